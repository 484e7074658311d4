"""An upstream's status line with a code outside 100-599 (RFC 9110 section 15: such values are invalid) is an invalid
answer, like a malformed head: the client gets the gateway's 502 `api_error`, never a status line of its own that
no HTTP/1.1 client is bound to accept.  The fast head parser declines these (it takes 200-599 only), so h11 reads
them; the answer must be the same with the fast path on or off.  An in-range code with no reason, or an odd reason,
is an ordinary answer."""
from __future__ import annotations

import json

import pytest

from tests.support.scripted_gateway import ask, post

MESSAGE = {"id": "msg_scripted", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001",
           "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 3, "output_tokens": 5}}
RAW = json.dumps(MESSAGE).encode()
PARSERS = pytest.mark.parametrize("fast_heads", [True, False], ids=["fast-heads", "h11-only"])


def answer(status_line: bytes) -> bytes:
    return (status_line + b"\r\ncontent-type: application/json\r\nrequest-id: req_scripted\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(RAW), RAW))


@PARSERS
@pytest.mark.parametrize("status_line", [b"HTTP/1.1 600 Weird", b"HTTP/1.1 999 Custom", b"HTTP/1.1 099 Low"],
                         ids=["600", "999", "099"])
async def test_status_outside_the_http_range_is_an_invalid_upstream_answer(scripted, fast_heads, status_line):
    scripted.channel.queue([answer(status_line)])
    await scripted.start(fast_heads=fast_heads)
    response = await post(scripted, ask(stream=False))
    status_line_sent = response.raw.partition(b"\r\n")[0]
    assert 100 <= response.status <= 599, f"the gateway wrote the status line {status_line_sent!r}"
    assert response.status == 502 and response.json()["error"]["type"] == "api_error", response.body


@PARSERS
@pytest.mark.parametrize("status_line", [b"HTTP/1.1 200", b"HTTP/1.1 200 ", b"HTTP/1.1 200 \tall good\t",
                                         b"HTTP/1.0 200 OK"], ids=["no-reason", "empty-reason", "odd-reason",
                                                                   "http-1.0"])
async def test_regular_status_line_variants_are_answers(scripted, fast_heads, status_line):
    scripted.channel.queue([answer(status_line)])
    await scripted.start(fast_heads=fast_heads)
    response = await post(scripted, ask(stream=False))
    assert response.status == 200 and response.json() == MESSAGE
