"""The database file: created private, never created by read commands, backed up online, pruned by retention."""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
import time
from datetime import datetime, timezone

import anthropic
import pytest

from apertis_proxy.cli import main
from apertis_proxy.settings import load
from apertis_proxy.store import schema
from apertis_proxy.store.retention import LedgerRetention
from apertis_proxy.store.service import open_store

HAIKU = "claude-haiku-4-5-20251001"
MESSAGE = {"model": HAIKU, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_new_database_and_its_wal_are_owner_only(tmp_path, loose_umask, capsys):
    db = tmp_path / "apertis.db"
    assert main(["keys", "create", "alice", "--db", str(db)]) == 0
    assert mode(db) == 0o600
    conn = schema.connect(str(db))      # open: SQLite keeps its -wal file beside it
    try:
        conn.execute("UPDATE keys SET note = 'x'")
        assert mode(f"{db}-wal") == 0o600
    finally:
        conn.close()


@pytest.mark.parametrize("command", [
    ("keys", "list"), ("keys", "set", "alice", "--rpm", "5"), ("keys", "disable", "alice"),
    ("channels", "list"), ("channels", "remove", "main"), ("prices", "list"), ("usage",),
    ("db", "backup", "copy.db"),
])
def test_read_commands_refuse_a_missing_database(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APERTIS_DB", raising=False)
    assert main(list(command)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(tmp_path / "apertis.db") in err and "--db" in err and "APERTIS_DB" in err
    assert os.listdir(tmp_path) == []


def test_create_commands_still_create_it(tmp_path, capsys):
    db = str(tmp_path / "new.db")
    assert main(["channels", "add", "main", "--base-url", "http://127.0.0.1:9", "--api-key", "sk-ant-x",
                 "--db", db]) == 0
    assert main(["channels", "list", "--db", db]) == 0
    assert "main" in capsys.readouterr().out


def test_keep_days_is_checked(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[ledger]\nkeep_days = -1\n")
    with pytest.raises(ValueError, match="keep_days"):
        load(str(config))
    config.write_text("[ledger]\nkeep_days = 30\n")
    assert load(str(config)).keep_days == 30


async def _serve_requests(base_url: str, key: str, stop: asyncio.Event) -> int:
    served = 0
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0) as client:
        while not stop.is_set():
            await client.messages.create(**MESSAGE)
            served += 1
    return served


async def test_backup_while_serving_is_a_consistent_copy(gateway, tmp_path, capsys):
    stop = asyncio.Event()
    clients = [asyncio.create_task(_serve_requests(gateway.base_url, gateway.key, stop)) for _ in range(3)]
    await gateway.usage_rows(n=5, timeout=30)          # the ledger is being written
    copies = []
    for i in range(3):
        target = str(tmp_path / f"copy{i}.db")
        code = await asyncio.to_thread(main, ["db", "backup", target, "--db", gateway.db_path])
        assert code == 0, capsys.readouterr().err
        copies.append(target)
    stop.set()
    served = sum(await asyncio.gather(*clients))
    rows = {r["id"]: r for r in await gateway.usage_rows(n=served, timeout=30)}
    assert len(rows) == served
    for target in copies:
        assert mode(target) == 0o600
        assert not os.path.exists(target + "-wal")
        conn = sqlite3.connect(target)
        conn.row_factory = sqlite3.Row
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert [r["name"] for r in conn.execute("SELECT name FROM keys")] == ["alice"]
            assert [r["name"] for r in conn.execute("SELECT name FROM channels")] == ["main"]
            copied = [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
        finally:
            conn.close()
        # A snapshot: the rows committed by then, each exactly as in the live ledger.
        assert copied and all(rows[r["id"]] == r for r in copied)
    # The copy is a working database for the CLI.
    assert main(["keys", "list", "--db", copies[-1]]) == 0
    assert "alice" in capsys.readouterr().out


def _add_usage(conn, ts: float, n: int, tag: str) -> None:
    conn.executemany(
        "INSERT INTO usage (request_id, ts, endpoint, stream, status, duration_ms) VALUES (?,?,?,?,?,?)",
        [(f"req_{tag}_{i}", ts, "/v1/messages", 0, 200, 1.0) for i in range(n)])


async def test_retention_deletes_old_rows_in_batches_while_serving(gateway_env, mock_upstream):
    now = time.time()
    _add_usage(gateway_env.conn, now - 40 * 86400, 1200, "old")
    _add_usage(gateway_env.conn, now - 29 * 86400, 3, "recent")
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    gw = await gateway_env.start(keep_days=30)
    async with anthropic.AsyncAnthropic(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        await client.messages.create(**MESSAGE)
    await mock_upstream.wait_until(lambda: gw.retention.deleted == 1200, timeout=30)
    rows = await gateway_env.usage_rows(n=4)
    assert sorted(r["request_id"].split("_")[1] for r in rows if not r["key_name"]) == ["recent"] * 3
    assert [r["key_name"] for r in rows if r["key_name"]] == ["alice"]


async def test_retention_over_several_batches_keeps_newer_rows(tmp_path):
    db = str(tmp_path / "apertis.db")
    conn = schema.connect(db)
    now = time.time()
    _add_usage(conn, now - 10 * 86400, 25, "old")
    _add_usage(conn, now - 1 * 86400, 2, "new")
    conn.close()
    store = await open_store(db)
    retention = LedgerRetention(store, 7, logging.getLogger("test"), batch_rows=10)
    try:
        assert await retention.prune(now) == 25
    finally:
        await store.close()
    conn = schema.connect(db)
    try:
        assert [r[0] for r in conn.execute("SELECT request_id FROM usage ORDER BY id")] == \
            ["req_new_0", "req_new_1"]
    finally:
        conn.close()


async def test_retention_drops_refusal_counts_of_days_past_the_cutoff(tmp_path):
    db = str(tmp_path / "apertis.db")
    conn = schema.connect(db)
    now = datetime(2026, 12, 20, 12, 0, tzinfo=timezone.utc).timestamp()
    conn.executemany("INSERT INTO refusals (day, key_name, reason, status, count) VALUES (?, 'alice', 'rpm', 429, 3)",
                     [("2026-12-12",), ("2026-12-13",), ("2026-12-19",)])
    conn.close()
    store = await open_store(db)
    try:
        await LedgerRetention(store, 7, logging.getLogger("test")).prune(now)     # cutoff 2026-12-13 12:00
    finally:
        await store.close()
    conn = schema.connect(db)
    try:
        assert [r[0] for r in conn.execute("SELECT day FROM refusals ORDER BY day")] == ["2026-12-13", "2026-12-19"]
    finally:
        conn.close()
