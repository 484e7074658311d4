"""Budget alerts: when a key's settled spend reaches a threshold (a percentage of
its quota) in the current period, POST it to the operator's webhook, once.

"Once" across worker processes and hosts: every worker sees the same settled
spend, and each alert is claimed with an INSERT into `budget_alerts` before it
is sent; only the worker whose INSERT took it sends.  Deliveries run as
background tasks with retries (see webhook.py); their outcomes are queued here
and written by the next tick, through the store.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

from ..store import budgets as budget_store
from ..store.admissions import COST_TOLERANCE
from . import webhook
from .periods import period_end

DEFAULT_THRESHOLDS = (80, 100)
LIFETIME = "lifetime"       # the period name of a quota that never resets
SHUTDOWN_GRACE = 2.0        # seconds deliveries in progress get at shutdown


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """What one key has spent of its quota in the current period."""

    key_id: int
    key_name: str
    period: Optional[str]       # None: a lifetime quota
    start: Optional[str]        # the period's first day (None for lifetime)
    unit: str                   # "usd" or "tokens"
    spend: float
    quota: float


@dataclass(frozen=True, slots=True)
class AlertConfig:
    url: str
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
    attempts: int = 5
    backoff: float = 1.0        # seconds before the second attempt; doubled each time


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def payload(use: QuotaUse, threshold: int, now: float) -> dict[str, Any]:
    return {
        "type": "budget_alert",
        "key": use.key_name,
        "key_id": use.key_id,
        "period": use.period or LIFETIME,
        "period_start": use.start,
        "period_end": period_end(use.period, use.start) if use.period and use.start else None,
        "unit": use.unit,
        "spend": use.spend,
        "quota": use.quota,
        "threshold": threshold,
        "percent": round(100.0 * use.spend / use.quota, 2) if use.quota else 100.0,
        "fired_at": _iso(now),
    }


def reached(use: QuotaUse, threshold: int) -> bool:
    """Whether `use` reached `threshold` percent of its quota (a quota of 0 spent from: 100 percent); USD at the
    ledger's precision, as the quota's own decision (a sum of floating-point costs may fall short of the quota)."""
    if use.quota <= 0:
        return threshold <= 100
    tolerance = COST_TOLERANCE if use.unit == "usd" else 0.0
    return use.spend >= use.quota * threshold / 100 - tolerance


class BudgetAlerts:
    def __init__(self, config: AlertConfig, log: logging.Logger) -> None:
        self.config = config
        self.log = log
        # Alerts this process has already decided on (claimed or found claimed).
        self._seen: set[tuple[int, str, str, int]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._outcomes: list[tuple[tuple[int, str, str, int], Optional[float], Optional[str]]] = []

    async def check(self, store: Any, uses: Sequence[QuotaUse], now: float) -> None:
        """Claim and start sending every alert whose threshold the spend has reached."""
        await self.flush(store)
        for use in uses:
            if use.quota <= 0 and use.spend <= 0:
                continue
            for threshold in self.config.thresholds:
                if not reached(use, threshold):
                    continue
                ident = (use.key_id, use.period or LIFETIME, use.start or "", threshold)
                if ident in self._seen:
                    continue
                if await store.call(budget_store.claim_alert, *ident, use.key_name, now):
                    self._start(ident, payload(use, threshold, now))
                self._seen.add(ident)

    def _start(self, ident: tuple[int, str, str, int], body: dict[str, Any]) -> None:
        async def record(ok: bool, error: Optional[str]) -> None:
            self._outcomes.append((ident, time.time() if ok else None, error))

        async def run() -> None:
            sent = await webhook.deliver(self.config.url, body, attempts=self.config.attempts,
                                         backoff=self.config.backoff, log=self.log, on_attempt=record)
            if sent:
                self.log.info("budget alert sent: key %s reached %d%% of its %s quota",
                              body["key"], body["threshold"], body["period"])
            else:
                self.log.error("budget alert for key %s (%d%% of its %s quota) not delivered after %d attempts",
                               body["key"], body["threshold"], body["period"], self.config.attempts)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self, store: Any) -> None:
        """Write the outcomes of the attempts made since the last flush."""
        outcomes, self._outcomes = self._outcomes, []
        for ident, sent_at, error in outcomes:
            await store.call(budget_store.record_alert_attempt, *ident, sent_at=sent_at, error=error)

    async def close(self, store: Any) -> None:
        """Give deliveries in progress a moment, cancel the rest, record what happened."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=SHUTDOWN_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if store is not None:
            await self.flush(store)
