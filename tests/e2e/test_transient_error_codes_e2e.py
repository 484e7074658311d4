"""Upstream answers of December 2026 that are the server's, not the request's: a 529 with an error code fails
over and rests its channel; events before message_start reach the client as they came."""
from __future__ import annotations

import time

import pytest

from tests.support.gateway_requests import message, post
from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, chunk, event, message_start, text_events
from tests.support.scripted_gateway import ask
from tests.support.scripted_gateway import post as post_scripted


async def two_channels(gateway_env, make_mock_upstream):
    first, second = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("first", first, priority=1)
    gateway_env.add_channel("second", second, priority=0)
    await gateway_env.start()
    return key, first, second


# -- 529 compaction_unavailable ----------------------------------------------------------------------------------

async def test_a_529_compaction_unavailable_is_transient_and_fails_over(gateway_env, make_mock_upstream):
    """SDK 2.17 `_error_classes.py` maps (529, "compaction_unavailable") to CompactionUnavailableError, an
    OverloadedError documented as "could not be completed for a transient server reason. Retry the request.":
    the next channel serves it (a 4xx with a `compaction_` code is the request's and would not fail over)."""
    key, first, second = await two_channels(gateway_env, make_mock_upstream)
    first.fail_next(529, error_type="overloaded_error", error_code="compaction_unavailable")
    response = await post(gateway_env, key, message())
    assert [r.status for r in first.requests] == [529]
    assert response.status == 200 and len(second.served) == 1, (
        f"a transient 529 compaction_unavailable from the first channel was not failed over: the client got "
        f"{response.status} {response.body[:160]!r} and the second channel received {len(second.requests)} requests")


async def test_a_529_compaction_unavailable_rests_the_channel_like_any_overload(gateway_env, make_mock_upstream):
    """The channel that answered it rests like one answering a plain 529 overloaded_error."""
    key, first, second = await two_channels(gateway_env, make_mock_upstream)
    router = gateway_env.gateway.plugins.routers[0][1]
    first.fail_next(529, error_type="overloaded_error", error_code="compaction_unavailable")
    await post(gateway_env, key, message())
    [first_id] = gateway_env.query("SELECT id FROM channels WHERE name = 'first'")[0]
    assert router.cool_until.get(first_id, 0) > time.monotonic(), (
        "a channel answering 529 compaction_unavailable (transient overload) was given no cooldown")


# -- before message_start ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("opening", [
    [event("ping", {"type": "ping"})],
    [event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded",
                                                 "details": {"error_code": "compaction_unavailable"}},
                     "request_id": "req_upstream_inband"})],
], ids=["ping-before-message-start", "only-an-error-event"])
async def test_events_before_message_start_reach_the_client_byte_for_byte(scripted, opening):
    await scripted.start()
    events = opening if opening[0].startswith(b"event: error") else [
        *opening, message_start(), *text_events("after a ping"), MESSAGE_STOP]
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in events), b"0\r\n\r\n"])
    response = await post_scripted(scripted, ask())
    assert response.status == 200
    assert response.body == b"".join(events)
    assert response.header("upstream-request-id") == "req_scripted"
