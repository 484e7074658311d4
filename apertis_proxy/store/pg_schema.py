"""The PostgreSQL schema: the same tables as the SQLite one (schema.py), in
PostgreSQL's types, plus what several hosts need.

* Config writes (keys, key_grace, channels, models, model_prices) bump
  ``config_rev`` and send ``NOTIFY apertis_config`` (statement triggers), so every
  host's watcher hears of a change at once; ledger and spend writes never notify
  (a NOTIFY serialises commits).
* ``usage`` is partitioned by month on ``ts``: retention drops whole partitions,
  never a mass DELETE.  Rows are unique by (request_id, ts): a replayed row is the
  same row (its start time is part of it), so a replay inserts nothing.
* ``usage_daily`` is the per-day rollup ``usage --by`` reads; it is kept in the
  ledger write's transaction.

Creation and upgrades run under ``pg_advisory_lock``, so two hosts starting
together create the schema once.  ``SCHEMA_VERSION`` here is PostgreSQL's own: the version of SQLite's schema
(store/schema.py) whose tables it last followed, moved only by a change both backends take; ``PG_REVISION``
counts the changes made to PostgreSQL alone (its functions and indexes) since.  A change to one backend alone
leaves the other's version as it is, so hosts of the previous release keep starting on the database.
"""
from __future__ import annotations

import datetime
from typing import Iterable

from ..plugin_api import DEFAULT_API_VERSION
from . import pg_admissions, pg_ledger, schema

NOTIFY_CHANNEL = "apertis_config"
MIGRATION_LOCK = 0x61706572          # pg_advisory_lock key: "aper"
CONFIG_TABLES = ("keys", "key_grace", "channels", "models", "model_prices")
PARTITIONS_AHEAD = 2                 # months created beyond the current one
# Changes to the PostgreSQL schema alone at SCHEMA_VERSION, reinstalled by migrate() (1: apertis_admit_many;
# 2: apertis_admit decides on its own, for batches of one; 3: the index of requests in flight holds their ids;
# 4: a full minute's times ahead of the clock come back to it; 5: the rollup's iteration_tokens, filled from the
# ledger rows there are; 6: USD quotas compared at the ledger's precision, and an rpm refusal's retry-after counted
# from the admission that frees a slot).  The functions of an earlier revision stay callable as they were, so
# hosts of both revisions can share it.
PG_REVISION = 6
# SQLite's version 9 (the minute's numbered times) is SQLite's alone; version 10 (ended admissions per key and
# day) is both backends'.
SCHEMA_VERSION = 10

DDL = f"""
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS config_rev (id INTEGER PRIMARY KEY CHECK (id = 1), rev BIGINT NOT NULL);
INSERT INTO config_rev (id, rev) VALUES (1, 0) ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS keys (
    id            BIGINT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    key_hash      TEXT NOT NULL UNIQUE,
    key_prefix    TEXT NOT NULL,
    enabled       INTEGER NOT NULL DEFAULT 1,
    created_at    DOUBLE PRECISION NOT NULL,
    expires_at    DOUBLE PRECISION,
    models        TEXT,
    quota_cost    DOUBLE PRECISION,
    quota_tokens  BIGINT,
    rpm           INTEGER,
    concurrency   INTEGER,
    note          TEXT,
    quota_period  TEXT
);
ALTER TABLE keys ADD COLUMN IF NOT EXISTS quota_period TEXT;
CREATE TABLE IF NOT EXISTS key_spend (
    key_id  BIGINT PRIMARY KEY REFERENCES keys(id) ON DELETE CASCADE,
    cost    DOUBLE PRECISION NOT NULL DEFAULT 0,
    tokens  BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS key_period_spend (
    key_id  BIGINT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    period  TEXT NOT NULL,
    start   TEXT NOT NULL,
    cost    DOUBLE PRECISION NOT NULL DEFAULT 0,
    tokens  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, period, start)
);
CREATE TABLE IF NOT EXISTS budget_alerts (
    key_id      BIGINT NOT NULL,
    period      TEXT NOT NULL,
    start       TEXT NOT NULL,
    threshold   INTEGER NOT NULL,
    key_name    TEXT NOT NULL,
    claimed_at  DOUBLE PRECISION NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    sent_at     DOUBLE PRECISION,
    last_error  TEXT,
    PRIMARY KEY (key_id, period, start, threshold)
);
CREATE TABLE IF NOT EXISTS refusals (
    day       TEXT NOT NULL,
    key_name  TEXT NOT NULL,
    reason    TEXT NOT NULL,
    status    INTEGER NOT NULL,
    count     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_name, reason)
);
CREATE TABLE IF NOT EXISTS key_grace (
    key_hash    TEXT PRIMARY KEY,
    key_id      BIGINT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    key_prefix  TEXT NOT NULL,
    until       DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS deleted_keys (
    id          BIGINT PRIMARY KEY,
    name        TEXT NOT NULL,
    key_prefix  TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    deleted_at  DOUBLE PRECISION NOT NULL,
    note        TEXT
);
CREATE TABLE IF NOT EXISTS channels (
    id              BIGSERIAL PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    type            TEXT NOT NULL DEFAULT 'anthropic',
    base_url        TEXT NOT NULL,
    api_key         TEXT NOT NULL,
    models          TEXT,
    aliases         TEXT NOT NULL DEFAULT '{{}}',
    priority        INTEGER NOT NULL DEFAULT 0,
    weight          INTEGER NOT NULL DEFAULT 1,
    enabled         INTEGER NOT NULL DEFAULT 1,
    disabled_reason TEXT,
    disabled_at     DOUBLE PRECISION,
    api_version     TEXT NOT NULL DEFAULT '{DEFAULT_API_VERSION}',
    options         TEXT NOT NULL DEFAULT '{{}}',
    created_at      DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    id               TEXT PRIMARY KEY,
    display_name     TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    aliases          TEXT NOT NULL DEFAULT '[]',
    input            DOUBLE PRECISION NOT NULL DEFAULT 0,
    output           DOUBLE PRECISION NOT NULL DEFAULT 0,
    cache_write_5m   DOUBLE PRECISION NOT NULL DEFAULT 0,
    cache_write_1h   DOUBLE PRECISION NOT NULL DEFAULT 0,
    cache_read       DOUBLE PRECISION NOT NULL DEFAULT 0,
    line             TEXT,
    lifecycle        TEXT NOT NULL DEFAULT 'active',
    deprecated_at    TEXT,
    retires_at       TEXT,
    successor        TEXT,
    redirect_to      TEXT,
    max_input_tokens BIGINT,
    max_tokens       BIGINT,
    capabilities     TEXT,
    rules            TEXT,
    fast_multiplier  DOUBLE PRECISION,
    geo_multipliers  TEXT,
    operator_fields  TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS model_prices (
    model_id       TEXT NOT NULL,
    effective_from DOUBLE PRECISION NOT NULL DEFAULT 0,
    origin         TEXT NOT NULL,
    input          DOUBLE PRECISION NOT NULL,
    output         DOUBLE PRECISION NOT NULL,
    cache_write_5m DOUBLE PRECISION NOT NULL,
    cache_write_1h DOUBLE PRECISION NOT NULL,
    cache_read     DOUBLE PRECISION NOT NULL,
    bands          TEXT,
    source         TEXT,
    PRIMARY KEY (model_id, origin, effective_from)
);
CREATE TABLE IF NOT EXISTS usage (
    request_id                  TEXT NOT NULL,
    ts                          DOUBLE PRECISION NOT NULL,
    endpoint                    TEXT NOT NULL,
    client                      TEXT,
    key_id                      BIGINT,
    key_name                    TEXT,
    channel_id                  BIGINT,
    channel_name                TEXT,
    requested_model             TEXT,
    upstream_model              TEXT,
    stream                      INTEGER NOT NULL,
    status                      INTEGER NOT NULL,
    error_type                  TEXT,
    interrupted                 INTEGER NOT NULL DEFAULT 0,
    input_tokens                BIGINT NOT NULL DEFAULT 0,
    output_tokens               BIGINT NOT NULL DEFAULT 0,
    cache_read_input_tokens     BIGINT NOT NULL DEFAULT 0,
    cache_creation_input_tokens BIGINT NOT NULL DEFAULT 0,
    cache_creation_5m_input_tokens BIGINT,
    cache_creation_1h_input_tokens BIGINT,
    server_tool_use             TEXT,
    web_search_requests         BIGINT NOT NULL DEFAULT 0,
    web_fetch_requests          BIGINT NOT NULL DEFAULT 0,
    service_tier                TEXT,
    speed                       TEXT,
    inference_geo               TEXT,
    iterations                  TEXT,
    raw_usage                   TEXT,
    ttfb_ms                     DOUBLE PRECISION,
    duration_ms                 DOUBLE PRECISION NOT NULL,
    upstream_request_id         TEXT,
    attempts                    INTEGER NOT NULL DEFAULT 0,
    reached_upstream            INTEGER NOT NULL DEFAULT 0,
    cost                        DOUBLE PRECISION,
    prices                      TEXT,
    attempt_log                 TEXT,
    UNIQUE (request_id, ts)
) PARTITION BY RANGE (ts);
ALTER TABLE usage ADD COLUMN IF NOT EXISTS attempt_log TEXT;
CREATE TABLE IF NOT EXISTS usage_default PARTITION OF usage DEFAULT;
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
CREATE INDEX IF NOT EXISTS usage_key ON usage (key_name, ts);
CREATE TABLE IF NOT EXISTS usage_daily (
    day                         DATE NOT NULL,
    key_name                    TEXT NOT NULL,     -- '' stands for none
    requested_model             TEXT NOT NULL,
    channel_name                TEXT NOT NULL,
    requests                    BIGINT NOT NULL,
    input_tokens                BIGINT NOT NULL,
    output_tokens               BIGINT NOT NULL,
    cache_read_input_tokens     BIGINT NOT NULL,
    cache_creation_input_tokens BIGINT NOT NULL,
    cost                        DOUBLE PRECISION NOT NULL,
    errors                      BIGINT NOT NULL,
    interrupted                 BIGINT NOT NULL,
    unpriced                    BIGINT NOT NULL,
    PRIMARY KEY (day, key_name, requested_model, channel_name)
);
-- Tokens of the iterations billed apart from the top-level counts (advisor, compaction, fallback); a host of
-- revision 4 adds 0.
ALTER TABLE usage_daily ADD COLUMN IF NOT EXISTS iteration_tokens BIGINT NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS channel_health (
    channel_id      BIGINT NOT NULL,
    worker          TEXT NOT NULL,
    channel_name    TEXT NOT NULL,
    cool_until      DOUBLE PRECISION,
    cool_cause      TEXT,
    failures        TEXT NOT NULL DEFAULT '{{}}',
    last_error      TEXT,
    last_error_at   DOUBLE PRECISION,
    last_request_id TEXT,
    updated_at      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (channel_id, worker)
);
CREATE TABLE IF NOT EXISTS owned_state (
    kind        TEXT NOT NULL,
    id          TEXT NOT NULL,
    owner       TEXT NOT NULL,
    account     TEXT NOT NULL,
    channel_id  BIGINT,
    created_at  DOUBLE PRECISION NOT NULL,
    settled_at  DOUBLE PRECISION,
    PRIMARY KEY (kind, id)
);
CREATE INDEX IF NOT EXISTS owned_state_owner ON owned_state (owner, kind, created_at);
CREATE TABLE IF NOT EXISTS limit_leases (
    holder      TEXT PRIMARY KEY,
    expires_at  DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS admissions (
    key_id      BIGINT NOT NULL,
    request_id  TEXT NOT NULL,
    holder      TEXT NOT NULL,
    admitted_at DOUBLE PRECISION NOT NULL,
    live        INTEGER NOT NULL,
    cost        DOUBLE PRECISION NOT NULL,
    tokens      BIGINT NOT NULL,
    start       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (key_id, request_id)
);
ALTER TABLE admissions ADD COLUMN IF NOT EXISTS start TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS admission_times (
    key_id      BIGINT NOT NULL,
    at          DOUBLE PRECISION NOT NULL,
    request_id  TEXT NOT NULL,
    PRIMARY KEY (key_id, at, request_id)
);
CREATE TABLE IF NOT EXISTS admission_counts (
    key_id  BIGINT PRIMARY KEY,
    n       BIGINT NOT NULL,
    last_at DOUBLE PRECISION NOT NULL
);
-- A key's requests in flight (a decision reads them), and one of them by its id (a release): with the id in the
-- index a release finds its row by the index alone, also where the table's statistics are stale (the planner
-- then took the key's whole range, a row per request in flight).
DROP INDEX IF EXISTS admissions_live;
CREATE INDEX IF NOT EXISTS admissions_in_flight ON admissions (key_id, request_id) WHERE live = 1;
-- Ended admissions' sums per key and the UTC day their requests started (start); version 8 kept them per key
-- alone: its ended admissions take the day they were admitted, and the sums are made again from them.
CREATE TABLE IF NOT EXISTS admission_ended (
    key_id  BIGINT NOT NULL,
    start   TEXT NOT NULL DEFAULT '',
    n       BIGINT NOT NULL,
    cost    DOUBLE PRECISION NOT NULL,
    tokens  BIGINT NOT NULL,
    PRIMARY KEY (key_id, start)
);
ALTER TABLE admission_ended ADD COLUMN IF NOT EXISTS start TEXT NOT NULL DEFAULT '';
DO $$
BEGIN
    IF (SELECT cardinality(conkey) FROM pg_constraint
         WHERE conrelid = 'admission_ended'::regclass AND contype = 'p') = 1 THEN
        ALTER TABLE admission_ended DROP CONSTRAINT admission_ended_pkey;
        ALTER TABLE admission_ended ADD PRIMARY KEY (key_id, start);
        UPDATE admissions SET start = to_char(to_timestamp(admitted_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')
         WHERE live = 0;
        DELETE FROM admission_ended;
    END IF;
END $$;
INSERT INTO admission_ended (key_id, start, n, cost, tokens)
    SELECT key_id, start, COUNT(*), SUM(cost), SUM(tokens) FROM admissions WHERE live = 0 GROUP BY key_id, start
    ON CONFLICT (key_id, start) DO NOTHING;

CREATE OR REPLACE FUNCTION apertis_config_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE config_rev SET rev = rev + 1 WHERE id = 1;
    PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_TABLE_NAME);
    RETURN NULL;
END $$;
"""


def _trigger_ddl() -> list[str]:
    out = []
    for table in CONFIG_TABLES:
        out.append(f"DROP TRIGGER IF EXISTS {table}_config_rev ON {table}")
        out.append(f"CREATE TRIGGER {table}_config_rev AFTER INSERT OR UPDATE OR DELETE ON {table}"
                   " FOR EACH STATEMENT EXECUTE FUNCTION apertis_config_changed()")
    return out


async def migrate(conn) -> None:
    """Create or upgrade the schema (an asyncpg connection), under the advisory lock."""
    version = await schema_version(conn)
    if version > SCHEMA_VERSION:
        raise NewerSchema(version)
    if version == SCHEMA_VERSION and await pg_revision(conn) >= PG_REVISION and await _has_database_id(conn):
        return
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        version = await schema_version(conn)      # another host may have done it meanwhile
        revision = await pg_revision(conn) if version else 0
        if version < SCHEMA_VERSION or revision < PG_REVISION:
            async with conn.transaction():
                await conn.execute(DDL)
                if version and revision < 5:
                    await conn.execute(_fill_iteration_tokens())
                await _add_database_id(conn)
                for stmt in _trigger_ddl():
                    await conn.execute(stmt)
                await conn.execute(pg_admissions.FUNCTIONS)
                for stmt in partition_ddl(month_starts(_today(), PARTITIONS_AHEAD)):
                    await conn.execute(stmt)
                await conn.execute("INSERT INTO meta (k, v) VALUES ('schema_version', $1)"
                                   " ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v", str(SCHEMA_VERSION))
                await conn.execute("INSERT INTO meta (k, v) VALUES ('pg_revision', $1)"
                                   " ON CONFLICT (k) DO UPDATE SET v = GREATEST(meta.v::INTEGER, $1::INTEGER)::TEXT",
                                   str(PG_REVISION))
        # A database made by an earlier version gets its identity at its first start by this one: a key of `meta`
        # (no schema version of its own, so hosts of the previous release keep starting on it), made once
        # under the lock whichever of several hosts starting together comes first.
        await _add_database_id(conn)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


def _fill_iteration_tokens() -> str:
    """The rollup's iteration_tokens of the days whose ledger rows are still kept (revision 5): a rollup row of a
    day whose rows retention dropped keeps 0."""
    return f"""
UPDATE usage_daily d SET iteration_tokens = s.tokens
FROM (SELECT (to_timestamp(floor(ts)) AT TIME ZONE 'UTC')::date AS day, COALESCE(key_name, '') AS key_name,
             COALESCE(requested_model, '') AS requested_model, COALESCE(channel_name, '') AS channel_name,
             SUM({pg_ledger.iteration_tokens_sql("usage")}) AS tokens
      FROM usage WHERE iterations IS NOT NULL GROUP BY 1, 2, 3, 4) s
WHERE d.day = s.day AND d.key_name = s.key_name AND d.requested_model = s.requested_model
  AND d.channel_name = s.channel_name
"""


async def _has_database_id(conn) -> bool:
    return bool(await conn.fetchval("SELECT v FROM meta WHERE k = $1", schema.DATABASE_ID))


async def _add_database_id(conn) -> None:
    """The database's identity (store/schema.py's DATABASE_ID), unless it has one."""
    await conn.execute("INSERT INTO meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING",
                       schema.DATABASE_ID, schema.new_database_id())


class NewerSchema(RuntimeError):
    def __init__(self, version: int) -> None:
        super().__init__(f"the database's schema is version {version}, newer than this apertis-proxy "
                         f"understands ({SCHEMA_VERSION}): upgrade apertis-proxy")
        self.version = version


async def schema_version(conn) -> int:
    exists = await conn.fetchval("SELECT to_regclass('meta') IS NOT NULL")
    if not exists:
        return 0
    return await _meta_number(conn, "schema_version")


async def pg_revision(conn) -> int:
    """PG_REVISION of the schema (asked once it is at SCHEMA_VERSION: `meta` exists)."""
    return await _meta_number(conn, "pg_revision")


async def _meta_number(conn, k: str) -> int:
    value = await conn.fetchval("SELECT v FROM meta WHERE k = $1", k)
    return int(value) if value else 0


# -- ledger partitions -----------------------------------------------------------------

def _today() -> datetime.date:
    return datetime.datetime.now(datetime.timezone.utc).date()


def month_starts(first: datetime.date, ahead: int) -> list[datetime.date]:
    """The first day of `first`'s month and of the `ahead` months after it."""
    months, day = [], first.replace(day=1)
    for _ in range(ahead + 1):
        months.append(day)
        day = (day + datetime.timedelta(days=32)).replace(day=1)
    return months


def epoch(day: datetime.date) -> float:
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc).timestamp()


def partition_name(month: datetime.date) -> str:
    return f"usage_{month:%Y%m}"


def partition_ddl(months: Iterable[datetime.date]) -> list[str]:
    """CREATE statements for the monthly partitions of `months` (each a first day of month).

    A partition whose month already has rows in the default partition cannot be
    created over them; those rows stay in the default partition (retention
    deletes from it only by time)."""
    out = []
    for month in months:
        following = (month + datetime.timedelta(days=32)).replace(day=1)
        out.append(f"CREATE TABLE IF NOT EXISTS {partition_name(month)} PARTITION OF usage"
                   f" FOR VALUES FROM ({epoch(month)!r}) TO ({epoch(following)!r})")
    return out


def month_of(ts: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).date().replace(day=1)


async def ensure_partitions(conn, months: Iterable[datetime.date]) -> None:
    """Create the monthly partitions of `months` that are missing (an asyncpg connection)."""
    for month in sorted(set(months)):
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", partition_name(month))
        if exists:
            continue
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            try:
                for stmt in partition_ddl([month]):
                    await conn.execute(stmt)
            except Exception:    # rows of that month already sit in the default partition
                pass
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


async def old_partitions(conn, before: float) -> list[str]:
    """Monthly partitions whose whole range lies before `before` (unix time), oldest first."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'usage' AND c.relname ~ '^usage_[0-9]{6}$'"
        " ORDER BY c.relname")
    out = []
    for row in rows:
        name = row[0]
        month = datetime.date(int(name[6:10]), int(name[10:12]), 1)
        following = (month + datetime.timedelta(days=32)).replace(day=1)
        if epoch(following) <= before:
            out.append(name)
    return out
