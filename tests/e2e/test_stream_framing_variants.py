"""A stream whose upstream chunks are framed in the less usual legal ways (size in upper case, with an extension,
with leading zeros, trailers after the last chunk), split anywhere across reads (inside a size line, inside an
event), in CRLF line endings, with comments, `id:`/`retry:` fields and a run of pings: the client gets exactly the
events the upstream sent, and the ledger row the usage of the stream's last report.  A real gateway (in process,
real sockets, the SQLite ledger), a ScriptedChannel that writes exact bytes."""
from __future__ import annotations

import pytest

from tests.support.scripted_channel import HEAD_SSE, chunk, event, message_start
from tests.support.scripted_gateway import ask, post

DELTA = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 33}})
STOP = event("message_stop", {"type": "message_stop"})
TEXT = event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "hello"}})
PING = event("ping", {"type": "ping"})
START = message_start(12)
END = b"0\r\n\r\n"


def upper(data: bytes) -> bytes:
    return b"%X\r\n%s\r\n" % (len(data), data)


def ext(data: bytes) -> bytes:
    return b"%x;ext=1\r\n%s\r\n" % (len(data), data)


def zeros(data: bytes) -> bytes:
    return b"00%x\r\n%s\r\n" % (len(data), data)


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


# name: (the body's reads after the head, the SSE bytes they carry)
SHAPES = {
    "upper-case-size": ([upper(START), upper(TEXT + TEXT), upper(DELTA), upper(STOP), END],
                        START + TEXT + TEXT + DELTA + STOP),
    "size-extension": ([ext(START), ext(TEXT), ext(DELTA), ext(STOP), END], START + TEXT + DELTA + STOP),
    "leading-zeros": ([zeros(START), zeros(TEXT), zeros(DELTA), zeros(STOP), END], START + TEXT + DELTA + STOP),
    "delta-across-chunks": ([chunk(START), chunk(TEXT + DELTA[:9]), chunk(DELTA[9:] + STOP), END],
                            START + TEXT + DELTA + STOP),
    "reads-split-in-framing": ([chunk(START)[:7], chunk(START)[7:], chunk(PING)[:3],
                                chunk(PING)[3:] + chunk(DELTA)[:20], chunk(DELTA)[20:], chunk(STOP) + END],
                               START + PING + DELTA + STOP),
    "crlf-split-terminator": ([chunk(crlf(START)), chunk(crlf(TEXT)), chunk(crlf(DELTA)[:-1]),
                               chunk(crlf(DELTA)[-1:] + crlf(STOP)), END], crlf(START + TEXT + DELTA + STOP)),
    "pings-comments-fields": ([chunk(START), *[chunk(PING)] * 50, chunk(b": keepalive\n\n"),
                               chunk(b"id: 5\nretry: 100\n" + TEXT), chunk(DELTA), chunk(STOP), END],
                              START + PING * 50 + b": keepalive\n\n" + b"id: 5\nretry: 100\n" + TEXT + DELTA + STOP),
    "trailers": ([chunk(START), chunk(DELTA), chunk(STOP), b"0\r\nx-trailer: 1\r\n\r\n"], START + DELTA + STOP),
}


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_stream_reaches_the_client_as_sent_and_is_metered(scripted, shape):
    reads, sse = SHAPES[shape]
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, *reads])
    response = await post(scripted, ask())
    [row] = await scripted.usage_rows(1)
    assert response.status == 200 and response.body == sse
    assert (row["input_tokens"], row["output_tokens"], row["error_type"]) == (12, 33, None)
