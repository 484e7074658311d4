"""`kill -9` of a real `apertis-proxy serve` (one worker, and two) after its clients had their answers.

Every response a client received whole (JSON and streams) must already have its usage row in the spool or the
ledger at that moment (the row is written before the answer's last bytes); streams the client abandoned are
metered once the gateway has drained them.  After the kill and a restart, the ledger holds every request id the
clients saw exactly once, its totals equal what the mock upstream reported, and each key's settled spend equals
its ledger rows.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import pytest

from apertis_proxy.store import channels, keys, schema
from apertis_proxy.store.ledger_spool import spooled_rows
from tests.support.gateway_requests import abandoned, complete
from tests.support.ledger_rows import COUNTS
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One `apertis-proxy serve` process group on a fresh database."""

    def __init__(self, tmp_path: Path, mock: MockUpstream, workers: int) -> None:
        self.db = str(tmp_path / "gw.db")
        self.spool_dir = self.db + ".spool"
        self.workers = workers
        self.port = free_port()
        conn = schema.connect(self.db)
        channels.add_channel(conn, "main", mock.base_url, MOCK_API_KEY)
        self.key = keys.create_key(conn, "alice")[1]
        conn.close()
        self.proc: asyncio.subprocess.Process | None = None
        self.tmp_path = tmp_path

    async def start(self, **meter_options: object) -> None:
        config = self.tmp_path / f"config-{self.port}-{len(meter_options)}.toml"
        lines = ["[plugins.options.keys]", "poll_interval = 0.2", "[plugins.options.sqlite]"]
        lines += [f"{name} = {value!r}" for name, value in meter_options.items()]
        config.write_text("\n".join(lines) + "\n")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "apertis_proxy", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--db", self.db, "--workers", str(self.workers), "--config", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        for _ in range(400):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("the gateway did not start listening")

    async def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)       # the supervisor and its workers at once
        await self.proc.wait()

    async def stop(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 30)

    def ledger(self) -> list[dict]:
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
        finally:
            conn.close()

    def spend(self) -> list[tuple]:
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute("SELECT key_id, cost, tokens FROM key_spend").fetchall()
        finally:
            conn.close()

    def durable_ids(self) -> set[str]:
        """Request ids whose rows are in a spool file on disk or in the ledger.  The spool is read first: a
        segment deleted meanwhile was committed before, so the ledger read after it has its rows."""
        ids = {r["request_id"] for r in spooled_rows(self.spool_dir)}
        return ids | {r["request_id"] for r in self.ledger()}


async def eventually(predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
async def test_kill9_after_the_answers_loses_no_row_and_counts_none_twice(tmp_path, workers):
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        served = Served(tmp_path, mock, workers)
        # Ships by size only (batches of 25): part of the rows reach the ledger before the kill, the rest
        # is only in the spool when the gateway dies.
        await served.start(flush_interval=600.0, batch_size=25)
        seen: list[str] = []
        left: list[str] = []
        gate = asyncio.Semaphore(16)

        async def one(n: int) -> None:
            async with gate:
                if n % 5 == 4:
                    left.append(await abandoned(served, n))
                    return
                rid = await complete(served, n, stream=n % 2 == 1)
                # The answer ended only after its row was on disk.
                assert rid in served.durable_ids(), rid
                seen.append(rid)

        await asyncio.gather(*(one(n) for n in range(120)))
        # Abandoned streams are drained by the gateway, then metered: wait until that happened.
        await eventually(lambda: set(left) <= served.durable_ids())
        before = {r["request_id"] for r in served.ledger()}
        assert before < set(seen) | set(left), "the kill should find rows still spooled"
        await served.kill9()

        await served.start(flush_interval=0.05)     # adopts the dead workers' spools and ships them
        everyone = set(seen) | set(left)
        await eventually(lambda: {r["request_id"] for r in served.ledger()} >= everyone)
        await served.stop()

    rows = served.ledger()
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(everyone) == 120 and set(ids) == everyone
    by_upstream = {s["request_id"]: s for s in mock.served}
    assert len(by_upstream) == 120
    for field in COUNTS:
        assert sum(r[field] for r in rows) == sum(s["usage"][field] for s in by_upstream.values()), field
    for row in rows:
        usage = by_upstream[row["upstream_request_id"]]["usage"]
        assert {f: row[f] for f in COUNTS} == {f: usage[f] for f in COUNTS}, row
    assert sum(r["interrupted"] for r in rows) == len(left)
    # The key's settled spend is its ledger rows, each counted once.
    [(key_id, cost, tokens)] = served.spend()
    assert tokens == sum(sum(r[f] for f in COUNTS) for r in rows)
    assert cost == pytest.approx(sum(r["cost"] for r in rows), rel=1e-12)
    assert spooled_rows(served.spool_dir) == []     # everything shipped and deleted
