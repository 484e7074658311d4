"""A client that stops reading for a while in the middle of a stream and then reads it to its end: the gateway
pauses the upstream (backpressure) while bulk reads, paced one-chunk reads (passed through as they came) and usage
events go by, and the client still gets every byte in order, the ledger row the stream's last usage.  A real
gateway (in process, real sockets, the SQLite ledger), a ScriptedChannel that writes exact bytes."""
from __future__ import annotations

import asyncio
import socket

from apertis_proxy.upstream.connection import UpstreamConnection

from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.scripted_channel import HEAD_SSE, chunk, event, message_start
from tests.support.scripted_gateway import ask


def text(i: int) -> bytes:
    return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": f"{i:05d} " + "w" * 1500}})


def delta(output_tokens: int) -> bytes:
    return event("message_delta", {"type": "message_delta", "delta": {"stop_reason": None},
                                   "usage": {"output_tokens": output_tokens}})


PING = event("ping", {"type": "ping"})
STOP = event("message_stop", {"type": "message_stop"})


async def test_a_reader_that_stalls_then_resumes_gets_every_byte_and_the_row_the_last_usage(scripted, monkeypatch):
    pauses = []
    pause = UpstreamConnection.pause
    monkeypatch.setattr(UpstreamConnection, "pause", lambda self: (pauses.append(1), pause(self))[1])
    await scripted.start()
    bulk = [text(i) for i in range(3000)]           # ~4.5 MB, more than the sockets between hold
    paced = [text(i) for i in range(3000, 3040)] + [PING] * 20
    sse = (message_start(12) + b"".join(bulk[:1500]) + delta(700) + b"".join(bulk[1500:]) + b"".join(paced)
           + delta(900) + STOP)
    script = [HEAD_SSE, chunk(message_start(12)),
              b"".join(chunk(e) for e in bulk[:1500]) + chunk(delta(700)),
              b"".join(chunk(e) for e in bulk[1500:]),
              *(chunk(e) for e in paced), chunk(delta(900)), chunk(STOP), b"0\r\n\r\n"]
    scripted.channel.queue(script)
    async with await RawConnection.open(scripted.gateway.host, scripted.gateway.port) as conn:
        conn.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": scripted.key}, json_body=ask()))
        head = await conn.read_head()
        assert head.status == 200
        got = []
        async for piece in conn.iter_chunks(head):
            got.append(piece)
            if len(got) == 2:
                await asyncio.sleep(0.5)            # stall: the kernel buffers fill and the gateway pauses
    assert pauses, "the stall never paused the upstream: the test did not test backpressure"
    body = b"".join(got)
    assert len(body) == len(sse) and body == sse
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["output_tokens"], row["error_type"], row["interrupted"]) == (12, 900, None, 0)
