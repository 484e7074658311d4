"""A meter plugin that raises while recording a request, in a real `apertis-proxy serve` process.

The meters get the record before the keys plugin's release() (forward.py: `meter` in a try, `release` in its
finally).  A meter that raises must not keep the key's concurrency slot or its reservation: with a key of
concurrency 1 and a USD quota, and a lease of 30 s (a slot left behind would refuse the next request with 429
until the lease ran out), every request one after the other is answered 200 at once, the server stays up and
logs the meter's failure, and the spend afterwards is exactly the ledger's rows (nothing left in flight).

The raising meter is a distribution of its own (a module and its .dist-info with the entry point, on PYTHONPATH),
found by the gateway's plugin loader as any third-party meter.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from apertis_proxy import cli
from apertis_proxy.store import service
from tests.support.gateway_process import GatewayProcess
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.plugin_dist import plugin_site

REQUESTS = 6
AT_ONCE = 3.0       # seconds a request may take (a slot left behind would hold the next for the 30 s lease)

METER_MODULE = '''
import asyncio


class RaisingMeter:
    """Raises in every hook it has, as `mode` says: "exception" (RuntimeError; its sent() and checkpoint() too),
    "cancelled" (asyncio.CancelledError out of record(): an await of something cancelled under the plugin)."""

    def __init__(self, ctx):
        self.mode = ctx.options.get("mode", "exception")
        self.calls = 0

    async def record(self, record):
        self.calls += 1
        await asyncio.sleep(0)
        if self.mode == "cancelled":
            raise asyncio.CancelledError()
        raise RuntimeError(f"the raising meter refuses {record.request_id}")

    def sent(self, record):
        if self.mode == "exception":
            raise RuntimeError("the raising meter refuses sent()")

    def checkpoint(self, record):
        if self.mode == "exception":
            raise RuntimeError("the raising meter refuses checkpoint()")
'''


@pytest.fixture(scope="module")
def meter_site(tmp_path_factory) -> Path:
    return plugin_site(tmp_path_factory.mktemp("raising-meter"), "raising_meter", METER_MODULE,
                       {"apertis_proxy.meter": {"raising": "raising_meter:RaisingMeter"}})


@pytest.fixture
async def upstream():
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        yield mock


def _cli(*argv: str) -> None:
    assert cli.main(list(argv)) == 0


def _create_key(db: str, capsys, *limits: str) -> str:
    capsys.readouterr()
    _cli("keys", "create", "alice", "--db", db, *limits)
    return re.search(r"sk-apx-[A-Za-z0-9_-]+", capsys.readouterr().out).group(0)


def _rows(db: str, sql: str) -> list[tuple]:
    conn = service.connect(db)
    try:
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()


async def _eventually(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@pytest.mark.parametrize("backend, meters, mode", [
    ("postgresql", ["raising", "sqlite"], "exception"),
    ("postgresql", ["sqlite", "raising"], "exception"),
    ("postgresql", ["raising"], "exception"),        # no ledger: the release settles the spend itself
    ("sqlite", ["raising", "sqlite"], "exception"),
    ("postgresql", ["raising", "sqlite"], "cancelled"),
], ids=["pg-raising-first", "pg-raising-last", "pg-no-ledger", "sqlite-raising-first", "pg-cancelled-error"])
async def test_a_meter_that_raises_frees_the_slot_and_the_reservation_at_once(
        request, backend, meters, mode, meter_site, upstream, tmp_path, capsys, monkeypatch):
    db = request.getfixturevalue("pg_url") if backend == "postgresql" else str(tmp_path / "gateway.db")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(meter_site), os.environ.get("PYTHONPATH"))
                                                     if p))
    await asyncio.to_thread(_cli, "channels", "add", "main", "--base-url", upstream.base_url, "--api-key",
                            MOCK_API_KEY, "--db", db)
    key = await asyncio.to_thread(_create_key, db, capsys, "--concurrency", "1", "--quota", "5")
    host = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "host", tables={
        "plugins": {"meter": meters}, "plugins.options.raising": {"mode": mode},
        "limits": {"lease_seconds": 30}})
    try:
        answers = []
        for _ in range(REQUESTS):
            t = time.monotonic()
            status, headers, body = await asyncio.to_thread(host.post_message, key)
            answers.append((status, round(time.monotonic() - t, 3), body[:160]))
        alive = host.proc.poll() is None
        # The server still serves (a request of its own after the others).
        after = (await asyncio.to_thread(host.post_message, key))[0] if alive else None
    finally:
        await asyncio.to_thread(host.stop)
    log = host.log
    # Nothing left in flight; the spend is the ledger's rows (or, without a ledger, what the releases settled).
    drained = await _eventually(lambda: _rows(db, "SELECT COUNT(*) FROM admissions WHERE live = 1") == [(0,)])
    in_flight = _rows(db, "SELECT request_id, live, cost FROM admissions")
    spend = _rows(db, "SELECT cost, tokens FROM key_spend")
    if "sqlite" in meters:
        await _eventually(lambda: _rows(db, "SELECT COUNT(*) FROM usage")[0][0] >= REQUESTS + 1, 5.0)
    ledger = _rows(db, "SELECT COUNT(*), SUM(cost) FROM usage")[0]
    access = [line.split("access: ", 1)[1][:130] for line in host.lines if "apertis_proxy.access" in line][:2]
    report = (f"answers {[a[:2] for a in answers]}; alive {alive}; after {after}; ledger rows (count, cost) "
              f"{ledger}; key_spend {spend}; admissions left {in_flight}; meter failure logged by name: "
              f"{'raising' in log}; access log: {access}; errors logged: "
              f"{[line.strip()[:200] for line in host.lines if 'ERROR' in line or 'Error' in line][:4]}")
    assert alive and after == 200, report
    assert [a[0] for a in answers] == [200] * REQUESTS, report
    assert all(a[1] < AT_ONCE for a in answers), report
    assert all(b'"type": "message"' in a[2] or b'"type":"message"' in a[2] for a in answers), report
    assert drained and in_flight == [], report
    if "sqlite" in meters:
        # Every request's row reached the ledger (the other meter still got the record), its cost in the spend.
        assert ledger[0] == REQUESTS + 1 and ledger[1] > 0, report
        assert spend and spend[0][0] == pytest.approx(ledger[1]), report
    else:
        assert spend and spend[0][0] > 0, report
    assert "raising" in log, report          # the failure was logged with the meter's name
    assert "key_name=alice" in log, report          # the access log has the request's record
