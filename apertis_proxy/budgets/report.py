"""A key's budget as the CLI reports it: its quota period and what it spent in it."""
from __future__ import annotations

from typing import Any

from ..store import budgets as budget_store
from .periods import current_bounds


def key_budget(conn, key: dict[str, Any], now: float) -> dict[str, Any]:
    """For a key (as store.keys lists it): quota_period ("lifetime" when it never
    resets), period_start/period_end (UTC dates, end exclusive; None for lifetime),
    period_spent_cost/period_spent_tokens (settled spend in the current period;
    the lifetime spend for a lifetime quota)."""
    period = key.get("quota_period")
    start, end = current_bounds(period, now)
    if period is None:
        cost, tokens = key["spent_cost"], key["spent_tokens"]
    else:
        cost, tokens = budget_store.period_spend(conn, key["id"], period, start)
    return {"quota_period": period or "lifetime", "period_start": start, "period_end": end,
            "period_spent_cost": cost, "period_spent_tokens": tokens}


def percent_used(key: dict[str, Any], budget: dict[str, Any]) -> float | None:
    """How much of its quota a key used in the current period, in percent; None without a quota."""
    if key.get("quota_cost"):
        return 100.0 * budget["period_spent_cost"] / key["quota_cost"]
    if key.get("quota_tokens"):
        return 100.0 * budget["period_spent_tokens"] / key["quota_tokens"]
    return None
