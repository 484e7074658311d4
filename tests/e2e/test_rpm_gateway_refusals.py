"""Requests the gateway refuses itself, without any upstream attempt (a body that breaks the request contract, a
model no channel serves, every channel cooling down), are not admissions a key's requests-per-minute limit should
count: the window is "the admissions of the last 60 s" of requests that were let through to be served.

A client whose first requests were malformed, or whose SDK retried a 503 while every channel rested, must still get
its `rpm` real requests in that minute.
"""
from __future__ import annotations

import asyncio

from tests.support.gateway_requests import HAIKU, assert_error, message, post
from tests.support.rawhttp import RawConnection

OPUS = "claude-opus-4-1-20250805"


async def test_requests_refused_as_malformed_do_not_use_the_minute(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice", rpm=2)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    no_max_tokens = {"model": HAIKU, "messages": [{"role": "user", "content": "hello"}]}
    for _ in range(2):
        assert_error(await post(gateway_env, key, no_max_tokens), 400, "invalid_request_error")
    assert not mock_upstream.requests           # refused by the gateway: nothing went upstream

    served = await post(gateway_env, key, message())
    assert served.status == 200, (served.status, served.header("retry-after"), served.body[:200])


async def test_requests_for_a_model_no_channel_serves_do_not_use_the_minute(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice", rpm=2)
    gateway_env.add_channel("main", mock_upstream, models=[HAIKU])
    await gateway_env.start()
    for _ in range(2):
        assert_error(await post(gateway_env, key, message(model=OPUS)), 404, "not_found_error")
    assert not mock_upstream.requests

    served = await post(gateway_env, key, message())
    assert served.status == 200, (served.status, served.header("retry-after"), served.body[:200])


async def test_503s_while_every_channel_rests_do_not_use_the_minute(gateway_env, mock_upstream):
    """The one channel answers 529 and rests for 1 s; meanwhile the gateway answers the key's next two requests 503
    itself (what the SDKs retry at once). Only the 529 reached an upstream; once the channel is back the key still
    has the rest of its minute (rpm 3: the 529, and two more)."""
    key = gateway_env.add_key("alice", rpm=3)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(plugin_options={"channels": {"cooldown_overloaded": 1.0}})
    mock_upstream.queue("status=529")
    first = await post(gateway_env, key, message())
    assert first.status == 529
    for _ in range(2):
        assert_error(await post(gateway_env, key, message()), 503, "overloaded_error")
    assert len(mock_upstream.requests) == 1
    await asyncio.sleep(1.2)                    # the channel's rest is over

    answers = [await post(gateway_env, key, message(f"after {n}")) for n in range(2)]
    assert [a.status for a in answers] == [200, 200], [(a.status, a.header("retry-after")) for a in answers]


async def test_a_batch_refused_to_a_key_with_a_quota_does_not_use_the_minute(gateway_env, mock_upstream):
    """A key with a quota may not create batches (403 permission_error, nothing sent upstream): the refused create
    is not one of the key's requests per minute."""
    key = gateway_env.add_key("alice", quota_cost=25.0, rpm=1)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    batch = {"requests": [{"custom_id": "one", "params": message("a question")}]}
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        refused = await conn.request("POST", "/v1/messages/batches", {"x-api-key": key}, json_body=batch)
    assert_error(refused, 403, "permission_error")
    assert not mock_upstream.requests

    served = await post(gateway_env, key, message())
    assert served.status == 200, (served.status, served.header("retry-after"), served.body[:200])
