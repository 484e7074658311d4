"""Retention on PostgreSQL run by two hosts of one database at once.

Every host runs `[ledger] keep_days` retention (at start-up, then hourly): hosts started together prune at the
same moments.  Host A's prune drops an old monthly partition in its transaction; host B's prune, started before
A committed, listed that partition too.  B's round must end quietly (A did the work), not fail.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

import asyncpg

from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import pg_schema, service, usage
from apertis_proxy.store.url import parse


def _rows(n: int, ts: float, prefix: str) -> list[dict]:
    return [dataclasses.asdict(UsageRecord(
        request_id=f"{prefix}_{i}", started_at=ts + i * 0.001, endpoint="/v1/messages", status=200,
        key_name="alice", requested_model="claude-x", input_tokens=10, output_tokens=5, cost=0.001))
        for i in range(n)]


async def _waiting_on_a_lock(conn, pid: int) -> bool:
    for _ in range(200):
        waiting = await conn.fetchval(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> $1", pid)
        if waiting:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_second_hosts_prune_of_a_partition_the_first_dropped_ends_quietly(pg_url):
    now = time.time()
    old = now - 120 * 86400
    host_b = await service.open_store(pg_url)
    other = await asyncpg.connect(parse(pg_url).target)        # host A's prune, mid-transaction
    try:
        assert await host_b.write_ledger(_rows(20, old, "old") + _rows(5, now, "new")) == 25
        name = pg_schema.partition_name(pg_schema.month_of(old))
        pid = await other.fetchval("SELECT pg_backend_pid()")
        transaction = other.transaction()
        await transaction.start()
        await other.execute(f"DROP TABLE {name}")              # as pg_ledger.prune does, not yet committed
        pruning = asyncio.ensure_future(host_b.prune_ledger(now - 30 * 86400))
        try:
            assert await _waiting_on_a_lock(other, pid), "host B's prune never waited for host A's"
        finally:
            await transaction.commit()
        try:
            removed = await pruning
            failure = None
        except Exception as exc:     # noqa: BLE001 - what the retention loop would log as a failed round
            removed, failure = None, exc
        assert failure is None, (
            f"host B's retention round failed after host A dropped {name} first: {type(failure).__name__}: "
            f"{failure}")
        assert removed == 0
        conn = await asyncio.to_thread(service.connect, pg_url)
        try:
            assert usage.summarize(conn, by="day")["requests"] == 5
        finally:
            conn.close()
    finally:
        await other.close()
        await host_b.close()


_ITERATIONS = [{"type": "message", "input_tokens": 10, "output_tokens": 5},
               {"type": "advisor_message", "input_tokens": 1000, "output_tokens": 200}]


async def test_after_retention_the_rollup_and_the_raw_rows_report_the_same(pg_url):
    now = time.time()
    store = await service.open_store(pg_url)
    try:
        rows = _rows(4, now - 120 * 86400, "old") + _rows(3, now - 3600, "new")
        for row in rows:
            row["iterations"] = _ITERATIONS
        assert await store.write_ledger(rows) == 7
        assert await store.prune_ledger(now - 30 * 86400) == 4
        assert await store.prune_ledger(now - 30 * 86400) == 0        # a second host's later round
    finally:
        await store.close()
    conn = await asyncio.to_thread(service.connect, pg_url)
    try:
        rollup = usage.summarize(conn, by="day")
        raw = usage.summarize(conn, by="day", since=1.5)
    finally:
        conn.close()
    assert rollup["requests"] == raw["requests"] == 3
    assert rollup["iteration_tokens"] == raw["iteration_tokens"] == 3 * 1200
    assert rollup["by"] == raw["by"]
