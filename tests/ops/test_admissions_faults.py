"""The admissions store when things go wrong: a step of a SQLite group commit that fails, a database that refuses
writes or connections, a database that stops answering, a lease that lapses while its process lives, and a process
that stops with ended admissions not yet in the ledger.  Real SQLite files, real PostgreSQL servers."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sqlite3
import time

import pytest

from apertis_proxy.budgets.limiter import Limiter
from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import service
from apertis_proxy.store.admissions import STALE_LEASE_SECONDS, Limits, admit_step, release_step
from apertis_proxy.store.service import StoreUnavailable
from tests.ops.test_admissions_store import admit, lease, new_key, opened, release
from tests.support.pg_server import SUPERUSER, PgServer, PgUnavailable, memory_folder
from tests.support.processes import wait_for


def rows(url: str) -> list[tuple]:
    """(request id, holder, live, cost) of every admission in the store."""
    conn = service.connect(url)
    try:
        return [tuple(r) for r in conn.execute(
            "SELECT request_id, holder, live, cost FROM admissions ORDER BY request_id").fetchall()]
    finally:
        conn.close()


def sql(url: str, statement: str, params: tuple = ()) -> None:
    conn = service.connect(url)
    try:
        conn.execute(statement, params)
        conn.commit()
    finally:
        conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("pg_url")


# -- SQLite group commit: one savepoint per step ------------------------------------------------------------


async def group(admissions, *steps) -> list:
    """Submit `steps` (step function, args...) in one loop iteration, so they share one transaction; their
    outcomes (a result or the exception)."""
    futures = [admissions._submit(step, *args) for step, *args in steps]
    return await asyncio.gather(*futures, return_exceptions=True)


async def test_a_failing_step_of_a_group_fails_alone(tmp_path):
    url = str(tmp_path / "store.db")
    keys = [new_key(url, name) for name in ("a", "b", "c", "d")]
    a, b, c, d = (Limits(k, concurrency=5) for k in keys)
    # Key b's admissions are refused by the database itself (as a constraint would).
    sql(url, f"CREATE TRIGGER refuse_b BEFORE INSERT ON admissions WHEN NEW.key_id = {keys[1]}"
             " BEGIN SELECT RAISE(ABORT, 'no admissions for b'); END")
    process, = await opened(url, 1)
    try:
        adm = process.admissions
        await lease(process, "h")

        def half_then_io_error(conn):
            # A step that wrote part of its work when the disk failed it.
            admit_step(conn, d, "d1", "h", 0.0, 0)
            raise sqlite3.OperationalError("disk I/O error")

        outcomes = await group(adm, (admit_step, a, "a1", "h", 0.0, 0), (admit_step, b, "b1", "h", 0.0, 0),
                               (half_then_io_error,), (admit_step, c, "c1", "h", 0.0, 0))
        assert outcomes[0].admitted and outcomes[3].admitted
        assert isinstance(outcomes[1], sqlite3.IntegrityError) and "no admissions for b" in str(outcomes[1])
        assert isinstance(outcomes[2], sqlite3.OperationalError)
        # The failed steps left nothing; the others committed together.
        assert [r[0] for r in rows(url)] == ["a1", "c1"]
        assert not adm._conn.in_transaction

        # Through the limiter, the database's refusal is the store being unavailable (503), not a bug (500).
        limiter = Limiter(process.store)
        limiter.admissions = adm
        with pytest.raises(StoreUnavailable, match="no admissions for b"):
            await limiter.admit(b, "b2", 0.0, 0)
        assert (await limiter.admit(a, "a2", 0.0, 0)).admitted
        assert [r[0] for r in rows(url)] == ["a1", "a2", "c1"]
    finally:
        await process.close()


async def the_whole_group_fails(process, url: str, key: Limits, bad_step, what: str) -> None:
    """`bad_step` between admissions and a release of one group: every step fails (saying `what`), nothing of
    the group stays nor runs after the failure outside it (autocommitted), and the next group works."""
    outcomes = await group(process.admissions, (admit_step, key, "r1", "h", 0.0, 0), (bad_step,),
                           (admit_step, key, "r2", "h", 0.0, 0), (release_step, key.key_id, "r0", 1.0, 10, False))
    assert all(isinstance(o, sqlite3.OperationalError) and what in str(o) for o in outcomes), outcomes
    assert rows(url) == []
    assert not process.admissions._conn.in_transaction
    assert (await admit(process, key, "r3", "h")).admitted
    assert [r[0] for r in rows(url)] == ["r3"]


async def test_a_step_that_ends_the_transaction_fails_the_whole_group(tmp_path):
    url = str(tmp_path / "store.db")
    key = Limits(new_key(url, "k"), concurrency=9)
    process, = await opened(url, 1)
    try:
        await lease(process, "h")

        def disk_full(conn):
            # SQLite rolls the whole transaction back by itself on some errors (a full disk, an I/O error).
            conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")

        await the_whole_group_fails(process, url, key, disk_full, "disk is full")
    finally:
        await process.close()


async def test_a_failed_commit_fails_every_step_and_keeps_none(tmp_path):
    url = str(tmp_path / "store.db")
    key = Limits(new_key(url, "k"), concurrency=9)
    # A deferred foreign key is checked at COMMIT: a step inserting an orphan makes the commit fail.
    sql(url, "CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    sql(url, "CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
    process, = await opened(url, 1)
    try:
        adm = process.admissions
        await lease(process, "h")
        adm._conn.execute("PRAGMA foreign_keys = ON")

        def orphan(conn):
            conn.execute("INSERT INTO child (p) VALUES (42)")

        await the_whole_group_fails(process, url, key, orphan, "FOREIGN KEY")
    finally:
        await process.close()


# -- PostgreSQL refusing: read-only, out of connections -----------------------------------------------------


async def started_limiter(url: str) -> tuple[service.Store, Limiter]:
    store = await service.open_store(url)
    limiter = Limiter(store, lease_seconds=30)
    await limiter.start()
    return store, limiter


async def refusals(limiter: Limiter, limits: Limits, what: str) -> StoreUnavailable:
    """Admit until the store refuses with `what` in the message; every failure on the way must be
    StoreUnavailable (a lost connection first, then the refusal)."""
    for n in range(5):
        try:
            await limiter.admit(limits, f"{what}-{n}", 0.0, 0)
        except StoreUnavailable as exc:
            if what in str(exc):
                return exc
    raise AssertionError(f"the store never refused with {what!r}")


def terminate_backends(server: PgServer, database: str) -> None:
    server._psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
                 " AND pid <> pg_backend_pid()")


async def refused_then_back(server: PgServer, url: str, database: str, refuse: str, undo: str, what: str) -> None:
    """A limiter admits; the server is made to refuse (`refuse`, its connections cut): admissions fail with
    StoreUnavailable saying `what`; after `undo` they are admitted again, by the same limiter."""
    key = Limits(new_key(url, "k"), concurrency=3)
    store, limiter = await started_limiter(url)
    try:
        assert (await limiter.admit(key, "r0", 0.0, 0)).admitted
        await asyncio.to_thread(server._psql, refuse)
        await asyncio.to_thread(terminate_backends, server, database)
        await refusals(limiter, key, what)
        await asyncio.to_thread(server._psql, undo)
        await asyncio.to_thread(terminate_backends, server, database)
        decision = None
        for n in range(3):      # connections the server closed are opened again
            try:
                decision = await limiter.admit(key, f"back-{n}", 0.0, 0)
                break
            except StoreUnavailable:
                continue
        assert decision is not None and decision.admitted
        assert [r[0] for r in rows(url)] == [f"back-{n}", "r0"]
    finally:
        await limiter.close()
        await store.close()


async def test_a_read_only_database_is_the_store_unavailable(pg_server, pg_url):
    database = pg_url.split("?")[0].rsplit("/", 1)[1]
    await refused_then_back(pg_server, pg_url, database,
                            f'ALTER DATABASE "{database}" SET default_transaction_read_only = on',
                            f'ALTER DATABASE "{database}" RESET default_transaction_read_only', "read-only")


async def test_too_many_connections_is_the_store_unavailable(pg_server):
    # A superuser is exempt from connection limits: the store is the database of a role of its own.
    name = f"conns_{os.getpid()}"
    await asyncio.to_thread(pg_server._psql, f"CREATE ROLE {name} LOGIN")
    await asyncio.to_thread(pg_server._psql, f"CREATE DATABASE {name} OWNER {name}")
    url = pg_server.url(name).replace(f"{SUPERUSER}@", f"{name}@")
    await refused_then_back(pg_server, url, name, f"ALTER ROLE {name} CONNECTION LIMIT 0",
                            f"ALTER ROLE {name} CONNECTION LIMIT -1", "too many connections")


# -- PostgreSQL not answering ---------------------------------------------------------------------------------


def server_processes(server: PgServer) -> list[int]:
    """The postmaster and its children (the backends serving the connections)."""
    with open(os.path.join(server.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(entry))
    return pids


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


async def test_a_database_that_stops_answering_fails_admissions_within_the_timeout(pg_server):
    try:
        server = await asyncio.to_thread(PgServer.start, parent=memory_folder())
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    store = limiter = None
    stopped: list[int] = []
    try:
        url = await asyncio.to_thread(server.create_database, "hung")
        key = Limits(new_key(url, "k"), concurrency=50)
        store, limiter = await started_limiter(url)
        timeout = limiter.admissions.timeout = 1.0
        assert (await limiter.admit(key, "before", 0.0, 0)).admitted

        stopped = server_processes(server)
        signal_all(stopped, signal.SIGSTOP)
        began = time.monotonic()
        # More admissions than the pool has connections: those waiting for a connection fail in time too.
        outcomes = await asyncio.gather(*(limiter.admit(key, f"hung-{n}", 0.0, 0) for n in range(12)),
                                        return_exceptions=True)
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        with pytest.raises(StoreUnavailable):
            await limiter.admissions.renew_lease(limiter.holder, 30)
        assert time.monotonic() - began < 3 * timeout * 2      # two waits: the admissions, then the renewal

        signal_all(stopped, signal.SIGCONT)
        stopped = []
        assert (await limiter.admit(key, "after", 0.0, 0)).admitted
        assert (await limiter.admissions.renew_lease(limiter.holder, 30)).holders == 1
        assert {r[0] for r in rows(url)} >= {"before", "after"}
    finally:
        signal_all(stopped, signal.SIGCONT)
        if limiter is not None:
            await limiter.close()
        if store is not None:
            await store.close()
        await asyncio.to_thread(server.close)


# -- Leases: lapsing while the process lives, stale ones collected, processes stopping ----------------------


async def test_a_lapsed_lease_is_taken_again_and_its_admissions_count_again(store_url):
    key = Limits(new_key(store_url, "k"), concurrency=1)
    stalled, other = await opened(store_url, 2)
    try:
        await lease(stalled, "stalled", seconds=0.5)
        await lease(other, "other")
        assert (await admit(stalled, key, "s1", "stalled")).admitted
        await asyncio.sleep(0.7)            # the stalled process misses its renewals: s1 stops counting
        assert (await in_flight(other, key)) == 0
        renewal = await stalled.admissions.renew_lease("stalled", 30)
        assert renewal.left is not None and renewal.left < 0 and renewal.holders == 2
        # Its slot counts again: the key's one slot is taken.
        assert (await admit(other, key, "o1", "other")).reason == "concurrency"
        assert (await stalled.admissions.renew_lease("stalled", 30)).left > 0
    finally:
        await stalled.close()
        await other.close()


async def in_flight(process, limits: Limits) -> int:
    return (await process.admissions.in_flight(limits.key_id))[0]


async def test_garbage_collection_spares_renewing_holders_and_ended_costs(store_url):
    key = Limits(new_key(store_url, "k"), concurrency=5, quota_cost=10.0)
    process, = await opened(store_url, 1)
    try:
        for holder in ("dead", "slow", "alive"):
            await lease(process, holder)
        for holder in ("dead", "slow"):
            assert (await admit(process, key, f"{holder}-live", holder, cost=1.0)).admitted
            assert (await admit(process, key, f"{holder}-ended", holder, cost=1.0)).admitted
            await release(process, key.key_id, f"{holder}-ended", 0.25, 10, True)
        # Both leases ran out long ago; "slow" renews (its loop stalled) before anyone collects.
        sql(store_url, "UPDATE limit_leases SET expires_at = ? WHERE holder IN ('dead', 'slow')",
            (time.time() - STALE_LEASE_SECONDS - 100,))
        renewal = await process.admissions.renew_lease("slow", 30)
        assert renewal.left < -STALE_LEASE_SECONDS
        await process.admissions.renew_lease("alive", 30)
        # The dead holder's slot and reservation went with its lease; its exact cost waits for the ledger row;
        # the slow holder kept everything.
        assert rows(store_url) == [("dead-ended", "dead", 0, 0.25), ("slow-ended", "slow", 0, 0.25),
                                   ("slow-live", "slow", 1, 1.0)]
        leases = service.connect(store_url)
        try:
            assert sorted(r[0] for r in leases.execute("SELECT holder FROM limit_leases").fetchall()) == [
                "alive", "slow"]
        finally:
            leases.close()
        assert await in_flight(process, key) == 1
    finally:
        await process.close()


async def test_a_stopping_process_leaves_its_ended_costs_to_the_ledger(store_url):
    key = Limits(new_key(store_url, "k"), concurrency=5, quota_cost=10.0)
    process, = await opened(store_url, 1)
    try:
        await lease(process, "h")
        for rid in ("running", "ended", "settled"):
            assert (await admit(process, key, rid, "h", cost=1.0)).admitted
        await release(process, key.key_id, "ended", 0.4, 10, True)          # the ledger row settles it
        await release(process, key.key_id, "settled", 0.5, 10, False)       # settled here: no ledger
        assert (await process.store.read_spend())[key.key_id][0] == pytest.approx(0.5)
        await process.admissions.drop_lease("h")
        assert rows(store_url) == [("ended", "h", 0, 0.4)]
        # The ledger row comes later: the cost reaches the spend once, the admission goes.
        record = UsageRecord(request_id="ended", started_at=time.time(), endpoint="/v1/messages", status=200,
                             key_id=key.key_id, key_name="k", input_tokens=5, output_tokens=5, cost=0.4)
        assert await process.store.write_ledger([dataclasses.asdict(record)]) == 1
        assert rows(store_url) == []
        assert (await process.store.read_spend())[key.key_id][0] == pytest.approx(0.9)
    finally:
        await process.close()


async def test_the_limiter_warns_once_when_its_lease_lapsed(tmp_path, caplog):
    url = str(tmp_path / "store.db")
    key = Limits(new_key(url, "k"), concurrency=1)
    store = await service.open_store(url)
    log = logging.getLogger("test.limits.lapse")
    limiter = Limiter(store, lease_seconds=0.3, log=log)
    await limiter.start()
    try:
        assert (await limiter.admit(key, "r1", 0.0, 0)).admitted
        with caplog.at_level(logging.WARNING, logger=log.name):
            time.sleep(0.6)                 # the event loop stalls longer than the lease
            await asyncio.sleep(0.5)        # the renewal loop catches up, renewing several times
        lapses = [r for r in caplog.records if "had run out" in r.getMessage()]
        assert len(lapses) == 1, caplog.records
        assert await limiter.admissions.in_flight(key.key_id) == (1, 0.0)      # r1 counts again
    finally:
        await limiter.close()
        await store.close()


async def test_an_admission_cut_off_by_its_timeout_is_forgotten_if_it_committed(pg_url):
    """The statement's timer ends the connection, but the server may still commit the admission (here once the
    key's lock it waited for is free): the limiter releases it, so the slot does not stay taken for good."""
    import asyncpg

    from apertis_proxy.store.pg_admissions import ADMISSION_LOCK
    key = Limits(new_key(pg_url, "k"), concurrency=1)
    store = await service.open_store(pg_url)
    limiter = Limiter(store, lease_seconds=1.5)         # renewed, and the forgotten released again, every 0.5 s
    await limiter.start()
    blocker = await asyncpg.connect(pg_url)
    try:
        limiter.admissions.timeout = 0.3
        async with blocker.transaction():
            await blocker.execute("SELECT pg_advisory_xact_lock($1)", (ADMISSION_LOCK << 32) | key.key_id)
            with pytest.raises(StoreUnavailable):
                await limiter.admit(key, "cut-off", 0.0, 0)
            await asyncio.sleep(0.2)
        # The server got the lock and committed after the limiter gave up; the limiter releases it again.
        async def forgotten() -> bool:
            return not any(r[0] == "cut-off" for r in rows(pg_url))
        await wait_for(forgotten, 5.0, "the admission to be forgotten")
        assert (await limiter.admit(key, "next", 0.0, 0)).admitted
    finally:
        await blocker.close()
        await limiter.close()
        await store.close()


async def test_a_release_cut_off_by_its_bound_leaves_the_pool_usable(pg_url, monkeypatch):
    """A release waiting on a locked row past the limiter's bound is given up and retried later; the connection
    it ran on is closed rather than handed back busy, so every later admission of the process works."""
    import asyncpg

    from apertis_proxy.budgets import limiter as limiter_module
    monkeypatch.setattr(limiter_module, "RELEASE_TIMEOUT", 0.3)
    key_id = new_key(pg_url, "slow-release")
    process, = await opened(pg_url, 1)
    limiter = Limiter(process.store)
    limiter.admissions = process.admissions
    blocker = await asyncpg.connect(pg_url)
    try:
        await lease(process, limiter.holder)
        limits = Limits(key_id, concurrency=20, quota_cost=10.0)
        assert (await limiter.admit(limits, "slow", 0.5, 0)).admitted
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM admissions WHERE request_id = 'slow' FOR UPDATE")
            await limiter.release(key_id, "slow", 0.25, 10, True)       # cut off after 0.3 s: kept for later
        for n in range(12):                                             # more than the pool's connections
            assert (await limiter.admit(limits, f"next{n}", 0.01, 0)).admitted
        await limiter._retry_releases()
        assert limiter._unreleased == []
        in_flight = await process.admissions.in_flight(key_id)
        assert in_flight[0] == 12
        decision = await limiter.admit(limits, "last", 0.01, 0)
        assert decision.admitted and decision.use.spent_cost == pytest.approx(0.25)     # counted once
    finally:
        await blocker.close()
        await process.close()


async def admitted_under_a_short_release_bound(tmp_path, monkeypatch, request_id: str):
    """A SQLite store whose releases give up on the write lock after 0.3 s (the lock itself waited for without
    end), and a limited key with `request_id` admitted: (url, key id, store, limiter, limits)."""
    from apertis_proxy.budgets import limiter as limiter_module
    from apertis_proxy.store import admissions as admissions_module
    monkeypatch.setattr(limiter_module, "RELEASE_TIMEOUT", 0.3)
    monkeypatch.setattr(admissions_module, "LOCK_WAIT", 3600.0)      # unbounded, a release would wait on
    url = str(tmp_path / "store.db")
    key_id = new_key(url, request_id)
    store, limiter = await started_limiter(url)
    limits = Limits(key_id, concurrency=5, quota_cost=10.0)
    assert (await limiter.admit(limits, request_id, 0.5, 0)).admitted
    return url, key_id, store, limiter, limits


async def test_a_sqlite_release_kept_from_the_write_lock_past_its_bound_is_made_later_once(tmp_path, monkeypatch):
    """On SQLite the store bounds a release's wait for the write lock (the limiter times none itself): a release
    the lock holds back past the bound fails unrun, the answer is not held back further, and the limiter makes
    it again later, counted once."""
    url, key_id, store, limiter, limits = await admitted_under_a_short_release_bound(tmp_path, monkeypatch, "slow")
    blocker = sqlite3.connect(url, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")          # another process's write transaction, not ending
        # Given up after 0.3 s, kept for later (the 30 s only keeps a regression from hanging the suite).
        await asyncio.wait_for(limiter.release(key_id, "slow", 0.25, 10, True), 30)
        assert blocker.in_transaction and limiter._unreleased == [((key_id, "slow", 0.25, 10, True, None, None), True)]
        blocker.execute("ROLLBACK")

        async def made() -> bool:
            return not limiter._unreleased
        await wait_for(made, 15.0, "the release to be made again")
        assert rows(url) == [("slow", limiter.holder, 0, 0.25)]
        decision = await limiter.admit(limits, "next", 0.01, 0)
        assert decision.admitted and decision.use.live == 0
        assert decision.use.spent_cost == pytest.approx(0.25)        # counted once
    finally:
        blocker.close()
        await limiter.close()
        await store.close()


async def test_a_release_not_run_for_the_write_lock_is_made_again_as_a_first_release(tmp_path, monkeypatch):
    """Without a ledger, a first release settles the request's cost also when its admission was collected (its
    process had stalled past its lease); a retry does not, since an earlier try may have committed.  A release
    the store dropped unrun for waiting on the write lock past its bound is made again as a first release, so
    that cost still reaches the key's spend."""
    from apertis_proxy.store.admissions import renew_step
    url, key_id, store, limiter, _ = await admitted_under_a_short_release_bound(tmp_path, monkeypatch, "collected")
    other = sqlite3.connect(url, isolation_level=None)
    try:
        # Another process, holding the write lock: it finds this process's lease run out long ago and
        # collects its admission.
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE limit_leases SET expires_at = ? WHERE holder = ?",
                      (time.time() - STALE_LEASE_SECONDS - 5, limiter.holder))
        renew_step(other, "another-process", 30.0)
        assert other.execute("SELECT COUNT(*) FROM admissions").fetchone()[0] == 0
        await asyncio.wait_for(limiter.release(key_id, "collected", 0.25, 10, False), 30)
        assert limiter._unreleased == [((key_id, "collected", 0.25, 10, False, None, None), True)]
        other.execute("COMMIT")

        async def made() -> bool:
            return not limiter._unreleased
        await wait_for(made, 15.0, "the release to be made again")
        spent = other.execute("SELECT cost, tokens FROM key_spend WHERE key_id = ?", (key_id,)).fetchone()
        assert spent == (pytest.approx(0.25), 10)
    finally:
        other.close()
        await limiter.close()
        await store.close()


async def test_spend_settled_without_a_ledger_survives_a_postgres_crash(tmp_path):
    """Admissions commit without waiting for the disk, but a release that adds a cost to the spend (no ledger
    settles it) is money: it must survive a crash of the server right after it returned."""
    import asyncpg
    try:
        server = await asyncio.to_thread(PgServer.start, True, memory_folder())
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    try:
        server._psql("ALTER SYSTEM SET wal_writer_delay = '10s'")     # asynchronous commits stay unflushed
        server._psql("SELECT pg_reload_conf()")
        url = server.create_database("crash")
        key_id = new_key(url, "k")
        process, = await opened(url, 1)
        await lease(process, "h")
        assert (await admit(process, Limits(key_id, quota_cost=10.0), "r1", "h", cost=1.0)).admitted
        await release(process, key_id, "r1", 0.7, 70, False)
        await asyncio.to_thread(server.stop, "immediate")
        for closing in (process.admissions.close, process.store.close):
            try:
                await closing()
            except Exception:  # noqa: BLE001 - the server is gone
                pass
        await asyncio.to_thread(server.start_again)
        conn = await asyncpg.connect(url)
        try:
            row = await conn.fetchrow("SELECT cost, tokens FROM key_spend WHERE key_id = $1", key_id)
        finally:
            await conn.close()
        assert row is not None and row["cost"] == pytest.approx(0.7) and row["tokens"] == 70
    finally:
        server.close()


async def test_an_admission_on_a_connection_the_server_just_ended_is_tried_once_more(pg_server, pg_url):
    """The server ends the pooled connections (a restart of its processes, an idle timeout, an operator's
    pg_terminate_backend) an instant before an admission uses one, before the event loop read of it: the
    admission runs again on a new connection, once, instead of answering 503."""
    database = pg_url.split("?")[0].rsplit("/", 1)[1]
    key = Limits(new_key(pg_url, "k"), concurrency=100)
    store, limiter = await started_limiter(pg_url)
    try:
        assert (await limiter.admit(key, "r0", 0.0, 0)).admitted
        for n in range(5):
            terminate_backends(pg_server, database)     # blocking: the loop reads nothing of it before the use
            assert (await limiter.admit(key, f"r{n + 1}", 0.0, 0)).admitted
        assert sorted(r[0] for r in rows(pg_url)) == [f"r{n}" for n in range(6)]
    finally:
        await limiter.close()
        await store.close()
