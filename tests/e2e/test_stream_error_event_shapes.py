"""Streams whose watched events are not quite the documented shape: an in-band `event: error` whose `error` is a
bare string (what some relays in front of an upstream write) instead of an object, and a message_start whose
`message` is not an object.  The gateway should still end the client's stream properly (the events forwarded, the
chunked body terminated) and write a ledger row that says how the stream ended.  A real gateway (in process, real
sockets, the SQLite ledger), a ScriptedChannel."""
from __future__ import annotations

import asyncio

from tests.support.scripted_channel import HEAD_SSE, chunk, event, message_start
from tests.support.scripted_gateway import ask, post

STRING_ERROR = event("error", {"type": "error", "error": "overloaded"})


async def _answer_and_row(env) -> tuple:
    """(the answer, or None when its chunked body was cut; the cut; the request's ledger row)."""
    try:
        response, cut = await post(env, ask()), None
    except asyncio.IncompleteReadError as exc:
        response, cut = None, exc
    [row] = await env.usage_rows(1)
    return response, cut, row


async def test_an_in_band_error_given_as_a_string_ends_the_stream_and_its_row(scripted):
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, chunk(message_start(12)), chunk(STRING_ERROR), b"0\r\n\r\n"])
    response, cut, row = await _answer_and_row(scripted)
    assert cut is None, f"the client's chunked body was cut before its end ({cut!r}); row {dict(row)}"
    assert response.status == 200
    names = [name for name, _ in response.sse_events()]
    assert names[0] == "message_start" and names[-1] == "error", names
    assert row["input_tokens"] == 12
    assert row["error_type"] is not None, dict(row)


NOT_A_MESSAGE = event("message_start", {"type": "message_start", "message": "msg_scripted"})
DELTA = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 33}})
STOP = event("message_stop", {"type": "message_stop"})


async def test_a_message_start_whose_message_is_not_an_object_does_not_cut_the_stream(scripted):
    """The splicer reads message_start's `message` as an object; a string there is ignored like any malformed
    usage (the row keeps what the later events report), and the client gets the stream to its end."""
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, chunk(NOT_A_MESSAGE), chunk(DELTA), chunk(STOP), b"0\r\n\r\n"])
    response, cut, row = await _answer_and_row(scripted)
    assert cut is None, f"the client's chunked body was cut before its end ({cut!r}); row {dict(row)}"
    names = [name for name, _ in response.sse_events()]
    assert names == ["message_start", "message_delta", "message_stop"], \
        (names, row["error_type"], row["output_tokens"])
    assert row["output_tokens"] == 33 and row["error_type"] is None, dict(row)
