"""The operator CLI, run in-process through `main()` and as `python -m apertis_proxy`."""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from apertis_proxy import __version__
from apertis_proxy.cli import main, parse_quota, parse_time
from apertis_proxy.store import channels as channel_store
from apertis_proxy.store.schema import connect

UPSTREAM_KEY = "sk-ant-upstream-SECRET-0123456789"


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "apertis.db")


@pytest.fixture
def cli(db, capsys):
    """Run the CLI on the test database; returns (exit code, stdout, stderr)."""
    def run(*args: str):
        code = main([*args, "--db", db])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def run_module(db, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("APERTIS_DB", "ANTHROPIC_API_KEY")}
    return subprocess.run([sys.executable, "-m", "apertis_proxy", *args, "--db", db], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


def db_dump(db) -> str:
    conn = connect(db)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def query(db, sql, params=()):
    conn = connect(db)
    try:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


# --------------------------------------------------------------------------- version

def test_version_in_process_and_as_module(db, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"apertis-proxy {__version__}"
    proc = subprocess.run([sys.executable, "-m", "apertis_proxy", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"apertis-proxy {__version__}"


def test_usage_error_exits_2(cli):
    code, _, err = cli("keys", "create")
    assert code == 2
    assert "required" in err


# --------------------------------------------------------------------------- keys

def test_key_create_prints_key_last_and_stores_only_its_hash(cli, db):
    code, out, err = cli("keys", "create", "alice")
    assert code == 0, err
    plain = out.strip().splitlines()[-1]
    assert plain.startswith("sk-apx-") and len(plain) > 40
    rows = query(db, "SELECT key_hash, key_prefix FROM keys WHERE name = 'alice'")
    assert rows[0]["key_hash"] == hashlib.sha256(plain.encode()).hexdigest()
    assert plain not in db_dump(db)
    assert plain.startswith(rows[0]["key_prefix"].rstrip("."))


def test_key_create_with_limits(cli, db):
    before = time.time()
    code, out, err = cli("keys", "create", "bob", "--models", "claude-haiku-4.5,claude-opus-4.5",
                         "--quota", "$25", "--rpm", "60", "--concurrency", "4", "--expires", "30d",
                         "--note", "team b")
    assert code == 0, err
    row = query(db, "SELECT * FROM keys WHERE name = 'bob'")[0]
    assert json.loads(row["models"]) == ["claude-haiku-4.5", "claude-opus-4.5"]
    assert row["quota_cost"] == 25.0 and row["quota_tokens"] is None
    assert (row["rpm"], row["concurrency"], row["note"]) == (60, 4, "team b")
    assert before + 30 * 86400 <= row["expires_at"] <= time.time() + 30 * 86400

    code, _, err = cli("keys", "create", "carol", "--quota", "2mtokens", "--expires", "2999-01-31")
    assert code == 0, err
    row = query(db, "SELECT * FROM keys WHERE name = 'carol'")[0]
    assert row["quota_tokens"] == 2_000_000 and row["quota_cost"] is None
    # A bare date: the key works through that whole (UTC) day.
    assert row["expires_at"] == datetime(2999, 2, 1, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("text, expected", [
    ("25", (25.0, None)), ("25usd", (25.0, None)), ("$25", (25.0, None)), ("12.5", (12.5, None)),
    ("2000000tokens", (None, 2_000_000)), ("2000000tok", (None, 2_000_000)),
    ("2mtokens", (None, 2_000_000)), ("500k tokens", (None, 500_000)), ("1_000 tokens", (None, 1000)),
])
def test_parse_quota(text, expected):
    assert parse_quota(text) == expected


@pytest.mark.parametrize("text", ["", "25eur", "2m", "-5", "tokens"])
def test_parse_quota_rejects(text, cli):
    code, _, err = cli("keys", "create", "x", "--quota", text)
    assert code == 2
    assert "quota" in err


def test_parse_time_forms():
    now = 1_800_000_000.0
    assert parse_time("12h", now=now, relative_sign=+1) == now + 12 * 3600
    assert parse_time("7d", now=now) == now - 7 * 86400
    assert parse_time("2026-11-01T10:00:00Z") == datetime(2026, 11, 1, 10, tzinfo=timezone.utc).timestamp()
    assert parse_time("2026-11-01T10:00:00+02:00") == \
        datetime(2026, 11, 1, 8, tzinfo=timezone.utc).timestamp()
    assert parse_time("2026-11-01") == datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp()
    assert parse_time("2026-11-01", date_is_end_of_day=True) == \
        datetime(2026, 11, 2, tzinfo=timezone.utc).timestamp()


def test_expiry_in_the_past_is_refused(cli):
    code, _, err = cli("keys", "create", "late", "--expires", "2001-01-01")
    assert code == 2
    assert "past" in err


def test_duplicate_key_name_is_a_clear_error(cli, db):
    assert cli("keys", "create", "dup")[0] == 0
    code, out, err = cli("keys", "create", "dup")
    assert code == 1
    assert "already exists" in err and "sk-apx-" not in out + err
    assert len(query(db, "SELECT id FROM keys")) == 1


def test_keys_list_enable_disable_delete(cli, db):
    _, out, _ = cli("keys", "create", "alice", "--quota", "10")
    plain = out.strip().splitlines()[-1]
    key_id = query(db, "SELECT id FROM keys WHERE name = 'alice'")[0]["id"]
    conn = connect(db)
    conn.execute("INSERT INTO key_spend (key_id, cost, tokens) VALUES (?, 1.25, 4321)", (key_id,))
    conn.close()

    code, out, err = cli("keys", "list")
    assert code == 0, err
    header, line = out.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "KEY", "ENABLED"]
    assert line.split()[:3] == ["alice", plain[:11] + "...", "yes"]
    assert "$1.25" in line and "4,321 tok" in line and "$10.00" in line
    assert plain not in out and hashlib.sha256(plain.encode()).hexdigest() not in out

    assert cli("keys", "disable", "alice")[0] == 0
    assert query(db, "SELECT enabled FROM keys")[0]["enabled"] == 0
    assert cli("keys", "list")[1].splitlines()[1].split()[2] == "no"
    assert cli("keys", "enable", "alice")[0] == 0
    assert query(db, "SELECT enabled FROM keys")[0]["enabled"] == 1

    assert cli("keys", "delete", "alice", "--yes")[0] == 0
    assert query(db, "SELECT * FROM keys") == [] and query(db, "SELECT * FROM key_spend") == []
    code, _, err = cli("keys", "disable", "alice")
    assert code == 1 and "no key named 'alice'" in err


def test_keys_set_changes_and_clears_limits(cli, db):
    cli("keys", "create", "dave", "--quota", "5", "--rpm", "10", "--models", "a")
    code, _, err = cli("keys", "set", "dave", "--quota", "1ktok", "--rpm", "none", "--any-model",
                       "--concurrency", "3")
    assert code == 0, err
    row = query(db, "SELECT * FROM keys WHERE name = 'dave'")[0]
    assert (row["quota_cost"], row["quota_tokens"], row["rpm"], row["concurrency"], row["models"]) == \
        (None, 1000, None, 3, None)
    assert cli("keys", "set", "dave")[0] == 2          # nothing to change
    assert cli("keys", "set", "nobody", "--rpm", "1")[0] == 1


def test_keys_via_subprocess(db):
    created = run_module(db, "keys", "create", "sub-user", "--rpm", "5")
    assert created.returncode == 0, created.stderr
    plain = created.stdout.strip().splitlines()[-1]
    listed = run_module(db, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert "sub-user" in listed.stdout
    assert plain not in listed.stdout
    assert hashlib.sha256(plain.encode()).hexdigest() not in listed.stdout
    dup = run_module(db, "keys", "create", "sub-user")
    assert dup.returncode == 1 and "already exists" in dup.stderr


# --------------------------------------------------------------------------- channels

def test_channels_add_list_never_shows_the_key(cli, db):
    code, out, err = cli("channels", "add", "main", "--base-url", "https://api.anthropic.com/",
                         "--api-key", UPSTREAM_KEY, "--models", "claude-haiku-4.5,claude-sonnet-4.5",
                         "--priority", "2", "--weight", "3", "--alias", "fast=claude-haiku-4-5-20251001",
                         "--api-version", "2026-10-21", "--forward-extras", "--auth-header", "bearer")
    assert code == 0, err
    assert UPSTREAM_KEY not in out + err
    row = query(db, "SELECT * FROM channels WHERE name = 'main'")[0]
    assert row["base_url"] == "https://api.anthropic.com"
    assert row["api_key"] == UPSTREAM_KEY
    assert json.loads(row["models"]) == ["claude-haiku-4.5", "claude-sonnet-4.5"]
    assert json.loads(row["aliases"]) == {"fast": "claude-haiku-4-5-20251001"}
    assert (row["priority"], row["weight"], row["api_version"]) == (2, 3, "2026-10-21")
    assert json.loads(row["options"]) == {"forward_extras": True, "auth_header": "authorization"}

    assert cli("channels", "add", "any", "--base-url", "http://127.0.0.1:9", "--api-key", "k-2")[0] == 0
    assert query(db, "SELECT models FROM channels WHERE name = 'any'")[0]["models"] is None

    code, out, err = cli("channels", "list")
    assert code == 0, err
    assert UPSTREAM_KEY not in out + err and "k-2" not in out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "TYPE", "BASE"]
    main_line = next(line for line in lines if line.startswith("main "))
    for expected in ("https://api.anthropic.com", "plain text", "claude-haiku-4.5,claude-sonnet-4.5",
                     "fast=claude-haiku-4-5-20251001", "2026-10-21", "bearer,fwd-extras"):
        assert expected in main_line
    any_line = next(line for line in lines if line.startswith("any "))
    assert " any " in any_line


def test_channels_add_rejects_bad_input(cli, db):
    code, _, err = cli("channels", "add", "x", "--base-url", "ftp://host", "--api-key", "k")
    assert code == 2 and "invalid base URL" in err
    code, _, err = cli("channels", "add", "x", "--base-url", "https://", "--api-key", "k")
    assert code == 2
    code, _, err = cli("channels", "add", "x", "--base-url", "https://h", "--api-key", "bad key")
    assert code == 1 and "printable ASCII" in err
    assert cli("channels", "add", "x", "--base-url", "https://h", "--api-key", "k")[0] == 0
    code, _, err = cli("channels", "add", "x", "--base-url", "https://h", "--api-key", "k")
    assert code == 1 and "already exists" in err


def test_numbers_too_large_and_empty_changes_are_one_line_errors(cli, db):
    """An integer past SQLite's 64 bits was a traceback (OverflowError); `channels set NAME` with no option said
    "updated" where `keys set` says there is nothing to change.  Options stored in 32-bit PostgreSQL columns are
    bounded by the CLI (naming the bound); a token quota past 64 bits is refused by the store."""
    for args in (("keys", "create", "x", "--rpm", "9" * 25),
                 ("channels", "add", "c", "--base-url", "https://h", "--api-key", "k", "--priority", "9" * 25)):
        code, out, err = cli(*args)
        assert code == 2 and "Traceback" not in out + err
        assert err.strip() == f"error: a number given is too large: {'9' * 25} (at most 2147483647)"
    code, out, err = cli("keys", "create", "x", "--quota", f"{'9' * 25}tokens")
    assert code == 2 and err.strip() == "error: a number given is too large" and "Traceback" not in out + err
    assert cli("channels", "add", "c", "--base-url", "https://h", "--api-key", "k")[0] == 0
    code, out, err = cli("channels", "set", "c")
    assert code == 2 and "nothing to change" in err and "updated" not in out
    code, out, _ = cli("channels", "set", "c", "--priority", "0")
    assert code == 0 and "updated" in out


def test_channels_add_reads_key_from_stdin(cli, db, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(UPSTREAM_KEY + "\n"))
    code, out, err = cli("channels", "add", "piped", "--base-url", "https://h", "--api-key", "-")
    assert code == 0, err
    assert query(db, "SELECT api_key FROM channels")[0]["api_key"] == UPSTREAM_KEY
    assert UPSTREAM_KEY not in out + err


def test_channels_enable_disable_set_remove(cli, db):
    cli("channels", "add", "c1", "--base-url", "https://a.example", "--api-key", UPSTREAM_KEY,
        "--models", "m1", "--alias", "x=y", "z=w", "--forward-client-version")
    rev = query(db, "SELECT rev FROM config_rev")[0]["rev"]

    assert cli("channels", "disable", "c1")[0] == 0
    row = query(db, "SELECT enabled, disabled_reason FROM channels")[0]
    assert row["enabled"] == 0 and row["disabled_reason"]
    _, out, _ = cli("channels", "list")
    assert "disabled by operator" in out and " no " in out
    assert query(db, "SELECT rev FROM config_rev")[0]["rev"] > rev   # a running server notices

    assert cli("channels", "enable", "c1")[0] == 0
    row = query(db, "SELECT enabled, disabled_reason FROM channels")[0]
    assert row["enabled"] == 1 and row["disabled_reason"] is None

    code, out, err = cli("channels", "set", "c1", "--base-url", "http://b.example:8080", "--priority", "7",
                         "--weight", "2", "--alias", "q=r", "--remove-alias", "x", "--any-model",
                         "--no-forward-client-version", "--auth-header", "x-api-key",
                         "--api-version", "2026-10-21", "--api-key", "new-key-1")
    assert code == 0, err
    row = query(db, "SELECT * FROM channels")[0]
    assert row["base_url"] == "http://b.example:8080"
    assert (row["priority"], row["weight"], row["api_version"], row["api_key"]) == \
        (7, 2, "2026-10-21", "new-key-1")
    assert row["models"] is None
    assert json.loads(row["aliases"]) == {"z": "w", "q": "r"}
    assert json.loads(row["options"]) == {"forward_client_version": False, "auth_header": "x-api-key"}

    # Options left out of `set` keep their stored values.
    assert cli("channels", "set", "c1", "--models", "m2,m3", "--clear-aliases")[0] == 0
    row = query(db, "SELECT * FROM channels")[0]
    assert json.loads(row["models"]) == ["m2", "m3"] and json.loads(row["aliases"]) == {}
    assert row["priority"] == 7 and row["api_key"] == "new-key-1"

    assert cli("channels", "set", "nope", "--priority", "1")[0] == 1
    assert cli("channels", "remove", "c1")[0] == 0
    assert query(db, "SELECT * FROM channels") == []
    code, _, err = cli("channels", "remove", "c1")
    assert code == 1 and "no channel named 'c1'" in err


def test_channels_list_empty_says_how_to_add_one(cli, db):
    connect(db).close()
    code, out, _ = cli("channels", "list")
    assert code == 0
    assert "apertis-proxy channels add" in out and "--base-url" in out


def test_channels_via_subprocess(db):
    added = run_module(db, "channels", "add", "sub", "--base-url", "https://api.anthropic.com",
                       "--api-key", UPSTREAM_KEY)
    assert added.returncode == 0, added.stderr
    listed = run_module(db, "channels", "list")
    assert listed.returncode == 0 and "sub" in listed.stdout
    assert UPSTREAM_KEY not in added.stdout + added.stderr + listed.stdout + listed.stderr


# --------------------------------------------------------------------------- channels test

class MockUpstream(ThreadingHTTPServer):
    """A tiny Anthropic stand-in: checks the credential, answers a message or a 401."""

    daemon_threads = True

    def __init__(self, expected_key: str, reject: bool = False):
        super().__init__(("127.0.0.1", 0), _MockHandler)
        self.expected_key = expected_key
        self.reject = reject
        self.seen: list[dict] = []


class _MockHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        server: MockUpstream = self.server
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        headers = {k.lower(): v for k, v in self.headers.items()}
        server.seen.append({"path": self.path, "headers": headers, "body": body})
        presented = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        if server.reject or presented != server.expected_key:
            # A careless upstream that echoes the credential: the CLI must not print it.
            self._answer(401, {"type": "error", "error": {
                "type": "authentication_error", "message": f"invalid x-api-key {presented}"},
                "request_id": "req_mock401"})
            return
        self._answer(200, {
            "id": "msg_mock", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": "p"}], "stop_reason": "max_tokens",
            "stop_sequence": None, "usage": {"input_tokens": 8, "output_tokens": 1,
                                             "cache_read_input_tokens": 0,
                                             "cache_creation_input_tokens": 0}})

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("request-id", "req_mock")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    servers = []

    def start(expected_key=UPSTREAM_KEY, reject=False) -> MockUpstream:
        server = MockUpstream(expected_key, reject)
        # shutdown() waits for the loop's next poll: every 0.5 s by default.
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _url(server: MockUpstream, path: str = "") -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{path}"


def test_channels_test_success_with_x_api_key(cli, upstream):
    server = upstream()
    cli("channels", "add", "up", "--base-url", _url(server), "--api-key", UPSTREAM_KEY)
    code, out, err = cli("channels", "test", "up")
    assert code == 0, err
    assert "HTTP 200" in out and "claude-haiku-4-5-20251001" in out and "output_tokens=1" in out
    assert UPSTREAM_KEY not in out + err
    seen = server.seen[-1]
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == UPSTREAM_KEY and "authorization" not in seen["headers"]
    assert seen["headers"]["anthropic-version"] == "2023-06-01"
    assert seen["body"] == {"model": "claude-haiku-4-5-20251001", "max_tokens": 1,
                            "messages": [{"role": "user", "content": "ping"}]}


def test_channels_test_bearer_alias_and_path_prefix(cli, upstream):
    server = upstream()
    cli("channels", "add", "up", "--base-url", _url(server, "/prefix"), "--api-key", UPSTREAM_KEY,
        "--auth-header", "bearer", "--api-version", "2026-10-21", "--models", "claude-sonnet-4.5")
    code, out, err = cli("channels", "test", "up")
    assert code == 0, err
    seen = server.seen[-1]
    assert seen["path"] == "/prefix/v1/messages"
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in seen["headers"]
    assert seen["headers"]["anthropic-version"] == "2026-10-21"
    # The channel's first model, through the catalogue's alias to the upstream id.
    assert seen["body"]["model"] == "claude-sonnet-4-5-20250929"

    assert cli("channels", "test", "up", "--model", "custom-model")[0] == 0
    assert server.seen[-1]["body"]["model"] == "custom-model"


def test_channels_test_reports_401_without_the_key(cli, upstream):
    server = upstream(reject=True)
    cli("channels", "add", "bad", "--base-url", _url(server), "--api-key", UPSTREAM_KEY)
    code, out, err = cli("channels", "test", "bad")
    assert code == 1
    assert "HTTP 401" in err and "authentication_error" in err
    assert UPSTREAM_KEY not in out + err          # the mock echoed it; the CLI redacted it
    assert server.seen[-1]["headers"]["x-api-key"] == UPSTREAM_KEY


def test_channels_test_connection_refused(cli):
    with socket.socket() as s:           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli("channels", "add", "down", "--base-url", f"http://127.0.0.1:{port}", "--api-key", UPSTREAM_KEY)
    code, out, err = cli("channels", "test", "down", "--timeout", "5")
    assert code == 1
    assert "request failed" in err and UPSTREAM_KEY not in out + err
    assert cli("channels", "test", "missing")[0] == 1


def test_channels_test_sends_the_gateways_upstream_headers(cli, upstream):
    # The same header code as the gateway: the operator's workspace headers and the host line go upstream.
    server = upstream()
    cli("channels", "add", "ws", "--base-url", _url(server), "--api-key", UPSTREAM_KEY,
        "--workspace-id", "wrkspc_01", "--user-profile-id", "prof_01")
    code, out, err = cli("channels", "test", "ws")
    assert code == 0, err
    headers = server.seen[-1]["headers"]
    assert headers["anthropic-workspace-id"] == "wrkspc_01"
    assert headers["anthropic-user-profile-id"] == "prof_01"
    assert headers["host"] == "{}:{}".format(*server.server_address[:2])
    assert headers["user-agent"].startswith("apertis-proxy/")
    assert UPSTREAM_KEY not in out + err


def test_channels_test_over_tls_reports_a_failed_handshake(cli, upstream):
    # https:// goes through TLS as the gateway does; a plain-HTTP peer fails the handshake.
    server = upstream()
    cli("channels", "add", "tls", "--base-url", _url(server).replace("http://", "https://"),
        "--api-key", UPSTREAM_KEY)
    code, out, err = cli("channels", "test", "tls", "--timeout", "5")
    assert code == 1
    assert "request failed" in err and "cannot connect" in err
    assert UPSTREAM_KEY not in out + err
    assert server.seen == []


def test_channels_test_via_subprocess(db, upstream):
    server = upstream()
    run_module(db, "channels", "add", "up", "--base-url", _url(server), "--api-key", "-",
               stdin=UPSTREAM_KEY + "\n")
    proc = run_module(db, "channels", "test", "up")
    assert proc.returncode == 0, proc.stderr
    assert "HTTP 200" in proc.stdout and UPSTREAM_KEY not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- prices

def test_prices_list_shows_the_seed(cli, db):
    connect(db).close()
    code, out, err = cli("prices", "list")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("claude-sonnet-4-5-20250929"))
    cols = line.split()
    assert "claude-sonnet-4.5,claude-sonnet-4-5" in cols
    assert cols[-5:] == ["3", "15", "3.75", "6", "0.3"]


def operator_prices(db, model: str, everything: bool = False) -> tuple:
    """The operator's latest price row: (input, output, cache read), or all five rates."""
    row = query(db, "SELECT * FROM model_prices WHERE model_id = ? AND origin = 'operator'"
                    " ORDER BY effective_from DESC LIMIT 1", (model,))[0]
    if everything:
        return tuple(row[f] for f in ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read"))
    return row["input"], row["output"], row["cache_read"]


def test_prices_set_updates_by_alias_and_creates(cli, db):
    code, out, err = cli("prices", "set", "claude-haiku-4.5", "--input", "0.8", "--cache-read", "0.08",
                         "--alias", "haiku", "--display-name", "Haiku")
    assert code == 0, err
    row = query(db, "SELECT * FROM models WHERE id = 'claude-haiku-4-5-20251001'")[0]
    assert row["display_name"] == "Haiku"
    assert operator_prices(db, "claude-haiku-4-5-20251001")[:3] == (0.8, 5.0, 0.08)
    assert json.loads(row["aliases"]) == ["claude-haiku-4.5", "claude-haiku-4-5", "haiku"]

    code, _, err = cli("prices", "set", "new-model", "--input", "2")
    assert code == 1 and "--output" in err
    assert query(db, "SELECT * FROM models WHERE id = 'new-model'") == []

    code, _, err = cli("prices", "set", "new-model", "--input", "2", "--output", "10",
                       "--cache-write-1h", "3")
    assert code == 0, err
    assert operator_prices(db, "new-model", everything=True) == (2.0, 10.0, 2.5, 3.0, 0.2)
    assert "new-model" in cli("prices", "list")[1]

    code, _, err = cli("prices", "set", "new-model", "--alias", "haiku")
    assert code == 1 and "already names" in err
    assert cli("prices", "set", "new-model", "--input", "-1")[0] == 2
    assert cli("prices", "remove", "new-model")[0] == 0
    assert query(db, "SELECT * FROM models WHERE id = 'new-model'") == []


# --------------------------------------------------------------------------- usage

DAY1 = datetime(2026, 10, 1, 12, tzinfo=timezone.utc).timestamp()
DAY2 = datetime(2026, 10, 2, 9, tzinfo=timezone.utc).timestamp()

LEDGER = [
    # key, model, channel, ts, status, error, interrupted, in, out, cache read, cache write, cost
    ("alice", "claude-haiku-4.5", "c1", DAY1, 200, None, 0, 100, 20, 50, 10, 0.0002),
    ("alice", "claude-sonnet-4.5", "c1", DAY1 + 60, 200, None, 1, 1000, 200, 0, 0, 0.006),
    ("bob", "claude-sonnet-4.5", "c2", DAY2, 529, "overloaded_error", 0, 0, 0, 0, 0, 0.0),
    ("bob", "claude-haiku-4.5", "c2", DAY2 + 60, 200, None, 0, 300, 40, 0, 700, 0.00125),
]


@pytest.fixture
def ledger(db):
    conn = connect(db)
    for i, (key, model, channel, ts, status, error, interrupted, inp, out, cread, cwrite, cost) \
            in enumerate(LEDGER):
        conn.execute(
            "INSERT INTO usage (request_id, ts, endpoint, key_name, channel_name, requested_model,"
            " upstream_model, stream, status, error_type, interrupted, input_tokens, output_tokens,"
            " cache_read_input_tokens, cache_creation_input_tokens, duration_ms, cost)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (f"req_{i}", ts, "/v1/messages", key, channel, model, model, 1, status, error,
             interrupted, inp, out, cread, cwrite, 12.5, cost))
    conn.close()
    return LEDGER


def expected_totals(rows):
    return {"requests": len(rows), "input_tokens": sum(r[7] for r in rows),
            "output_tokens": sum(r[8] for r in rows), "cache_read_input_tokens": sum(r[9] for r in rows),
            "cache_creation_input_tokens": sum(r[10] for r in rows),
            "iteration_tokens": 0,      # these rows have no iterations
            "cost": sum(r[11] or 0 for r in rows), "unpriced_requests": sum(r[11] is None for r in rows),
            "errors": sum(r[4] >= 400 or r[5] is not None for r in rows), "interrupted": sum(bool(r[6]) for r in rows),
            "failed_attempts": 0, "failures": {}}     # these rows predate the attempt log


def totals(out: str) -> dict:
    """`usage --json`'s totals; its refusal count (none in this ledger) checked and left out."""
    data = json.loads(out)
    assert data.pop("refused") == 0
    return data


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == (pytest.approx(want[k]) if isinstance(want[k], (int, float)) else want[k]), k


def test_usage_json_totals(cli, ledger):
    code, out, err = cli("usage", "--json")
    assert code == 0, err
    _close(totals(out), expected_totals(ledger))
    assert 0 < totals(out)["errors"] < len(ledger) and totals(out)["interrupted"] > 0


def test_usage_json_by_key_and_filters(cli, ledger):
    code, out, _ = cli("usage", "--json", "--by", "key")
    data = json.loads(out)
    assert set(data) == {"requests", "input_tokens", "output_tokens", "cache_read_input_tokens",
                         "cache_creation_input_tokens", "iteration_tokens", "cost", "errors", "interrupted",
                         "unpriced_requests",
                         "refused", "failed_attempts", "failures", "by"}
    by_key = {row.pop("key"): row for row in data["by"]}
    for name in ("alice", "bob"):
        _close(by_key[name], expected_totals([r for r in ledger if r[0] == name]))

    _, out, _ = cli("usage", "--json", "--key", "bob")
    _close(totals(out), expected_totals([r for r in ledger if r[0] == "bob"]))
    _, out, _ = cli("usage", "--json", "--since", "2026-10-02")
    _close(totals(out), expected_totals([r for r in ledger if r[3] >= DAY2 - 9 * 3600]))
    _, out, _ = cli("usage", "--json", "--until", "2026-10-01")
    _close(totals(out), expected_totals([r for r in ledger if r[3] < DAY2 - 9 * 3600]))


@pytest.mark.parametrize("by, column, group", [("model", 1, "model"), ("channel", 2, "channel")])
def test_usage_json_by_model_and_channel(cli, ledger, by, column, group):
    _, out, _ = cli("usage", "--json", "--by", by)
    rows = {row.pop(group): row for row in json.loads(out)["by"]}
    assert set(rows) == {r[column] for r in ledger}
    for value, row in rows.items():
        _close(row, expected_totals([r for r in ledger if r[column] == value]))


def test_usage_by_day_human_table(cli, ledger):
    code, out, err = cli("usage", "--by", "day")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["DAY", "REQUESTS"]
    assert [line.split()[0] for line in lines[1:]] == ["2026-10-01", "2026-10-02", "TOTAL"]
    total = lines[-1].split()
    assert total[1] == "4" and total[2] == f"{sum(r[7] for r in ledger):,}"
    assert total[-3:] == ["1", "1", "0"]     # one error, one interrupted, no failed attempt

    _, out, _ = cli("usage")
    assert out.splitlines()[1].split()[0] == "4"


def test_usage_json_via_subprocess(db, ledger):
    proc = run_module(db, "usage", "--json", "--by", "day")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    _close({k: v for k, v in data.items() if k not in ("by", "refused")}, expected_totals(ledger))
    assert [row["day"] for row in data["by"]] == ["2026-10-01", "2026-10-02"]


# --------------------------------------------------------------------------- serve

def test_bootstrap_default_channel(db):
    conn = connect(db)
    try:
        assert channel_store.bootstrap_default_channel(conn, {}) is None
        message = channel_store.bootstrap_default_channel(conn, {"ANTHROPIC_API_KEY": UPSTREAM_KEY})
        assert message and "anthropic" in message and UPSTREAM_KEY not in message
        channel = channel_store.get_channel(conn, "anthropic")
        assert (channel.base_url, channel.api_key) == ("https://api.anthropic.com", UPSTREAM_KEY)
        # Only ever on an empty channels table.
        assert channel_store.bootstrap_default_channel(conn, {"ANTHROPIC_API_KEY": "other"}) is None
        assert channel_store.channel_count(conn) == 1
    finally:
        conn.close()


@pytest.fixture
def fake_server(monkeypatch):
    """Stand in for apertis_proxy.server so `serve` returns at once with what it was given."""
    calls = []
    module = types.ModuleType("apertis_proxy.server")

    def run(settings):
        calls.append(settings)
        return 0
    module.run = run
    monkeypatch.setitem(sys.modules, "apertis_proxy.server", module)
    return calls


def test_serve_bootstraps_from_env_and_passes_settings(db, capsys, monkeypatch, fake_server):
    monkeypatch.setenv("ANTHROPIC_API_KEY", UPSTREAM_KEY)
    assert main(["serve", "--db", db, "--port", "0", "--host", "127.0.0.1", "--workers", "2",
                 "--log-level", "debug"]) == 0
    out, err = capsys.readouterr()
    assert "created channel 'anthropic'" in out and UPSTREAM_KEY not in out + err
    settings = fake_server[0]
    assert (settings.db, settings.port, settings.host, settings.workers, settings.log_level) == \
        (db, 0, "127.0.0.1", 2, "DEBUG")
    assert query(db, "SELECT name FROM channels") == [{"name": "anthropic"}]


def test_serve_hints_and_warnings_follow_the_json_log_format(db, tmp_path, capsys, monkeypatch, fake_server):
    """[logging] format = "json": start-up hints on stdout and warnings on stderr are log-shaped JSON lines, a
    multi-line hint one object; in text format the same messages print as they are."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    config = tmp_path / "apertis.toml"
    config.write_text('[logging]\nformat = "json"\n')
    assert main(["serve", "--db", db]) == 0                     # text: a plain hint
    text_out, _ = capsys.readouterr()
    assert "apertis-proxy channels add" in text_out and not text_out.startswith("{")
    os.chmod(db, 0o644)                                         # readable by others: a warning on stderr
    assert main(["serve", "--db", db, "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    hints = [json.loads(line) for line in out.splitlines()]
    warnings = [json.loads(line) for line in err.splitlines()]
    assert len(hints) == 1 and hints[0]["message"] == text_out.rstrip("\n") and "\n" in hints[0]["message"]
    assert hints[0]["level"] == "INFO" and hints[0]["time"].endswith("Z") and hints[0]["logger"]
    assert len(warnings) == 1 and warnings[0]["level"] == "WARNING" and "chmod 600" in warnings[0]["message"]


def test_serve_without_channels_explains_how_to_add_one(db, capsys, monkeypatch, fake_server):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("APERTIS_DB", db)
    assert main(["serve"]) == 0
    out, _ = capsys.readouterr()
    assert "apertis-proxy channels add" in out and f"--db {db}" in out
    assert fake_server[0].db == db and fake_server[0].port == 8080
