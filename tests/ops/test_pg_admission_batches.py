"""PostgreSQL admissions and releases asked for together go to the server as one call (pg_admissions.py,
gathered.py): decided exactly as one at a time would be, and a call at fault fails alone."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import asyncpg
import pytest

from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import pg_admissions, pg_schema
from apertis_proxy.store.admissions import Limits

from .test_admissions_store import admit, lease, leased_process, new_key, opened, release


def batch_sizes(process, kind: str) -> list[int]:
    """The sizes of the batches `process` sends of `kind` (admissions or releases) from now on."""
    gathered = getattr(process.admissions, f"_{kind}")
    sent = gathered._send
    sizes: list[int] = []

    async def counting(items):
        sizes.append(len(items))
        return await sent(items)
    gathered._send = counting
    return sizes


def decided(decision) -> tuple:
    use = decision.use
    return (decision.reason, decision.retry_after, use.spent_cost, use.spent_tokens, use.live, use.live_cost,
            use.live_tokens, use.recent)


async def test_a_batch_of_one_key_decides_as_one_request_at_a_time(pg_url):
    """Twelve requests of one key in one batch: every refusal in the same order (quota reserved, concurrency,
    minute) and the same figures as the same twelve sent one after the other for a twin key."""
    costs = [0.3, 0.3, 0.5, 0.3, 0.2, 0.1, 0.4, 0.1, 0.1, 0.1, 0.2, 0.1]
    alone_key, batch_key = new_key(pg_url, "alone"), new_key(pg_url, "batch")
    async with leased_process(pg_url) as store:
        limits = {key: Limits(key, quota_cost=1.0, concurrency=4, rpm=9) for key in (alone_key, batch_key)}
        alone = [await admit(store, limits[alone_key], f"a{n}", "h", cost) for n, cost in enumerate(costs)]
        sizes = batch_sizes(store, "admissions")
        together = await asyncio.gather(*(admit(store, limits[batch_key], f"b{n}", "h", cost)
                                          for n, cost in enumerate(costs)))
        assert sizes == [len(costs)]
        assert [decided(d) for d in together] == [decided(d) for d in alone]
        assert {d.reason for d in alone} == {None, "quota_reserved", "concurrency"}
        assert await store.admissions.in_flight(batch_key) == await store.admissions.in_flight(alone_key)
        # Nine in the minute: the minute refuses the next ones, in one batch as alone.
        more = {key: Limits(key, rpm=9) for key in (alone_key, batch_key)}
        alone = [await admit(store, more[alone_key], f"a-m{n}", "h") for n in range(8)]
        together = await asyncio.gather(*(admit(store, more[batch_key], f"b-m{n}", "h") for n in range(8)))
        assert [d.reason for d in together] == [d.reason for d in alone]
        assert [d.reason for d in alone].count("rpm") > 0


async def test_a_batch_of_releases_adds_ended_costs_in_order_and_a_repeat_once(pg_url):
    """Releases of one key in one batch add their exact costs to the key's ended sum in the batch's order
    (the same floating-point sum as one at a time); a release repeated in the batch ends its request once."""
    key_id = new_key(pg_url, "ended")
    async with leased_process(pg_url) as store:
        limits = Limits(key_id, quota_cost=10.0)
        for n in range(4):
            assert (await admit(store, limits, f"r{n}", "h", 1.0)).admitted
        await release(store, key_id, "r0", 0.1, 10, True)
        sizes = batch_sizes(store, "releases")
        await asyncio.gather(release(store, key_id, "r1", 0.2, 20, True), release(store, key_id, "r2", 0.3, 30, True),
                             release(store, key_id, "r2", 0.3, 30, True), release(store, key_id, "r3", 0.0, 0, True))
        assert sizes == [3, 1]      # the repeat of r2 waits for the next batch, and finds r2 ended
        conn = await asyncpg.connect(store.admissions.url.target)
        try:
            row = await conn.fetchrow("SELECT n, cost, tokens FROM admission_ended WHERE key_id = $1", key_id)
            assert tuple(row) == (3, (0.1 + 0.2) + 0.3, 60)
            assert (0.1 + 0.2) + 0.3 != 0.1 + (0.2 + 0.3)      # the order shows
            assert await conn.fetchval("SELECT COUNT(*) FROM admissions WHERE key_id = $1", key_id) == 3
        finally:
            await conn.close()
        assert await store.admissions.in_flight(key_id) == (0, 0.0)


async def test_a_call_the_server_refuses_fails_alone_and_the_batch_stands(pg_url):
    """A request admitted twice in one batch (its id is taken): the batch is refused by the server, then sent
    one call at a time, so that only the repeat fails; the calls before and after it are decided as alone."""
    key_id = new_key(pg_url, "dup")
    async with leased_process(pg_url) as store:
        limits = Limits(key_id, concurrency=10)
        sizes = batch_sizes(store, "admissions")
        outcomes = await asyncio.gather(*(admit(store, limits, rid, "h") for rid in ("a", "dup", "dup", "b")),
                                        return_exceptions=True)
        assert sizes == [4, 1, 1, 1, 1]
        assert [o.admitted for o in (outcomes[0], outcomes[1], outcomes[3])] == [True, True, True]
        assert isinstance(outcomes[2], asyncpg.UniqueViolationError)
        assert (outcomes[0].use.live, outcomes[1].use.live, outcomes[3].use.live) == (0, 1, 2)
        assert await store.admissions.in_flight(key_id) == (3, 0.0)


async def test_batches_of_two_processes_over_shared_keys_never_deadlock(pg_url):
    """Two processes whose batches take the same keys in opposite orders: each batch locks its keys in one
    order, so neither waits on the other in a cycle (the server counts no deadlock) and the limits hold."""
    keys = [new_key(pg_url, f"k{n}") for n in range(6)]
    stores = await opened(pg_url, 2)
    try:
        for n, store in enumerate(stores):
            await lease(store, f"h{n}")
        limits = {key: Limits(key, concurrency=5, quota_cost=100.0) for key in keys}

        async def one(store, n: int, key: int, holder: str) -> bool:
            decision = await admit(store, limits[key], f"{holder}-{n}-{key}", holder, 0.5)
            if decision.admitted:
                await release(store, key, f"{holder}-{n}-{key}", 0.25, 1, True)
            return decision.admitted

        rounds, round_keys = [], []
        for n in range(15):
            for store, holder, order in ((stores[0], "h0", keys), (stores[1], "h1", keys[::-1])):
                rounds += [one(store, n, key, holder) for key in order]
                round_keys += order
        admitted = await asyncio.gather(*rounds)
        conn = await asyncpg.connect(stores[0].admissions.url.target)
        try:
            deadlocks = await conn.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            ended = await conn.fetch("SELECT key_id, n, cost FROM admission_ended ORDER BY key_id")
        finally:
            await conn.close()
        assert deadlocks == 0
        per_key = {key: 0 for key in keys}
        for key, ok in zip(round_keys, admitted):
            per_key[key] += ok
        assert {row["key_id"]: (row["n"], row["cost"]) for row in ended} == {
            key: (count, pytest.approx(0.25 * count)) for key, count in per_key.items()}
        for key in keys:
            assert await stores[0].admissions.in_flight(key) == (0, 0.0)
    finally:
        for store in stores:
            await store.close()


async def test_requests_one_after_the_other_keep_to_one_connection(pg_url):
    """The connection freed last is the next one used: a light load opens no second connection (and keeps to
    one server process, whose caches stay warm)."""
    key_id = new_key(pg_url, "sequential")
    async with leased_process(pg_url) as store:
        for n in range(12):
            assert (await admit(store, Limits(key_id, concurrency=2, rpm=100), f"r{n}", "h")).admitted
            await release(store, key_id, f"r{n}", 0.0, 0, True)
        assert len(store.admissions._open) == 2       # the pool's one and the lease's


async def test_a_connection_idle_too_long_is_replaced_when_next_taken(pg_url, monkeypatch):
    """Freed last, used first: the connections under a burst's may sit unused for hours (a NAT on the way may
    have forgotten them); one idle for longer than MAX_IDLE_SECONDS is closed and a new one opened when taken."""
    monkeypatch.setattr(pg_admissions, "MAX_IDLE_SECONDS", 0.3)
    key_id = new_key(pg_url, "idle")
    async with leased_process(pg_url) as store:
        pool = store.admissions

        async def server_process() -> int:
            return await pool._run(lambda conn: conn.fetchval("SELECT pg_backend_pid()"))
        first = await server_process()
        assert await server_process() == first          # used again at once: the same one
        await asyncio.sleep(0.5)
        second = await server_process()
        assert second != first
        assert (await admit(store, Limits(key_id, concurrency=1), "r", "h")).admitted
        assert len(pool._open) == 2       # the replaced one closed: the pool's one and the lease's
        # The server took the keepalive settings from the connection (over a unix socket they read 0: unused).
        sources = await pool._run(lambda conn: conn.fetch(
            "SELECT name, source FROM pg_settings WHERE name LIKE 'tcp_keepalives_%'"))
        assert {row["name"]: row["source"] for row in sources} == {
            "tcp_keepalives_idle": "client", "tcp_keepalives_interval": "client", "tcp_keepalives_count": "client"}


async def test_a_statement_the_server_refused_leaves_its_connection_in_the_pool(pg_url):
    """An error the server answers (here a division by zero; a full disk would fail every statement alike) leaves
    the connection usable: the next call runs on the same server process, no new connection is opened for it.
    A connection cut mid-exchange is replaced."""
    async with leased_process(pg_url) as store:
        pool = store.admissions

        async def server_process() -> int:
            return await pool._run(lambda conn: conn.fetchval("SELECT pg_backend_pid()"))
        first = await server_process()
        for _ in range(3):
            with pytest.raises(asyncpg.DivisionByZeroError):
                await pool._run(lambda conn: conn.fetchval("SELECT 1 / 0"))
        assert await server_process() == first
        assert len(pool._open) == 2       # the pool's one and the lease's

        async def cut(conn):
            await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(5)"), 0.05)
        with pytest.raises(asyncio.TimeoutError):
            await pool._run(cut)
        assert await server_process() != first


async def migrated_then(pg_url, name: str, sql: str) -> tuple[int, str]:
    """A new key `name` (its id) in a database migrated by a store of this revision, then altered by `sql`
    (as a database of an earlier revision would be); the database's address."""
    key_id = new_key(pg_url, name)
    store, = await opened(pg_url, 1)
    target = store.admissions.url.target
    await store.close()
    conn = await asyncpg.connect(target)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
    return key_id, target


async def test_a_database_of_the_same_version_gets_the_batch_function_and_keeps_the_single_one(pg_url):
    """A database migrated before apertis_admit_many (same SCHEMA_VERSION, no pg_revision) gets it when a
    host of this revision opens it; apertis_admit, the call of hosts of the earlier revision, still decides."""
    key_id, target = await migrated_then(pg_url, "upgrade", "DROP FUNCTION apertis_admit;"
                                         " DROP FUNCTION apertis_admit_many; DELETE FROM meta WHERE k = 'pg_revision'")
    async with leased_process(pg_url) as store:
        limits = Limits(key_id, concurrency=1)
        assert (await admit(store, limits, "new", "h")).admitted
        conn = await asyncpg.connect(target)
        try:
            old = await conn.fetchrow("SELECT * FROM apertis_admit($1, 'old', 'h', 0, 0, NULL, NULL, NULL, NULL, 1)",
                                      key_id)
            assert (old["reason"], old["live"]) == ("concurrency", 1)
            assert await conn.fetchval("SELECT v FROM meta WHERE k = 'pg_revision'") == str(pg_schema.PG_REVISION)
        finally:
            await conn.close()


async def test_a_database_of_revision_1_gets_apertis_admit_of_its_own(pg_url):
    """At revision 1, apertis_admit called apertis_admit_many; a host of this revision replaces it with the
    function that decides a batch of one itself."""
    key_id, target = await migrated_then(
        pg_url, "revision1",
        "CREATE OR REPLACE FUNCTION apertis_admit(p_key BIGINT, p_request TEXT, p_holder TEXT,"
        " p_cost DOUBLE PRECISION, p_tokens BIGINT, p_quota_cost DOUBLE PRECISION, p_quota_tokens BIGINT,"
        " p_period TEXT, p_rpm BIGINT, p_concurrency BIGINT, OUT reason TEXT, OUT retry_after INTEGER,"
        " OUT spent_cost DOUBLE PRECISION, OUT spent_tokens BIGINT, OUT live BIGINT, OUT live_cost DOUBLE PRECISION,"
        " OUT live_tokens BIGINT, OUT recent BIGINT, OUT holders BIGINT) LANGUAGE sql AS $$"
        " SELECT 'revision 1', NULL::INTEGER, 0::FLOAT8, 0::BIGINT, 0::BIGINT, 0::FLOAT8, 0::BIGINT, 0::BIGINT,"
        " 1::BIGINT $$; UPDATE meta SET v = '1' WHERE k = 'pg_revision'")
    async with leased_process(pg_url) as store:
        assert (await admit(store, Limits(key_id, concurrency=1), "new", "h")).admitted
        assert not (await admit(store, Limits(key_id, concurrency=1), "next", "h")).admitted
    conn = await asyncpg.connect(target)
    try:
        assert await conn.fetchval("SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang"
                                   " WHERE p.proname = 'apertis_admit'") == "plpgsql"
        assert await conn.fetchval("SELECT v FROM meta WHERE k = 'pg_revision'") == str(pg_schema.PG_REVISION)
    finally:
        await conn.close()


async def test_a_database_of_revision_2_gets_the_in_flight_index_a_release_finds_its_row_by(pg_url):
    """At revision 2 the index of requests in flight held the key alone, and a release planned without the table's
    statistics read every request of the key in flight; a host of this revision replaces it with one that holds
    the request's id too, so a release reads its one row whatever the statistics say."""
    key_id, target = await migrated_then(
        pg_url, "revision2",
        "DROP INDEX admissions_in_flight; CREATE INDEX admissions_live ON admissions (key_id) WHERE live = 1;"
        " UPDATE meta SET v = '2' WHERE k = 'pg_revision'")
    async with leased_process(pg_url) as store:
        assert (await admit(store, Limits(key_id, concurrency=1000), "new", "h")).admitted
    conn = await asyncpg.connect(target)
    try:
        indexes = {r["indexname"]: r["indexdef"] for r in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'admissions'")}
        assert "admissions_live" not in indexes
        assert "(key_id, request_id) WHERE (live = 1)" in indexes["admissions_in_flight"]
        assert await conn.fetchval("SELECT v FROM meta WHERE k = 'pg_revision'") == str(pg_schema.PG_REVISION)
        # 500 requests of the key in flight, the statistics not gathered: the release's row by its id alone.
        await conn.execute("INSERT INTO admissions SELECT $1, 'r' || g, 'h', 0, 1, 0.01, 10"
                           " FROM generate_series(1, 500) g", key_id)
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        for sql, args in ((pg_admissions._RELEASE_ENDED, (key_id, "r7", 0.5, 5, "")),
                          (pg_admissions._RELEASE_FREE, (key_id, "r8"))):
            plan = "\n".join(r[0] for r in await (await conn.prepare(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + sql)).fetch(*args))
            scan = next(line for line in plan.splitlines() if "Index Scan" in line or "Seq Scan" in line)
            assert "Index Scan" in scan and "rows=1 " in scan, plan
            assert "Rows Removed by Filter" not in plan, plan
    finally:
        await conn.close()


async def test_a_host_of_an_earlier_revision_starts_and_one_of_an_earlier_version_does_not(pg_url, monkeypatch):
    """A host of an earlier revision of the same schema version (PostgreSQL's changes alone) starts on a database
    this one upgraded, and leaves the revision where it is; one of version 8 (before ended admissions were kept
    per quota period, a change of both backends' tables) refuses it instead of writing rows of the old shape."""
    store, = await opened(pg_url, 1)
    target = store.admissions.url.target
    await store.close()
    conn = await asyncpg.connect(target)
    try:
        assert await conn.fetchval("SELECT v FROM meta WHERE k = 'schema_version'") == "10"
        revision = pg_schema.PG_REVISION
        monkeypatch.setattr(pg_schema, "PG_REVISION", 1)
        await pg_schema.migrate(conn)
        assert await conn.fetchval("SELECT v FROM meta WHERE k = 'pg_revision'") == str(revision)
        monkeypatch.setattr(pg_schema, "SCHEMA_VERSION", 8)
        with pytest.raises(pg_schema.NewerSchema):
            await pg_schema.migrate(conn)
    finally:
        await conn.close()


# Version 8's ended admissions: no period of their own, their sums per key alone.
AS_VERSION_8 = """
DROP TABLE admission_ended;
ALTER TABLE admissions DROP COLUMN start;
CREATE TABLE admission_ended (key_id BIGINT PRIMARY KEY, n BIGINT NOT NULL, cost DOUBLE PRECISION NOT NULL,
                              tokens BIGINT NOT NULL);
UPDATE meta SET v = '8' WHERE k = 'schema_version';
"""


async def test_a_version_8_database_keeps_its_ended_costs_under_their_days(pg_url):
    """Version 8 kept ended admissions' sums per key alone: upgraded, each ended admission takes the day it was
    admitted and the sums are made again from them, so they count for a lifetime quota, and the ledger row of
    such an admission settles its day's sum."""
    key_id, target = await migrated_then(pg_url, "v8", AS_VERSION_8)
    conn = await asyncpg.connect(target)
    try:
        await conn.execute("INSERT INTO admissions (key_id, request_id, holder, admitted_at, live, cost, tokens)"
                           " VALUES ($1, 'old', 'h', 0, 0, 0.25, 10)", key_id)
        await conn.execute("INSERT INTO admission_ended (key_id, n, cost, tokens) VALUES ($1, 1, 0.25, 10)", key_id)
    finally:
        await conn.close()
    async with leased_process(pg_url) as store:
        seen = await admit(store, Limits(key_id, quota_cost=1.0), "new", "h", cost=0.1)
        assert seen.admitted and seen.use.spent_cost == pytest.approx(0.25)
        await release(store, key_id, "new", 0.5, 10, True, None, "")
        record = UsageRecord(request_id="old", started_at=time.time(), endpoint="/v1/messages", status=200,
                             key_id=key_id, key_name="v8", input_tokens=5, output_tokens=5, cost=0.25)
        assert await store.store.write_ledger([dataclasses.asdict(record)]) == 1
        conn = await asyncpg.connect(target)
        try:
            rows = await conn.fetch("SELECT start, n, cost FROM admission_ended WHERE key_id = $1 ORDER BY start",
                                    key_id)
            assert [tuple(r) for r in rows] == [("", 1, 0.5), ("1970-01-01", 0, 0.0)]
        finally:
            await conn.close()


async def test_a_full_minute_ahead_of_the_servers_clock_comes_back_to_it(pg_url):
    """The server's clock set back an hour after a key's minute filled up: its times lie an hour ahead and would
    count until the clock caught up.  The next decision brings them back to now: the key is told to come back in
    a minute, not in an hour, and the times leave the minute a minute from now."""
    key_id = new_key(pg_url, "clock")
    async with leased_process(pg_url) as store:
        limits = Limits(key_id, rpm=3)
        for n in range(3):
            assert (await admit(store, limits, f"r{n}", "h")).admitted
        conn = await asyncpg.connect(store.admissions.url.target)
        try:
            await conn.execute("UPDATE admission_times SET at = at + 3600 WHERE key_id = $1", key_id)
            await conn.execute("UPDATE admission_counts SET last_at = last_at + 3600 WHERE key_id = $1", key_id)
            refused = await admit(store, limits, "r3", "h")
            assert (refused.reason, refused.use.recent) == ("rpm", 3)
            assert 1 <= refused.retry_after <= 61
            ahead = await conn.fetchval("SELECT COUNT(*) FROM admission_times WHERE key_id = $1"
                                        " AND at > extract(epoch FROM clock_timestamp()) + 1", key_id)
            assert ahead == 0
        finally:
            await conn.close()
        # Both functions decide alike: a batch of two sees the minute as the call of one did.
        both = await asyncio.gather(admit(store, limits, "r4", "h"), admit(store, limits, "r5", "h"))
        assert [d.reason for d in both] == ["rpm", "rpm"] and all(d.retry_after <= 61 for d in both)


async def test_a_renewal_leaves_an_idle_minute_another_transaction_holds(pg_url):
    """A renewal deletes the minutes of keys idle for a minute, but does not wait for one another transaction
    holds (an admission batch may hold several keys' minutes: waiting could close a cycle with it); the next
    renewal deletes it."""
    held_key, free_key = new_key(pg_url, "held"), new_key(pg_url, "free")
    store, = await opened(pg_url, 1)
    other = await asyncpg.connect(store.admissions.url.target)
    try:
        await lease(store, "h")
        for key_id in (held_key, free_key):
            assert (await admit(store, Limits(key_id, rpm=100), f"r{key_id}", "h")).admitted
        await other.execute("UPDATE admission_counts SET last_at = last_at - 120")
        async with other.transaction():
            await other.execute("SELECT 1 FROM admission_counts WHERE key_id = $1 FOR UPDATE", held_key)
            await asyncio.wait_for(store.admissions.renew_lease("h", 30.0), 2.0)     # it does not wait
            assert [r[0] for r in await store_rows(store, "SELECT key_id FROM admission_counts")] == [held_key]
        await store.admissions.renew_lease("h", 30.0)
        assert await store_rows(store, "SELECT key_id FROM admission_counts") == []
        assert await store_rows(store, "SELECT key_id FROM admission_times") == []
    finally:
        await other.close()
        await store.close()


async def store_rows(store, query: str) -> list:
    conn = await asyncpg.connect(store.admissions.url.target)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()
