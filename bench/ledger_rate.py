"""How many ledger rows per second the store's ledger write takes, on SQLite and on PostgreSQL.

    python bench/ledger_rate.py [--rows 100000] [--batch 500]

Rows shaped like the meter's (every UsageRecord field) go through Store.write_ledger in batches, as the meter
ships its spool: idempotent insert, key spend settled in the same transaction (PostgreSQL: the daily rollup too).
PostgreSQL is a throwaway server (tests/support/pg_server.py) on a unix socket, fsync and synchronous commit on.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store.keys import create_key
from apertis_proxy.store.service import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))


def rows(n: int, start: int, key_id: int) -> list[dict]:
    now = time.time()
    return [dataclasses.asdict(UsageRecord(
        request_id=f"req_{i:024x}", started_at=now + i * 1e-4, endpoint="/v1/messages", key_id=key_id,
        key_name="bench", requested_model="claude-haiku-4-5-20251001", upstream_model="claude-haiku-4-5-20251001",
        channel_id=1, channel_name="main", status=200, input_tokens=120, output_tokens=40, cost=0.00032,
        prices={"input": "1", "output": "5"}, duration_ms=12.5)) for i in range(start, start + n)]


async def measure(url: str, total: int, batch: int) -> float:
    store = await open_store(url)
    try:
        key_id, _ = await store.call(create_key, "bench")
        batches = [rows(batch, i, key_id) for i in range(0, total, batch)]
        t0 = time.perf_counter()
        for b in batches:
            assert await store.write_ledger(b) == len(b)
        return total / (time.perf_counter() - t0)
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args()
    from pg_server import PgServer
    work = tempfile.mkdtemp(prefix="apertis-ledger-rate-")
    print(f"SQLite:     {asyncio.run(measure(f'{work}/ledger.db', args.rows, args.batch)):,.0f} rows/s")
    server = PgServer.start(durable=True)
    try:
        url = server.create_database("ledger")
        print(f"PostgreSQL: {asyncio.run(measure(url, args.rows, args.batch)):,.0f} rows/s")
    finally:
        server.close()


if __name__ == "__main__":
    main()
