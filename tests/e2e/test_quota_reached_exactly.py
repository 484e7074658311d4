"""A USD quota reached exactly: ten requests of $0.10 each against a $1.00 quota. Their costs are exact in the
catalogue's decimal prices ($1 per million input tokens on Haiku 4.5, 100,000 input tokens each), and the ledger
holds ten rows of $0.10: the key has spent $1.00 of $1.00, so its next request is a 402 billing_error.

README "Budgets": "Once the spend settled in the current period reaches the quota, requests get 402".
"""
from __future__ import annotations

import json

import pytest

from tests.ops.test_budget_webhook_e2e import Receiver
from tests.support.gateway_requests import assert_error, message, poll, post

TENTH = json.dumps({"input_tokens": 100_000, "output_tokens": 0})    # $0.10 at Haiku 4.5's $1/M input
COSTED = {"x-mock-scenario": f"usage={TENTH}"}


def spend(env) -> float:
    rows = env.query("SELECT s.cost FROM key_spend s JOIN keys k ON k.id = s.key_id WHERE k.name = 'alice'")
    return rows[0][0] if rows else 0.0


@pytest.mark.parametrize("period", [None, "month"])
async def test_a_quota_spent_to_the_cent_is_402(gateway_env, mock_upstream, period):
    key = gateway_env.add_key("alice", quota_cost=1.0, quota_period=period)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    for n in range(10):
        answer = await post(gateway_env, key, message(f"tenth {n}"), COSTED)
        assert answer.status == 200, (n, answer.status, answer.body[:200])
        rows = await gateway_env.usage_rows(n + 1)
        assert rows[-1]["cost"] == pytest.approx(0.1, abs=1e-12)
        await poll(lambda: len(gateway_env.query("SELECT 1 FROM admissions")) == 0)     # settled by the ledger
    rows = await gateway_env.usage_rows(10)
    assert round(sum(r["cost"] for r in rows), 9) == 1.0           # spent to the cent

    eleventh = await post(gateway_env, key, message("one more"), COSTED)
    assert eleventh.status == 402, (eleventh.status, f"settled spend {spend(gateway_env)!r}",
                                    f"upstream served {len(mock_upstream.served)}")
    assert_error(eleventh, 402, "billing_error")
    assert len(mock_upstream.served) == 10


async def test_the_100_percent_alert_is_claimed_when_the_quota_is_spent_to_the_cent(gateway_env, mock_upstream):
    """The same ten $0.10 requests with `[budgets] thresholds = [100]`: the key's settled spend reached its $1.00
    quota, so the keys plugin's next check claims the 100% alert (README "Budgets": one alert per key, period and
    threshold reached)."""
    receiver = await Receiver(fail_first=0).start()
    try:
        key = gateway_env.add_key("alice", quota_cost=1.0)
        gateway_env.add_channel("main", mock_upstream)
        await gateway_env.start(budget_webhook_url=receiver.url, budget_thresholds=[100],
                                budget_webhook_backoff=0.1)
        for n in range(10):
            assert (await post(gateway_env, key, message(f"tenth {n}"), COSTED)).status == 200
            await gateway_env.usage_rows(n + 1)
        await poll(lambda: len(gateway_env.query("SELECT 1 FROM admissions")) == 0)
        rows = await gateway_env.usage_rows(10)
        assert round(sum(r["cost"] for r in rows), 9) == 1.0
        [(_, auth)] = gateway_env.gateway.plugins.auth
        await auth.refresh()            # flush and re-read the spend, then claim the thresholds reached
        claimed = [row[0] for row in gateway_env.query("SELECT threshold FROM budget_alerts")]
        assert claimed == [100], (f"settled spend {spend(gateway_env)!r}", claimed)
    finally:
        await receiver.close()
