"""Exact limits, decided without a store: a USD quota and a budget alert's threshold reached at the ledger's
precision (admissions.COST_TOLERANCE), and an rpm refusal's retry-after counted from the admission that frees a slot
(admissions.decide, and the keys plugin's share of a limit while the store is away)."""
from __future__ import annotations

import logging

import pytest

from apertis_plugins.keys_auth import KeyState, KeysAuth, _Refusal
from apertis_proxy.budgets.alerts import QuotaUse, reached
from apertis_proxy.plugin_api import PluginContext
from apertis_proxy.store.admissions import Limits, Use, decide

TEN_TENTHS = sum([0.1] * 10)        # 0.9999999999999999: ten $0.10 ledger rows summed in floating point


def use(spent_cost: float = 0.0, recent: int = 0, freeing_at: float | None = None) -> Use:
    return Use(spent_cost=spent_cost, spent_tokens=0, live=0, live_cost=0.0, live_tokens=0, recent=recent,
               freeing_at=freeing_at)


def test_a_usd_quota_spent_to_the_cent_is_reached_and_a_hair_below_it_is_not():
    assert TEN_TENTHS < 1.0
    assert decide(Limits(1, quota_cost=1.0), use(TEN_TENTHS), 0.0, 0.0, 0).reason == "quota"
    assert decide(Limits(1, quota_cost=1.0), use(1.0 - 1e-10), 0.0, 0.0, 0).admitted


def test_an_rpm_refusal_retries_when_its_freeing_admission_leaves_the_minute():
    assert decide(Limits(1, rpm=1), use(recent=3, freeing_at=100.0), 130.0, 0.0, 0).retry_after == 30


@pytest.mark.parametrize("spend, quota, unit, threshold, expected", [
    (TEN_TENTHS, 1.0, "usd", 100, True),
    (1.0 - 1e-10, 1.0, "usd", 100, False),
    (0.8, 1.0, "usd", 80, True),
    (99, 100, "tokens", 100, False),
    (100, 100, "tokens", 100, True),
    (5, 0, "tokens", 100, True),
    (5, 0, "tokens", 120, False),
])
def test_a_budget_alerts_threshold_is_reached_at_the_ledgers_precision(spend, quota, unit, threshold, expected):
    assert reached(QuotaUse(1, "alice", None, None, unit, spend, quota), threshold) is expected


def test_a_shrunk_share_of_rpm_retries_when_the_admission_that_brings_it_under_leaves():
    """Admitting alone with the store away: three admissions of this process in the minute and a share of 1 (more
    processes hold leases now): a slot frees when the newest leaves, not the oldest."""
    auth = KeysAuth(PluginContext(name="keys", options={}, db_path=":memory:", log=logging.getLogger("test"),
                                  workers=1))
    key = KeyState(id=1, name="alice", key_hash="h", rpm=3)
    key.recent.extend([100.0, 130.0, 131.0])
    with pytest.raises(_Refusal) as refused:
        auth._check_rpm(key, 140.0, 1)
    assert refused.value.reason == "rpm" and refused.value.reject.headers["retry-after"] == "51"
