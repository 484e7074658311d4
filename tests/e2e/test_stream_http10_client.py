"""A stream to an HTTP/1.0 client (no chunked coding: the body ends with the connection), whose upstream chunks
would pass through as they came to an HTTP/1.1 client (paced one-chunk reads of pings and text): the client gets
the events as sent, without chunk framing, and the row the stream's last usage.  A real gateway (in process, real
sockets, the SQLite ledger), a ScriptedChannel that writes exact bytes."""
from __future__ import annotations

from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.scripted_channel import HEAD_SSE, chunk, event, message_start
from tests.support.scripted_gateway import ask

TEXT = event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "hello"}})
PING = event("ping", {"type": "ping"})
DELTA = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 33}})
STOP = event("message_stop", {"type": "message_stop"})


async def test_an_http10_client_gets_the_stream_unframed(scripted):
    await scripted.start()
    events = [message_start(12), PING, TEXT, PING, TEXT, DELTA, STOP]
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in events), b"0\r\n\r\n"])
    wire = request_bytes("POST", "/v1/messages", {"x-api-key": scripted.key}, json_body=ask())
    wire = wire.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    async with await RawConnection.open(scripted.gateway.host, scripted.gateway.port) as conn:
        await conn.send(wire)
        head = await conn.read_head()
        body = await conn.read_until_eof()
    assert head.status == 200 and not head.is_chunked
    assert body == b"".join(events)
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["output_tokens"], row["error_type"]) == (12, 33, None)
