"""Keys over their life: rotation with a grace period, confirmed deletion that keeps history attributable,
listings with notes and --json, and warnings for models nobody knows."""
from __future__ import annotations

import io
import json
import sqlite3
import time
import types

import anthropic
import pytest

from apertis_plugins import keys_auth
from apertis_proxy.cli import main
from apertis_proxy.store.schema import connect

HAIKU = "claude-haiku-4-5-20251001"


def cli(db, capsys, *args):
    code = main([*args, "--db", db])
    out, err = capsys.readouterr()
    return code, out, err


async def ask(base_url, key):
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0) as client:
        return await client.messages.create(model=HAIKU, max_tokens=8,
                                            messages=[{"role": "user", "content": "hi"}])


def auth_plugin(env):
    [(_, plugin)] = env.gateway.plugins.auth
    return plugin


async def rotate(env, capsys, *args):
    code, out, err = cli(env.db_path, capsys, "keys", "rotate", "alice", *args)
    assert code == 0, err
    await auth_plugin(env).refresh()
    return out.splitlines()[-1]


async def test_rotation_keeps_the_key_and_honours_the_grace_period(gateway_env, mock_upstream, capsys,
                                                                   monkeypatch):
    old = gateway_env.add_key("alice", quota_cost=100.0, models=[HAIKU], note="team a")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    await ask(gateway_env.base_url, old)
    (before,) = await gateway_env.usage_rows(n=1)

    new = await rotate(gateway_env, capsys, "--grace", "24h")
    assert new.startswith("sk-apx-") and new != old
    await ask(gateway_env.base_url, new)
    await ask(gateway_env.base_url, old)            # inside the grace period
    rows = await gateway_env.usage_rows(n=3)
    assert [(r["key_id"], r["key_name"], r["status"]) for r in rows] == [(before["key_id"], "alice", 200)] * 3

    # Name, limits and spend stayed with the key.
    await auth_plugin(gateway_env).refresh()
    code, out, _ = cli(gateway_env.db_path, capsys, "keys", "list", "--json")
    (listed,) = json.loads(out)
    assert (listed["id"], listed["name"], listed["quota_cost"], listed["models"], listed["note"]) == \
        (before["key_id"], "alice", 100.0, [HAIKU], "team a")
    assert listed["spent_cost"] == pytest.approx(sum(r["cost"] for r in rows)) and listed["spent_cost"] > 0
    assert listed["key_prefix"] == new[:11] + "..." and listed["old_secrets"][0]["key_prefix"] == old[:11] + "..."

    # A day later the old secret is refused; the new one still works.
    later = time.time() + 86400 + 60
    monkeypatch.setattr(keys_auth, "time", types.SimpleNamespace(time=lambda: later,
                                                                 monotonic=time.monotonic))
    with pytest.raises(anthropic.AuthenticationError) as refused:
        await ask(gateway_env.base_url, old)
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert "rotated" in refused.value.body["error"]["message"]
    await ask(gateway_env.base_url, new)


async def test_rotation_without_grace_refuses_the_old_secret_at_once(gateway_env, mock_upstream, capsys):
    old = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    new = await rotate(gateway_env, capsys)
    with pytest.raises(anthropic.AuthenticationError):
        await ask(gateway_env.base_url, old)
    assert (await ask(gateway_env.base_url, new)).content


def test_rotate_unknown_key_and_bad_grace(tmp_path, capsys):
    db = str(tmp_path / "a.db")
    assert cli(db, capsys, "keys", "create", "alice")[0] == 0
    assert cli(db, capsys, "keys", "rotate", "bob")[0] == 1
    code, _, err = cli(db, capsys, "keys", "rotate", "alice", "--grace", "soon")
    assert code == 2 and "duration" in err


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_delete_asks_and_keeps_history_attributable(tmp_path, capsys, monkeypatch):
    db = str(tmp_path / "a.db")
    assert cli(db, capsys, "keys", "create", "alice")[0] == 0
    conn = connect(db)
    alice_id = conn.execute("SELECT id FROM keys WHERE name = 'alice'").fetchone()[0]
    conn.execute("INSERT INTO usage (request_id, ts, endpoint, key_id, key_name, stream, status,"
                 " duration_ms, cost) VALUES ('req_1', ?, '/v1/messages', ?, 'alice', 0, 200, 1.0, 0.25)",
                 (time.time(), alice_id))
    conn.close()

    monkeypatch.setattr("sys.stdin", io.StringIO(""))         # no terminal, no --yes: refused
    code, _, err = cli(db, capsys, "keys", "delete", "alice")
    assert code == 2 and "--yes" in err
    monkeypatch.setattr("sys.stdin", FakeTty("n\n"))          # asked, declined
    assert cli(db, capsys, "keys", "delete", "alice")[0] == 1
    monkeypatch.setattr("sys.stdin", FakeTty("y\n"))          # asked, confirmed
    assert cli(db, capsys, "keys", "delete", "alice")[0] == 0

    assert cli(db, capsys, "keys", "create", "bob")[0] == 0
    conn = sqlite3.connect(db)
    try:
        bob_id = conn.execute("SELECT id FROM keys WHERE name = 'bob'").fetchone()[0]
        deleted = conn.execute("SELECT id, name FROM deleted_keys").fetchall()
    finally:
        conn.close()
    assert bob_id != alice_id                      # the ledger's rows of alice never become bob's
    assert deleted == [(alice_id, "alice")]
    code, out, _ = cli(db, capsys, "usage", "--json", "--by", "key")
    assert [(r["key"], r["requests"]) for r in json.loads(out)["by"]] == [("alice", 1)]


def test_every_list_has_json_and_keys_list_shows_notes(tmp_path, capsys):
    db = str(tmp_path / "a.db")
    secret = "sk-ant-upstream-SECRET-42"
    assert cli(db, capsys, "keys", "create", "alice", "--note", "on-call laptop")[0] == 0
    assert cli(db, capsys, "channels", "add", "main", "--base-url", "https://api.anthropic.com",
               "--api-key", secret)[0] == 0
    code, out, _ = cli(db, capsys, "keys", "list")
    assert code == 0 and "NOTE" in out.splitlines()[0] and "on-call laptop" in out
    keys = json.loads(cli(db, capsys, "keys", "list", "--json")[1])
    assert [k["name"] for k in keys] == ["alice"] and keys[0]["note"] == "on-call laptop"
    out = cli(db, capsys, "channels", "list", "--json")[1]
    channels = json.loads(out)
    assert [c["name"] for c in channels] == ["main"] and secret not in out and "api_key" not in channels[0]
    assert channels[0]["key_storage"] == "plain text"
    prices = json.loads(cli(db, capsys, "prices", "list", "--json")[1])
    assert {p["id"] for p in prices} >= {HAIKU} and all("input" in p and "aliases" in p for p in prices)


def test_unknown_models_are_warned_about(tmp_path, capsys):
    db = str(tmp_path / "a.db")
    code, _, err = cli(db, capsys, "channels", "add", "main", "--base-url", "https://api.anthropic.com",
                       "--api-key", "sk-ant-x", "--models", "claude-haiku-4.5,my-finetune")
    assert code == 0 and "my-finetune" in err and "prices set" in err and "claude-haiku" not in err
    code, _, err = cli(db, capsys, "keys", "create", "alice", "--models", "claude-sonet-4.5,my-finetune")
    assert code == 0 and "'claude-sonet-4.5'" in err and "my-finetune" not in err
    code, _, err = cli(db, capsys, "keys", "set", "alice", "--models", "claude-opus-4.5")
    assert code == 0 and "warning" not in err
