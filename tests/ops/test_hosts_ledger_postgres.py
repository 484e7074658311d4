"""The ledger of two hosts sharing one PostgreSQL: 500 mixed requests (JSON, streams, streams the client
abandons) over both, `kill -9` of one host once its clients had their answers, a restart; then the ledger holds
every request id a client saw exactly once, its token totals equal what the mock upstream reported, and the key's
settled spend equals its ledger rows.  The same with the database stopped and started during the traffic."""
from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path

import pytest

from apertis_proxy import cli
from apertis_proxy.store import service
from apertis_proxy.store.ledger_spool import spooled_rows
from tests.support.gateway_process import GatewayProcess
from tests.support.gateway_requests import abandoned, complete
from tests.support.ledger_rows import COUNTS
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.pg_server import PgServer, PgUnavailable, memory_folder

REQUESTS = 500


class Host:
    """What gateway_requests.complete and abandoned need (port, key), and this host's spool."""

    def __init__(self, process: GatewayProcess, key: str, workdir: Path) -> None:
        self.process, self.key, self.workdir = process, key, workdir

    @property
    def port(self) -> int:
        return self.process.port

    def spooled_ids(self) -> set[str]:
        return {r["request_id"] for r in spooled_rows(str(self.workdir / "apertis-ledger.spool"))}


def _setup(db: str, upstream: MockUpstream) -> str:
    assert cli.main(["channels", "add", "main", "--base-url", upstream.base_url, "--api-key", MOCK_API_KEY,
                     "--db", db]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["keys", "create", "alice", "--db", db]) == 0
    return re.search(r"sk-apx-[A-Za-z0-9_-]+", out.getvalue()).group(0)


def _ledger(db: str) -> tuple[list[dict], list[tuple]]:
    conn = service.connect(db)
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM usage")]
        spend = [tuple(r) for r in conn.execute("SELECT key_id, cost, tokens FROM key_spend")]
        return rows, spend
    finally:
        conn.close()


async def _ledger_ids(db: str) -> set[str]:
    rows, _ = await asyncio.to_thread(_ledger, db)
    return {r["request_id"] for r in rows}


async def _traffic(hosts: list[Host], count: int, on_half=None) -> tuple[list[str], list[str]]:
    """`count` requests spread over the hosts: JSON, streams read to the end, and (one in five) streams the
    client abandons; (request ids of complete answers, of abandoned streams)."""
    seen: list[str] = []
    left: list[str] = []
    gate = asyncio.Semaphore(16)
    done = 0

    async def one(n: int) -> None:
        nonlocal done
        host = hosts[n % len(hosts)]
        async with gate:
            if n % 5 == 4:
                left.append(await abandoned(host, n))
            else:
                seen.append(await complete(host, n, stream=n % 2 == 1))
            done += 1
            if on_half is not None and done == count // 2:
                await on_half()

    await asyncio.gather(*(one(n) for n in range(count)))
    return seen, left


async def _ledger_holds(db: str, everyone: set[str], timeout: float) -> None:
    """Wait until the ledger holds every one of these request ids (the database may still be starting)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ids: set[str] = set()
    while True:
        try:
            ids = await _ledger_ids(db)
        except service.StoreUnavailable:
            pass
        if ids >= everyone:
            return
        assert loop.time() < deadline, f"{len(everyone - ids)} request ids missing from the ledger"
        await asyncio.sleep(0.1)


def _check(db: str, everyone: set[str], left: list[str], mock: MockUpstream) -> None:
    rows, spend = _ledger(db)
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(everyone) == REQUESTS and set(ids) == everyone
    by_upstream = {s["request_id"]: s for s in mock.served}
    assert len(by_upstream) == REQUESTS
    for field in COUNTS:
        assert sum(r[field] for r in rows) == sum(s["usage"][field] for s in by_upstream.values()), field
    assert sum(r["interrupted"] for r in rows) == len(left)
    [(_, cost, tokens)] = spend
    assert tokens == sum(sum(r[f] for f in COUNTS) for r in rows)
    assert cost == pytest.approx(sum(r["cost"] for r in rows), rel=1e-9)


async def test_two_hosts_kill9_one_the_ledger_holds_every_answer_once(pg_url, tmp_path):
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(_setup, pg_url, mock)
        dirs = [tmp_path / "a", tmp_path / "b"]
        # Shipping by size only (batches of 30): part of the rows are only in the spool at the kill.
        procs = [await asyncio.to_thread(GatewayProcess.start, pg_url, d, flush_interval=600.0, batch_size=30)
                 for d in dirs]
        hosts = [Host(p, key, d) for p, d in zip(procs, dirs)]
        try:
            seen, left = await _traffic(hosts, REQUESTS)
            everyone = set(seen) | set(left)

            async def durable() -> bool:
                return everyone <= (await _ledger_ids(pg_url) | hosts[0].spooled_ids() | hosts[1].spooled_ids())
            deadline = asyncio.get_running_loop().time() + 20
            while not await durable():
                assert asyncio.get_running_loop().time() < deadline, "rows neither spooled nor in the ledger"
                await asyncio.sleep(0.1)
            assert hosts[0].spooled_ids(), "the kill should find rows still spooled"
            await asyncio.to_thread(procs[0].kill)
            procs[0] = await asyncio.to_thread(GatewayProcess.start, pg_url, dirs[0])   # ships what was left
            await asyncio.to_thread(procs[1].stop)                                      # ships on its way out
            await _ledger_holds(pg_url, everyone, timeout=20)
        finally:
            for p in procs:
                await asyncio.to_thread(p.stop)
        await asyncio.to_thread(_check, pg_url, everyone, left, mock)


async def test_two_hosts_through_a_database_outage_lose_no_row(pg_server, tmp_path):
    # pg_server: PostgreSQL is there (or the test skips, or fails in CI); this test stops a server of its own.
    try:
        server = await asyncio.to_thread(PgServer.start, True, memory_folder())     # a crash keeps what it committed
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    try:
        db = await asyncio.to_thread(server.create_database, "outage")
        async with MockUpstream(api_key=MOCK_API_KEY) as mock:
            key = await asyncio.to_thread(_setup, db, mock)
            dirs = [tmp_path / "a", tmp_path / "b"]
            procs = [await asyncio.to_thread(GatewayProcess.start, db, d) for d in dirs]
            hosts = [Host(p, key, d) for p, d in zip(procs, dirs)]
            try:
                async def outage() -> None:
                    await asyncio.to_thread(server.stop, "immediate")
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(server.start_again)

                seen, left = await _traffic(hosts, REQUESTS, on_half=outage)
                everyone = set(seen) | set(left)
                await _ledger_holds(db, everyone, timeout=60)
            finally:
                for p in procs:
                    await asyncio.to_thread(p.stop)
            await asyncio.to_thread(_check, db, everyone, left, mock)
    finally:
        await asyncio.to_thread(server.close)
