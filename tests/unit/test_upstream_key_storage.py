"""Upstream keys at rest: encrypted under APERTIS_SECRET_KEY, plain text still served and reported,
re-encrypted under a new key; a gateway key is never taken as an upstream key."""
from __future__ import annotations

import sqlite3
import sys
import types

import anthropic
import pytest

from apertis_proxy.cli import main
from apertis_proxy.store import channels as channel_store
from apertis_proxy.store import key_encryption
from apertis_proxy.store.schema import connect
from tests.support.mock_upstream import MOCK_API_KEY

HAIKU = "claude-haiku-4-5-20251001"
KEY_1 = "eV4EzYjLrBqP8u0zXfHn2l5hC7vS2m9QdUu3kT6wA1g="
KEY_2 = "Q2w8lV0cN5rT1yH6sK3pJ9xF4bG7mZ2aD8eR0uI5oLc="


@pytest.fixture(autouse=True)
def no_secret_key(monkeypatch):
    for name in (key_encryption.ENV_KEY, key_encryption.ENV_KEY_FILE, "APERTIS_UPSTREAM_API_KEY",
                 "ANTHROPIC_API_KEY", "APERTIS_DB"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "apertis.db")


def cli(db, capsys, *args):
    code = main([*args, "--db", db])
    out, err = capsys.readouterr()
    return code, out, err


def stored_key(db, name="main"):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT api_key FROM channels WHERE name = ?", (name,)).fetchone()[0]
    finally:
        conn.close()


async def ask(base_url, key):
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0) as client:
        message = await client.messages.create(model=HAIKU, max_tokens=8,
                                               messages=[{"role": "user", "content": "hi"}])
    return message


async def test_encrypted_key_is_stored_sealed_and_served(gateway_env, mock_upstream, monkeypatch, capsys):
    monkeypatch.setenv(key_encryption.ENV_KEY, KEY_1)
    db = gateway_env.db_path
    code, _, err = cli(db, capsys, "channels", "add", "main", "--base-url", mock_upstream.base_url,
                       "--api-key", MOCK_API_KEY)
    assert code == 0, err
    stored = stored_key(db)
    assert stored.startswith("enc:v1:") and MOCK_API_KEY not in stored
    with open(db, "rb") as fh:
        assert MOCK_API_KEY.encode() not in fh.read()
    key = gateway_env.add_key("alice")
    await gateway_env.start()
    assert (await ask(gateway_env.base_url, key)).content
    assert mock_upstream.last_request.headers["x-api-key"] == MOCK_API_KEY
    code, out, _ = cli(db, capsys, "channels", "list")
    assert code == 0 and "encrypted" in out and MOCK_API_KEY not in out


async def test_plain_text_keys_keep_working_are_reported_and_get_encrypted(
        gateway_env, mock_upstream, monkeypatch, capsys):
    db = gateway_env.db_path
    gateway_env.add_channel("main", mock_upstream)          # stored before any secret key existed
    key = gateway_env.add_key("alice")
    monkeypatch.setenv(key_encryption.ENV_KEY, KEY_1)
    code, out, _ = cli(db, capsys, "db", "secrets")
    assert code == 0
    assert "main" in out and "plain text" in out and "db reencrypt" in out
    await gateway_env.start()
    assert (await ask(gateway_env.base_url, key)).content

    code, out, err = cli(db, capsys, "db", "reencrypt")
    assert code == 0, err
    assert stored_key(db).startswith("enc:v1:")
    code, out, _ = cli(db, capsys, "db", "secrets")
    assert code == 0 and "plain text" not in out and "encrypted" in out
    # The running server reloads the channel from its encrypted row and still sends the right key.
    [(_, router)] = gateway_env.gateway.plugins.routers
    await router.refresh()
    assert (await ask(gateway_env.base_url, key)).content
    assert mock_upstream.last_request.headers["x-api-key"] == MOCK_API_KEY


def test_a_new_secret_key_takes_over_with_reencrypt(db, monkeypatch, capsys):
    monkeypatch.setenv(key_encryption.ENV_KEY, KEY_1)
    assert cli(db, capsys, "channels", "add", "main", "--base-url", "https://api.anthropic.com",
               "--api-key", "sk-ant-upstream-1")[0] == 0
    sealed_1 = stored_key(db)
    monkeypatch.setenv(key_encryption.ENV_KEY, f"{KEY_2}, {KEY_1}")     # new key first, old one still there
    assert cli(db, capsys, "db", "reencrypt")[0] == 0
    assert stored_key(db) != sealed_1
    monkeypatch.setenv(key_encryption.ENV_KEY, KEY_2)                  # the old key is gone
    conn = connect(db)
    try:
        assert channel_store.get_channel(conn, "main").api_key == "sk-ant-upstream-1"
    finally:
        conn.close()
    monkeypatch.setenv(key_encryption.ENV_KEY, KEY_1)                  # only the retired key: cannot open
    code, out, _ = cli(db, capsys, "db", "secrets")
    assert code == 1 and "NO" in out
    code, _, err = cli(db, capsys, "channels", "test", "main")
    assert code == 1 and "opens" in err and "sk-ant-upstream-1" not in err


def test_secret_key_from_a_file(db, tmp_path, monkeypatch, capsys):
    path = tmp_path / "secret"
    path.write_text(KEY_1 + "\n")
    monkeypatch.setenv(key_encryption.ENV_KEY_FILE, str(path))
    assert cli(db, capsys, "channels", "add", "main", "--base-url", "https://api.anthropic.com",
               "--api-key", "sk-ant-upstream-1")[0] == 0
    assert stored_key(db).startswith("enc:v1:")
    monkeypatch.delenv(key_encryption.ENV_KEY_FILE)
    monkeypatch.setenv(key_encryption.ENV_KEY, KEY_1)
    conn = connect(db)
    try:
        assert channel_store.get_channel(conn, "main").api_key == "sk-ant-upstream-1"
    finally:
        conn.close()


def test_malformed_secret_key_is_one_clear_error(db, monkeypatch, capsys):
    monkeypatch.setenv(key_encryption.ENV_KEY, "not-a-fernet-key")
    code, _, err = cli(db, capsys, "channels", "add", "main", "--base-url", "https://api.anthropic.com",
                       "--api-key", "sk-ant-upstream-1")
    assert code == 1 and key_encryption.ENV_KEY in err and "db secret-key" in err
    code, out, _ = cli(db, capsys, "db", "secret-key")
    assert code == 0
    monkeypatch.setenv(key_encryption.ENV_KEY, out.strip())
    assert key_encryption.from_environment().open(key_encryption.seal_for_storage("x")) == "x"


@pytest.fixture
def fake_server(monkeypatch):
    """`serve` stops just before the server would start."""
    calls = []
    module = types.ModuleType("apertis_proxy.server")
    module.run = lambda settings: calls.append(settings) or 0
    monkeypatch.setitem(sys.modules, "apertis_proxy.server", module)
    return calls


def test_serve_refuses_keys_it_cannot_open(db, monkeypatch, capsys, fake_server):
    monkeypatch.setenv(key_encryption.ENV_KEY, KEY_1)
    assert cli(db, capsys, "channels", "add", "main", "--base-url", "https://api.anthropic.com",
               "--api-key", "sk-ant-upstream-1")[0] == 0
    monkeypatch.delenv(key_encryption.ENV_KEY)
    code, _, err = cli(db, capsys, "serve")
    assert code == 1 and "main" in err and key_encryption.ENV_KEY in err
    assert fake_server == []


@pytest.mark.parametrize("action", ["add", "set"])
def test_a_gateway_key_is_never_an_upstream_key(db, capsys, action):
    gateway_key = "sk-apx-" + "k" * 43
    if action == "set":
        assert cli(db, capsys, "channels", "add", "main", "--base-url", "https://api.anthropic.com",
                   "--api-key", "sk-ant-upstream-1")[0] == 0
    extra = ["--base-url", "https://api.anthropic.com"] if action == "add" else []
    code, out, err = cli(db, capsys, "channels", action, "main", *extra, "--api-key", gateway_key)
    assert code == 1 and "gateway key" in err and gateway_key not in out + err
    if action == "set":
        conn = connect(db)
        try:
            assert channel_store.get_channel(conn, "main").api_key == "sk-ant-upstream-1"
        finally:
            conn.close()


@pytest.mark.parametrize("env, used, warned", [
    ({"APERTIS_UPSTREAM_API_KEY": "sk-ant-own", "ANTHROPIC_API_KEY": "sk-apx-client"}, "sk-ant-own", False),
    ({"ANTHROPIC_API_KEY": "sk-ant-legacy"}, "sk-ant-legacy", True),
])
def test_bootstrap_prefers_its_own_variable(db, env, used, warned):
    conn = connect(db)
    try:
        message = channel_store.bootstrap_default_channel(conn, env)
        assert "created channel" in message and "APERTIS_UPSTREAM_API_KEY" in message
        assert ("warning" in message) is warned
        assert channel_store.get_channel(conn, "anthropic").api_key == used
    finally:
        conn.close()


def test_bootstrap_never_takes_a_client_gateway_key(db):
    conn = connect(db)
    try:
        message = channel_store.bootstrap_default_channel(conn, {"ANTHROPIC_API_KEY": "sk-apx-" + "c" * 43})
        assert "gateway key" in message and "c" * 43 not in message
        assert channel_store.channel_count(conn) == 0
    finally:
        conn.close()
