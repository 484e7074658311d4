"""The store on PostgreSQL: every CLI verb, schema creation, errors without passwords, db copy,
and the store service (snapshot, LISTEN/NOTIFY, ledger idempotence, retention by partitions)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time

import orjson
import pytest

from apertis_proxy import cli
from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import keys, pg_schema, service, usage
from apertis_proxy.store.url import parse, redact
from tests.support.ledger_rows import record

PASSWORD = "hunter2-not-for-logs"


def with_password(url: str) -> str:
    return url.replace("apertis@", f"apertis:{PASSWORD}@")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_urls_are_classified_and_redacted():
    assert parse("./apertis.db").kind == "sqlite" and parse("./apertis.db").target == "./apertis.db"
    assert parse("sqlite:///var/lib/a.db").target == "/var/lib/a.db"
    assert parse("sqlite:///./a.db").target == "./a.db"
    assert parse("postgresql://u:p@h:5432/db").is_postgres and parse("postgres://u@/db?host=/run").is_postgres
    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    with pytest.raises(ValueError):
        parse("mysql://u@h/db")


def test_every_cli_verb_works_on_postgresql(pg_url, capsys):
    db = ["--db", with_password(pg_url)]
    code, out, _ = run_cli(capsys, "keys", "create", "alice", "--quota", "$5", *db)
    assert code == 0 and "sk-apx-" in out
    assert run_cli(capsys, "keys", "create", "bob", "--rpm", "10", *db)[0] == 0
    assert run_cli(capsys, "keys", "create", "alice", *db)[0] == 1          # a taken name: one line
    assert run_cli(capsys, "keys", "set", "bob", "--rpm", "20", *db)[0] == 0
    assert run_cli(capsys, "keys", "disable", "bob", *db)[0] == 0
    assert run_cli(capsys, "keys", "rotate", "alice", "--grace", "1h", *db)[0] == 0
    code, out, _ = run_cli(capsys, "keys", "list", "--json", *db)
    listed = {k["name"]: k for k in json.loads(out)}
    assert listed["bob"]["enabled"] is False and listed["bob"]["rpm"] == 20 and listed["alice"]["quota_cost"] == 5
    assert run_cli(capsys, "keys", "delete", "bob", "--yes", *db)[0] == 0
    assert run_cli(capsys, "channels", "add", "main", "--base-url", "http://127.0.0.1:9", "--api-key",
                   "sk-ant-upstream", *db)[0] == 0
    assert run_cli(capsys, "channels", "set", "main", "--priority", "3", *db)[0] == 0
    assert run_cli(capsys, "channels", "disable", "main", *db)[0] == 0
    code, out, _ = run_cli(capsys, "channels", "list", "--json", *db)
    (channel,) = json.loads(out)
    assert channel["priority"] == 3 and channel["enabled"] is False and "sk-ant-upstream" not in out
    assert run_cli(capsys, "channels", "enable", "main", *db)[0] == 0
    assert run_cli(capsys, "prices", "set", "house-model", "--input", "2", "--output", "8", *db)[0] == 0
    code, out, _ = run_cli(capsys, "prices", "show", "house-model", *db)
    assert code == 0 and "operator" in out
    assert run_cli(capsys, "prices", "list", *db)[0] == 0
    assert run_cli(capsys, "prices", "remove", "house-model", *db)[0] == 0
    code, out, _ = run_cli(capsys, "usage", "--by", "key", "--json", *db)
    assert code == 0 and json.loads(out)["requests"] == 0
    for by in ("day", "week", "month", "model", "channel"):
        assert run_cli(capsys, "usage", "--by", by, *db)[0] == 0
    assert run_cli(capsys, "usage", "--refused", *db)[0] == 0
    assert run_cli(capsys, "usage", "--csv", *db)[0] == 0
    assert run_cli(capsys, "keys", "set", "alice", "--quota", "5/month", *db)[0] == 0
    code, out, _ = run_cli(capsys, "keys", "show", "alice", *db)
    assert code == 0 and "month" in out
    assert run_cli(capsys, "db", "secrets", *db)[0] == 0
    assert run_cli(capsys, "channels", "remove", "main", *db)[0] == 0


def test_unreachable_database_is_one_line_without_the_password(pg_server, capsys):
    missing = with_password(pg_server.url("no_such_database"))
    code, out, err = run_cli(capsys, "keys", "list", "--db", missing)
    assert code == 1 and err.startswith("error: cannot reach the database at postgresql://apertis:***@")
    assert PASSWORD not in out + err and len(err.strip().splitlines()) == 1


def test_serve_refuses_an_unreachable_url_and_a_newer_schema(pg_server, pg_url, capsys):
    code, out, err = run_cli(capsys, "serve", "--db", with_password(pg_server.url("no_such_database")))
    assert code == 1 and "cannot reach the database" in err and PASSWORD not in out + err
    conn = service.connect(pg_url)
    conn.execute("UPDATE meta SET v = '999' WHERE k = 'schema_version'")
    conn.close()
    code, out, err = run_cli(capsys, "serve", "--db", pg_url)
    assert code == 1 and "newer than this apertis-proxy understands" in err


def test_two_starters_create_the_schema_once(pg_url):
    async def both():
        return await asyncio.gather(*(asyncio.to_thread(service.connect, pg_url) for _ in range(4)))
    conns = asyncio.run(both())
    try:
        assert conns[0].execute("SELECT COUNT(*) FROM models").fetchone()[0] > 0
        assert conns[0].execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()[0] == \
            str(pg_schema.SCHEMA_VERSION)
    finally:
        for conn in conns:
            conn.close()


def _rows(n: int, ts: float, prefix: str = "req", key_id=None) -> list[dict]:
    """Ledger rows as the spool holds them (UsageRecord fields)."""
    return [dataclasses.asdict(UsageRecord(
        request_id=f"{prefix}_{i}", started_at=ts + i * 0.001, endpoint="/v1/messages", status=200, key_id=key_id,
        key_name="alice", requested_model="claude-x", input_tokens=10, output_tokens=5, cost=0.001))
        for i in range(n)]


async def test_the_ledger_write_is_idempotent_and_keeps_the_rollup_and_spend(pg_url):
    store = await service.open_store(pg_url)
    try:
        key_id, _ = await store.call(keys.create_key, "alice")
        now = time.time()
        rows = _rows(300, now, key_id=key_id)
        assert await store.write_ledger(rows) == 300
        assert await store.write_ledger(rows[:150] + _rows(10, now, "more", key_id)) == 10
        cost, tokens = (await store.read_spend())[key_id]
        assert tokens == 310 * 15 and cost == pytest.approx(0.31)
        conn = await asyncio.to_thread(service.connect, pg_url)
        try:
            by_day = usage.summarize(conn, by="day")           # from the rollup
            by_rows = usage.summarize(conn, by="day", since=1.5)  # from the ledger rows
            assert by_day["requests"] == by_rows["requests"] == 310
            assert by_day["input_tokens"] == by_rows["input_tokens"] == 3100
            assert by_day["by"] == by_rows["by"]
        finally:
            conn.close()
    finally:
        await store.close()


async def test_retention_drops_whole_old_partitions(pg_url):
    store = await service.open_store(pg_url)
    try:
        now = time.time()
        old = now - 120 * 86400
        await store.write_ledger(_rows(20, old, "old") + _rows(5, now, "new"))
        assert await store.prune_ledger(now - 30 * 86400) == 20
        conn = await asyncio.to_thread(service.connect, pg_url)
        try:
            assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 5
            assert pg_schema.partition_name(pg_schema.month_of(old)) not in [
                r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'usage_%'")]
            assert usage.summarize(conn, by="day")["requests"] == 5
        finally:
            conn.close()
    finally:
        await store.close()


async def test_config_changes_reach_a_watcher_through_notify(pg_url):
    store = await service.open_store(pg_url)
    watcher = store.watcher(interval=30.0)      # no help from polling: only NOTIFY can be this quick
    try:
        await watcher.start()
        seen = asyncio.Event()
        watcher.subscribe(lambda snap: seen.set() if any(k.name == "carol" for k in snap.keys) else None)
        conn = await asyncio.to_thread(service.connect, pg_url)
        try:
            await asyncio.to_thread(keys.create_key, conn, "carol")
        finally:
            conn.close()
        await asyncio.wait_for(seen.wait(), 1.0)
    finally:
        await store.close()


def test_db_copy_copies_everything_once(tmp_path, pg_url, capsys):
    src = str(tmp_path / "a.db")
    assert run_cli(capsys, "keys", "create", "alice", "--db", src)[0] == 0
    assert run_cli(capsys, "channels", "add", "main", "--base-url", "http://127.0.0.1:9", "--api-key",
                   "sk-ant-x", "--db", src)[0] == 0
    assert run_cli(capsys, "prices", "set", "house-model", "--input", "1", "--output", "2", "--db", src)[0] == 0
    conn = sqlite3.connect(src)
    now = time.time()
    conn.executemany("INSERT INTO usage (request_id, ts, endpoint, stream, status, duration_ms, key_id, key_name,"
                     " cost, input_tokens) VALUES (?, ?, '/v1/messages', 0, 200, 1, 1, 'alice', 0.25, 7)",
                     [("r_old", now - 40 * 86400), ("r_new", now)])
    conn.execute("INSERT INTO key_spend VALUES (1, 0.5, 14)")
    conn.commit()
    conn.close()
    target = with_password(pg_url)
    code, out, err = run_cli(capsys, "db", "copy", "--from", src, "--to", target)
    assert code == 0 and "keys 1" in out and "usage 2" in out and PASSWORD not in out + err
    code, out, _ = run_cli(capsys, "db", "copy", "--from", src, "--to", target)
    assert code == 0 and "keys 0" in out and "usage 0" in out and "key_spend 0" in out
    assert "models 0" in out and "model_prices 0" in out, out      # an unchanged catalogue is left alone
    assert run_cli(capsys, "prices", "set", "house-model", "--input", "3", "--output", "4", "--db", src)[0] == 0
    code, out, _ = run_cli(capsys, "db", "copy", "--from", src, "--to", target)
    assert code == 0 and "model_prices 1" in out and "models 0" in out, out   # the source's change wins
    code, out, _ = run_cli(capsys, "keys", "list", "--json", "--db", target)
    (alice,) = json.loads(out)
    assert (alice["spent_cost"], alice["spent_tokens"]) == (0.5, 14)
    code, out, _ = run_cli(capsys, "usage", "--json", "--db", target)
    assert json.loads(out)["requests"] == 2 and json.loads(out)["cost"] == 0.5
    assert run_cli(capsys, "prices", "show", "house-model", "--db", target)[0] == 0
    # A channel added after the copy gets a new id (the sequence moved past the copied ones).
    assert run_cli(capsys, "channels", "add", "second", "--base-url", "http://127.0.0.1:9", "--api-key",
                   "sk-ant-y", "--db", target)[0] == 0


async def test_spooled_rows_shipped_twice_count_once_on_postgresql(pg_url):
    store = await service.open_store(pg_url)
    try:
        alice, _ = await store.call(keys.create_key, "alice")
        rows = [orjson.loads(orjson.dumps(record(i, alice))) for i in range(130)]
        assert await store.write_ledger(rows) == 130
        first = await store.read_spend()
        assert await store.write_ledger(rows) == 0                       # a whole replay
        assert await store.write_ledger(rows[:70] + [orjson.loads(orjson.dumps(record(500, alice)))]) == 1
        cost, tokens = (await store.read_spend())[alice]
        assert cost == pytest.approx(first[alice][0] + 0.25) and tokens == first[alice][1] + 615
        shipped, spend, _ = await store.shipped_and_spend([rows[0]["request_id"], "req_never"])
        assert shipped == {rows[0]["request_id"]} and spend[alice] == (cost, tokens)
    finally:
        await store.close()


async def test_the_ledger_settles_a_period_quota_in_the_period_of_each_row(pg_url):
    store = await service.open_store(pg_url)
    try:
        alice, _ = await store.call(keys.create_key, "alice", quota_cost=5.0, quota_period="month")
        rows = [orjson.loads(orjson.dumps(record(i, alice))) for i in range(10)]     # 2025-10-09 UTC
        assert await store.write_ledger(rows) == 10
        assert await store.write_ledger(rows) == 0
        _, _, in_period = await store.shipped_and_spend([], {"month": "2025-10-01"})
        cost, tokens = in_period[(alice, "month")]
        assert cost == pytest.approx(2.5) and tokens == sum(115 + i for i in range(10))
    finally:
        await store.close()
