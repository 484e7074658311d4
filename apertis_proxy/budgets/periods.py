"""Quota periods, in UTC: a calendar day, an ISO week (from Monday) or a calendar month.

A period is named by its first day ("2026-12-01"), which is also how spend per
period is keyed in the store; a lifetime quota has the period None.
"""
from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone
from typing import Optional

PERIODS = ("day", "week", "month")


def period_start(period: str, now: float) -> str:
    """The first day (ISO date) of the `period` that contains unix time `now`: its whole second's, as the
    ledger settles a row (datetime would round a fraction to the microsecond, into the next day at midnight)."""
    today = datetime.fromtimestamp(math.floor(now), timezone.utc).date()
    if period == "day":
        return today.isoformat()
    if period == "week":
        return (today - timedelta(days=today.weekday())).isoformat()
    if period == "month":
        return today.replace(day=1).isoformat()
    raise ValueError(f"unknown quota period {period!r}; use one of {', '.join(PERIODS)}")


def period_end(period: str, start: str) -> str:
    """The first day of the next period (exclusive end)."""
    first = date.fromisoformat(start)
    if period == "day":
        return (first + timedelta(days=1)).isoformat()
    if period == "week":
        return (first + timedelta(days=7)).isoformat()
    if period == "month":
        return (first.replace(year=first.year + 1, month=1) if first.month == 12
                else first.replace(month=first.month + 1)).isoformat()
    raise ValueError(f"unknown quota period {period!r}; use one of {', '.join(PERIODS)}")


def current_bounds(period: Optional[str], now: float) -> tuple[Optional[str], Optional[str]]:
    """(start, end) of the current period, or (None, None) for a lifetime quota."""
    if period is None:
        return None, None
    start = period_start(period, now)
    return start, period_end(period, start)
