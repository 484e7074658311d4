"""The ledger spool and idempotent shipping, on real files and real SQLite databases.

The kill -9 runs with real gateway processes are in test_ledger_kill9.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tracemalloc
from pathlib import Path

import orjson
import pytest

from apertis_plugins.sqlite_meter import SqliteMeter
from apertis_proxy.plugin_api import PluginContext, UsageRecord
from apertis_proxy.store import schema
from apertis_proxy.store.keys import create_key
from apertis_proxy.store.ledger_spool import LedgerSpool, spooled_rows
from apertis_proxy.store.service import open_store
from tests.support.ledger_rows import record
from tests.support.rawhttp import RawConnection

HAIKU = "claude-haiku-4-5-20251001"
LOG = logging.getLogger("test.ledger")


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "gateway.db")
    conn = schema.connect(path)
    alice = create_key(conn, "alice")[0]
    bob = create_key(conn, "bob")[0]
    yield path, conn, (alice, bob)
    conn.close()


def meter_for(path: str, **options) -> SqliteMeter:
    return SqliteMeter(PluginContext(name="sqlite", options={"flush_interval": 600, **options}, db_path=path,
                                     log=logging.getLogger("test.plugin.sqlite")))


@contextlib.asynccontextmanager
async def running(meter: SqliteMeter):
    await meter.start()
    try:
        yield meter
    finally:
        await meter.close()


def ledger(conn) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM usage ORDER BY id").fetchall()


def spend(conn) -> dict[int, tuple[float, int]]:
    return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT key_id, cost, tokens FROM key_spend")}


def spooled(directory: str) -> list[dict]:
    return spooled_rows(directory)


async def test_shipping_the_same_rows_twice_counts_them_once(db):
    path, conn, (alice, bob) = db
    rows = [orjson.loads(orjson.dumps(record(i, alice if i % 3 else bob))) for i in range(130)]
    store = await open_store(path)
    try:
        assert await store.write_ledger(rows) == 130
        first = spend(conn)
        assert await store.write_ledger(rows) == 0                       # a whole replay
        assert await store.write_ledger(rows[:70] + [orjson.loads(orjson.dumps(record(500, bob)))]) == 1
    finally:
        await store.close()
    assert len(ledger(conn)) == 131
    assert first[alice] == (pytest.approx(0.25 * 86), sum(115 + i for i in range(130) if i % 3))
    after = spend(conn)
    assert after[alice] == first[alice]                                  # the replay changed nothing
    assert after[bob] == (pytest.approx(first[bob][0] + 0.25), first[bob][1] + 615)


async def test_a_spool_replayed_after_its_rows_were_committed_does_not_double_count(db, tmp_path):
    """A worker killed after its batch committed but before it deleted the segment leaves the rows behind:
    the worker that adopts them ships them again, and nothing changes."""
    path, conn, (alice, _) = db
    async with running(meter_for(path)) as meter:
        for i in range(40):
            await meter.record(record(i, alice))
        segment = meter.spool.current.path
        copy = Path(meter.spool.directory) / "ledger-1-dead-1.spool2"
        shutil.copy(segment, copy)          # the dead worker's segment, its rows already in the ledger
        assert await meter.flush()
        assert len(ledger(conn)) == 40
        shipped_once = spend(conn)
        assert shipped_once[alice] == (pytest.approx(10.0), sum(115 + i for i in range(40)))
    async with running(meter_for(path)) as second:     # adopts the copy at start
        assert await second.flush()
        assert second.shipped == 40 and second.written == 0
    assert len(ledger(conn)) == 40 and spend(conn) == shipped_once
    assert not copy.exists()


async def test_rows_shipped_from_memory_equal_rows_read_back_from_either_spool_format(db, tmp_path):
    """The meter ships its own rows from memory; a stopped worker's rows are read from its file, as JSON arrays
    after a header (*.spool2) or as objects (*.spool, written by earlier versions).  All three give the same
    ledger rows: nested values as JSON text, bools as 0/1."""
    path, conn, (alice, _) = db

    def shipped(first: int) -> list[dict]:
        rows = [dict(r) for r in conn.execute("SELECT * FROM usage WHERE request_id >= ? ORDER BY request_id",
                                              (f"req_{first:024x}",))]
        for r in rows:
            del r["id"], r["request_id"]
        return rows

    def full(i: int) -> UsageRecord:
        r = record(i, alice)
        r.stream, r.reached_upstream, r.iterations = True, True, [{"type": "message", "input_tokens": 3}]
        r.attempt_log = [{"channel": "main", "channel_id": 1, "outcome": "ok", "status": 200}]
        r.started_at, r.input_tokens = 1_760_000_000.5, 100     # the same row but for its request id
        return r

    async with running(meter_for(path)) as meter:
        await meter.record(full(0))                             # from memory
        assert await meter.flush()
        await meter.record(full(100))
        segment = meter.spool.current.path
        assert segment.endswith(".spool2")
        shutil.copy(segment, Path(meter.spool.directory) / "ledger-1-dead-1.spool2")   # a stopped worker's
        meter.spool.current.lines.clear()                       # only the copy ships it (the test's shortcut)
        legacy = orjson.dumps(full(200)) + b"\n"                # an earlier version's line: the record's object
        (Path(meter.spool.directory) / "ledger-2-dead-1.spool").write_bytes(legacy)
    async with running(meter_for(path)) as second:              # adopts both files at start
        assert await second.flush()
        assert second.shipped == 2
    assert shipped(0)[:1] == shipped(100)[:1] == shipped(200)
    assert shipped(200)[0]["stream"] == 1 and orjson.loads(shipped(200)[0]["iterations"])[0]["input_tokens"] == 3
    assert spooled_rows(str(Path(path + ".spool"))) == []


async def test_a_field_holding_what_its_type_does_not_say_is_stored_as_json_and_the_batch_ships(db):
    """Only the fields declared as dicts, lists or bools are converted on the request path; a plugin that put a
    dict in a text field gets its row stored all the same (as JSON), and the rows around it too."""
    path, conn, (alice, _) = db
    odd = record(1, alice)
    odd.error_type = {"kind": "custom"}
    async with running(meter_for(path)) as meter:
        for r in (record(0, alice), odd, record(2, alice)):
            await meter.record(r)
        assert await meter.flush()
        assert meter.rejected == 0
    stored = {r["request_id"]: r["error_type"] for r in conn.execute("SELECT request_id, error_type FROM usage")}
    assert stored == {f"req_{0:024x}": None, f"req_{1:024x}": '{"kind":"custom"}', f"req_{2:024x}": None}


async def test_an_unreadable_line_is_left_out_and_logged_the_others_ship(db, caplog):
    path, conn, (alice, _) = db
    async with running(meter_for(path)) as meter:
        directory = Path(meter.spool.directory)
        await meter.record(record(1, alice))
        good = Path(meter.spool.current.path).read_bytes()
        header, line = good.splitlines(keepends=True)
        # A machine crash mid-write: a torn array, and an array of the wrong length.
        (directory / "ledger-3-dead-1.spool2").write_bytes(header + line.replace(b"req_", b"req_x")
                                                           + b'["req_torn", 1.0, "/v1/m' + b"\n" + b"[1, 2]\n")
        meter.spool.current.lines.clear()
    with caplog.at_level(logging.ERROR):
        async with running(meter_for(path)) as second:
            assert await second.flush()
    assert [r["request_id"] for r in conn.execute("SELECT request_id FROM usage")] == [f"req_x{1:024x}"]
    assert "unreadable line" in caplog.text and "unknown shape" in caplog.text


async def test_a_locked_database_keeps_rows_spooled_on_disk_and_ships_them_when_it_returns(db):
    path, conn, (alice, _) = db
    async with running(meter_for(path)) as meter:
        # The meter's connection gives up on a lock after busy_timeout (10 s); it fails the same after 0.2 s.
        await meter.store.call(lambda c: c.execute("PRAGMA busy_timeout=200"))
        blocker = sqlite3.connect(path, isolation_level=None, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")          # the database is unavailable to everyone else
        try:
            for i in range(30):
                await meter.record(record(i, alice))
            assert not await meter.flush()
            assert [r["request_id"] for r in spooled(meter.spool.directory)] == [f"req_{i:024x}" for i in range(30)]
            assert meter.pending == 30
        finally:
            blocker.execute("COMMIT")
            blocker.close()
        assert await meter.flush()
        assert meter.pending == 0 and spooled(meter.spool.directory) == []
    assert [r["request_id"] for r in ledger(conn)] == [f"req_{i:024x}" for i in range(30)]
    assert spend(conn)[alice][1] == sum(115 + i for i in range(30))


def test_a_live_workers_spool_is_never_adopted_a_dead_ones_is(tmp_path):
    directory = str(tmp_path / "spool")
    live, other = LedgerSpool(directory, LOG), LedgerSpool(directory, LOG)
    live.open()
    other.open()
    live.append(b'{"request_id": "req_1"}\n')
    live.seal()
    live.append(b'{"request_id": "req_2"}\n')
    assert other.adopt() == 0 and other.pending == 0          # locked by its live owner
    live.close()                                              # its owner is gone; the rows stay on disk
    assert other.adopt() == 2
    assert [r["request_id"] for s in other.sealed for r in s.rows(LOG)] == ["req_1", "req_2"]
    for seg in list(other.sealed):
        other.shipped(seg)
    assert spooled(directory) == []
    other.close()


def test_the_spool_is_readable_by_its_owner_only(tmp_path):
    """Spooled rows name keys and client addresses: a new spool directory is 0700, its segments 0600 (even under
    a permissive umask); a directory that exists keeps its mode."""
    old = os.umask(0o002)
    try:
        spool = LedgerSpool(str(tmp_path / "new" / "spool"), LOG)
        spool.open()
        spool.append(b'{"request_id": "req_1"}\n')
        for seg in spool.seal():
            assert os.stat(seg.path).st_mode & 0o777 == 0o600
        assert os.stat(spool.current.path).st_mode & 0o777 == 0o600
        assert os.stat(tmp_path / "new" / "spool").st_mode & 0o777 == 0o700
        spool.close()
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o750)
        other = LedgerSpool(str(shared), LOG)
        other.open()
        assert os.stat(shared).st_mode & 0o777 == 0o750
        other.close()
    finally:
        os.umask(old)


def test_the_spool_warns_as_it_grows_and_says_when_it_is_full(tmp_path, caplog):
    spool = LedgerSpool(str(tmp_path / "spool"), LOG, max_bytes=1000, warn_bytes=400)
    spool.open()
    line = b'{"request_id": "req_%03d", "pad": "' + b"x" * 60 + b'"}\n'
    with caplog.at_level(logging.INFO, logger="test.ledger"):
        for i in range(20):
            spool.append(line.replace(b"%03d", b"%03d" % i))
    assert spool.full and spool.pending == 20                 # rows past the bound are still kept
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(warnings) == 1 and "growing" in warnings[0].getMessage()
    assert len(errors) == 1 and "full" in errors[0].getMessage()
    for seg in spool.seal():
        spool.shipped(seg)
    assert not spool.full and spool.size == 0
    spool.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_the_answer_ends_only_after_its_row_is_spooled(gateway, stream):
    """While the meter has not taken the row, the client has not got the whole answer."""
    meter = next(p for name, p in gateway.gateway.plugins.meters if name == "sqlite")
    entered, release = asyncio.Event(), asyncio.Event()
    original = meter.record

    async def held(rec: UsageRecord) -> None:
        entered.set()
        await release.wait()
        await original(rec)

    meter.record = held
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        body = {"model": HAIKU, "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        answer = asyncio.create_task(conn.request("POST", "/v1/messages", {"x-api-key": gateway.key},
                                                  json_body=body))
        await entered.wait()
        await asyncio.sleep(0.2)        # room for any byte already sent to arrive
        assert not answer.done()
        release.set()
        response = await answer
    assert response.status == 200
    rid = response.header("request-id")
    assert rid in [r["request_id"] for r in spooled(meter.spool.directory)] + [
        r["request_id"] for r in await gateway.usage_rows(1)]


async def test_a_full_spool_refuses_new_requests_with_503_until_the_database_takes_rows(gateway_env,
                                                                                        mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(spool_max_bytes=4096, spool_warn_bytes=1000)   # [ledger] settings
    body = {"model": HAIKU, "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
    blocker = sqlite3.connect(gateway_env.db_path, isolation_level=None, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    served = []
    try:
        async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
            for _ in range(50):
                response = await conn.request("POST", "/v1/messages", {"x-api-key": key}, json_body=body)
                if response.status != 200:
                    break
                served.append(response.header("request-id"))
        assert response.status == 503 and response.json()["error"]["type"] == "overloaded_error"
        assert response.header("retry-after") == "5"
        assert 0 < len(served) < 50
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:     # the shipping back-off retries; then requests are admitted again
        async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
            response = await conn.request("POST", "/v1/messages", {"x-api-key": key}, json_body=body)
        if response.status == 200:
            break
        assert loop.time() < deadline
        await asyncio.sleep(0.1)
    rows = await gateway_env.usage_rows(len(served) + 1)
    assert set(served) <= {r["request_id"] for r in rows}
    await gateway_env.stop()


# -- a running stream's interim row ----------------------------------------------------------------------------------

def interim(i: int, key_id: int) -> UsageRecord:
    """What a stream of record(i) reported in its message_start: input only, flagged interrupted."""
    r = record(i, key_id, cost=0.1)
    r.output_tokens, r.interrupted, r.stream = 1, True, True
    return r


async def die(meter: SqliteMeter) -> None:
    """The meter's worker killed with -9: its tasks and connections end, its spool files stay as they are."""
    meter._task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await meter._task
    for seg in [*meter.spool.sealed, meter.spool.current]:
        if seg is not None and seg.durable:
            os.close(seg.fd)
    await meter.store.close()


def ledger_by_id(conn) -> dict[str, sqlite3.Row]:
    return {r["request_id"]: r for r in ledger(conn)}


async def test_a_live_worker_never_ships_an_interim_row_the_final_row_replaces_it(db):
    path, conn, (alice, _) = db
    async with running(meter_for(path)) as meter:
        meter.checkpoint(interim(1, alice))
        meter.checkpoint(interim(2, alice))
        await meter.record(record(2, alice))
        assert await meter.flush()
        assert list(ledger_by_id(conn)) == [f"req_{2:024x}"]        # the running request 1 is not shipped
        row = ledger_by_id(conn)[f"req_{2:024x}"]
        assert (row["interrupted"], row["output_tokens"], row["cost"]) == (0, 10, 0.25)
        await meter.record(record(1, alice))
    assert ledger_by_id(conn)[f"req_{1:024x}"]["output_tokens"] == 10
    assert spend(conn)[alice] == (pytest.approx(0.5), 116 + 117)   # input, output and cache reads


async def test_a_running_requests_lines_hold_little_more_memory_than_their_length(db):
    """The sent and interim lines the meter keeps for every running request (a paced stream may run minutes, and
    thousands at once) take about their own length in memory, not the 8 KiB buffer an encoder may have written them
    into (orjson's bytes keep it whole): measured with tracemalloc over 200 requests."""
    path, _, (alice, _) = db
    async with running(meter_for(path)) as meter:
        for step in ("sent", "checkpoint"):
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(200):
                    getattr(meter, step)(interim(i, alice))
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            lines = sum(map(len, meter.spool.interims.values()))
            assert held < 2 * lines + 200 * 200, f"{step}: {held} bytes held for {lines} bytes of lines"
        for i in range(200):
            await meter.record(record(i, alice))


async def test_a_dead_workers_running_request_is_metered_from_its_interim_row_once(db):
    """Request 1 was running when its worker died (only its interim row exists), request 2 had ended (its final
    row follows its interim row in the same segment), request 3 ended after a seal (its interim row's first copy
    is in an older segment that was never shipped).  The adopter ships request 1 as reported so far, flagged
    interrupted, and requests 2 and 3 from their final rows, each once."""
    path, conn, (alice, _) = db
    meter = meter_for(path)
    await meter.start()
    meter.checkpoint(interim(1, alice))
    meter.checkpoint(interim(2, alice))
    meter.checkpoint(interim(3, alice))
    await meter.record(record(2, alice))
    meter.spool.seal()                  # shipping of this segment never happens: the database was away
    await meter.record(record(3, alice))
    assert len(meter.spool.sealed) == 1 and len(meter.spool.interims) == 1
    await die(meter)
    async with running(meter_for(path)) as adopter:
        assert await adopter.flush()
        assert adopter.shipped == 3
    rows = ledger_by_id(conn)
    assert sorted(rows) == [f"req_{i:024x}" for i in (1, 2, 3)]
    assert [(rows[f"req_{i:024x}"]["interrupted"], rows[f"req_{i:024x}"]["output_tokens"]) for i in (1, 2, 3)] == [
        (1, 1), (0, 10), (0, 10)]
    assert spend(conn)[alice] == (pytest.approx(0.1 + 0.25 + 0.25), (101 + 1 + 5) + 117 + 118)
    assert spooled(meter.spool.directory) == []


async def test_a_dead_workers_request_that_had_gone_upstream_is_metered_with_its_usage_unknown(db):
    """Request 1 had gone upstream and nothing of its usage was known when its worker died: it is metered with
    its usage unknown (cost NULL, counted apart; error_type gateway_stopped).  Request 2 was noted as sent, then
    its stream's first usage came: that interim row counts.  Request 3 was noted as sent and ended: its final
    row counts.  Nothing counts for the key's spend but what was reported."""
    path, conn, (alice, _) = db
    meter = meter_for(path)
    await meter.start()
    for i in (1, 2, 3):
        meter.sent(record(i, alice))
    meter.checkpoint(interim(2, alice))
    await meter.record(record(3, alice))
    await die(meter)
    async with running(meter_for(path)) as adopter:
        assert await adopter.flush()
    rows = ledger_by_id(conn)
    one = rows[f"req_{1:024x}"]
    assert (one["cost"], one["error_type"], one["interrupted"], one["reached_upstream"], one["status"]) == (
        None, "gateway_stopped", 1, 1, 0)
    assert (one["key_id"], one["requested_model"], one["ts"], one["input_tokens"]) == (
        alice, HAIKU, record(1, alice).started_at, 0)
    assert "usage unknown" in orjson.loads(one["prices"])["unpriced"]
    assert [(rows[f"req_{i:024x}"]["interrupted"], rows[f"req_{i:024x}"]["cost"]) for i in (2, 3)] == [
        (1, 0.1), (0, 0.25)]
    assert spend(conn)[alice] == (pytest.approx(0.35), (102 + 1 + 5) + 118)


async def test_interim_rows_carried_into_each_new_segment_survive_their_first_segments_shipping(db):
    path, conn, (alice, _) = db
    meter = meter_for(path)
    await meter.start()
    meter.checkpoint(interim(1, alice))
    for i in (10, 11):                  # two shipments: request 1's first segments are gone
        await meter.record(record(i, alice))
        assert await meter.flush()
    await die(meter)
    async with running(meter_for(path)) as adopter:
        assert await adopter.flush()
    rows = ledger_by_id(conn)
    assert sorted(rows) == [f"req_{i:024x}" for i in (1, 10, 11)] and rows[f"req_{1:024x}"]["interrupted"] == 1


async def test_a_worker_that_stops_while_requests_run_keeps_their_interim_rows_for_the_next_start(db):
    path, conn, (alice, _) = db
    async with running(meter_for(path)) as meter:
        meter.checkpoint(interim(1, alice))
    assert ledger(conn) == []
    async with running(meter_for(path)) as adopter:
        assert await adopter.flush()
    assert list(ledger_by_id(conn)) == [f"req_{1:024x}"]


# -- a disk that takes only part of a write --------------------------------------------------------------------------

TORN_WRITE = r"""
import logging, os, resource, signal, sys
from apertis_proxy.store.ledger_spool import LedgerSpool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)           # past the limit: EFBIG instead of the signal
spool = LedgerSpool(sys.argv[1], logging.getLogger("torn"))
spool.open()
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
for i in range(3):
    spool.append(b'{"request_id": "req_%d", "pad": "%s"}\n' % (i, b"x" * 40))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
spool.append(b'{"request_id": "req_after"}\n')
print(spool.write_errors, spool.pending)
os._exit(0)                                              # as kill -9: the files stay
"""


def test_a_torn_write_is_cut_back_so_the_rows_after_it_survive_a_kill(tmp_path, caplog):
    """The file may grow only by a line and a half: row 0 is written, row 1 only in part (a short write, then
    EFBIG), row 2 not at all.  Rows 1 and 2 are held in memory only; the torn part is cut off, so the row written
    once the disk has room again is whole on its own line and a stopped worker's adopter ships rows 0 and it."""
    directory = tmp_path / "spool"
    line = len(b'{"request_id": "req_0", "pad": "' + b"x" * 40 + b'"}\n')
    done = subprocess.run([sys.executable, "-c", TORN_WRITE, str(directory), str(line + line // 2)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "4"]                 # two rows not written; four held
    assert "unwritable" in done.stderr
    assert [r["request_id"] for r in spooled(str(directory))] == ["req_0", "req_after"]
    adopter = LedgerSpool(str(directory), LOG)
    adopter.open()
    with caplog.at_level(logging.ERROR, logger="test.ledger"):
        assert adopter.adopt() == 2
        assert [r["request_id"] for s in adopter.sealed for r in s.rows(LOG)] == ["req_0", "req_after"]
    assert "unreadable" not in caplog.text
    adopter.close()
