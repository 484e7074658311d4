"""The SQLite schema shared by the CLI, the core and the first-party plugins.

One file holds keys, channels, the model/price catalogue and the usage ledger.
Every change to keys, channels, models or model prices bumps ``config_rev.rev`` (by trigger),
so a running server notices a CLI edit by polling one integer.  Spend and usage
live in their own tables so metering never bumps the revision.
"""
from __future__ import annotations

import secrets
import sqlite3

from ..plugin_api import DEFAULT_API_VERSION
from .catalog import sync_shipped_catalog
from .dbfile import create_private

SCHEMA_VERSION = 10

# Binding None, Python's sqlite3 first looks for an adapter: a tuple, a dict
# miss, and an AttributeError raised and cleared on its protocol type, ~2.5k
# instructions per NULL (callgrind; the ledger binds a few per row).  An adapter
# for NoneType answering None binds the same NULL after one dict hit.  It is
# process-wide: binding stays the same for every sqlite3 user, but
# sqlite3.adapt(None) now answers None instead of raising, and another library
# registering its own NoneType adapter would replace this one (or be replaced).
sqlite3.register_adapter(type(None), {}.get)

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
    api_version     TEXT NOT NULL DEFAULT '{DEFAULT_API_VERSION}',
    options         TEXT NOT NULL DEFAULT '{}',  -- JSON: forward_client_version, forward_extras, auth_header
    created_at      REAL NOT NULL
);

-- Prices live in model_prices (migration 2); the price columns here are the
-- version-1 ones, no longer read.
CREATE TABLE IF NOT EXISTS models (
    id             TEXT PRIMARY KEY,         -- upstream model id
    display_name   TEXT NOT NULL,
    created_at     TEXT NOT NULL,            -- RFC 3339
    aliases        TEXT NOT NULL DEFAULT '[]',   -- JSON list of client-facing names
    input          REAL NOT NULL DEFAULT 0,
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
-- Upstream state bound to the account that created it and to the key that
-- owns it: thread anchors (message ids), containers, files, batches, skills,
-- fallback credit tokens.  Written by the gateway as it sees them created.
CREATE TABLE IF NOT EXISTS owned_state (
    kind        TEXT NOT NULL,       -- thread, container, file, batch, skill, credit
    id          TEXT NOT NULL,       -- the upstream's id
    owner       TEXT NOT NULL,       -- the key that created it ("<key id>/<key name>")
    account     TEXT NOT NULL,       -- fingerprint of the upstream account (Channel.account)
    channel_id  INTEGER,             -- the channel that created it
    created_at  REAL NOT NULL,
    settled_at  REAL,                -- a batch: when its results were billed (once)
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS owned_state_owner ON owned_state (owner, kind, created_at);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
CREATE INDEX IF NOT EXISTS usage_key ON usage (key_name, ts);
""".replace("{DEFAULT_API_VERSION}", DEFAULT_API_VERSION)

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
    return conn


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


def schema_version(conn: sqlite3.Connection) -> int:
    try:
        row = conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the store to SCHEMA_VERSION, then load the shipped catalogue if it is newer.

    Version 1 is DDL; each later version is one step of MIGRATIONS, applied
    once, in its own transaction, in order.
    """
    if schema_version(conn) < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(conn)       # another process may have migrated meanwhile
            for stmt in _split(DDL + "\n" + _trigger_ddl()):
                conn.execute(stmt)
            version = max(version, 1)
            _set_version(conn, version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        for number, step in MIGRATIONS:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if schema_version(conn) < number:
                    for stmt in step:
                        conn.execute(stmt)
                    _set_version(conn, number)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    try:
        ensure_database_id(conn)
    except sqlite3.OperationalError:
        pass        # a file this process may only read: a reader needs no identity (a gateway makes it anyway)
    sync_shipped_catalog(conn)


# The database's identity: a random id made with the schema (or at the first open of a database made by an
# earlier version) and never changed, so that what belongs to one database (a ledger spool directory:
# ledger_spool.py) can tell it from another.  A copy of the file (a backup restored) is the same database;
# `db copy` makes a new one (the target keeps its own).
DATABASE_ID = "database_id"


def new_database_id() -> str:
    return secrets.token_hex(16)


def database_id(conn) -> "str | None":
    """The database's identity (see DATABASE_ID); None before it has one (either backend's connection)."""
    row = conn.execute("SELECT v FROM meta WHERE k = ?", (DATABASE_ID,)).fetchone()
    return row[0] if row else None


def ensure_database_id(conn) -> str:
    """The database's identity, made now if it has none: a database of an earlier version gets it at its first
    open by this one (a key of `meta`, no schema version of its own, so earlier versions keep opening it).
    INSERT OR IGNORE keeps the first of two processes making it together (either backend's connection;
    PostgreSQL makes it in pg_schema.migrate, under the migration lock)."""
    found = database_id(conn)
    if found is None:
        conn.execute("INSERT OR IGNORE INTO meta (k, v) VALUES (?, ?)", (DATABASE_ID, new_database_id()))
        found = database_id(conn)
    return found


def _set_version(conn: sqlite3.Connection, version: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('schema_version', ?)", (str(version),))


# The version-1 usage table, with cost nullable (NULL = the model had no
# price) and every billed dimension of the usage object in its own column.
_USAGE_V2 = """
CREATE TABLE usage_v2 (
    id                          INTEGER PRIMARY KEY,
    request_id                  TEXT NOT NULL,
    ts                          REAL NOT NULL,   -- unix time the request started
    endpoint                    TEXT NOT NULL,
    client                      TEXT,
    key_id                      INTEGER,
    key_name                    TEXT,
    channel_id                  INTEGER,
    channel_name                TEXT,
    requested_model             TEXT,            -- the name the client asked for
    upstream_model              TEXT,            -- the model that answered (a retired model's successor)
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
    web_search_requests         INTEGER NOT NULL DEFAULT 0,
    web_fetch_requests          INTEGER NOT NULL DEFAULT 0,
    service_tier                TEXT,
    speed                       TEXT,
    inference_geo               TEXT,
    iterations                  TEXT,            -- JSON: beta usage.iterations[]
    raw_usage                   TEXT,            -- JSON: the final usage object
    ttfb_ms                     REAL,
    duration_ms                 REAL NOT NULL,
    upstream_request_id         TEXT,
    attempts                    INTEGER NOT NULL DEFAULT 0,
    reached_upstream            INTEGER NOT NULL DEFAULT 0,
    cost                        REAL,            -- USD; NULL = unpriced
    prices                      TEXT             -- JSON: rates and multipliers `cost` used
)"""
_USAGE_V1_COLUMNS = (
    "id, request_id, ts, endpoint, client, key_id, key_name, channel_id, channel_name, requested_model,"
    " upstream_model, stream, status, error_type, interrupted, input_tokens, output_tokens,"
    " cache_read_input_tokens, cache_creation_input_tokens, cache_creation_5m_input_tokens,"
    " cache_creation_1h_input_tokens, server_tool_use, ttfb_ms, duration_ms, upstream_request_id,"
    " attempts, reached_upstream, cost, prices")
# The version-1 seed, to tell its prices (catalogue data) from operator edits.
_V1_SEED_PRICES = (
    "('claude-opus-4-5-20251101', 5.0, 25.0, 6.25, 10.0, 0.5),"
    " ('claude-sonnet-4-5-20250929', 3.0, 15.0, 3.75, 6.0, 0.3),"
    " ('claude-haiku-4-5-20251001', 1.0, 5.0, 1.25, 2.0, 0.1)")

# The version-1 seed's names, to tell them from the operator's (json.dumps of the alias list, as stored).
_V1_SEED_NAMES = """
    ('claude-opus-4-5-20251101', 'Claude Opus 4.5', '["claude-opus-4.5", "claude-opus-4-5"]'),
    ('claude-sonnet-4-5-20250929', 'Claude Sonnet 4.5', '["claude-sonnet-4.5", "claude-sonnet-4-5"]'),
    ('claude-haiku-4-5-20251001', 'Claude Haiku 4.5', '["claude-haiku-4.5", "claude-haiku-4-5"]')"""

# Limits decided in the store (admissions.py): requests admitted and not yet in the
# ledger, the admissions of the last minute, and each gateway process's lease.
ADMISSIONS_DDL = [
    """CREATE TABLE IF NOT EXISTS limit_leases (
        holder      TEXT PRIMARY KEY,            -- one gateway process: "<host>/<pid>/<random>"
        expires_at  REAL NOT NULL                -- unix time (store clock); its admissions count until then
    ) WITHOUT ROWID""",
    # One B-tree per table (a decision reads a key's range; an admission writes a page or two).
    """CREATE TABLE IF NOT EXISTS admissions (
        key_id      INTEGER NOT NULL,
        request_id  TEXT NOT NULL,
        holder      TEXT NOT NULL,
        admitted_at REAL NOT NULL,
        live        INTEGER NOT NULL,            -- 1 while the request runs: a concurrency slot
        cost        REAL NOT NULL,               -- reserved bound while live; the exact cost once ended
        tokens      INTEGER NOT NULL,
        PRIMARY KEY (key_id, request_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS admission_times (
        key_id      INTEGER NOT NULL,
        at          REAL NOT NULL,
        request_id  TEXT NOT NULL,
        PRIMARY KEY (key_id, at, request_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS admission_counts (
        key_id  INTEGER PRIMARY KEY,
        n       INTEGER NOT NULL,                -- rows of admission_times of this key
        last_at REAL NOT NULL                    -- its latest admission
    )""",
]


# Ended admissions' exact costs summed per key (a decision reads one row, not every ended request the
# ledger has not settled yet), and the requests in flight indexed apart from them.
ADMISSIONS_V8 = [
    """CREATE TABLE IF NOT EXISTS admission_ended (
        key_id  INTEGER PRIMARY KEY,
        n       INTEGER NOT NULL,                -- ended admissions of the key not yet in the ledger
        cost    REAL NOT NULL,                   -- their exact costs
        tokens  INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS admissions_live ON admissions (key_id) WHERE live = 1",
    "INSERT OR IGNORE INTO admission_ended (key_id, n, cost, tokens)"
    " SELECT key_id, COUNT(*), SUM(cost), SUM(tokens) FROM admissions WHERE live = 0 GROUP BY key_id",
]


# A decision reads less (admissions.py's _USE), and an admission writes one row fewer:
# * the requests in flight indexed with every column a decision reads of them: the index alone is read,
#   not each row's table entry as well;
# * the minute's admissions numbered per key in order of time, so that a decision counts them from the
#   first in the minute and the key's latest (a seek each) instead of a counter every admission wrote
#   (admission_counts goes).  Rows already there are numbered as they stand.
ADMISSIONS_V9 = [
    "DROP INDEX IF EXISTS admissions_live",
    "CREATE INDEX admissions_live ON admissions (key_id, holder, cost, tokens, live) WHERE live = 1",
    """CREATE TABLE admission_times_v9 (
        key_id      INTEGER NOT NULL,
        at          REAL NOT NULL,
        seq         INTEGER NOT NULL,            -- the key's admissions numbered in order, without gaps
        request_id  TEXT NOT NULL,
        PRIMARY KEY (key_id, at, seq)
    ) WITHOUT ROWID""",
    "INSERT INTO admission_times_v9 (key_id, at, seq, request_id)"
    " SELECT key_id, at, ROW_NUMBER() OVER (PARTITION BY key_id ORDER BY at, request_id), request_id"
    " FROM admission_times",
    "DROP TABLE admission_times",
    "ALTER TABLE admission_times_v9 RENAME TO admission_times",
    "DROP TABLE admission_counts",
]


# Ended admissions count in the quota periods that hold the UTC day their requests started (admissions.py):
# each keeps that day, and the ended sums are kept per key and day.  Those already ended take the day they were
# admitted, and the sums are made again from them.
ADMISSIONS_V10 = [
    "ALTER TABLE admissions ADD COLUMN start TEXT NOT NULL DEFAULT ''",
    "UPDATE admissions SET start = strftime('%Y-%m-%d', admitted_at, 'unixepoch') WHERE live = 0",
    """CREATE TABLE admission_ended_v10 (
        key_id  INTEGER NOT NULL,
        start   TEXT NOT NULL,                   -- the UTC day the requests started
        n       INTEGER NOT NULL,                -- ended admissions of the key and day not yet in the ledger
        cost    REAL NOT NULL,                   -- their exact costs
        tokens  INTEGER NOT NULL,
        PRIMARY KEY (key_id, start)
    ) WITHOUT ROWID""",
    "INSERT INTO admission_ended_v10 (key_id, start, n, cost, tokens)"
    " SELECT key_id, start, COUNT(*), SUM(cost), SUM(tokens) FROM admissions WHERE live = 0 GROUP BY key_id, start",
    "DROP TABLE admission_ended",
    "ALTER TABLE admission_ended_v10 RENAME TO admission_ended",
]


MIGRATIONS: list[tuple[int, list[str]]] = [
    (2, [
        # Effective-dated prices: a change applies from its time on.
        """CREATE TABLE model_prices (
            model_id       TEXT NOT NULL,
            effective_from REAL NOT NULL DEFAULT 0,  -- unix time; 0 = from the beginning
            origin         TEXT NOT NULL,            -- 'catalog' (shipped/imported) or 'operator'
            input          REAL NOT NULL,            -- USD per million tokens
            output         REAL NOT NULL,
            cache_write_5m REAL NOT NULL,
            cache_write_1h REAL NOT NULL,
            cache_read     REAL NOT NULL,
            bands          TEXT,                     -- JSON: prompt-size bands [{above_prompt_tokens, rates}]
            source         TEXT,
            PRIMARY KEY (model_id, origin, effective_from)
        )""",
        *(f"CREATE TRIGGER model_prices_{op.lower()}_rev AFTER {op} ON model_prices "
          f"BEGIN UPDATE config_rev SET rev = rev + 1 WHERE id = 1; END"
          for op in ("INSERT", "UPDATE", "DELETE")),
        "ALTER TABLE models ADD COLUMN line TEXT",
        "ALTER TABLE models ADD COLUMN lifecycle TEXT NOT NULL DEFAULT 'active'",
        "ALTER TABLE models ADD COLUMN deprecated_at TEXT",
        "ALTER TABLE models ADD COLUMN retires_at TEXT",
        "ALTER TABLE models ADD COLUMN successor TEXT",         # documented successor
        "ALTER TABLE models ADD COLUMN redirect_to TEXT",       # operator's choice for a retired model
        "ALTER TABLE models ADD COLUMN max_input_tokens INTEGER",
        "ALTER TABLE models ADD COLUMN max_tokens INTEGER",
        "ALTER TABLE models ADD COLUMN capabilities TEXT",      # JSON
        "ALTER TABLE models ADD COLUMN rules TEXT",             # JSON
        "ALTER TABLE models ADD COLUMN fast_multiplier REAL",
        "ALTER TABLE models ADD COLUMN geo_multipliers TEXT",   # JSON {geo: multiplier}
        "ALTER TABLE models ADD COLUMN operator_fields TEXT NOT NULL DEFAULT '[]'",
        # Names that differ from the version-1 seed (or models it did not have) are the operator's:
        # the catalogue import must not overwrite them.
        f"""UPDATE models SET operator_fields = (
                SELECT json_group_array(f) FROM (
                    SELECT 'aliases' AS f WHERE NOT EXISTS (
                        SELECT 1 FROM (VALUES {_V1_SEED_NAMES}) s
                        WHERE s.column1 = models.id AND s.column3 = models.aliases)
                    UNION ALL
                    SELECT 'display_name' WHERE NOT EXISTS (
                        SELECT 1 FROM (VALUES {_V1_SEED_NAMES}) s
                        WHERE s.column1 = models.id AND s.column2 = models.display_name)))""",
        # Version-1 prices: the seed's stay catalogue data, anything else was the operator's.
        f"""INSERT INTO model_prices (model_id, effective_from, origin, input, output, cache_write_5m,
                cache_write_1h, cache_read, source)
            SELECT m.id, 0, CASE WHEN s.id IS NULL THEN 'operator' ELSE 'catalog' END,
                m.input, m.output, m.cache_write_5m, m.cache_write_1h, m.cache_read, 'schema version 1'
            FROM models m LEFT JOIN (SELECT column1 AS id, column2 AS i, column3 AS o, column4 AS w5,
                column5 AS w1, column6 AS r FROM (VALUES {_V1_SEED_PRICES})) s
            ON s.id = m.id AND s.i = m.input AND s.o = m.output AND s.w5 = m.cache_write_5m
                AND s.w1 = m.cache_write_1h AND s.r = m.cache_read""",
        _USAGE_V2,
        f"INSERT INTO usage_v2 ({_USAGE_V1_COLUMNS}) SELECT {_USAGE_V1_COLUMNS} FROM usage",
        "DROP TABLE usage",
        "ALTER TABLE usage_v2 RENAME TO usage",
        "CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts)",
        "CREATE INDEX IF NOT EXISTS usage_key ON usage (key_name, ts)",
    ]),
    (3, [
        # A key's life after creation: the old secrets of rotated keys (accepted
        # until `until`) and deleted keys (their ids are never given to a new
        # key, so ledger rows stay attributable).
        """CREATE TABLE IF NOT EXISTS key_grace (
            key_hash    TEXT PRIMARY KEY,            -- sha256 hex of a rotated-out secret
            key_id      INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
            key_prefix  TEXT NOT NULL,
            until       REAL NOT NULL                -- unix time the old secret stops working
        )""",
        """CREATE TABLE IF NOT EXISTS deleted_keys (
            id          INTEGER PRIMARY KEY,         -- the id ledger rows carry
            name        TEXT NOT NULL,
            key_prefix  TEXT NOT NULL,
            created_at  REAL NOT NULL,
            deleted_at  REAL NOT NULL,
            note        TEXT
        )""",
    ]),
    (4, [
        # Budgets: a quota may reset per UTC period; spend is kept per period too.
        "ALTER TABLE keys ADD COLUMN quota_period TEXT",    # 'day', 'week', 'month'; NULL = lifetime
        """CREATE TABLE IF NOT EXISTS key_period_spend (
            key_id  INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
            period  TEXT NOT NULL,                   -- day, week, month
            start   TEXT NOT NULL,                   -- the period's first day (UTC), e.g. 2026-12-01
            cost    REAL NOT NULL DEFAULT 0,
            tokens  INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (key_id, period, start)
        ) WITHOUT ROWID""",
        # One row per budget alert fired: claimed before it is sent, so one worker sends it.
        """CREATE TABLE IF NOT EXISTS budget_alerts (
            key_id      INTEGER NOT NULL,
            period      TEXT NOT NULL,               -- day, week, month or lifetime
            start       TEXT NOT NULL,               -- the period's first day; '' for lifetime
            threshold   INTEGER NOT NULL,            -- percent of the quota
            key_name    TEXT NOT NULL,
            claimed_at  REAL NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            sent_at     REAL,                        -- NULL until the webhook answered 2xx
            last_error  TEXT,
            PRIMARY KEY (key_id, period, start, threshold)
        ) WITHOUT ROWID""",
        # Requests the gateway refused itself, counted per UTC day, key and reason.
        """CREATE TABLE IF NOT EXISTS refusals (
            day       TEXT NOT NULL,                 -- YYYY-MM-DD, UTC
            key_name  TEXT NOT NULL,                 -- '(unknown)' for a missing or unknown key
            reason    TEXT NOT NULL,                 -- e.g. quota, rpm, invalid_key
            status    INTEGER NOT NULL,
            count     INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, key_name, reason)
        ) WITHOUT ROWID""",
    ]),
    (5, [
        # Every channel tried for a request, failed-over ones included (JSON list).
        "ALTER TABLE usage ADD COLUMN attempt_log TEXT",
        # Each worker's view of each channel's health, written by the router on
        # state changes so that `channels list` (another process) can show it.
        """CREATE TABLE IF NOT EXISTS channel_health (
            channel_id      INTEGER NOT NULL,
            worker          TEXT NOT NULL,           -- "<host>/<worker index>"
            channel_name    TEXT NOT NULL,
            cool_until      REAL,                    -- unix time; NULL or past: not cooling
            cool_cause      TEXT,                    -- Outcome.kind that started the cooldown
            failures        TEXT NOT NULL DEFAULT '{}',  -- JSON {kind: {unix minute: count}}
            last_error      TEXT,                    -- redacted: never an upstream key
            last_error_at   REAL,
            last_request_id TEXT,                    -- the request of the last error
            updated_at      REAL NOT NULL,
            PRIMARY KEY (channel_id, worker)
        ) WITHOUT ROWID""",
    ]),
    (6, [
        # One ledger row per request id, so shipping a spooled row again is a
        # no-op (ON CONFLICT DO NOTHING).  Duplicates written before (a retried
        # batch) keep their first row.
        "DELETE FROM usage WHERE id NOT IN (SELECT MIN(id) FROM usage GROUP BY request_id)",
        "CREATE UNIQUE INDEX IF NOT EXISTS usage_request_id ON usage (request_id)",
    ]),
    (7, ADMISSIONS_DDL),
    (8, ADMISSIONS_V8),
    (9, ADMISSIONS_V9),
    (10, ADMISSIONS_V10),
]


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
