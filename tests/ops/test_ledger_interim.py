"""What a running stream's interim row costs and holds: one disk flush per request with fsync = "always", a spool
bound that counts each running request once during a database outage, and the attempt that was serving it.

Real `apertis-proxy serve` processes, the mock upstream on 127.0.0.1, real SQLite files and a throwaway PostgreSQL
server (tests/support); strace counts a gateway's disk flushes.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.ops.test_ledger_faults import FAILED_SHIPMENT, killed_mid_stream, ledger_holds, log_count, \
    logged_again, message, open_stream, post, read_only_for_new_sessions, setup_store
from tests.support.gateway_process import GatewayProcess
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream


# -- fsync = "always": one flush per stream --------------------------------------------------------------------------

STREAMS = 5


def spool_flushes(trace: Path) -> list[str]:
    """The fsync calls on spool files in an `strace -f -y` output."""
    return [line for line in trace.read_text().splitlines() if "fsync(" in line and ".spool" in line]


@pytest.mark.skipif(shutil.which("strace") is None, reason="counts fsync calls with strace")
async def test_fsync_always_flushes_the_disk_once_per_stream(tmp_path):
    """With `fsync = "always"` a stream costs one disk flush, for the final row its answer's end waits for (the
    README's price: one flush per request); its sent line and interim row are never synced on their own (they are
    there for a killed process, which the page cache survives), so message_start never waits for the disk."""
    db = str(tmp_path / "gw.db")
    trace = tmp_path / "fsync.trace"
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        host = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw",
                                       tables={"ledger": {"fsync": "always"}})
        tracer = subprocess.Popen(["strace", "-f", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace),
                                   "-p", str(host.proc.pid)], stderr=subprocess.PIPE, text=True)
        try:
            attached = tracer.stderr.readline()
            if "attached" not in attached:
                pytest.skip(f"strace cannot trace the gateway here: {attached.strip()}")
            for _ in range(STREAMS):
                status, _, _ = await asyncio.to_thread(post, host.port, key, message(stream=True))
                assert status == 200
        finally:
            tracer.terminate()
            tracer.wait(10)
            await asyncio.to_thread(host.kill)
    flushes = spool_flushes(trace)
    assert len(flushes) == STREAMS, f"{len(flushes)} spool fsyncs for {STREAMS} streams:\n" + "\n".join(flushes)


# -- a database outage with streams running --------------------------------------------------------------------------

RUNNING = 8
ROW_BYTES = 1000            # a spooled row is 800 to 1,000 bytes here
MAX_BYTES = 24_000


async def test_an_outage_with_streams_running_does_not_fill_the_spool_with_copies_of_their_interim_rows(
        pg_url, tmp_path):
    """While the database takes no rows, rows gather in one segment instead of one per refused shipment, and the
    spool's bound counts what waits to be shipped: the rows, and each running request's latest line once (not the
    copies carried into new segments, nor lines replaced since).  With 8 streams running and a 24 KB bound, 6
    requests answered during a read-only PostgreSQL are all admitted."""
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, pg_url, mock)
        host = await asyncio.to_thread(GatewayProcess.start, pg_url, tmp_path / "gw",
                                       tables={"ledger": {"spool_max_bytes": MAX_BYTES, "spool_warn_bytes": 8000}})
        streams = []
        statuses = []
        try:
            await read_only_for_new_sessions(pg_url, True)
            for _ in range(RUNNING):
                conn, _ = await asyncio.to_thread(open_stream, host.port, key)      # 3 s between events
                streams.append(conn)
            for _ in range(6):
                status, _, _ = await asyncio.to_thread(post, host.port, key, message())
                statuses.append(status)
                # A shipment attempt (refused) after the answer, its row spooled, sealed the segment.
                await logged_again(host, FAILED_SHIPMENT, log_count(host, FAILED_SHIPMENT),
                                   "a refused shipment of the request's row")
        finally:
            for conn in streams:
                conn.close()
            await asyncio.to_thread(host.kill)
            await read_only_for_new_sessions(pg_url, False)
    assert (6 + RUNNING) * ROW_BYTES < MAX_BYTES
    assert statuses == [200] * 6, f"answered {statuses}; {[ln for ln in host.lines if 'spool full' in ln]}"


# -- the attempt serving a stream cut by a crash ---------------------------------------------------------------------

def ledger_row(db: str, request_id: str) -> dict:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,)).fetchone())
    finally:
        conn.close()


async def test_an_interim_row_lists_the_attempt_that_was_serving_the_stream(tmp_path):
    """The row of a stream cut by kill -9 lists the attempt that was serving it in its attempt_log (outcome
    gateway_stopped), as every other row lists each channel tried."""
    db = str(tmp_path / "gw.db")
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        request_id, again = await killed_mid_stream(db, tmp_path / "gw", key)
        try:
            assert request_id in await ledger_holds(db, {request_id}, timeout=10.0)
            row = await asyncio.to_thread(ledger_row, db, request_id)
        finally:
            await asyncio.to_thread(again.kill)
    assert row["interrupted"] and row["attempts"] == 1 and row["channel_name"] == "main"
    log = json.loads(row["attempt_log"])
    assert [(entry["channel"], entry["outcome"]) for entry in log] == [("main", "gateway_stopped")], log
