"""A stream whose upstream body is not chunked: delimited by the connection's close, or by a Content-Length (both
legal HTTP/1.1 framings of a response).  The client gets the events as sent and the row the stream's last usage.
A real gateway (in process, real sockets, the SQLite ledger), a ScriptedChannel that writes exact bytes."""
from __future__ import annotations

import pytest

from tests.support.scripted_channel import CLOSE, event, message_start
from tests.support.scripted_gateway import ask, post

TEXT = event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "hello"}})
DELTA = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 33}})
STOP = event("message_stop", {"type": "message_stop"})
SSE = message_start(12) + TEXT + DELTA + STOP
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nrequest-id: req_scripted\r\n"


@pytest.mark.parametrize("framing", ["close", "length"])
async def test_an_unchunked_stream_is_spliced_and_metered(scripted, framing):
    await scripted.start()
    if framing == "close":
        head = HEAD + b"connection: close\r\n\r\n"
    else:
        head = HEAD + b"content-length: %d\r\n\r\n" % len(SSE)
    reads = [SSE[:50], SSE[50:len(SSE) - 7], SSE[len(SSE) - 7:]]
    scripted.channel.queue([head, *reads, CLOSE])
    response = await post(scripted, ask())
    assert response.status == 200 and response.body == SSE
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["output_tokens"], row["error_type"]) == (12, 33, None)
