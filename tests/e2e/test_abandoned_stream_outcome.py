"""A stream whose client left is drained for its usage; when the upstream then fails (an in-band overloaded_error,
or a cut before message_stop), the row says so, as it does for a client still reading: the ledger's `errors`
and the channel's health must not count an upstream failure as a success because nobody was listening.

A real gateway (in process, real sockets, the SQLite ledger) in front of a ScriptedChannel writing exact bytes."""
from __future__ import annotations

import pytest

from tests.support.rawhttp import RawConnection
from tests.support.scripted_channel import CLOSE, HEAD_SSE, chunk, event, message_start, text_events
from tests.support.scripted_gateway import ask, stream_until

OVERLOADED = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
ENDINGS = {
    "error-event": ([chunk(OVERLOADED), b"0\r\n\r\n"], "overloaded_error"),
    "cut": ([CLOSE], "api_error"),
}


async def _leave_after_message_start(env) -> None:
    conn, _ = await stream_until(env, b"message_start")
    conn.abort()


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_an_upstream_failure_after_the_client_left_is_kept_in_the_row(scripted, ending):
    steps, error_type = ENDINGS[ending]
    await scripted.start()
    opening = [message_start(12), *text_events("partial", 9)[:2]]     # a block started, no message_delta
    scripted.channel.queue([HEAD_SSE, chunk(opening[0]), 0.4, *(chunk(e) for e in opening[1:]), *steps])
    await _leave_after_message_start(scripted)
    await scripted.channel.wait_finished(1)
    [row] = await scripted.usage_rows(1)
    assert (row["interrupted"], row["input_tokens"]) == (1, 12)
    assert row["error_type"] == error_type, (row["status"], row["error_type"])


async def test_control_the_same_failure_with_the_client_reading_is_kept(scripted):
    """Control (passes): the client reads on; the in-band overloaded_error is the row's error_type."""
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, chunk(message_start(12)), *(chunk(e) for e in text_events("p", 9)[:2]),
                            chunk(OVERLOADED), b"0\r\n\r\n"])
    async with await RawConnection.open(scripted.gateway.host, scripted.gateway.port) as conn:
        response = await conn.request("POST", "/v1/messages", {"x-api-key": scripted.key}, json_body=ask())
    assert response.status == 200
    [row] = await scripted.usage_rows(1)
    assert row["error_type"] == "overloaded_error"
