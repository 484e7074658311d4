"""Ended admissions whose ledger rows do not land (the ledger refused the row, or a meter failed before it was
spooled): on SQLite and on PostgreSQL, each counts its exact cost once, in the quota period its request started
in and no later one, until a late ledger row settles it (without counting it twice)."""
from __future__ import annotations

import dataclasses
import time

import pytest

from apertis_proxy.budgets.periods import period_start
from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import service
from apertis_proxy.store.admissions import ENDED_KEPT_DAYS, Limits
from tests.ops.test_admissions_store import admit, leased_process, new_key, release

DAY = 86400.0


def utc_day(t: float) -> str:
    """The day an ended admission is kept under: the UTC day its request started (keys_auth.release)."""
    return period_start("day", t)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("pg_url")


def ledger_row(key_id: int, request_id: str, started_at: float, cost: float, tokens: int = 100,
               name: str = "k") -> dict:
    return dataclasses.asdict(UsageRecord(
        request_id=request_id, started_at=started_at, endpoint="/v1/messages", status=200, key_id=key_id,
        key_name=name, input_tokens=tokens // 2, output_tokens=tokens - tokens // 2, cost=cost))


def ended_sums(url: str) -> list[tuple]:
    """(start, n, cost, tokens) of every key's ended sums, by start."""
    conn = service.connect(url)
    try:
        return sorted(tuple(r) for r in conn.execute("SELECT start, n, cost, tokens FROM admission_ended"))
    finally:
        conn.close()


def admission_ids(url: str) -> list[str]:
    conn = service.connect(url)
    try:
        return sorted(r[0] for r in conn.execute("SELECT request_id FROM admissions"))
    finally:
        conn.close()


def set_period(url: str, key_id: int, period: str) -> None:
    """The key's quota period, as `keys set --period` stores it (the ledger settles period spend by it)."""
    conn = service.connect(url)
    try:
        conn.execute("UPDATE keys SET quota_period = ? WHERE id = ?", (period, key_id))
        conn.commit()
    finally:
        conn.close()


async def test_an_unsettled_ended_request_counts_its_exact_cost_in_its_own_period_only(store_url):
    key_id = new_key(store_url, "daily")
    set_period(store_url, key_id, "day")
    now = time.time()
    today, yesterday = period_start("day", now), period_start("day", now - DAY)
    async with leased_process(store_url) as process:
        limits = Limits(key_id, quota_cost=1.0, quota_period="day")
        # Started yesterday, ended now, its ledger row lost: it belongs to yesterday's quota.
        assert (await admit(process, limits, "late", "h", cost=0.9)).admitted
        await release(process, key_id, "late", 0.3, 100, True, "day", yesterday)
        # Started today, its ledger row lost too: its exact cost counts today, not its bound.
        assert (await admit(process, limits, "lost", "h", cost=0.9)).admitted
        await release(process, key_id, "lost", 0.4, 100, True, "day", today)
        seen = await admit(process, limits, "next", "h", cost=0.1)
        assert seen.admitted and seen.use.spent_cost == pytest.approx(0.4) and seen.use.live == 0
        await release(process, key_id, "next", 0.0, 0, True, "day", today)
        # The rows land late: each cost reaches its own period once, and the ended sums are exactly zero again.
        rows = [ledger_row(key_id, "late", now - DAY, 0.3), ledger_row(key_id, "lost", now, 0.4)]
        assert await process.store.write_ledger(rows) == 2
        again = await admit(process, limits, "again", "h", cost=0.1)
        assert again.admitted and again.use.spent_cost == pytest.approx(0.4)
        assert ended_sums(store_url) == [(yesterday, 0, 0, 0), (today, 0, 0, 0)]
        assert admission_ids(store_url) == ["again"]


async def test_a_lifetime_quota_counts_an_unsettled_ended_request_once_for_good(store_url):
    key_id = new_key(store_url, "lifetime")
    async with leased_process(store_url) as process:
        limits = Limits(key_id, quota_tokens=1000)
        assert (await admit(process, limits, "lost", "h", tokens=900)).admitted
        await release(process, key_id, "lost", 0.0, 300, True, None, "")
        assert (await admit(process, limits, "seen", "h", tokens=1)).use.spent_tokens == 300
        await release(process, key_id, "seen", 0.0, 0, True, None, "")
        await process.admissions.renew_lease("h", 30)          # garbage collection spares it: it counts
        assert (await admit(process, limits, "kept", "h", tokens=1)).use.spent_tokens == 300
        await release(process, key_id, "kept", 0.0, 0, True, None, "")
        # A late row settles it: in the spend instead, not beside it.
        assert await process.store.write_ledger([ledger_row(key_id, "lost", time.time(), 0.0, 300)]) == 1
        settled = await admit(process, limits, "settled", "h", tokens=1)
        assert settled.use.spent_tokens == 300
        assert ended_sums(store_url) == [("", 0, 0, 0)]


async def test_a_row_the_ledger_refuses_leaves_its_exact_cost_counting(store_url):
    """The ledger refuses a row no column can hold and takes the others: the refused request's ended admission
    keeps its exact cost counting, the others' costs move to the spend."""
    key_id = new_key(store_url, "refused")
    async with leased_process(store_url) as process:
        limits = Limits(key_id, quota_cost=1.0)
        for rid, cost in (("bad", 0.25), ("good", 0.5)):
            assert (await admit(process, limits, rid, "h", cost=0.4)).admitted
            await release(process, key_id, rid, cost, 100, True, None, "")
        bad = ledger_row(key_id, "bad", time.time(), 0.25)
        bad["output_tokens"] = 2 ** 70          # past any integer column
        rejected: list[str] = []
        assert await process.store.write_ledger([bad, ledger_row(key_id, "good", time.time(), 0.5)], rejected) == 1
        assert rejected == ["bad"]
        seen = await admit(process, limits, "seen", "h", cost=0.1)
        assert seen.admitted and seen.use.spent_cost == pytest.approx(0.75)
        assert (await process.store.read_spend())[key_id][0] == pytest.approx(0.5)
        assert admission_ids(store_url) == ["bad", "seen"]


async def test_ended_requests_of_periods_long_over_are_collected(store_url):
    """Ended admissions of a key with a quota period, of a day ENDED_KEPT_DAYS ago, count nowhere: a renewal
    deletes them and their sums (a row landing later settles its old period's spend alone); those of a key with
    a lifetime quota are kept, and count."""
    key_id, forever_key = new_key(store_url, "old"), new_key(store_url, "forever")
    set_period(store_url, key_id, "month")
    started = time.time() - (ENDED_KEPT_DAYS + 32) * DAY
    old = utc_day(started)
    async with leased_process(store_url) as process:
        limits = Limits(key_id, quota_cost=1.0, quota_period="month")
        lifetime = Limits(forever_key, quota_cost=1.0)
        assert (await admit(process, limits, "ancient", "h", cost=0.5)).admitted
        await release(process, key_id, "ancient", 0.5, 100, True, "month", old)
        assert (await admit(process, lifetime, "forever", "h", cost=0.5)).admitted
        await release(process, forever_key, "forever", 0.25, 100, True, None, old)
        await process.admissions.renew_lease("h", 30)
        assert admission_ids(store_url) == ["forever"]
        assert ended_sums(store_url) == [(old, 1, 0.25, 100)]
        assert (await admit(process, lifetime, "next", "h", cost=0.1)).use.spent_cost == pytest.approx(0.25)
        assert await process.store.write_ledger([ledger_row(key_id, "ancient", started, 0.5)]) == 1
        assert (await admit(process, limits, "now", "h", cost=0.1)).use.spent_cost == pytest.approx(0.0)
