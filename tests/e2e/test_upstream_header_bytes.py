"""Bytes in an upstream's header values that HTTP does not allow there (controls other than HTAB, and DEL) never
reach the client's response head. h11 tolerates them (its field grammar only excludes NUL and whitespace), the fast
head parser declines such a head and leaves it to h11, and the gateway passes `content-type` and `cache-control`
down as read: a client's strict parser (Node's, under the official JavaScript SDK) refuses the whole response, which
the gateway has answered and metered. The answer must be the same with the fast path on or off."""
from __future__ import annotations

import json
import re

import pytest

from tests.support.scripted_gateway import ask, post

MESSAGE = {"id": "msg_scripted", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001",
           "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 3, "output_tokens": 5}}
RAW = json.dumps(MESSAGE).encode()
# What RFC 9110 section 5.5 allows in a field value: VCHAR, obs-text, SP and HTAB.
_NOT_A_FIELD_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def answer(*lines: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines)
            + b"request-id: req_scripted\r\ncontent-length: %d\r\n\r\n%s" % (len(RAW), RAW))


def head_lines(raw: bytes) -> list[bytes]:
    return raw[:raw.index(b"\r\n\r\n")].split(b"\r\n")


@pytest.mark.parametrize("fast_heads", [True, False], ids=["fast-heads", "h11-only"])
@pytest.mark.parametrize("lines", [
    (b"content-type: application/json\x01",),
    (b"content-type: application/json; x=\x7f",),
    (b"content-type: application/json", b"cache-control: no-\x1fstore"),
    (b"content-type: application/\x0bjson",),         # h11 refuses this one: a 502
], ids=["soh", "del", "unit-separator", "vertical-tab"])
async def test_control_bytes_in_an_upstream_header_never_reach_the_client(scripted, fast_heads, lines):
    scripted.channel.queue([answer(*lines)])
    await scripted.start(fast_heads=fast_heads)
    response = await post(scripted, ask(stream=False))
    bad = [head for head in head_lines(response.raw) if _NOT_A_FIELD_BYTE.search(head)]
    assert bad == [], f"status {response.status}: the gateway wrote {bad!r}"


@pytest.mark.parametrize("fast_heads", [True, False], ids=["fast-heads", "h11-only"])
async def test_plain_and_obs_text_values_are_passed_down(scripted, fast_heads):
    scripted.channel.queue([answer(b"content-type: application/json; charset=\xe9", b"cache-control: no-store")])
    await scripted.start(fast_heads=fast_heads)
    response = await post(scripted, ask(stream=False))
    assert response.status == 200 and response.json() == MESSAGE
    assert response.header("cache-control") == "no-store"
