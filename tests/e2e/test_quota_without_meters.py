"""README, "Configuration": `meter = ["sqlite"]  # [] turns metering off`; docs/plugins.md: the keys plugin settles
spend itself "when no meter settles it with the ledger" (`ctx.meters` without `sqlite`).

With metering off, a key's token quota still holds: requests are served until the quota is used up, overshot by at
most one request, then refused 402 `billing_error`."""
from __future__ import annotations

from tests.support.rawhttp import RawConnection

BODY = {"model": "claude-haiku-4-5-20251001", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
QUOTA = 200          # tokens; the mock answers each request with 6 input and 6 output tokens


async def test_a_token_quota_holds_with_metering_turned_off(gateway_env, mock_upstream):
    gateway_env.add_channel("main", mock_upstream)
    key = gateway_env.add_key("alice", quota_tokens=QUOTA)
    gw = await gateway_env.start(meter_plugins=[])
    port = int(gw.base_url.rsplit(":", 1)[1])
    statuses, tokens = [], 0
    async with await RawConnection.open("127.0.0.1", port) as conn:
        for _ in range(QUOTA // 12 + 6):
            response = await conn.request("POST", "/v1/messages", {"x-api-key": key}, json_body=BODY)
            statuses.append(response.status)
            if response.status == 200:
                usage = response.json()["usage"]
                tokens += usage["input_tokens"] + usage["output_tokens"]
            else:
                assert response.json()["error"]["type"] == "billing_error", response.body
    assert 402 in statuses, statuses
    served = statuses.index(402)
    assert statuses[served:] == [402] * (len(statuses) - served), statuses
    assert QUOTA <= tokens < QUOTA + 12, (tokens, statuses)
    assert gateway_env.query("SELECT COUNT(*) FROM usage")[0][0] == 0      # no ledger rows: metering is off
