"""The ledger spool as an operator meets it ("The ledger spool" in README.md): whose rows a spool directory holds,
and rows in it the ledger cannot take.

- A spool directory belongs to one database: the first gateway that uses it marks it with its database's identity
  (a random id kept in the store, made with the schema or at the first open of an older database). A gateway of
  another database given the same directory (two configurations copied from one file; two PostgreSQL-backed
  gateways started in one working directory, both defaulting to ./apertis-ledger.spool) stops at start with one
  line naming both databases, and never ships the other's rows under its own key ids. A directory of an earlier
  version (no mark) is adopted as before and marked; one moved to another host of the same database ships there.
- A segment line the ledger cannot take (a row object lacking a required field, a value of the wrong type, a torn
  or foreign line) is logged whole and left out, and the rows after it ship; a one-row batch refused for a
  constraint is that row's fault unless the database refuses a good row too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest

from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import schema, service
from apertis_proxy.store.ledger_write import LedgerUnavailable, write_ledger_rows
from tests.support.gateway_process import GatewayProcess
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.processes import ServeProcess, ask, clean_env, free_port, wait_for
from tests.support.served_gateway import configured_server, prepare_db, usage_rows

# -- rows the ledger cannot take -----------------------------------------------------------------------------------

# A whole row object as an earlier version spooled it (*.spool: a UsageRecord as a dict), valid: each bad row
# below is it with one change.
GOOD_ROW = UsageRecord(request_id="req_000000000000000000000001", started_at=1765000000.0, endpoint="/v1/messages",
                       client="127.0.0.1", status=200, duration_ms=5.0, input_tokens=3).as_dict()


async def _rows_ship_despite(tmp_path, mock_upstream, lines: bytes) -> str:
    """A gateway started on a spool (without a mark, as an earlier version leaves it) holding `lines` in a dead
    worker's segment: the row of a request sent then reaches the ledger.  The gateway's log."""
    from apertis_proxy.store.ledger_spool import OWNER_FILE
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "ledger-1-deadbeef-1.spool").write_bytes(lines)
    server, db, key = configured_server(tmp_path, mock_upstream.base_url, f'[ledger]\nspool_dir = "{spool}"\n')
    async with server:
        await ask(server.base_url, key)

        async def shipped() -> bool:
            return any(r["status"] == 200 and r["endpoint"] == "/v1/messages" for r in usage_rows(db)
                       if r["request_id"] != GOOD_ROW["request_id"])
        try:
            await wait_for(shipped, 4.0, "the request's row in the ledger")
        except AssertionError:
            raise AssertionError(
                f"a bad line in a spool segment keeps every later row out of the ledger; spool holds"
                f" {sorted(os.listdir(spool))}; log:\n{server.stderr[-3000:]}") from None
        # The unmarked directory (an earlier version's) was adopted, and is this database's now.
        mark = json.loads((spool / OWNER_FILE).read_text())
        assert mark["database"] == os.path.abspath(db) and mark["database_id"]
        assert GOOD_ROW["request_id"] not in {r["request_id"] for r in usage_rows(db)}
        return server.stderr


async def test_a_row_object_missing_required_fields_is_logged_whole_and_left_out(tmp_path, mock_upstream):
    line = b'{"request_id": "req_000000000000000000000001"}'
    log = await _rows_ship_despite(tmp_path, mock_upstream, line + b"\n")
    assert "a row the ledger cannot take (no started_at) left out: " + line.decode() in log, log[-2000:]


@pytest.mark.parametrize("field, value", [("started_at", "yesterday"), ("status", None), ("stream", "no"),
                                          ("key_id", "7")])
async def test_a_row_object_with_a_value_of_the_wrong_type_is_logged_whole_and_left_out(tmp_path, mock_upstream,
                                                                                        field, value):
    """SQLite would store a string in a REAL column as it is: the row is checked against the ledger's columns."""
    line = json.dumps({**GOOD_ROW, field: value}).encode()
    log = await _rows_ship_despite(tmp_path, mock_upstream, line + b"\n")
    assert "a row the ledger cannot take" in log and line.decode() in log, log[-2000:]


async def test_torn_and_foreign_lines_are_left_out_and_the_rows_after_them_ship(tmp_path, mock_upstream):
    await _rows_ship_despite(tmp_path, mock_upstream, b'[1, 2, 3]\n"text"\nnull\n{"request_id": "req_00')


def _bad_and_good_rows() -> tuple[dict, dict]:
    bad = {**GOOD_ROW, "request_id": "req_00000000000000000000000b", "endpoint": None}    # a NOT NULL column
    return bad, {**GOOD_ROW, "request_id": "req_00000000000000000000000c"}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "gw.db")
    return request.getfixturevalue("pg_url")


def test_a_batch_of_one_row_refused_for_a_constraint_is_that_row_left_out(store_url, caplog):
    """Shipped alone (a light load), a row violating a NOT NULL constraint is logged and left out: the database
    takes a good row (tried and rolled back), so the constraint is the row's, and the ledger goes on."""
    bad, good = _bad_and_good_rows()
    conn = service.connect(store_url)
    try:
        rejected: list[str] = []
        with caplog.at_level(logging.ERROR, logger="apertis_proxy.store.ledger"):
            assert write_ledger_rows(conn, [bad], rejected=rejected) == 0
        assert rejected == [bad["request_id"]] and bad["request_id"] in caplog.text
        assert write_ledger_rows(conn, [good]) == 1
        assert [r[0] for r in conn.execute("SELECT request_id FROM usage")] == [good["request_id"]]
    finally:
        conn.close()


def test_a_database_refusing_every_row_keeps_a_batch_of_one(tmp_path):
    """A trigger refusing every INSERT refuses the good row tried as well: the database is refusing, the one row
    stays (LedgerUnavailable: nothing written, shipped again later), also when that row is a bad one."""
    path = str(tmp_path / "gw.db")
    bad, good = _bad_and_good_rows()
    conn = service.connect(path)
    try:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON usage BEGIN SELECT RAISE(ABORT, 'no'); END")
        for row in (good, bad):
            rejected: list[str] = []
            with pytest.raises(LedgerUnavailable):
                write_ledger_rows(conn, [row], rejected=rejected)
            assert rejected == []
        conn.execute("DROP TRIGGER refuse")
        assert write_ledger_rows(conn, [good]) == 1
    finally:
        conn.close()


async def test_a_postgresql_database_refusing_every_row_keeps_a_batch_of_one(pg_url):
    bad, good = _bad_and_good_rows()
    conn = service.connect(pg_url)
    try:
        conn.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                     " $$ BEGIN RAISE check_violation USING MESSAGE = 'no'; END $$")
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON usage FOR EACH ROW EXECUTE FUNCTION refuse()")
        for row in (good, bad):
            with pytest.raises(LedgerUnavailable):
                write_ledger_rows(conn, [row], rejected=[])
    finally:
        conn.close()


# -- whose rows a spool directory holds ----------------------------------------------------------------------------

def test_each_database_has_an_identity_of_its_own_kept_across_opens(tmp_path):
    """Made with the schema; made at the first open of a database that has none (an earlier version's)."""
    a, b = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    ids = []
    for path in (a, b, a):
        conn = schema.connect(path)
        ids.append(schema.database_id(conn))
        conn.close()
    assert ids[0] and ids[0] == ids[2] and ids[0] != ids[1]
    conn = schema.connect(a)
    conn.execute("DELETE FROM meta WHERE k = 'database_id'")      # as an earlier version made it
    conn.close()
    conn = schema.connect(a)
    made = schema.database_id(conn)
    conn.close()
    assert made and made != ids[0]


async def test_hosts_starting_together_on_a_postgresql_database_see_one_identity(pg_url):
    first = service.connect(pg_url)
    try:
        assert schema.database_id(first)
        first.execute("DELETE FROM meta WHERE k = 'database_id'")     # as an earlier version made it
    finally:
        first.close()

    def identity() -> str:
        conn = service.connect(pg_url)
        try:
            return schema.database_id(conn)
        finally:
            conn.close()
    ids = await asyncio.gather(*(asyncio.to_thread(identity) for _ in range(4)))
    assert len(set(ids)) == 1 and ids[0], ids
    assert identity() == ids[0]


async def test_a_spool_dir_shared_by_mistake_never_ships_rows_into_the_other_database(tmp_path, mock_upstream):
    """Two gateways with their own SQLite databases given one spool_dir (one configuration file): A, killed
    with a row spooled, leaves the directory marked as its database's.  B refuses to start, with one line
    naming both databases and telling to give each its own spool_dir; it ships nothing.  A started again
    ships its row into its own database."""
    spool = tmp_path / "shared.spool"
    config = tmp_path / "apertis.toml"
    config.write_text(f'[ledger]\nspool_dir = "{spool}"\n')
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a_db, b_db = str(a_dir / "a.db"), str(b_dir / "b.db")
    a_key, _ = prepare_db(a_db, mock_upstream.base_url), prepare_db(b_db, mock_upstream.base_url)
    async with ServeProcess(a_dir, a_db, "--config", str(config)) as a:
        holder = sqlite3.connect(a_db, timeout=1.0, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")       # A cannot ship: its row waits in the spool
        try:
            await ask(a.base_url, a_key)
            await a.stop(signal.SIGKILL)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    segments = sorted(n for n in os.listdir(spool) if n.endswith((".spool", ".spool2")))
    assert segments
    b = subprocess.run([sys.executable, "-m", "apertis_proxy", "serve", "--host", "127.0.0.1", "--port",
                        str(free_port()), "--db", b_db, "--config", str(config)],
                       cwd=b_dir, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert b.returncode == 1, b.stderr
    [line] = [line for line in b.stderr.splitlines() if "spool" in line]
    assert f"belongs to database {a_db}, not to this gateway's database {b_db}" in line, line
    assert "give each database its own [ledger] spool_dir" in line, line
    assert usage_rows(b_db) == [], "gateway B shipped gateway A's rows into B's database"
    assert sorted(n for n in os.listdir(spool) if n.endswith((".spool", ".spool2"))) == segments
    async with ServeProcess(a_dir, a_db, "--config", str(config)):
        async def shipped() -> bool:
            return len(usage_rows(a_db)) == 1
        await wait_for(shipped, 5.0, "A's spooled row in A's database")


async def test_postgresql_gateways_of_two_databases_in_one_working_directory(pg_server, tmp_path):
    """Both default to ./apertis-ledger.spool: the second refuses to start, its database's URL and the first's
    named (without their passwords), and ships none of the first one's rows."""
    urls = [pg_server.create_database(f"spool_owner_{n}_{os.getpid()}") for n in range(2)]
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        keys = [await asyncio.to_thread(prepare_db, url, mock.base_url) for url in urls]
        workdir = tmp_path / "gw"
        first = await asyncio.to_thread(GatewayProcess.start, urls[0], workdir, flush_interval=600.0,
                                        batch_size=100_000)
        try:
            status, _, _ = await asyncio.to_thread(first.post_message, keys[0])
            assert status == 200
        finally:
            await asyncio.to_thread(first.kill)
        with pytest.raises(RuntimeError) as refused:
            await asyncio.to_thread(GatewayProcess.start, urls[1], workdir)
        said = str(refused.value)
        assert f"belongs to database {urls[0]}, not to this gateway's database {urls[1]}" in said, said
        conn = service.connect(urls[1])
        try:
            assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 0
        finally:
            conn.close()


async def test_a_spool_dir_moved_to_another_host_of_the_same_database_ships_there(pg_url, tmp_path):
    """README: moving a spool directory between hosts is safe.  A host killed with rows spooled; its directory
    moved to another host's working directory (the same PostgreSQL database): that host ships them."""
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(prepare_db, pg_url, mock.base_url)
        dead, other = tmp_path / "dead", tmp_path / "other"
        host = await asyncio.to_thread(GatewayProcess.start, pg_url, dead, flush_interval=600.0, batch_size=100_000)
        try:
            answered = []
            for _ in range(3):
                status, headers, _ = await asyncio.to_thread(host.post_message, key)
                assert status == 200
                answered.append(headers["request-id"])
        finally:
            await asyncio.to_thread(host.kill)
        other.mkdir()
        shutil.move(str(dead / "apertis-ledger.spool"), str(other / "apertis-ledger.spool"))
        host = await asyncio.to_thread(GatewayProcess.start, pg_url, other)
        try:
            def ledger() -> set:
                conn = service.connect(pg_url)
                try:
                    return {r[0] for r in conn.execute("SELECT request_id FROM usage")}
                finally:
                    conn.close()

            async def shipped() -> bool:
                return set(answered) <= await asyncio.to_thread(ledger)
            await wait_for(shipped, 10.0, "the moved spool's rows in the ledger")
        finally:
            await asyncio.to_thread(host.stop)
