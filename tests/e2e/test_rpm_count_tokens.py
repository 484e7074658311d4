"""Counting tokens is free and rate-limited apart from messages by the API itself; a key's `--rpm` is a budget of
messages requests. A client that counts its prompt before sending it (as Claude Code and SDK users do) should not
find its minute spent on the counting: with `--rpm 2`, two count_tokens calls, then the two messages they measured.
"""
from __future__ import annotations

from tests.support.gateway_requests import message, post
from tests.support.rawhttp import RawConnection


async def test_counting_tokens_does_not_use_the_keys_requests_per_minute(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice", rpm=2)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    body = message("how long is this?")
    del body["max_tokens"], body["stream"]
    for _ in range(2):
        async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
            counted = await conn.request("POST", "/v1/messages/count_tokens", {"x-api-key": key}, json_body=body)
        assert counted.status == 200 and counted.json()["input_tokens"] > 0
    answers = [await post(gateway_env, key, message(f"send {n}")) for n in range(2)]
    assert [a.status for a in answers] == [200, 200], [(a.status, a.header("retry-after")) for a in answers]
