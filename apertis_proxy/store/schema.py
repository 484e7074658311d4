"""The SQLite schema shared by the CLI, the core and the first-party plugins.

One file holds keys, channels, the model/price catalogue and the usage ledger.
Every change to keys, channels or models bumps ``config_rev.rev`` (by trigger),
so a running server notices a CLI edit by polling one integer.  Spend and usage
live in their own tables so metering never bumps the revision.
"""
from __future__ import annotations

import json
import sqlite3

from .dbfile import create_private

SCHEMA_VERSION = 1

# Binding None, Python's sqlite3 first looks for an adapter: a tuple, a dict
# miss, and an AttributeError raised and cleared on its protocol type, ~2.5k
# instructions per NULL (callgrind; the ledger binds a few per row).  An adapter
# for NoneType answering None binds the same NULL after one dict hit.  It is
# process-wide: binding stays the same for every sqlite3 user, but
# sqlite3.adapt(None) now answers None instead of raising, and another library
# registering its own NoneType adapter would replace this one (or be replaced).
sqlite3.register_adapter(type(None), {}.get)

# Seed catalogue: list prices in USD per million tokens (input, output,
# cache write 5m, cache write 1h, cache read).  Aliases are the client-facing
# short names that map to the dated upstream ids.
SEED_MODELS = [
    # id, display name, created_at, aliases, input, output, cw5m, cw1h, cread
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z",
     ["claude-opus-4.5", "claude-opus-4-5"], 5.0, 25.0, 6.25, 10.0, 0.50),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z",
     ["claude-sonnet-4.5", "claude-sonnet-4-5"], 3.0, 15.0, 3.75, 6.0, 0.30),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z",
     ["claude-haiku-4.5", "claude-haiku-4-5"], 1.0, 5.0, 1.25, 2.0, 0.10),
]

DDL = """
CREATE TABLE IF NOT EXISTS meta (
    k TEXT PRIMARY KEY,
    v TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS config_rev (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    rev INTEGER NOT NULL
);
INSERT OR IGNORE INTO config_rev (id, rev) VALUES (1, 0);

CREATE TABLE IF NOT EXISTS keys (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    key_hash      TEXT NOT NULL UNIQUE,      -- sha256 hex of the plain key
    key_prefix    TEXT NOT NULL,             -- first characters, for listings
    enabled       INTEGER NOT NULL DEFAULT 1,
    created_at    REAL NOT NULL,
    expires_at    REAL,                      -- unix time, NULL = never
    models        TEXT,                      -- JSON list of allowed names, NULL = any
    quota_cost    REAL,                      -- USD, NULL = unlimited
    quota_tokens  INTEGER,                   -- tokens, NULL = unlimited
    rpm           INTEGER,                   -- requests per minute, NULL = unlimited
    concurrency   INTEGER,                   -- requests in flight, NULL = unlimited
    note          TEXT
);

-- Settled spend per key, written by the auth plugin after each request.
CREATE TABLE IF NOT EXISTS key_spend (
    key_id  INTEGER PRIMARY KEY REFERENCES keys(id) ON DELETE CASCADE,
    cost    REAL NOT NULL DEFAULT 0,
    tokens  INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS channels (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    type            TEXT NOT NULL DEFAULT 'anthropic',
    base_url        TEXT NOT NULL,
    api_key         TEXT NOT NULL,           -- upstream secret: never printed
    models          TEXT,                    -- JSON list, NULL = any model
    aliases         TEXT NOT NULL DEFAULT '{}',  -- JSON {client name: upstream id}
    priority        INTEGER NOT NULL DEFAULT 0,
    weight          INTEGER NOT NULL DEFAULT 1,
    enabled         INTEGER NOT NULL DEFAULT 1,
    disabled_reason TEXT,
    disabled_at     REAL,
    api_version     TEXT NOT NULL DEFAULT '2023-06-01',
    options         TEXT NOT NULL DEFAULT '{}',  -- JSON: forward_client_version, forward_extras, auth_header
    created_at      REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS models (
    id             TEXT PRIMARY KEY,         -- upstream model id
    display_name   TEXT NOT NULL,
    created_at     TEXT NOT NULL,            -- RFC 3339
    aliases        TEXT NOT NULL DEFAULT '[]',   -- JSON list of client-facing names
    input          REAL NOT NULL DEFAULT 0,  -- USD per million tokens
    output         REAL NOT NULL DEFAULT 0,
    cache_write_5m REAL NOT NULL DEFAULT 0,
    cache_write_1h REAL NOT NULL DEFAULT 0,
    cache_read     REAL NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS usage (
    id                          INTEGER PRIMARY KEY,
    request_id                  TEXT NOT NULL,
    ts                          REAL NOT NULL,   -- unix time the request started
    endpoint                    TEXT NOT NULL,
    client                      TEXT,
    key_id                      INTEGER,
    key_name                    TEXT,
    channel_id                  INTEGER,
    channel_name                TEXT,
    requested_model             TEXT,
    upstream_model              TEXT,
    stream                      INTEGER NOT NULL,
    status                      INTEGER NOT NULL,
    error_type                  TEXT,
    interrupted                 INTEGER NOT NULL DEFAULT 0,
    input_tokens                INTEGER NOT NULL DEFAULT 0,
    output_tokens               INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens     INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_5m_input_tokens INTEGER,
    cache_creation_1h_input_tokens INTEGER,
    server_tool_use             TEXT,            -- JSON
    ttfb_ms                     REAL,
    duration_ms                 REAL NOT NULL,
    upstream_request_id         TEXT,
    attempts                    INTEGER NOT NULL DEFAULT 0,
    reached_upstream            INTEGER NOT NULL DEFAULT 0,
    cost                        REAL NOT NULL DEFAULT 0,
    prices                      TEXT             -- JSON, USD per million tokens used
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
CREATE INDEX IF NOT EXISTS usage_key ON usage (key_name, ts);
"""

_TRIGGERED = ("keys", "channels", "models")


def _trigger_ddl() -> str:
    parts = []
    for table in _TRIGGERED:
        for op in ("INSERT", "UPDATE", "DELETE"):
            parts.append(
                f"CREATE TRIGGER IF NOT EXISTS {table}_{op.lower()}_rev AFTER {op} ON {table} "
                f"BEGIN UPDATE config_rev SET rev = rev + 1 WHERE id = 1; END;"
            )
    return "\n".join(parts)


def connect(path: str) -> sqlite3.Connection:
    """Open the database synchronously (CLI, start-up) and make sure the schema exists.

    A new file is created readable by its owner only: it holds upstream keys.
    """
    create_private(path)
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    conn.row_factory = sqlite3.Row
    apply_pragmas(conn)
    migrate(conn)
    ensure_key_history_tables(conn)
    return conn


# A key's life after creation: the old secrets of rotated keys (accepted until
# `until`) and deleted keys (their ids are never given to a new key, so ledger
# rows stay attributable).  Created on every open, so files from before get them.
KEY_HISTORY_DDL = """
CREATE TABLE IF NOT EXISTS key_grace (
    key_hash    TEXT PRIMARY KEY,            -- sha256 hex of a rotated-out secret
    key_id      INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    key_prefix  TEXT NOT NULL,
    until       REAL NOT NULL                -- unix time the old secret stops working
);
CREATE TABLE IF NOT EXISTS deleted_keys (
    id          INTEGER PRIMARY KEY,         -- the id ledger rows carry
    name        TEXT NOT NULL,
    key_prefix  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    deleted_at  REAL NOT NULL,
    note        TEXT
);
"""


def ensure_key_history_tables(conn: sqlite3.Connection) -> None:
    have = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('key_grace', 'deleted_keys')")}
    if len(have) < 2:
        conn.executescript(KEY_HISTORY_DDL)


# WAL lets the CLI and several worker processes read while the meter writes.
PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
)


def apply_pragmas(conn) -> None:
    for pragma in PRAGMAS:
        conn.execute(pragma)


def migrate(conn: sqlite3.Connection) -> None:
    row = None
    try:
        row = conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()
    except sqlite3.OperationalError:
        pass
    if row is not None and int(row[0]) >= SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in _split(DDL + "\n" + _trigger_ddl()):
            conn.execute(stmt)
        seeded = conn.execute("SELECT v FROM meta WHERE k = 'seeded'").fetchone()
        if seeded is None:
            for (mid, disp, created, aliases, inp, out, cw5, cw1, cr) in SEED_MODELS:
                conn.execute(
                    "INSERT OR IGNORE INTO models (id, display_name, created_at, aliases, input, output,"
                    " cache_write_5m, cache_write_1h, cache_read) VALUES (?,?,?,?,?,?,?,?,?)",
                    (mid, disp, created, json.dumps(aliases), inp, out, cw5, cw1, cr))
            conn.execute("INSERT INTO meta (k, v) VALUES ('seeded', '1')")
        conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('schema_version', ?)",
                     (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _split(script: str) -> list[str]:
    """Split DDL into statements (triggers contain ';' inside BEGIN ... END)."""
    out, buf = [], []
    for line in script.splitlines():
        stripped = line.split("--", 1)[0].rstrip()
        if not stripped.strip():
            continue
        buf.append(stripped)
        text = "\n".join(buf)
        if text.rstrip().endswith(";") and sqlite3.complete_statement(text):
            out.append(text)
            buf = []
    if buf:
        out.append("\n".join(buf))
    return out
