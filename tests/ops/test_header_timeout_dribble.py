"""Slowloris: a request head dribbled a byte at a time gets no more than header_timeout in all (README: "a request
head must arrive within this"), however often a byte comes."""
from __future__ import annotations

import asyncio
import time

from tests.support.rawhttp import RawConnection


async def test_a_head_dribbled_byte_by_byte_is_cut_at_header_timeout(gateway_env, mock_upstream):
    """Slowloris: one byte of the head every 0.1 s, each read resetting nothing: the head must arrive
    within header_timeout as a whole (README: "a request head must arrive within this")."""
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(header_timeout=0.5)
    head = b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: " + key.encode() + b"\r\nx-pad: " + b"a" * 200
    conn = await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port)
    start = time.monotonic()

    async def until_closed() -> float:
        try:
            await asyncio.wait_for(conn.reader.read(), 3.0)       # to EOF (a 408 may come first)
        except (ConnectionError, OSError):
            pass
        return time.monotonic() - start

    closing = asyncio.create_task(until_closed())
    try:
        for byte in head:
            if closing.done():
                break
            conn.writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        closed_after = await closing
    finally:
        closing.cancel()
        conn.writer.transport.abort()
    assert closed_after is not None and closed_after < 2.0, (
        f"a head dribbled a byte every 50 ms was still open after {time.monotonic() - start:.1f}s "
        "with header_timeout 0.5s")
