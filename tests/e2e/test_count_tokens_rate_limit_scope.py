"""Token counting is free and takes none of a key's limits because the API limits it apart from messages (README,
"Limits").  So a 429 on a count_tokens call tells of the account's counting limit only: it must not rest the channel
for everyone's Messages requests, or any one key, however tightly limited, could flood counting (which its `--rpm`
does not hold) and take the shared channel away from every other user."""
from __future__ import annotations

from tests.support.gateway_requests import HAIKU, message
from tests.support.rawhttp import RawConnection

RATE_LIMITED = "status=429; error-type=rate_limit_error; retry-after=30"


async def test_a_rate_limited_count_tokens_call_does_not_rest_the_channel_for_messages(gateway_env, mock_upstream):
    counter = gateway_env.add_key("counter", rpm=1)
    alice = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        counted = await conn.request("POST", "/v1/messages/count_tokens",
                                     {"x-api-key": counter, "x-mock-scenario": RATE_LIMITED},
                                     json_body={"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]})
    assert counted.status == 429, counted.body          # the upstream's counting limit, passed on
    sent_before = len(mock_upstream.requests)
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        answered = await conn.request("POST", "/v1/messages", {"x-api-key": alice}, json_body=message())
    assert answered.status == 200, answered.body
    assert len(mock_upstream.requests) == sent_before + 1
    await gateway_env.stop()
