"""A client that stops reading while the upstream goes on, then leaves: the upstream connection paused for the
slow client is read again by the drain, and the final usage counts.  In-process gateway, real sockets, the SQLite
ledger, a tiny upstream writing exact bytes."""
from __future__ import annotations

import asyncio
import socket

from apertis_proxy.gateway import relay

from tests.e2e.test_drain_e2e import FINAL_OUTPUT, HeldUpstream, _delta
from tests.support.gateway_requests import poll
from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, chunk, event, message_start, text_events
from tests.support.scripted_gateway import CHANNEL_KEY, ask


async def test_a_client_that_stops_reading_then_leaves_is_metered_with_the_final_usage(gateway_env, monkeypatch):
    # More than the kernel buffers between the gateway and a stalled client hold (tcp_wmem's 4 MiB at most); the
    # drain's byte bound (test_drain_e2e.py) is lifted so that only the hand-over is tested here.
    monkeypatch.setattr(relay, "DRAIN_BYTES", 256 * 1024 * 1024)
    block_start = text_events("x")[0]
    opening = [HEAD_SSE, chunk(message_start(input_tokens=12)), chunk(block_start)]
    filler = chunk(b"".join(_delta("word " * 50) for _ in range(60)))         # ~17 KB per chunk
    final = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                        "stop_sequence": None},
                                    "usage": {"output_tokens": FINAL_OUTPUT}})
    tail = [filler] * 720 + [chunk(event("content_block_stop", {"type": "content_block_stop", "index": 0})),
                             chunk(final), chunk(MESSAGE_STOP), b"0\r\n\r\n"]
    async with HeldUpstream(opening, tail) as upstream:
        key = gateway_env.add_key("alice")
        gateway_env.add_channel("main", upstream.base_url, api_key=CHANNEL_KEY)
        gateway = await gateway_env.start()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((gateway.host, gateway.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        conn = RawConnection(reader, writer)
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key}, json_body=ask()))
        assert (await conn.read_head()).status == 200
        upstream.go.set()
        # The client reads nothing more: the gateway falls behind writing to it and stops reading upstream.
        await poll(lambda: any(c.flow.write_paused for c in gateway.state.connections), timeout=30.0)
        assert not upstream.done.is_set()
        conn.abort()
        [row] = await gateway_env.usage_rows(1, timeout=10.0)
        await asyncio.wait_for(upstream.done.wait(), 10)
    assert (row["interrupted"], row["input_tokens"], row["output_tokens"]) == (1, 12, FINAL_OUTPUT)
