"""An upstream whose chunked body ends cleanly (the zero chunk) in the middle of an event: the half event is not
one the client can read (its `data:` is cut JSON).  sse.py: "if the upstream dies mid-event it is dropped, so the
in-band `event: error` the gateway then sends is never glued onto half an event"; flush() ends an unterminated
last event only because "an event at the very end can lack only its blank line".  So the client should get the
whole events, then the gateway's error event, and no event whose data is not JSON.  A real gateway (in process,
real sockets, the SQLite ledger), a ScriptedChannel that writes exact bytes."""
from __future__ import annotations

import json

import pytest

from tests.support.scripted_channel import HEAD_SSE, chunk, event, message_start
from tests.support.scripted_gateway import ask, post

TEXT = event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "hello"}})
DELTA = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 33}})


@pytest.mark.parametrize("cut_event", [TEXT, DELTA], ids=["text-delta", "message-delta"])
async def test_half_an_event_at_a_clean_end_is_not_forwarded(scripted, cut_event):
    await scripted.start()
    half = cut_event[:len(cut_event) - 20]
    scripted.channel.queue([HEAD_SSE, chunk(message_start(12)), chunk(TEXT), chunk(half), b"0\r\n\r\n"])
    response = await post(scripted, ask())
    assert response.status == 200
    events = response.sse_events()
    unreadable = []
    for name, data in events:
        try:
            json.loads(data)
        except ValueError:
            unreadable.append((name, data[-30:]))
    assert not unreadable, f"events forwarded with cut JSON: {unreadable}; all: {[n for n, _ in events]}"
    assert events[-1][0] == "error"
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["error_type"]) == (12, "api_error")
