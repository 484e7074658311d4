"""What a limited key's admission and release cost PostgreSQL: server CPU per admit+release pair.

    python bench/pg_admissions.py [--tasks 64] [--keys 8] [--pairs 4000] [--cost 0] [--limits all]
                                  [--repeat 3] [--durable]

Starts a throwaway PostgreSQL server (tests/support/pg_server.py, without fsync unless --durable), creates
--keys keys, and runs --tasks tasks on one event loop, each admitting a request of the next key through the
store's admissions access (store/pg_admissions.py) and releasing it at once (--cost > 0: ended with that exact
cost, added to the key's ended sums; 0: forgotten), --pairs pairs in all, once to warm up and then measured,
--repeat times.  The admission tables are vacuumed every 2 s, as a gateway does.  --limits picks the limits
that never bind: all (quota, requests per minute and concurrency), conc, rpm or quota.

It prints, per run and the median: pairs/s (a closed loop on a shared machine: indicative only), the
PostgreSQL server's CPU time per pair read from /proc (all its processes: it holds under load, and it is what
saturates limited keys on a small machine), and this process's CPU time per pair.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import procstat  # noqa: E402

from apertis_proxy.store import service  # noqa: E402
from apertis_proxy.store.admissions import Limits  # noqa: E402
from apertis_proxy.store.keys import create_key  # noqa: E402
from tests.support.pg_server import PgServer  # noqa: E402

LIMITS = {
    "all": dict(quota_cost=1e6, rpm=10**6, concurrency=1000),
    "conc": dict(concurrency=1000),
    "rpm": dict(rpm=10**6),
    "quota": dict(quota_cost=1e6),
}


async def run_once(url: str, server_pid: int, args) -> tuple[float, float, float]:
    conn = service.connect(url)
    keys = [create_key(conn, f"k{uuid.uuid4().hex[:8]}")[0] for _ in range(args.keys)]
    conn.commit()
    conn.close()
    store = await service.open_store(url)
    admissions = await store.admissions()
    await admissions.renew_lease("bench", 60)
    limits = [Limits(key, **LIMITS[args.limits]) for key in keys]
    tokens = 50 if args.cost else 0

    async def worker(task: int) -> None:
        for i in range(args.pairs // args.tasks):
            key = limits[(task + i) % len(limits)]
            request_id = f"r{task}-{i}-{uuid.uuid4().hex[:8]}"
            decision = await admissions.admit(key, request_id, "bench", 0.01, 100)
            assert decision.admitted, decision
            await admissions.release(key.key_id, request_id, args.cost, tokens, True)

    async def tidy() -> None:
        while True:
            await asyncio.sleep(2)
            await admissions.tidy()

    tidying = asyncio.create_task(tidy())
    try:
        await asyncio.gather(*(worker(t) for t in range(args.tasks)))        # warm-up
        server0, own0, t0 = procstat.cpu_seconds(server_pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(t) for t in range(args.tasks)))
        elapsed = time.perf_counter() - t0
        server, own = procstat.cpu_seconds(server_pid) - server0, time.process_time() - own0
    finally:
        tidying.cancel()
        await admissions.close()
        await store.close()
    pairs = args.pairs // args.tasks * args.tasks
    return pairs / elapsed, 1e6 * server / pairs, 1e6 * own / pairs


def _figures(run) -> str:
    rate, server, own = run
    return f"{rate:.0f} pairs/s, PostgreSQL CPU {server:.0f} us/pair, client CPU {own:.0f} us/pair"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--cost", type=float, default=0.0)
    parser.add_argument("--limits", choices=sorted(LIMITS), default="all")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--durable", action="store_true")
    args = parser.parse_args()
    pg = PgServer.start(durable=args.durable)
    try:
        pid = int(open(os.path.join(pg.data, "postmaster.pid")).read().split()[0])
        runs = []
        for n in range(args.repeat):
            runs.append(asyncio.run(run_once(pg.create_database(f"bench{n}"), pid, args)))
            print(f"run {n + 1}: {_figures(runs[-1])}")
        print(f"median: {_figures([statistics.median(run[i] for run in runs) for i in range(3)])}")
    finally:
        pg.close()


if __name__ == "__main__":
    main()
