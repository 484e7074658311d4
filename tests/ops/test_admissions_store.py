"""The admissions kept in the store (store/admissions.py), on SQLite and on PostgreSQL: one transaction per decision,
exact under concurrent deciders, settled by the ledger row, and freed when a holder's lease runs out."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import AsyncIterator

import pytest

from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import service
from apertis_proxy.store.admissions import Limits
from apertis_proxy.store.keys import create_key


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("pg_url")


class Process:
    """What one gateway process holds: its store and its admissions access (store.admissions())."""

    def __init__(self, store: service.Store, admissions) -> None:
        self.store, self.admissions = store, admissions

    async def close(self) -> None:
        await self.admissions.close()
        await self.store.close()


async def opened(url: str, n: int) -> list[Process]:
    """`n` gateway processes on one database, each with its own connections."""
    out = []
    for _ in range(n):
        store = await service.open_store(url)
        out.append(Process(store, await store.admissions()))
    return out


def new_key(url: str, name: str, **limits) -> int:
    conn = service.connect(url)
    try:
        key_id, _ = create_key(conn, name, **limits)
        conn.commit()
        return key_id
    finally:
        conn.close()


async def lease(process: Process, holder: str, seconds: float = 30.0) -> None:
    await process.admissions.renew_lease(holder, seconds)


@contextlib.asynccontextmanager
async def leased_process(url: str, holder: str = "h") -> AsyncIterator[Process]:
    """One gateway process on `url` holding `holder`'s lease; closed on leaving."""
    process, = await opened(url, 1)
    try:
        await lease(process, holder)
        yield process
    finally:
        await process.close()


async def admit(process: Process, limits, request_id, holder, cost=0.0, tokens=0):
    return await process.admissions.admit(limits, request_id, holder, cost, tokens)


async def release(process: Process, *args) -> None:
    await process.admissions.release(*args)


async def test_concurrent_deciders_admit_exactly_the_limit(store_url):
    """Four processes deciding at once for one key: never more than `concurrency` live, `rpm` in the minute."""
    key_id = new_key(store_url, "burst")
    stores = await opened(store_url, 4)
    try:
        for i, store in enumerate(stores):
            await lease(store, f"h{i}")
        limits = Limits(key_id, concurrency=7)
        decisions = await asyncio.gather(*(admit(stores[n % 4], limits, f"r{n}", f"h{n % 4}") for n in range(40)))
        assert sum(d.admitted for d in decisions) == 7
        refused = [d for d in decisions if not d.admitted]
        assert {d.reason for d in refused} == {"concurrency"} and {d.retry_after for d in refused} == {1}
        live, _ = await stores[0].admissions.in_flight(key_id)
        assert live == 7

        key2 = new_key(store_url, "minute")
        rpm = Limits(key2, rpm=11)
        decisions = await asyncio.gather(*(admit(stores[n % 4], rpm, f"m{n}", f"h{n % 4}") for n in range(30)))
        admitted = [n for n, d in enumerate(decisions) if d.admitted]
        assert len(admitted) == 11
        for n in admitted:      # releasing frees slots, not the minute
            await release(stores[0], key2, f"m{n}", 0.0, 0, True)
        late = await admit(stores[1], rpm, "m-late", "h1")
        assert late.reason == "rpm" and 1 <= late.retry_after <= 60
    finally:
        for store in stores:
            await store.close()


async def test_a_quota_reserves_bounds_and_settles_with_the_ledger_row(store_url):
    key_id = new_key(store_url, "budget")
    async with leased_process(store_url) as store:
        limits = Limits(key_id, quota_cost=1.0)
        first = await admit(store, limits, "q1", "h", cost=0.6)
        assert first.admitted
        # 0.6 + 0.6 > 1.0 while q1 is in flight: wait (429), do not refuse for good.
        second = await admit(store, limits, "q2", "h", cost=0.6)
        assert (second.reason, second.retry_after) == ("quota_reserved", 1)
        # q1 ends costing 0.3: its reservation becomes that, and q2 fits now.
        await release(store, key_id, "q1", 0.3, 100, True)
        second = await admit(store, limits, "q2", "h", cost=0.6)
        assert second.admitted and second.use.spent_cost == pytest.approx(0.3)
        await release(store, key_id, "q2", 0.5, 100, True)
        # The ledger rows settle both: the admissions go, key_spend takes the exact costs, nothing twice.
        now = time.time()
        rows = [dataclasses.asdict(UsageRecord(request_id=rid, started_at=now, endpoint="/v1/messages", status=200,
                                               key_id=key_id, key_name="budget", input_tokens=50, output_tokens=50,
                                               cost=cost)) for rid, cost in (("q1", 0.3), ("q2", 0.5))]
        assert await store.store.write_ledger(rows) == 2
        assert await store.admissions.in_flight(key_id) == (0, 0.0)
        spend = await store.store.read_spend()
        assert spend[key_id][0] == pytest.approx(0.8)
        # 0.8 spent, nothing in flight: a bound of 0.6 no longer fits, but runs alone.
        alone = await admit(store, limits, "q3", "h", cost=0.6)
        assert alone.admitted
        await release(store, key_id, "q3", 0.25, 10, True)
        used_up = await admit(store, limits, "q4", "h", cost=0.01)
        assert used_up.reason == "quota" and used_up.use.spent_cost == pytest.approx(1.05)


async def test_a_holders_admissions_stop_counting_when_its_lease_runs_out(store_url):
    key_id = new_key(store_url, "leased")
    survivor, doomed = await opened(store_url, 2)
    try:
        await lease(survivor, "alive")
        await lease(doomed, "doomed", seconds=0.5)
        limits = Limits(key_id, concurrency=2, quota_cost=1.0)
        assert (await admit(doomed, limits, "d1", "doomed", cost=0.4)).admitted
        assert (await admit(doomed, limits, "d2", "doomed", cost=0.4)).admitted
        refused = await admit(survivor, limits, "s1", "alive", cost=0.4)
        assert refused.reason == "concurrency"
        await asyncio.sleep(0.7)            # the doomed holder never renews
        admitted = await admit(survivor, limits, "s1", "alive", cost=0.4)
        assert admitted.admitted and admitted.use.live == 0 and admitted.holders == 1
        # A holder that stops normally hands everything back at once.
        await survivor.admissions.drop_lease("alive")
        assert await survivor.admissions.in_flight(key_id) == (0, 0.0)
    finally:
        await survivor.close()
        await doomed.close()


async def test_ended_requests_count_against_the_quota_whatever_became_of_their_holder(store_url):
    """An ended request's exact cost waits in `admissions` for its ledger row: it counts as spent after its
    process stopped (lease dropped) or died (lease run out), and exactly once after the ledger row lands."""
    key_id = new_key(store_url, "orphaned")
    survivor, stopped, killed = await opened(store_url, 3)
    try:
        await lease(survivor, "alive")
        await lease(stopped, "stopped")
        await lease(killed, "killed", seconds=0.5)
        limits = Limits(key_id, quota_cost=1.0)
        for process, holder, rid, cost in ((stopped, "stopped", "e1", 0.3), (killed, "killed", "e2", 0.5)):
            assert (await admit(process, limits, rid, holder, cost=0.6)).admitted
            await release(process, key_id, rid, cost, 100, True)
            await process.admissions.release(key_id, rid, cost, 100, True, retry=True)     # counted once
        await stopped.admissions.drop_lease("stopped")
        await asyncio.sleep(0.7)            # the killed holder never renews
        seen = await admit(survivor, limits, "s1", "alive", cost=0.1)
        assert seen.admitted and seen.use.spent_cost == pytest.approx(0.8) and seen.use.live == 0
        await release(survivor, key_id, "s1", 0.25, 10, True)
        refused = await admit(survivor, limits, "s2", "alive", cost=0.1)
        assert refused.reason == "quota" and refused.use.spent_cost == pytest.approx(1.05)
        # The ledger rows settle them: the spend holds each cost once.
        now = time.time()
        rows = [dataclasses.asdict(UsageRecord(request_id=rid, started_at=now, endpoint="/v1/messages", status=200,
                                               key_id=key_id, key_name="orphaned", input_tokens=50, output_tokens=50,
                                               cost=cost)) for rid, cost in (("e1", 0.3), ("e2", 0.5), ("s1", 0.25))]
        assert await survivor.store.write_ledger(rows) == 3
        again = await admit(survivor, limits, "s3", "alive", cost=0.1)
        assert again.reason == "quota" and again.use.spent_cost == pytest.approx(1.05)
        conn = service.connect(store_url)
        try:    # every ended admission settled: the key's sums are exactly zero again, no float residue
            assert tuple(conn.execute("SELECT n, cost, tokens FROM admission_ended").fetchone()) == (0, 0, 0)
        finally:
            conn.close()
    finally:
        for process in (survivor, stopped, killed):
            await process.close()


async def test_spend_is_settled_by_release_when_no_ledger_settles_it(store_url):
    key_id = new_key(store_url, "no-ledger")
    async with leased_process(store_url) as store:
        limits = Limits(key_id, quota_tokens=1000, quota_period="day")
        assert (await admit(store, limits, "t1", "h", tokens=600)).admitted
        start = time.strftime("%Y-%m-%d", time.gmtime())
        await release(store, key_id, "t1", 0.0, 700, False, "day", start)
        await store.admissions.release(key_id, "t1", 0.0, 700, False, "day", start, retry=True)   # once
        assert (await store.store.read_spend())[key_id] == (0.0, 700)
        assert (await admit(store, limits, "t2", "h", tokens=600)).admitted          # alone
        await release(store, key_id, "t2", 0.0, 300, False, "day", start)
        refused = await admit(store, limits, "t3", "h", tokens=1)
        assert refused.reason == "quota" and refused.use.spent_tokens == 1000


async def test_without_a_ledger_the_first_release_settles_a_collected_admission(store_url):
    """A process whose event loop stalled past STALE_LEASE_SECONDS finds its admission collected: its first
    release still adds the cost to the spend; a retry (the first may have committed) adds nothing."""
    key_id = new_key(store_url, "stalled")
    async with leased_process(store_url) as store:
        assert (await admit(store, Limits(key_id, quota_cost=1.0), "c1", "h", cost=0.5)).admitted
        conn = service.connect(store_url)
        conn.execute("DELETE FROM admissions WHERE request_id = 'c1'")     # as renew_step collects it
        conn.commit()
        conn.close()
        await release(store, key_id, "c1", 0.4, 10, False)
        await store.admissions.release(key_id, "c1", 0.4, 10, False, retry=True)
        spend = (await store.store.read_spend())[key_id]
        assert spend[0] == pytest.approx(0.4) and spend[1] == 10
        # A retry of a release whose first try committed finds nothing and adds nothing either.
        assert (await admit(store, Limits(key_id, quota_cost=1.0), "c2", "h", cost=0.1)).admitted
        await release(store, key_id, "c2", 0.1, 5, False)
        await store.admissions.release(key_id, "c2", 0.1, 5, False, retry=True)
        spend = (await store.store.read_spend())[key_id]
        assert spend[0] == pytest.approx(0.5) and spend[1] == 15


async def test_the_minute_slides_admissions_that_left_it_stop_counting(store_url):
    key_id = new_key(store_url, "minute")
    async with leased_process(store_url) as store:
        limits = Limits(key_id, rpm=3)
        for n in range(3):
            assert (await admit(store, limits, f"m{n}", "h")).admitted
        assert (await admit(store, limits, "late", "h")).reason == "rpm"
        conn = service.connect(store_url)
        try:
            # Two of the three leave the minute, as if admitted 61 s ago.
            conn.execute("UPDATE admission_times SET at = at - 61 WHERE request_id IN ('m0', 'm1')")
            conn.commit()
            assert (await admit(store, limits, "m3", "h")).admitted
            assert (await admit(store, limits, "m4", "h")).admitted
            refused = await admit(store, limits, "m5", "h")
            # The oldest admission still in the minute (m2, a moment ago) frees the next place in ~60 s.
            assert refused.reason == "rpm" and 55 <= refused.retry_after <= 60
            # Gone from the store by the next renewal at the latest (PostgreSQL: by the key's next admission).
            await store.admissions.renew_lease("h", 30)
            times = sorted(r[0] for r in conn.execute("SELECT request_id FROM admission_times").fetchall())
            assert times == ["m2", "m3", "m4"]
            if store_url.startswith("postgresql"):
                assert conn.execute("SELECT n FROM admission_counts").fetchone()[0] == 3
            else:       # numbered in order, without gaps: the first in the minute and the latest count them
                seqs = sorted(r[0] for r in conn.execute("SELECT seq FROM admission_times").fetchall())
                assert seqs == [3, 4, 5]
        finally:
            conn.close()


@pytest.mark.parametrize("settled_by_ledger", [False, True])
async def test_a_quota_spent_to_the_cent_is_reached(store_url, settled_by_ledger):
    """Ten requests of $0.10 against a $1.00 quota: their sum in floating point is 0.9999999999999999 (in the spend,
    or in the ended sums the ledger has not settled yet), the ledger's precision says $1.00, and the quota is
    reached (admissions.COST_TOLERANCE)."""
    key_id = new_key(store_url, "to-the-cent")
    async with leased_process(store_url) as store:
        limits = Limits(key_id, quota_cost=1.0)
        for n in range(10):
            assert (await admit(store, limits, f"c{n}", "h", cost=0.1)).admitted
            await release(store, key_id, f"c{n}", 0.1, 0, settled_by_ledger)
        refused = await admit(store, limits, "c10", "h", cost=0.1)
        assert refused.reason == "quota" and refused.use.spent_cost == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("lowered_to", [1, 2])
async def test_a_lowered_rpm_retries_after_the_admission_that_frees_a_slot(store_url, lowered_to):
    """Three admissions in the minute, the first 30 s old, and the limit lowered from 3: a slot frees when the
    admission that brings the minute under the new limit leaves it (one of a moment ago), not the oldest."""
    key_id = new_key(store_url, "lowered")
    async with leased_process(store_url) as store:
        for n in range(3):
            assert (await admit(store, Limits(key_id, rpm=3), f"m{n}", "h")).admitted
        conn = service.connect(store_url)
        try:
            conn.execute("UPDATE admission_times SET at = at - 30 WHERE request_id = 'm0'")
            conn.commit()
        finally:
            conn.close()
        refused = await admit(store, Limits(key_id, rpm=lowered_to), "late", "h")
        assert refused.reason == "rpm" and 55 <= refused.retry_after <= 60, refused.retry_after


async def test_postgres_admissions_commit_without_waiting_for_the_disk(pg_url):
    """Admissions and releases are transient: their connections do not wait for a WAL flush per commit
    (pg_admissions.SESSION_SETTINGS); the ledger's own connection keeps the server's durable default."""
    store, = await opened(pg_url, 1)
    try:
        setting = await store.admissions._run(lambda conn: conn.fetchval("SHOW synchronous_commit"))
        assert setting == "off"
    finally:
        await store.close()


def unknown_usage_row(key_id: int, key_name: str, request_id: str) -> dict:
    """The ledger row of a request cut before the upstream reported any usage: no tokens, cost unknown."""
    return dataclasses.asdict(UsageRecord(request_id=request_id, started_at=time.time(), endpoint="/v1/messages",
                                          status=499, key_id=key_id, key_name=key_name, interrupted=True,
                                          reached_upstream=True, cost=None))


def stored_spend(url: str, key_id: int, table: str = "key_spend") -> tuple[float, int]:
    """(cost, tokens) of the key in `table` (key_spend, or key_period_spend for a key with one period)."""
    conn = service.connect(url)
    try:
        row = conn.execute(f"SELECT cost, tokens FROM {table} WHERE key_id = ?", (key_id,)).fetchone()
        return (float(row[0]), int(row[1])) if row is not None else (0.0, 0)
    finally:
        conn.close()


def period_spend(url: str, key_id: int) -> tuple[float, int]:
    return stored_spend(url, key_id, "key_period_spend")


async def test_a_request_of_unknown_usage_counts_its_reserved_bound_until_and_after_its_ledger_row(store_url):
    """A release with cost None (the upstream may bill the request, nobody knows how much) keeps the
    reserved bound as the request's cost: it counts at once, and the ledger row (cost NULL, no tokens)
    settles that bound into the key's spend and its period's, once.  A request whose gateway was killed
    (its admission never released) settles its bound the same way; a row of known cost settles its own."""
    key_id = new_key(store_url, "unknown", quota_cost=1.0, quota_tokens=100_000, quota_period="day")
    start = time.strftime("%Y-%m-%d", time.gmtime())
    async with leased_process(store_url) as store:
        limits = Limits(key_id, quota_cost=1.0, quota_tokens=100_000, quota_period="day")
        assert (await admit(store, limits, "u1", "h", cost=0.4, tokens=3000)).admitted
        await release(store, key_id, "u1", None, None, True, "day", start)
        await store.admissions.release(key_id, "u1", None, None, True, "day", start, retry=True)   # once
        seen = await admit(store, limits, "u2", "h", cost=0.1, tokens=10)
        assert seen.admitted and seen.use.live == 0
        assert (seen.use.spent_cost, seen.use.spent_tokens) == (pytest.approx(0.4), 3000)
        await release(store, key_id, "u2", 0.05, 20, True, "day", start)
        # u3's gateway dies: its admission stays live with its bound when the adopted row lands.
        assert (await admit(store, limits, "u3", "h", cost=0.2, tokens=500)).admitted
        known = dataclasses.asdict(UsageRecord(request_id="u2", started_at=time.time(), endpoint="/v1/messages",
                                               status=200, key_id=key_id, key_name="unknown", input_tokens=10,
                                               output_tokens=10, cost=0.05))
        rows = [unknown_usage_row(key_id, "unknown", "u1"), known, unknown_usage_row(key_id, "unknown", "u3")]
        assert await store.store.write_ledger(rows) == 3
        assert await store.admissions.in_flight(key_id) == (0, 0.0)
        spend = (await store.store.read_spend())[key_id]
        assert (spend[0], spend[1]) == (pytest.approx(0.65), 3520)
        cost, tokens = period_spend(store_url, key_id)
        assert (cost, tokens) == (pytest.approx(0.65), 3520)
        after = await admit(store, limits, "u4", "h", cost=0.1, tokens=10)
        assert after.admitted and (after.use.spent_cost, after.use.spent_tokens) == (pytest.approx(0.65), 3520)
        conn = service.connect(store_url)
        try:    # the ended bound left the key's ended sums when its row settled it: nothing counted twice
            assert tuple(conn.execute("SELECT n, cost, tokens FROM admission_ended").fetchone()) == (0, 0, 0)
        finally:
            conn.close()


async def test_without_a_ledger_a_request_of_unknown_usage_adds_its_bound_to_the_spend(store_url):
    key_id = new_key(store_url, "unknown-no-ledger", quota_cost=1.0, quota_period="day")
    start = time.strftime("%Y-%m-%d", time.gmtime())
    async with leased_process(store_url) as store:
        limits = Limits(key_id, quota_cost=1.0, quota_period="day")
        assert (await admit(store, limits, "n1", "h", cost=0.7, tokens=0)).admitted
        await release(store, key_id, "n1", None, None, False, "day", start)
        await store.admissions.release(key_id, "n1", None, None, False, "day", start, retry=True)   # once
        assert (await store.store.read_spend())[key_id][0] == pytest.approx(0.7)
        assert period_spend(store_url, key_id)[0] == pytest.approx(0.7)
        # 0.7 spent: a bound of 0.4 does not fit, but runs alone; the next one is refused once it ends.
        assert (await admit(store, limits, "n2", "h", cost=0.4)).admitted
        await release(store, key_id, "n2", None, None, False, "day", start)
        refused = await admit(store, limits, "n3", "h", cost=0.01)
        assert refused.reason == "quota" and refused.use.spent_cost == pytest.approx(1.1)


def unpriced_row(key_id: int, key_name: str, request_id: str, input_tokens: int, output_tokens: int) -> dict:
    """The ledger row of a request answered with its usage that has no price here (cost NULL: e.g. web searches
    while the catalogue's web_search_per_request is unset): its tokens are known, its cost is not."""
    return dataclasses.asdict(UsageRecord(
        request_id=request_id, started_at=time.time(), endpoint="/v1/messages", status=200, key_id=key_id,
        key_name=key_name, reached_upstream=True, input_tokens=input_tokens, output_tokens=output_tokens,
        raw_usage={"input_tokens": input_tokens, "output_tokens": output_tokens}, cost=None))


async def test_an_unpriced_request_counts_its_bound_and_its_tokens_whichever_lands_first(store_url):
    """A request whose usage has no price (the keys plugin releases it with cost None and its exact tokens) counts
    its reserved cost bound and its exact tokens, whether its release lands before its ledger row or after it (a
    release retried by the limiter once the row had landed)."""
    key_id = new_key(store_url, "unpriced", quota_cost=1.0, quota_tokens=100_000, quota_period="day")
    start = time.strftime("%Y-%m-%d", time.gmtime())
    async with leased_process(store_url) as store:
        limits = Limits(key_id, quota_cost=1.0, quota_tokens=100_000, quota_period="day")
        assert (await admit(store, limits, "p1", "h", cost=0.4, tokens=3000)).admitted
        await release(store, key_id, "p1", None, 50, True, "day", start)           # the release first
        seen = await admit(store, limits, "p0", "h", cost=0.0, tokens=0)
        assert (seen.use.spent_cost, seen.use.spent_tokens) == (pytest.approx(0.4), 50)
        await release(store, key_id, "p0", 0.0, 0, True, "day", start)
        assert await store.store.write_ledger([unpriced_row(key_id, "unpriced", "p1", 30, 20)]) == 1
        spend = (await store.store.read_spend())[key_id]
        assert (spend[0], spend[1]) == (pytest.approx(0.4), 50)
        assert (await admit(store, limits, "p2", "h", cost=0.4, tokens=3000)).admitted
        assert await store.store.write_ledger([unpriced_row(key_id, "unpriced", "p2", 30, 20)]) == 1
        await store.admissions.release(key_id, "p2", None, 50, True, "day", start, retry=True)   # the row first
        spend = (await store.store.read_spend())[key_id]
        assert (spend[0], spend[1]) == (pytest.approx(0.8), 100)
        cost, tokens = period_spend(store_url, key_id)
        assert (cost, tokens) == (pytest.approx(0.8), 100)
        assert await store.admissions.in_flight(key_id) == (0, 0.0)
