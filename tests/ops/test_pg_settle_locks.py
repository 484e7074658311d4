"""The settling locks on PostgreSQL (pg_admissions.SETTLE_LOCK) beyond the ledger and release batches: a host
without a ledger that settles spend itself, renewals of stale holders, transactions killed while they hold or
await the locks, and how long releases wait behind a large ledger write.

Each test runs the product's statements as they are, on a database with deadlock_timeout at 50 ms, lines the
transactions up with a third connection that holds one lock a moment (a stand-in for any transaction holding
it), and counts "deadlock detected" in the server's log.  See test_pg_ledger_lock_order.py for the helpers.
"""
from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from apertis_proxy.store import pg_ledger
from apertis_proxy.store.admissions import STALE_LEASE_SECONDS, Limits
from apertis_proxy.store.pg_admissions import SETTLE_LOCK

from .test_admissions_store import admit, lease, leased_process, new_key, opened
from .test_pg_ledger_lock_order import deadlock_report, deadlocks, row_locker, settled_state
from .test_pg_release_lock_order import ledger_columns, lock_waiters, log_size, tuned, usage_row


# -- 1. a release without a ledger (_release_and_settle) against another host's ledger write ------------------

@pytest.mark.parametrize("cost", [0.3, None], ids=["exact-cost", "at-bound"])
async def test_a_release_settling_spend_itself_and_a_ledger_write_lock_the_spend_rows_in_one_order(
        pg_server, pg_url, cost):
    """Key K with a daily quota.  Host A runs without the sqlite meter (ledger_settles False): its release of
    request R1 settles R1's cost itself (_release_and_settle: DELETE the admission, upsert key_spend(K), then
    key_period_spend(K, day)), and takes no settling lock.  Host B ships the ledger row of its own request R2 of
    K: under K's settling lock, one statement whose data-modifying CTEs PostgreSQL runs to completion after the
    main query in the reverse order of their definition: usage_daily, then key_period_spend(K, day)
    (`period_spend`), then key_spend(K) (`spend`).  The two lock key_spend(K) and key_period_spend(K, day) in
    opposite orders: with key_spend(K) held a moment by a third transaction, the release queues first on it, the
    ledger takes key_period_spend(K, day) and queues behind it; once it is free the release takes it and waits
    for key_period_spend held by the ledger, which waits for key_spend held by the release: a deadlock."""
    target = await tuned(pg_server, pg_url)
    key = new_key(pg_url, "daily", quota_cost=100.0, quota_period="day")
    started_at = time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(started_at))
    shape = await ledger_columns(target)
    async with leased_process(pg_url, "a") as host_a:
        # The key's spend rows exist (an earlier request R0, settled by B's ledger).
        assert await host_a.store.write_ledger([usage_row(key, "R0", started_at, 0.1, 10)]) == 1
        assert (await admit(host_a, Limits(key, quota_cost=100.0, quota_period="day"), "R1", "a", 1.0, 100)).admitted
        since = log_size(pg_server)
        blocker = await row_locker(target, "SELECT 1 FROM key_spend WHERE key_id = $1 FOR UPDATE", key)
        raw = await asyncpg.connect(target)
        try:
            released = asyncio.create_task(host_a.admissions.release(key, "R1", cost, 30, False, "day", day))
            waiting1 = await lock_waiters(target, 3.0, 1)
            ledger_rows = [usage_row(key, "R2", started_at, 0.5, 50)]
            ledger = asyncio.create_task(pg_ledger.PgLedger().write(
                raw, shape.columns, [shape.values(r) for r in ledger_rows]))
            waiting2 = await lock_waiters(target, 3.0, 2, [raw.get_server_pid()])
            await blocker.execute("ROLLBACK")
            release_outcome, ledger_outcome = await asyncio.gather(released, ledger, return_exceptions=True)
        finally:
            await raw.close()
            await blocker.close()
        # What was refused is made again: the limiter retries the release (retry=True: the admission is still
        # there, the refused transaction rolled back), the spool ships the ledger row again.
        if isinstance(release_outcome, BaseException):
            await host_a.admissions.release(key, "R1", cost, 30, False, "day", day, retry=True)
        if isinstance(ledger_outcome, BaseException):
            assert await host_a.store.write_ledger(ledger_rows) == 1
        found, _ = deadlocks(pg_server, since)
        conn = await asyncpg.connect(target)
        try:
            spend = tuple(await conn.fetchrow("SELECT cost, tokens FROM key_spend WHERE key_id = $1", key))
            period = tuple(await conn.fetchrow("SELECT cost, tokens FROM key_period_spend WHERE key_id = $1", key))
        finally:
            await conn.close()
        report = (f"waiting: {[r['query'][:50] for r in waiting1]} then {[r['query'][:50] for r in waiting2]}; "
                  f"release {release_outcome!r}; ledger {ledger_outcome!r}; deadlocks {found}; spend {spend}, "
                  f"period spend {period}; server log: {deadlock_report(pg_server, since)}")
        total = 0.1 + (1.0 if cost is None else cost) + 0.5      # at_bound: the reserved bound (1.0) stands
        assert spend == (pytest.approx(total), 90) and period == (pytest.approx(total), 90), report
        assert found == 0, report
        assert not isinstance(release_outcome, BaseException) and not isinstance(ledger_outcome, BaseException), \
            report


# -- 2. two renewals, each collecting the other's stale lease ---------------------------------------------------

async def test_two_stale_holders_renewing_at_once_do_not_deadlock_on_each_others_leases(pg_server, pg_url):
    """Hosts h1 and h2 both had their leases run out more than STALE_LEASE_SECONDS ago (the database away for
    ten minutes, say, and then back: every host renews at about the same moment).  Each renewal (_RENEW) deletes
    the other's stale lease (`gone`) and upserts its own (`renewed`); PostgreSQL runs `gone` (and the settling
    locks of the gone holder's keys, `gone_keys`) before `renewed`.  h1's renewal deletes h2's lease, then waits
    for the settling lock of h2's key K (held a moment: a ledger write of K); h2's renewal deletes h1's lease and
    waits to upsert its own, which h1 deleted; once K is free h1 upserts its own, which h2 deleted: a deadlock.
    The docstring of _RENEW says a holder renewing while it is being collected keeps its lease."""
    target = await tuned(pg_server, pg_url)
    key = new_key(pg_url, "k")
    stores = await opened(pg_url, 2)
    try:
        await lease(stores[0], "h1")
        await lease(stores[1], "h2")
        assert (await admit(stores[1], Limits(key, quota_cost=100.0), "r", "h2", 1.0, 100)).admitted
        # Both leases ran out long ago (set directly: a renewal with a negative time would collect the other).
        conn = await asyncpg.connect(target)
        try:
            await conn.execute("UPDATE limit_leases SET expires_at = extract(epoch FROM clock_timestamp()) - $1",
                               STALE_LEASE_SECONDS + 60)
        finally:
            await conn.close()
        since = log_size(pg_server)
        blocker = await asyncpg.connect(target)
        await blocker.execute("BEGIN")
        await blocker.execute(f"SELECT pg_advisory_xact_lock(({SETTLE_LOCK}::BIGINT << 32) | {key})")
        try:
            first = asyncio.create_task(stores[0].admissions.renew_lease("h1", 30.0))
            waiting1 = await lock_waiters(target, 3.0, 1)
            second = asyncio.create_task(stores[1].admissions.renew_lease("h2", 30.0))
            waiting2 = await lock_waiters(target, 3.0, 2)
            await blocker.execute("COMMIT")
            outcomes = await asyncio.gather(first, second, return_exceptions=True)
        finally:
            await blocker.close()
        found, _ = deadlocks(pg_server, since)
        conn = await asyncpg.connect(target)
        try:
            leases = {r[0]: r[1] for r in await conn.fetch(
                "SELECT holder, expires_at - extract(epoch FROM clock_timestamp()) FROM limit_leases")}
        finally:
            await conn.close()
        report = (f"waiting: {[r['query'][:40] for r in waiting1]} then {[r['query'][:40] for r in waiting2]}; "
                  f"renewals {outcomes!r}; leases left {leases}; deadlocks {found}; "
                  f"server log: {deadlock_report(pg_server, since)}")
        assert found == 0, report
        assert all(not isinstance(o, BaseException) for o in outcomes), report
        assert sorted(leases) == ["h1", "h2"], report
    finally:
        for store in stores:
            await store.close()


# -- 3. how long releases of a key wait behind a ledger write of many rows of it --------------------------------

@pytest.mark.parametrize("n_rows", [500, 5000, 20000])
async def test_releases_behind_a_large_ledger_write_of_their_keys_are_not_refused(pg_server, pg_url, n_rows):
    """A spool segment of `n_rows` ledger rows of three busy keys (their requests ended: admissions with live = 0
    and the ended sums, inserted directly) is shipped while the same keys' requests in flight are released, in
    batches and one by one.  The batches wait for the ledger's settling locks; the single releases for the
    ended sums' rows (_SETTLE_ENDED, the ledger's last statement).  No release may be refused (StoreUnavailable
    after 5 s), and behind a segment of many transactions' worth of rows (pg_ledger.CHUNK_ROWS) every release is
    done before the write is: they wait for one of its transactions, not for all.  The figures (the write's
    time, the releases' waits) go into the report."""
    target = await tuned(pg_server, pg_url)
    keys = [new_key(pg_url, f"busy{n}") for n in range(3)]
    quiet = new_key(pg_url, "quiet")        # a key of no ledger row: its releases need no lock the ledger holds
    started_at = time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(started_at))
    shape = await ledger_columns(target)
    rows = [usage_row(keys[i % 3], f"L{i}", started_at, 0.001, 1) for i in range(n_rows)]
    conn = await asyncpg.connect(target)
    try:
        await conn.execute(
            "INSERT INTO admissions (request_id, key_id, holder, admitted_at, live, cost, tokens, start)"
            " SELECT 'L' || i, ($1::BIGINT[])[1 + i % 3], 'h', $2, 0, 0.001, 1, $3"
            " FROM generate_series(0, $4 - 1) AS i", keys, started_at, day, n_rows)
        await conn.execute(
            "INSERT INTO admission_ended (key_id, start, n, cost, tokens)"
            " SELECT key_id, start, COUNT(*), SUM(cost), SUM(tokens) FROM admissions GROUP BY 1, 2")
    finally:
        await conn.close()
    async with leased_process(pg_url, "h") as store:
        n_live = 120
        for i in range(n_live):
            assert (await admit(store, Limits(keys[i % 3], quota_cost=1e9), f"R{i}", "h", 1.0, 100)).admitted
            assert (await admit(store, Limits(quiet, quota_cost=1e9), f"Q{i}", "h", 1.0, 100)).admitted
        quiet_waits: list[float] = []

        async def release_quiet(i: int) -> None:
            t = time.monotonic()
            try:
                await store.admissions.release(quiet, f"Q{i}", 0.01, 10, True, None, day)
            except Exception as exc:  # noqa: BLE001 - reported
                errors.append(exc)
            quiet_waits.append(time.monotonic() - t)
            finished.append(time.monotonic())
        raw = await asyncpg.connect(target)
        waits: list[float] = []
        finished: list[float] = []         # when each release was done
        errors: list[BaseException] = []

        async def release(i: int, alone: bool) -> None:
            t = time.monotonic()
            try:
                if alone:   # the at_bound path: its own transaction, no settling lock
                    await store.admissions.release(keys[i % 3], f"R{i}", None, 10, True, None, day)
                else:
                    await store.admissions.release(keys[i % 3], f"R{i}", 0.01, 10, True, None, day)
            except Exception as exc:  # noqa: BLE001 - reported
                errors.append(exc)
            waits.append(time.monotonic() - t)
            finished.append(time.monotonic())

        try:
            t0 = time.monotonic()
            ledger = asyncio.create_task(pg_ledger.PgLedger().write(
                raw, shape.columns, [shape.values(r) for r in rows]))
            # The releases start once the ledger holds its settling locks (after its COPY).
            watch = await asyncpg.connect(target)
            try:
                while not await watch.fetchval("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory'"
                                               " AND granted AND pid = $1", raw.get_server_pid()):
                    await asyncio.sleep(0.002)
            finally:
                await watch.close()
            locked_at = time.monotonic() - t0
            pending = []
            for wave in range(n_live // 10):
                pending += [asyncio.create_task(release(wave * 10 + j, j % 5 == 0)) for j in range(10)]
                pending += [asyncio.create_task(release_quiet(wave * 10 + j)) for j in range(3)]
                await asyncio.sleep(0.01)
            inserted = await ledger
            ledger_done = time.monotonic()
            ledger_took = ledger_done - t0
            await asyncio.gather(*pending)
        finally:
            await raw.close()
        waits.sort()
        quiet_waits.sort()
        report = (f"{n_rows} rows: ledger write {ledger_took:.3f}s, settling locks held from {locked_at:.3f}s "
                  f"(inserted {inserted}); releases: median "
                  f"{waits[len(waits) // 2]:.3f}s, max {waits[-1]:.3f}s; releases of a key with no ledger row: median "
                  f"{quiet_waits[len(quiet_waits) // 2]:.3f}s, max {quiet_waits[-1]:.3f}s; "
                  f"errors {[repr(e)[:80] for e in errors][:3]}")
        assert not errors, report
        if n_rows >= 10 * pg_ledger.CHUNK_ROWS:
            # The write commits every CHUNK_ROWS rows: the releases get their turn between two of its
            # transactions instead of waiting for the whole segment.
            assert max(finished) < ledger_done, report


# -- 4. a ledger write or a release batch ended while it holds settling locks, then made again -----------------

@pytest.mark.parametrize("killed", ["ledger", "release-batch"])
async def test_a_transaction_killed_while_holding_or_awaiting_settling_locks_loses_and_doubles_nothing(
        pg_server, pg_url, killed):
    """Key K: X and Y ended (their ledger rows not in), Z and W in flight.  A ledger write of X and Y holds K's
    settling lock and waits in _SETTLE_ENDED (K's ended sum held a moment by a third transaction); a release
    batch of Z (cost 0.3) and W (cost nothing) waits for K's settling lock.  One of the two is ended by
    pg_terminate_backend; then the third transaction lets go, the killed one is made again (the spool ships its
    rows again, the limiter makes the releases again as retries) and Z's and W's ledger rows land.  The spend
    must be the ledger rows' sums exactly, nothing ended or in flight."""
    target = await tuned(pg_server, pg_url)
    key = new_key(pg_url, "k")
    started_at = time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(started_at))
    shape = await ledger_columns(target)
    async with leased_process(pg_url, "h") as store:
        for rid in ("X", "Y", "Z", "W"):
            assert (await admit(store, Limits(key, quota_cost=100.0), rid, "h", 1.0, 100)).admitted
        await store.admissions.release(key, "X", 0.25, 25, True, None, day)
        await store.admissions.release(key, "Y", 0.125, 12, True, None, day)
        ledger_rows = [usage_row(key, "X", started_at, 0.25, 25), usage_row(key, "Y", started_at, 0.125, 12)]
        blocker = await row_locker(target, "SELECT 1 FROM admission_ended WHERE key_id = $1 FOR UPDATE", key)
        raw = await asyncpg.connect(target)
        killer = await asyncpg.connect(target)
        try:
            ledger = asyncio.create_task(pg_ledger.PgLedger().write(
                raw, shape.columns, [shape.values(r) for r in ledger_rows]))
            await lock_waiters(target, 3.0, 1, [raw.get_server_pid()])
            released = asyncio.gather(store.admissions.release(key, "Z", 0.3, 30, True, None, day),
                                      store.admissions.release(key, "W", 0.0, 0, True, None, day),
                                      return_exceptions=True)
            waiting = await lock_waiters(target, 3.0, 2, [raw.get_server_pid()])
            if killed == "ledger":
                victim = raw.get_server_pid()
            else:
                victim = next(r["pid"] for r in waiting if r["pid"] != raw.get_server_pid())
            assert await killer.fetchval("SELECT pg_terminate_backend($1)", victim)
            await asyncio.sleep(0.1)
            await blocker.execute("ROLLBACK")
            outcomes = await released
            ledger_outcome, = await asyncio.gather(ledger, return_exceptions=True)
        finally:
            await raw.close()
            await blocker.close()
            await killer.close()
        if isinstance(ledger_outcome, BaseException):
            assert await store.store.write_ledger(ledger_rows) == 2
        for rid, cost, tokens, outcome in (("Z", 0.3, 30, outcomes[0]), ("W", 0.0, 0, outcomes[1])):
            if isinstance(outcome, BaseException):
                await store.admissions.release(key, rid, cost, tokens, True, None, day, retry=True)
        assert await store.store.write_ledger([usage_row(key, "Z", started_at, 0.3, 30),
                                               usage_row(key, "W", started_at, 0.0, 0)]) == 2
        spends, ended, left = await settled_state(target)
        spend = spends.get(key)
        report = (f"killed {killed}; ledger {ledger_outcome!r}; releases {outcomes!r}; spend {spend}; "
                  f"ended {ended}; admissions left {left}")
        assert spend == (pytest.approx(0.675), 67) and ended == [] and left == 0, report


# -- 5. the same under load, nothing lined up ----------------------------------------------------------------

async def test_hosts_with_and_without_a_ledger_on_keys_with_a_period_quota_never_deadlock_under_load(
        pg_server, pg_url):
    """Host A runs without the sqlite meter: its releases settle their costs themselves (_release_and_settle);
    host B ships ledger rows of its own requests of the same daily-quota keys, in small batches, as its spool
    does.  For a few seconds, both at once, nothing lined up.  No deadlock may be logged, and the spend must be
    exactly A's released costs plus B's ledger rows (a refused ledger batch shipped again, a refused release
    made again as a retry)."""
    target = await tuned(pg_server, pg_url)
    keys = [new_key(pg_url, f"daily{n}", quota_cost=1e9, quota_period="day") for n in range(2)]
    started_at = time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(started_at))
    stores = await opened(pg_url, 2)
    try:
        await lease(stores[0], "a")
        await lease(stores[1], "b")
        since = log_size(pg_server)
        expected = {key: [0.0, 0] for key in keys}
        refused: list[str] = []
        deadline = time.monotonic() + 3.0

        async def host_a(worker: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                key = keys[n % 2]
                rid = f"a{worker}-{n}"
                limits = Limits(key, quota_cost=1e9, quota_period="day")
                assert (await admit(stores[0], limits, rid, "a", 1.0, 100)).admitted
                for attempt in range(50):
                    try:
                        await stores[0].admissions.release(key, rid, 0.25, 25, False, "day", day,
                                                           retry=attempt > 0)
                        break
                    except Exception as exc:  # noqa: BLE001 - made again as a retry, as the limiter does
                        refused.append(repr(exc)[:60])
                expected[key][0] += 0.25
                expected[key][1] += 25
                n += 1

        async def host_b(shipper: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                batch = [usage_row(keys[(n + i) % 2], f"b{shipper}-{n + i}", started_at, 0.5, 50) for i in range(5)]
                n += 5
                for _ in range(50):
                    try:
                        await stores[1].store.write_ledger(batch)
                        break
                    except Exception as exc:  # noqa: BLE001 - shipped again, as the spool does
                        refused.append(repr(exc)[:60])
                        await asyncio.sleep(0.01)
                for row in batch:
                    expected[row["key_id"]][0] += 0.5
                    expected[row["key_id"]][1] += 50

        await asyncio.wait_for(asyncio.gather(*(host_a(w) for w in range(6)), host_b(0), host_b(1)), 60)
        found, _ = deadlocks(pg_server, since)
        conn = await asyncpg.connect(target)
        try:
            spend = {r[0]: (r[1], r[2]) for r in await conn.fetch("SELECT key_id, cost, tokens FROM key_spend")}
        finally:
            await conn.close()
        report = (f"deadlocks {found}; refused {len(refused)}: {refused[:3]}; "
                  f"server log: {deadlock_report(pg_server, since)}")
        for key in keys:
            assert spend[key][0] == pytest.approx(expected[key][0]) and spend[key][1] == expected[key][1], report
        assert found == 0, report
    finally:
        for store in stores:
            await store.close()
