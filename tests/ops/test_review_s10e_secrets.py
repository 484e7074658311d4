"""Adversarial review s10e: where an upstream credential can surface (CLI output, answers, the ledger) and how long
a dribbled head may hold a connection.

Each test names the attack; a failing one is a defect (see the assertion's message)."""
from __future__ import annotations

import asyncio
import json
import time

from tests.support.gateway_requests import message
from tests.support.rawhttp import RawConnection
from tests.support.scripted_channel import ScriptedChannel

CHANNEL_KEY = "sk-ant-api03-" + "Zq7xK2mP9vL4nR8tW1yB3cD5f"


async def test_an_upstream_request_id_quoting_the_channel_key_is_not_passed_on(gateway_env):
    """A relay that puts the credential it was sent into its `request-id` header (the body is redacted,
    the header is not): the client gets it as `upstream-request-id`, and the ledger row keeps it as
    upstream_request_id (headers.downstream_headers / forward._upstream_error copy it verbatim)."""
    async with ScriptedChannel() as channel:
        key = gateway_env.add_key("alice")
        gateway_env.add_channel("main", channel.base_url, api_key=CHANNEL_KEY)
        body = json.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": f"bad request for {CHANNEL_KEY}"}}).encode()
        channel.queue([b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nrequest-id: %s\r\n"
                       b"content-length: %d\r\n\r\n%s" % (CHANNEL_KEY.encode(), len(body), body)])
        await gateway_env.start()
        async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
            response = await conn.request("POST", "/v1/messages", {"x-api-key": key}, json_body=message())
        assert response.status == 400
        assert CHANNEL_KEY.encode() not in response.body        # the body is redacted: holds
        rows = await gateway_env.usage_rows(1)
        places = [where for where, text in (
            ("the answer's headers", json.dumps(response.headers)),
            ("the ledger row", json.dumps(rows)),
        ) if CHANNEL_KEY in text]
        assert not places, f"the channel's key, echoed in the upstream's request-id header, reached {places}"


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
