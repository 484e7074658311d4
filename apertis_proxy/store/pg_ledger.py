"""Ledger writes and retention on PostgreSQL (asyncpg connection, native calls).

A batch is copied into a temporary table and moved into ``usage`` by one
statement: rows already there (same request id and start time: a replay) are
skipped, and from exactly the rows inserted, in the same transaction, the daily
rollup ``usage_daily`` and the keys' settled spend ``key_spend`` are added to.
"""
from __future__ import annotations

import datetime
from typing import Sequence

from ..plugin_api import SEPARATE_ITERATIONS, TOKEN_COUNTS
from . import pg_schema
from .ledger_write import sql_strings
from .pg_admissions import TAKE_SETTLE_LOCKS

ROLLUP_SUMS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
ROLLUP_FIELDS = ("requests", *ROLLUP_SUMS, "iteration_tokens", "cost", "errors", "interrupted", "unpriced")


def iteration_tokens_sql(row: str) -> str:
    """The tokens of the iterations billed apart from the top-level counts of the ledger row `row` (a table or
    alias; ledger_write.iteration_tokens_sql): only a row with iterations has its JSON read, as json (not jsonb,
    which refuses a \\u0000 anywhere in the text); an iteration that is not an object, or a count that is not a
    positive integer, adds nothing."""
    return f"""CASE WHEN {row}.iterations IS NULL THEN 0 ELSE (SELECT COALESCE(SUM(c.value::text::BIGINT), 0)
    FROM json_array_elements(CASE WHEN json_typeof({row}.iterations::json) = 'array' THEN {row}.iterations::json END)
         AS i (value),
         json_each(CASE WHEN json_typeof(i.value) = 'object' THEN i.value END) c
    WHERE i.value ->> 'type' IN ({sql_strings(SEPARATE_ITERATIONS)}) AND c.key IN ({sql_strings(TOKEN_COUNTS)})
      AND json_typeof(c.value) = 'number' AND c.value::text ~ '^[0-9]{{1,18}}$') END"""


_ITERATION_TOKENS = iteration_tokens_sql("ins")


def _write_sql(columns: Sequence[str], settle: bool) -> str:
    cols = ", ".join(columns)
    updates = ", ".join(f"{f} = usage_daily.{f} + EXCLUDED.{f}" for f in ROLLUP_FIELDS)
    sums = ", ".join(f"SUM({f})" for f in ROLLUP_SUMS)
    # With settle: a row per key and day whose ended admissions the ledger rows settled
    # (pg_admissions.py), for _SETTLE_ENDED.
    ended = """, f.key_id, f.start, f.n, f.cost, f.tokens FROM (SELECT 1) one
LEFT JOIN (SELECT key_id, start, COUNT(*) AS n, SUM(cost) AS cost, SUM(tokens) AS tokens FROM freed WHERE live = 0
           GROUP BY key_id, start) f ON true ORDER BY f.key_id, f.start""" if settle else ""
    # A row's tokens include its iterations'; a row of unknown cost counts as its admission's cost, with no
    # tokens its admission's tokens (see ledger_write._SETTLE); the statement's snapshot still holds the
    # admissions `freed` deletes.
    quota_cost = """CASE WHEN ins.cost IS NULL THEN COALESCE((SELECT a.cost FROM admissions a
        WHERE a.key_id = ins.key_id AND a.request_id = ins.request_id), 0) ELSE GREATEST(ins.cost, 0) END"""
    ins_tokens = f"({' + '.join(f'ins.{f}' for f in ROLLUP_SUMS)} + {_ITERATION_TOKENS})"
    quota_tokens = f"""CASE WHEN ins.cost IS NULL AND {ins_tokens} = 0 THEN COALESCE((SELECT a.tokens FROM admissions a
        WHERE a.key_id = ins.key_id AND a.request_id = ins.request_id), 0) ELSE {ins_tokens} END"""
    # The keys' settling locks are taken first (PgLedger.write), so nothing here locks a row a release batch
    # or another host's ledger write of the same keys could hold; the upserts go in the order of their keys all
    # the same, for the rows of no key (a request refused before it had one).
    spend = f""", quota AS (
    SELECT ins.key_id, ins.ts, {quota_cost} AS cost, {quota_tokens} AS tokens FROM ins
), spend AS (
    INSERT INTO key_spend (key_id, cost, tokens)
    SELECT key_id, SUM(cost), SUM(tokens)
    FROM quota WHERE key_id IN (SELECT id FROM keys) GROUP BY key_id
    HAVING SUM(cost) > 0 OR SUM(tokens) > 0 ORDER BY key_id
    ON CONFLICT (key_id) DO UPDATE SET cost = key_spend.cost + EXCLUDED.cost,
        tokens = key_spend.tokens + EXCLUDED.tokens
), freed AS (
    DELETE FROM admissions a USING ins WHERE a.key_id = ins.key_id AND a.request_id = ins.request_id
    RETURNING a.key_id, a.start, a.live, a.cost, a.tokens
), period_spend AS (
    INSERT INTO key_period_spend (key_id, period, start, cost, tokens)
    SELECT q.key_id, k.quota_period,
        to_char(date_trunc(k.quota_period, to_timestamp(floor(q.ts)) AT TIME ZONE 'UTC'),
                'YYYY-MM-DD') AS start,
        SUM(q.cost), SUM(q.tokens)
    FROM quota q JOIN keys k ON k.id = q.key_id
    WHERE k.quota_period IN ('day', 'week', 'month')
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (key_id, period, start) DO UPDATE SET cost = key_period_spend.cost + EXCLUDED.cost,
        tokens = key_period_spend.tokens + EXCLUDED.tokens
)""" if settle else ""
    return f"""WITH ins AS (
    INSERT INTO usage ({cols}) SELECT {cols} FROM usage_incoming
    ON CONFLICT (request_id, ts) DO NOTHING
    RETURNING request_id, ts, key_id, key_name, requested_model, channel_name, status, error_type, interrupted, cost,
        {', '.join(ROLLUP_SUMS)}, iterations){spend}, rollup AS (
    INSERT INTO usage_daily (day, key_name, requested_model, channel_name, {', '.join(ROLLUP_FIELDS)})
    SELECT (to_timestamp(floor(ts)) AT TIME ZONE 'UTC')::date, COALESCE(key_name, ''), COALESCE(requested_model, ''),
        COALESCE(channel_name, ''), COUNT(*), {sums}, SUM({_ITERATION_TOKENS}), COALESCE(SUM(cost), 0),
        SUM((status >= 400 OR error_type IS NOT NULL)::int), SUM((interrupted != 0)::int),
        SUM((cost IS NULL)::int)
    FROM ins GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (day, key_name, requested_model, channel_name) DO UPDATE SET {updates}
)
SELECT (SELECT COUNT(*) FROM ins){ended}"""


# Those keys' ended admissions leave their days' sums (all of them gone: exactly 0 again, no float
# residue).  The last statement of the ledger's transaction: a release of the key waits on the row's lock until
# the commit.
_SETTLE_ENDED = """
UPDATE admission_ended e SET n = e.n - f.n,
    cost = CASE WHEN e.n <= f.n THEN 0 ELSE e.cost - f.cost END,
    tokens = CASE WHEN e.n <= f.n THEN 0 ELSE e.tokens - f.tokens END
FROM unnest($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::DOUBLE PRECISION[], $5::BIGINT[])
     AS f (key_id, start, n, cost, tokens)
WHERE e.key_id = f.key_id AND e.start = f.start
"""


RETENTION_LOCK = 0x61707274          # pg_advisory_xact_lock key of a prune: "aprt"

# Rows per transaction.  A write holds its keys' settling locks until it commits, and their releases wait for
# it (~25 µs a row): rows that gathered in one spool segment through a long outage go in transactions of this
# many, between which releases get their turn.
CHUNK_ROWS = 1000


class PgLedger:
    """Per connection: the partitions known to exist, the statement per column list."""

    def __init__(self) -> None:
        self._months: set[datetime.date] = set()
        self._sql: dict[tuple[str, ...], str] = {}
        self._temp_ready = False

    async def write(self, conn, columns: Sequence[str], rows: Sequence[Sequence], settle: bool = True) -> int:
        """Insert the rows not yet in the ledger; the number inserted.  With `settle`, their cost and
        tokens are added to their keys' settled spend (db copy copies the spend itself).  In transactions
        of at most CHUNK_ROWS rows: should one fail, the rows before it stay written (a replay skips them)."""
        if not rows:
            return 0
        ts_at = columns.index("ts")
        months = {pg_schema.month_of(row[ts_at]) for row in rows} - self._months
        if months:
            await pg_schema.ensure_partitions(conn, months)
            self._months |= months
        key = (tuple(columns), settle)
        sql = self._sql.get(key)
        if sql is None:
            sql = self._sql[key] = _write_sql(columns, settle)
        if not self._temp_ready:
            # Outside the batch's transaction: a batch refused (a row no column can hold) rolls back its own
            # work, not the table the next try copies into.
            await conn.execute("CREATE TEMP TABLE IF NOT EXISTS usage_incoming"
                               " (LIKE usage INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            self._temp_ready = True
        inserted = 0
        for start in range(0, len(rows), CHUNK_ROWS):
            inserted += await self._write_chunk(conn, sql, columns, rows[start:start + CHUNK_ROWS], settle)
        return inserted

    async def _write_chunk(self, conn, sql: str, columns: Sequence[str], rows: Sequence[Sequence],
                           settle: bool) -> int:
        async with conn.transaction():
            await conn.copy_records_to_table("usage_incoming", records=rows, columns=list(columns))
            if not settle:
                return await conn.fetchval(sql)
            # After the copy (which locks nothing shared): a release of these keys waits for as short a time.
            key_at = columns.index("key_id")
            await conn.execute(TAKE_SETTLE_LOCKS, sorted({row[key_at] for row in rows} - {None}))
            out = await conn.fetch(sql)
            ended = [r for r in out if r[1] is not None]
            if ended:
                await conn.execute(_SETTLE_ENDED, *(list(column) for column in zip(*(r[1:] for r in ended))))
            return out[0][0]


async def ledger_column_info(conn) -> list[tuple[str, bool, str]]:
    """(name, NOT NULL, declared type) of each of the ledger's columns, in order."""
    rows = await conn.fetch("SELECT column_name, is_nullable, data_type FROM information_schema.columns"
                            " WHERE table_name = 'usage' AND table_schema = current_schema()"
                            " ORDER BY ordinal_position")
    return [(r[0], r[1] == "NO", r[2]) for r in rows]


async def probe(conn, columns: Sequence[str], values: Sequence) -> None:
    """Insert one row and roll it back (ledger_write._takes_rows): raises what the ledger would raise."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(f"INSERT INTO usage ({', '.join(columns)})"
                           f" VALUES ({', '.join(f'${i + 1}' for i in range(len(columns)))})", *values)
    finally:
        await transaction.rollback()


async def prune(conn, cutoff: float) -> int:
    """Drop the monthly partitions that lie wholly before `cutoff` (rows go by whole months), then
    the default partition's rows of those months and their rollup days; create the coming months'
    partitions.  Returns the ledger rows removed.  Each partition goes in a transaction of its own: a drop
    locks the whole ledger until it commits, and a first prune over a year of months must not hold every
    host's ledger writes for all of them.  Hosts prune in turn (every host runs retention, often at the
    same moments): one that finds another pruning leaves the round to it and removes nothing."""
    from asyncpg import UndefinedTableError     # the optional driver: imported where PostgreSQL is used
    removed = 0
    await pg_schema.ensure_partitions(conn, pg_schema.month_starts(pg_schema._today(),
                                                                   pg_schema.PARTITIONS_AHEAD))
    boundary = pg_schema.month_of(cutoff)
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
        return 0
    try:
        for name in await pg_schema.old_partitions(conn, cutoff):
            try:
                async with conn.transaction():
                    removed += await conn.fetchval(f"SELECT COUNT(*) FROM {name}")
                    await conn.execute(f"DROP TABLE {name}")
            except UndefinedTableError:
                continue        # dropped meanwhile by a host of an earlier version, which takes no lock
        async with conn.transaction():
            status = await conn.execute("DELETE FROM usage_default WHERE ts < $1", pg_schema.epoch(boundary))
            removed += int(status.rsplit(" ", 1)[-1])
            await conn.execute("DELETE FROM usage_daily WHERE day < $1", boundary)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
    return removed
