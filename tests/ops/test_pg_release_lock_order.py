"""The lock order of a batched release (pg_admissions._RELEASE_MANY) against the ledger's write
(pg_ledger.PgLedger.write) on PostgreSQL.

The ledger's transaction locks the admissions rows of its requests (live ones too: a ledger row may land
before its release), then, in its last statement (_SETTLE_ENDED), the keys' ended sums (admission_ended, key
and day).  A batched release locks admissions rows (deleting those of requests that cost nothing, ending the
others) and then the ended sums.  Two such transactions sharing requests or keys must never lock those rows in
opposite orders, or they close a cycle; for instance, were the rows of requests that cost nothing taken after
the sums:

    ledger   : DELETE admissions (Y, Z)       ... UPDATE admission_ended (K, day)   -> waits for release
    release  :   UPDATE admissions (X); upsert admission_ended (K, day); DELETE admissions (Y) -> waits for ledger

or were two admissions rows taken in the order of each statement's plan.  Both therefore take their keys'
settling locks (pg_admissions.SETTLE_LOCK) in ascending order before any row.

The tests run the product's statements as they are (PgLedger.write on a connection that holds back its last
statement until the release is seen waiting; PgAdmissions.release through its Gathered batches), on a
database with deadlock_timeout at 50 ms and log_lock_waits on, and look at the server's deadlock count and log.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time

import asyncpg
import pytest

from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import pg_ledger
from apertis_proxy.store.admissions import Limits
from apertis_proxy.store.ledger_write import LedgerRows

from .test_admissions_store import admit, leased_process, new_key, opened, lease

DEADLOCK_TIMEOUT_MS = 50
SLOW = 0.5          # seconds no release or ledger write should take on an idle server


async def tuned(pg_server, pg_url: str, deadlock_timeout_ms: int = DEADLOCK_TIMEOUT_MS) -> str:
    """The database of `pg_url` with deadlock_timeout as given and lock waits logged (for every new connection);
    its asyncpg target."""
    name = pg_url.split("/")[3].split("?")[0]
    conn = await asyncpg.connect(pg_server.url("postgres"))
    try:
        await conn.execute(f'ALTER DATABASE "{name}" SET deadlock_timeout = \'{deadlock_timeout_ms}ms\'')
        await conn.execute(f'ALTER DATABASE "{name}" SET log_lock_waits = on')
    finally:
        await conn.close()
    return pg_server.url(name)


def log_size(pg_server) -> int:
    return os.path.getsize(os.path.join(pg_server.root, "log"))


def server_log(pg_server, since: int) -> str:
    """The server's log from offset `since` on (the session's server is shared by the tests of this run)."""
    with open(os.path.join(pg_server.root, "log"), "rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace")


def deadlock_lines(log: str) -> list[str]:
    """The log's lines that tell of a deadlock or a long lock wait, the statement texts left out."""
    return [line.strip() for line in log.splitlines()
            if any(word in line for word in ("deadlock", "still waiting", "acquired", "CONTEXT:", "waits for"))]


def usage_row(key_id: int, request_id: str, started_at: float, cost: float, tokens: int) -> dict:
    return dataclasses.asdict(UsageRecord(
        request_id=request_id, started_at=started_at, endpoint="/v1/messages", status=200 if tokens else 500,
        key_id=key_id, key_name=f"key{key_id}", input_tokens=tokens, output_tokens=0, cost=cost))


class HeldBack:
    """An asyncpg connection whose ledger write holds back its last statement (_SETTLE_ENDED) until `go` is set:
    PgLedger.write runs as it is, with the release's statement let in between its two statements."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self._conn, name)

    async def execute(self, sql, *args, **kw):
        if sql == pg_ledger._SETTLE_ENDED:
            self.reached.set()
            await self.go.wait()
        return await self._conn.execute(sql, *args, **kw)


async def lock_waiters(target: str, within: float, at_least: int, pids=()) -> list:
    """The server processes of this database waiting on a heavyweight lock (`pids` among them), polled for
    `within` seconds until there are `at_least` of them."""
    conn = await asyncpg.connect(target)
    try:
        deadline = time.monotonic() + within
        while True:
            rows = await conn.fetch("SELECT pid, left(query, 80) AS query FROM pg_stat_activity"
                                    " WHERE wait_event_type = 'Lock' AND datname = current_database()")
            found = {r["pid"] for r in rows}
            if (len(rows) >= at_least and set(pids) <= found) or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.005)
    finally:
        await conn.close()


async def ledger_columns(target: str) -> LedgerRows:
    conn = await asyncpg.connect(target)
    try:
        return LedgerRows([name for name, _, _ in await pg_ledger.ledger_column_info(conn)])
    finally:
        await conn.close()


@pytest.mark.parametrize("deadlock_timeout_ms, ledger_deadlock_timeout_ms", [
    (DEADLOCK_TIMEOUT_MS, DEADLOCK_TIMEOUT_MS),     # the release batch waits first: it is the victim
    (1000, 1000),                                   # PostgreSQL's default: a stall of a second
    (1000, DEADLOCK_TIMEOUT_MS),                    # the ledger's check fires first: the ledger write is the victim
], ids=["release-victim-50ms", "release-victim-1s", "ledger-victim"])
async def test_a_release_batch_and_a_ledger_write_of_a_request_that_cost_nothing_do_not_deadlock(
        pg_server, pg_url, deadlock_timeout_ms, ledger_deadlock_timeout_ms):
    """Key K, one day: Z ended (released with its cost, its ledger row not in yet), X and Y in flight.  The ledger
    writes Z's row and Y's (Y cost nothing: an upstream error; its row lands before its release); meanwhile
    one batch releases X (with a cost) and Y (cost 0).  Both must go through at once: no deadlock, no statement
    waiting for deadlock_timeout (50 ms here; 1 s, PostgreSQL's default, in the second run), and the sums exact
    afterwards (the ledger's rows shipped again if its write failed, as the meter's spool does)."""
    target = await tuned(pg_server, pg_url, deadlock_timeout_ms)
    key_id = new_key(pg_url, "lock-order")
    started_at = time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(started_at))
    shape = await ledger_columns(target)
    since = log_size(pg_server)
    async with leased_process(pg_url) as store:
        limits = Limits(key_id, quota_cost=100.0)
        for rid in ("X", "Y", "Z"):
            assert (await admit(store, limits, rid, "h", 1.0, 100)).admitted
        await store.admissions.release(key_id, "Z", 0.5, 50, True, None, day)

        raw = await asyncpg.connect(target)
        await raw.execute(f"SET deadlock_timeout = '{ledger_deadlock_timeout_ms}ms'")
        ledger_conn = HeldBack(raw)
        try:
            rows = [usage_row(key_id, "Z", started_at, 0.5, 50), usage_row(key_id, "Y", started_at, 0.0, 0)]
            ledger = asyncio.create_task(pg_ledger.PgLedger().write(
                ledger_conn, shape.columns, [shape.values(r) for r in rows]))
            await asyncio.wait_for(ledger_conn.reached.wait(), 5)
            # The ledger's first statement is done (it holds Y's and Z's admissions rows); one release batch of
            # X (cost 0.3) and Y (cost 0) now, through the product's API (Gathered: both in one batch).
            sent: list[int] = []
            gathered = store.admissions._releases
            send = gathered._send

            async def counting(items):
                sent.append(len(items))
                return await send(items)
            gathered._send = counting
            released = asyncio.gather(store.admissions.release(key_id, "X", 0.3, 30, True, None, day),
                                      store.admissions.release(key_id, "Y", 0.0, 0, True, None, day),
                                      return_exceptions=True)
            waiting = await lock_waiters(target, 2.0, 1)
            ledger_conn.go.set()
            t1 = time.monotonic()
            outcomes = await released
            released_in = time.monotonic() - t1
            ledger_outcome, = await asyncio.gather(ledger, return_exceptions=True)
            ledger_in = time.monotonic() - t1
        finally:
            await raw.close()

        # A ledger write refused is shipped again (the spool keeps its rows); X's row lands last.  Then everything
        # is settled: spend = the ledger rows' costs, no ended sum, nothing in flight.
        if isinstance(ledger_outcome, BaseException):
            assert await store.store.write_ledger(rows) == 2
        assert await store.store.write_ledger([usage_row(key_id, "X", started_at, 0.3, 30)]) == 1
        conn = await asyncpg.connect(target)
        try:
            spend = tuple(await conn.fetchrow("SELECT cost, tokens FROM key_spend WHERE key_id = $1", key_id))
            ended = [tuple(r) for r in await conn.fetch(
                "SELECT n, cost, tokens FROM admission_ended WHERE key_id = $1", key_id)]
            left = await conn.fetchval("SELECT COUNT(*) FROM admissions WHERE key_id = $1", key_id)
        finally:
            await conn.close()
        lines = deadlock_lines(server_log(pg_server, since))
        report = (f"release batches sent {sent}; waiting on a lock before the ledger's last statement: "
                  f"{[r['query'].split()[:3] for r in waiting]}; releases {outcomes!r} in {released_in:.3f}s; "
                  f"ledger write {ledger_outcome!r} in {ledger_in:.3f}s; after all rows: spend {spend}, "
                  f"ended {ended}, admissions left {left}; server log: " + " | ".join(lines[:6]))
        assert spend == (pytest.approx(0.8), 80) and ended in ([], [(0, 0.0, 0)]) and left == 0, report
        assert not isinstance(ledger_outcome, BaseException), report
        assert all(o is None for o in outcomes), report
        assert not any("deadlock detected" in line for line in lines), report
        assert released_in < SLOW and ledger_in < SLOW, report


async def test_concurrent_releases_and_ledger_writes_of_shared_keys_stay_exact_and_never_deadlock(pg_server, pg_url):
    """Two gateway processes on one database, three keys: each request is admitted, then released (a third of
    them cost nothing) by one process while its ledger row is written by the other's store, in either order
    (the ledger row first for half of them), many at once.  Afterwards: no deadlock in the server's statistics or
    log, no release or ledger write slower than SLOW, the spend exactly the ledger rows' sums, and nothing left
    in flight or ended."""
    target = await tuned(pg_server, pg_url)
    keys = [new_key(pg_url, f"k{n}") for n in range(3)]
    stores = await opened(pg_url, 2)
    rng = random.Random(8)
    try:
        for n, store in enumerate(stores):
            await lease(store, f"h{n}")
        since = log_size(pg_server)
        started_at = time.time()
        day = time.strftime("%Y-%m-%d", time.gmtime(started_at))
        slow: list[tuple[str, float]] = []
        errors: list[BaseException] = []
        expected = {key: [0.0, 0] for key in keys}

        async def timed(what: str, coro):
            t = time.monotonic()
            try:
                return await coro
            except Exception as exc:  # noqa: BLE001 - collected for the report
                errors.append(exc)
            finally:
                if time.monotonic() - t > SLOW:
                    slow.append((what, round(time.monotonic() - t, 3)))

        pending_rows: list[dict] = []

        async def one(n: int) -> None:
            key = keys[n % len(keys)]
            owner = stores[n % 2]
            rid = f"r{n}"
            assert (await admit(owner, Limits(key, quota_cost=1e9), rid, f"h{n % 2}", 1.0, 100)).admitted
            cost, tokens = (0.0, 0) if n % 3 == 0 else (round(rng.uniform(0.01, 0.5), 4), rng.randint(1, 90))
            expected[key][0] += cost
            expected[key][1] += tokens
            row = usage_row(key, rid, started_at, cost, tokens)
            if n % 2:
                pending_rows.append(row)        # its ledger row goes in the next batch, maybe before its release
                await asyncio.sleep(rng.uniform(0, 0.004))
            await timed("release", owner.admissions.release(key, rid, cost, tokens, True, None, day))
            if not n % 2:
                pending_rows.append(row)

        async def shipper(stop: asyncio.Event) -> None:
            # The other process's ledger: what is pending, every few milliseconds, as the spool ships it.
            while not (stop.is_set() and not pending_rows):
                batch, pending_rows[:] = list(pending_rows), []
                if batch:
                    inserted = await timed("ledger write", stores[1].store.write_ledger(batch))
                    if inserted is None:
                        pending_rows.extend(batch)        # refused (a deadlock victim): shipped again
                await asyncio.sleep(rng.uniform(0, 0.003))

        stop = asyncio.Event()
        ship = asyncio.create_task(shipper(stop))
        for wave in range(12):
            await asyncio.gather(*(one(wave * 40 + i) for i in range(40)))
        stop.set()
        await ship

        lines = deadlock_lines(server_log(pg_server, since))
        found = sum("deadlock detected" in line for line in lines)
        conn = await asyncpg.connect(target)
        try:
            spend = {r["key_id"]: (r["cost"], r["tokens"]) for r in await conn.fetch(
                "SELECT key_id, cost, tokens FROM key_spend")}
            ended = await conn.fetch("SELECT key_id, n, cost, tokens FROM admission_ended WHERE n <> 0 OR cost <> 0")
            left = await conn.fetchval("SELECT COUNT(*) FROM admissions")
            ledger = {r["key_id"]: (r["cost"], r["tokens"]) for r in await conn.fetch(
                "SELECT key_id, SUM(cost) AS cost, SUM(input_tokens) AS tokens FROM usage GROUP BY key_id")}
        finally:
            await conn.close()
        report = (f"deadlocks {found}; errors {[repr(e) for e in errors][:5]}; slow {slow[:10]}; "
                  f"server log: {' | '.join(lines[:6])}")
        assert found == 0 and not errors, report
        assert not slow, report
        for key in keys:
            assert spend.get(key, (0.0, 0))[0] == pytest.approx(ledger[key][0]) == pytest.approx(expected[key][0])
            assert spend.get(key, (0.0, 0))[1] == ledger[key][1] == expected[key][1]
        assert [tuple(r) for r in ended] == [] and left == 0
    finally:
        for store in stores:
            await store.close()
