"""When the only upstream account of a model reached its spend limit, the gateway rests its channel for an hour
(`cooldown_exhausted`) and answers the next requests 503 with that wait as `retry-after`. The official SDK (2.17,
`_calculate_retry_timeout`) sleeps whatever `retry-after` says, so a call retried into that 503 hangs for an hour
instead of failing: an answer that no client retry loop should wait for must say `x-should-retry: false` (or not
ask for such a wait)."""
from __future__ import annotations

import json

from tests.support.rawhttp import RawConnection

HAIKU = "claude-haiku-4-5-20251001"
BODY = json.dumps({"model": HAIKU, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def post(env):
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("POST", "/v1/messages", {"x-api-key": env.key, "content-type": "application/json"},
                                  BODY)


async def test_the_503_after_a_spend_limit_does_not_send_the_sdk_to_sleep_for_an_hour(gateway):
    gateway.mock.fail_next(429, error_code="contract_spend_limit_reached", error_type="rate_limit_error")
    first = await post(gateway)
    assert first.status == 429 and first.json()["error"]["details"]["error_code"] == "contract_spend_limit_reached"
    resting = await post(gateway)
    assert resting.status == 503, resting.body
    assert len(gateway.mock.requests) == 1
    wait = float(resting.header("retry-after"))
    # What the SDK does with this answer: retry it (no x-should-retry: false), after `retry-after` seconds.
    sleeps = resting.header("x-should-retry") != "false" and wait > 60
    assert not sleeps, f"the SDK would retry after sleeping {wait:.0f} s (retry-after {resting.header('retry-after')})"
