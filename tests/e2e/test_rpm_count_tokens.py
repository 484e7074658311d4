"""Counting tokens is free and rate-limited apart from messages by the API itself; a key's `--rpm` is a budget of
messages requests. A client that counts its prompt before sending it (as Claude Code and SDK users do) should not
find its minute spent on the counting: with `--rpm 2`, two count_tokens calls, then the two messages they measured.
"""
from __future__ import annotations

import asyncio

from apertis_proxy.store import keys as key_store
from tests.support.gateway_requests import HAIKU, assert_error, message, post
from tests.support.rawhttp import RawConnection


async def count(env, key: str, model: str = HAIKU):
    body = message("how long is this?", model=model)
    del body["max_tokens"], body["stream"]
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("POST", "/v1/messages/count_tokens", {"x-api-key": key}, json_body=body)


async def test_counting_tokens_does_not_use_the_keys_requests_per_minute(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice", rpm=2)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    for _ in range(2):
        counted = await count(gateway_env, key)
        assert counted.status == 200 and counted.json()["input_tokens"] > 0
    answers = [await post(gateway_env, key, message(f"send {n}")) for n in range(2)]
    assert [a.status for a in answers] == [200, 200], [(a.status, a.header("retry-after")) for a in answers]


async def test_counting_tokens_skips_the_keys_limits_but_not_its_checks(gateway_env, mock_upstream):
    """A key whose quota is used up and whose one concurrency slot would be taken still counts tokens (README
    "Limits"); its allow-list and its being disabled still apply."""
    key = gateway_env.add_key("alice", models=[HAIKU], quota_cost=0.0, concurrency=1)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    assert_error(await post(gateway_env, key, message("spent")), 402, "billing_error")
    assert (await count(gateway_env, key)).status == 200
    assert_error(await count(gateway_env, key, "claude-sonnet-4-5"), 403, "permission_error")
    key_store.set_key_enabled(gateway_env.conn, "alice", False)
    for _ in range(100):            # the plugin reloads the key within ~0.1 s
        counted = await count(gateway_env, key)
        if counted.status != 200:
            break
        await asyncio.sleep(0.05)
    assert_error(counted, 401, "authentication_error")
