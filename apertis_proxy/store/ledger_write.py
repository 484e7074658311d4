"""Writing usage rows to the ledger: idempotent, with the keys' settled spend.

A row is a mapping of UsageRecord field names to JSON values (what the ledger
spool holds).  `write_ledger_rows` inserts the rows whose request id the
ledger does not hold yet and adds exactly those rows' spend to `key_spend`
(and to `key_period_spend` for keys whose quota resets), in one transaction:
shipping the same rows again (a spool replayed after a crash) changes nothing.
The functions take a store connection (sqlite3 or PgConnection) and run on the
store's thread; PostgreSQL's batch goes through pg_ledger.PgLedger (COPY, one
statement, the daily rollup too).
"""
from __future__ import annotations

import json
import logging
import operator
import secrets
import sqlite3
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import orjson

from ..plugin_api import SEPARATE_ITERATIONS, TOKEN_COUNTS, UsageRecord
from .url import dialect
from .budgets import read_period_spend
from .spend import read_spend

log = logging.getLogger("apertis_proxy.store.ledger")

# UsageRecord field -> ledger column, where the names differ.
COLUMN_OF_FIELD = {"started_at": "ts"}
# Values stored as JSON text (what a row from the spool holds in its nested fields).
_JSON_TYPES = (dict, list)
_PLAIN = frozenset((str, int, float, type(None)))
_first = operator.itemgetter(0)
# Rows per INSERT statement: one statement stepped once per row costs ~3k more
# instructions per row (callgrind); two statement texts keep SQLite's cache warm.
ROWS_PER_STATEMENT = 64
MAX_PARAMS = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


def sql_strings(values: Iterable[str]) -> str:
    """SQL string literals of these constant names (no quotes in them), sorted, for an IN list."""
    return ", ".join(f"'{v}'" for v in sorted(values))


# The spend of the rows inserted by this transaction (ids above the highest id
# before it: nobody else writes inside BEGIN IMMEDIATE), added to their keys.
# A key deleted meanwhile is skipped, not a foreign-key error.  A row of unknown
# cost (no price for its usage, or its usage unknown) counts as its admission's
# cost, the reserved bound (admissions.release_step; also a live admission, its
# gateway killed), and with no tokens as its admission's tokens.
_QUOTA_COST = """CASE WHEN u.cost IS NULL THEN COALESCE((SELECT a.cost FROM admissions a
    WHERE a.key_id = u.key_id AND a.request_id = u.request_id), 0) ELSE MAX(u.cost, 0) END"""
def iteration_tokens_sql(row: str) -> str:
    """The tokens of the iterations billed apart from the top-level counts of the ledger row `row` (a table or
    alias): with the top-level counts, what a token quota counts (UsageRecord.billed_tokens).  Only a row with
    iterations has its JSON read; an iteration that is not an object, or a count that is not a positive integer,
    adds nothing."""
    return f"""CASE WHEN {row}.iterations IS NULL THEN 0 ELSE (SELECT COALESCE(SUM(c.value), 0)
    FROM json_each(CASE WHEN json_valid({row}.iterations) THEN {row}.iterations END) i,
         json_each(CASE WHEN i.type = 'object' THEN i.value END) c
    WHERE json_extract(CASE WHEN i.type = 'object' THEN i.value END, '$.type') IN ({sql_strings(SEPARATE_ITERATIONS)})
      AND c.key IN ({sql_strings(TOKEN_COUNTS)}) AND c.type = 'integer' AND c.value > 0) END"""


_ITERATION_TOKENS = iteration_tokens_sql("u")
_TOKENS = f"""(u.input_tokens + u.output_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    + {_ITERATION_TOKENS})"""
_QUOTA_TOKENS = f"""CASE WHEN u.cost IS NULL AND {_TOKENS} = 0 THEN COALESCE((SELECT a.tokens FROM admissions a
    WHERE a.key_id = u.key_id AND a.request_id = u.request_id), 0) ELSE {_TOKENS} END"""
_SETTLE = f"""
INSERT INTO key_spend (key_id, cost, tokens)
SELECT key_id, SUM(cost), SUM(tokens) FROM (
    SELECT u.key_id, {_QUOTA_COST} AS cost, {_QUOTA_TOKENS} AS tokens
    FROM usage u WHERE u.id > ? AND u.key_id IN (SELECT id FROM keys))
GROUP BY key_id HAVING SUM(cost > 0) OR SUM(tokens) > 0
ON CONFLICT (key_id) DO UPDATE SET cost = cost + excluded.cost, tokens = tokens + excluded.tokens
"""

# The same rows' spend in their keys' current quota periods (day, ISO week from Monday, month; UTC),
# the period taken from each row's start time, its whole second (SQLite's dates round a fraction to the
# millisecond, which would put a request started just before midnight in the next period).
_SETTLE_PERIODS = f"""
INSERT INTO key_period_spend (key_id, period, start, cost, tokens)
SELECT u.key_id, k.quota_period,
       CASE k.quota_period WHEN 'day' THEN date(CAST(u.ts AS INTEGER), 'unixepoch')
                           WHEN 'week' THEN date(CAST(u.ts AS INTEGER), 'unixepoch', '-6 days', 'weekday 1')
                           ELSE strftime('%Y-%m-01', CAST(u.ts AS INTEGER), 'unixepoch') END AS start,
       SUM({_QUOTA_COST}), SUM({_QUOTA_TOKENS})
FROM usage u JOIN keys k ON k.id = u.key_id
WHERE u.id > ? AND k.quota_period IN ('day', 'week', 'month')
GROUP BY u.key_id, k.quota_period, start
ON CONFLICT (key_id, period, start) DO UPDATE SET cost = cost + excluded.cost, tokens = tokens + excluded.tokens
"""

# Those requests' admissions (admissions.py): their cost is in key_spend now.  The ended ones leave their
# keys' sums for their days first (all of a day's ended admissions gone: the sums are exactly 0 again).
# CROSS JOIN keeps SQLite's order: the batch's rows, then each one's admission by its primary key.
_SETTLE_ENDED = """
UPDATE admission_ended
SET n = admission_ended.n - g.n,
    cost = CASE WHEN admission_ended.n <= g.n THEN 0 ELSE admission_ended.cost - g.cost END,
    tokens = CASE WHEN admission_ended.n <= g.n THEN 0 ELSE admission_ended.tokens - g.tokens END
FROM (SELECT a.key_id, a.start, COUNT(*) AS n, SUM(a.cost) AS cost, SUM(a.tokens) AS tokens
      FROM usage u CROSS JOIN admissions a ON a.key_id = u.key_id AND a.request_id = u.request_id
      WHERE u.id > ? AND a.live = 0 GROUP BY a.key_id, a.start) g
WHERE admission_ended.key_id = g.key_id AND admission_ended.start = g.start
"""
_FREE_ADMISSIONS = ("DELETE FROM admissions WHERE (key_id, request_id) IN"
                    " (SELECT key_id, request_id FROM usage WHERE id > ? AND key_id IS NOT NULL)")


# What a value of a column's declared type may be in a row (either backend's type names): a number column
# takes a number (a bool is an int: stored 0/1), a text column a string, or a dict or list it stores as JSON.
_KINDS = (("INT", (int,)), ("REAL", (int, float)), ("DOUBLE", (int, float)), ("FLOAT", (int, float)),
          ("NUMERIC", (int, float)), ("TEXT", (str, dict, list)), ("CHAR", (str, dict, list)))


def _kind(declared: str) -> Optional[tuple[type, ...]]:
    declared = declared.upper()
    return next((kind for name, kind in _KINDS if name in declared), None)


class LedgerRows:
    """The INSERT statements for the ledger's columns, rows turned into their values, and what a row needs
    for the ledger to take it (`fault`)."""

    def __init__(self, columns: Iterable[str], not_null: Iterable[str] = (),
                 types: Optional[Mapping[str, str]] = None) -> None:
        field_of_column = {column: field for field, column in COLUMN_OF_FIELD.items()}
        self.columns = [c for c in columns if c != "id"]
        self.fields = [field_of_column.get(c, c) for c in self.columns]
        # What a row needs, read off the ledger's own table (ledger_shape): a value in each NOT NULL column,
        # and in every column a value its declared type takes.  The one description of a valid row.
        not_null = set(not_null)
        self.needs = [(field, column in not_null, _kind((types or {}).get(column, "")))
                      for field, column in zip(self.fields, self.columns)]
        width = len(self.columns)
        values = f"({', '.join('?' * width)})"
        # An already shipped request id is skipped; any other constraint still fails loudly
        # (INSERT OR IGNORE would silently drop a row violating NOT NULL too).
        insert = f"INSERT INTO usage ({', '.join(self.columns)}) VALUES "
        tail = " ON CONFLICT (request_id) DO NOTHING"
        self.per_statement = max(1, min(ROWS_PER_STATEMENT, MAX_PARAMS // width))
        self.insert_one = insert + values + tail
        self.insert_many = insert + ", ".join([values] * self.per_statement) + tail
        # The row's values in column order, in one C call (a single column gives a value, not a tuple).
        pick = operator.itemgetter(*self.fields)
        self._pick = pick if len(self.fields) > 1 else (lambda row: (pick(row),))
        self._pickers: dict[RowFields, tuple[Callable, tuple[int, ...]]] = {}

    def values(self, row: Any, *, every: bool = False) -> list:
        """The row's values in column order, as stored.  A FieldValues row has only its `loose` fields
        looked at, unless `every` (a row refused as it was: a field held what its type did not say)."""
        if type(row) is FieldValues:
            pick, loose = self._picker(row.fields)
            out = list(pick(row.values))
            for i in (range(len(out)) if every else loose):
                if type(out[i]) not in _PLAIN:
                    out[i] = _column_value(out[i])
            return out
        try:
            picked = self._pick(row)
        except KeyError:        # a row without some field (spooled by an older version): NULL there
            picked = [row.get(name) for name in self.fields]
        return [v if type(v) in _PLAIN else _column_value(v) for v in picked]

    def fault(self, row: Any) -> Optional[str]:
        """Why the ledger cannot take `row` (a row read back from a spool file: written by a crash, an
        earlier version or by hand), or None: a NOT NULL column without a value, or a value of the wrong
        type for its column."""
        if type(row) is FieldValues:
            row = row.as_dict()
        elif not isinstance(row, Mapping):
            return f"a {type(row).__name__}, not a row"
        for field, required, kind in self.needs:
            value = row.get(field)
            if value is None:
                if required:
                    return f"no {field}"
            elif kind is not None and not isinstance(value, kind):
                return f"{field} is a {type(value).__name__}"
        return None

    def _picker(self, fields: "RowFields") -> tuple[Callable, tuple[int, ...]]:
        """Picks the columns' values out of a value tuple in the order of `fields`, and the positions
        (among the columns) of the values that may need converting; cached per field order."""
        picker = self._pickers.get(fields)
        if picker is None:
            where = {name: i for i, name in enumerate(fields.names)}
            missing = len(fields.names)     # a field the tuple lacks reads the None appended below
            at = [where.get(name, missing) for name in self.fields]
            pick = operator.itemgetter(*at) if len(at) > 1 else (lambda values: (values[at[0]],))
            loose = tuple(i for i, name in enumerate(self.fields) if name in fields.loose)
            picker = ((lambda values: pick(values + (None,))) if missing in at else pick), loose
            self._pickers[fields] = picker
        return picker

class RowFields:
    """The field names of FieldValues rows, and which of them may hold a dict, a list or a bool
    (values stored converted: JSON text, 0/1); the others hold str, int, float or None."""

    __slots__ = ("names", "loose")

    def __init__(self, names: Sequence[str], loose: Iterable[str]) -> None:
        self.names = tuple(names)
        self.loose = frozenset(loose)


class FieldValues:
    """A row as a tuple of values in the order of `fields.names` (UsageRecord field names): cheaper
    to build than a dict, and read like one by `get`."""

    __slots__ = ("fields", "values")

    def __init__(self, fields: RowFields, values: tuple) -> None:
        self.fields, self.values = fields, values

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self.values[self.fields.names.index(name)]
        except ValueError:
            return default

    def as_dict(self) -> dict:
        return dict(zip(self.fields.names, self.values))


def stored_values(values: Sequence, at: Iterable[int]) -> tuple:
    """`values` with those at the positions `at` as the ledger stores them: dicts and lists as JSON
    text, bools as 0/1 (values already so are left alone)."""
    out = list(values)
    for i in at:
        if type(out[i]) not in _PLAIN:
            out[i] = _column_value(out[i])
    return tuple(out)


def _column_value(value: Any) -> Any:
    if isinstance(value, _JSON_TYPES):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        # As 0/1 here: sqlite3 adapts a bool only after a failed look-up for an adapter (~2k instructions).
        return int(value)
    return value


def ledger_shape(conn) -> LedgerRows:
    """The ledger's columns, which of them are NOT NULL and their declared types, as the database has them."""
    if dialect(conn) == "sqlite":
        info = [(row[1], bool(row[3]), row[2]) for row in conn.execute("PRAGMA table_info(usage)")]
    else:
        from .pg_ledger import ledger_column_info
        info = conn.run(ledger_column_info(conn.raw))
    return LedgerRows([name for name, _, _ in info], [name for name, not_null, _ in info if not_null],
                      {name: declared for name, _, declared in info})


class LedgerUnavailable(Exception):
    """The database takes no rows now (locked, read-only, disk full, or refusing
    every row): nothing was written; ship the same rows again later."""


def write_ledger_rows(conn, rows: Sequence[Mapping[str, Any]], shape: Optional[LedgerRows] = None,
                      rejected: Optional[list[str]] = None, *, settle: bool = True, pg_ledger: Any = None) -> int:
    """Insert the rows the ledger lacks and (with `settle`) add their spend to their keys', in one
    transaction (on PostgreSQL, one per pg_ledger.CHUNK_ROWS rows: should one fail, the rows before it stay
    written, which a replay skips).

    Returns how many rows were inserted.  Raises LedgerUnavailable with nothing
    written when the database refuses (a lost PostgreSQL connection raises the
    driver's error, which the Store turns into StoreUnavailable).  A row the
    ledger refuses for itself (a value no column can hold) is logged with its
    content, its request id added to `rejected`, and left out, so it cannot
    hold back the others.
    """
    if not rows:
        return 0
    if dialect(conn) == "sqlite":
        write = _write
    else:
        from .pg_ledger import PgLedger
        ledger = pg_ledger or PgLedger()

        def write(conn, shape, values, settle):
            return conn.run(ledger.write(conn.raw, shape.columns, values, settle))
    try:
        shape = shape or ledger_shape(conn)
        try:
            return write(conn, shape, [shape.values(r) for r in rows], settle)
        except _row_errors() as exc:
            first_error: Exception = exc
        inserted = 0
        refused = []
        for row in rows:
            try:
                inserted += write(conn, shape, [shape.values(row, every=True)], settle)
            except _row_errors() as exc:
                refused.append((row, exc))
    except sqlite3.OperationalError as exc:
        raise LedgerUnavailable(str(exc)) from exc
    if len(refused) == len(rows) and not all(isinstance(exc, _own_errors()) for _, exc in refused) \
            and (len(rows) > 1 or not _takes_rows(conn, shape)):
        # Not one row taken, and not for a value of its own: it is the database refusing (a trigger,
        # a constraint an operator added), not the rows.  One row alone says nothing of the others: it is
        # the database only if a row known to be good is refused as well (_takes_rows); otherwise that
        # row is bad, and left out like any other.
        raise LedgerUnavailable(f"{type(first_error).__name__}: {first_error}") from first_error
    for row, exc in refused:
        log.error("usage row refused by the ledger and left out (%s: %s): %s",
                  type(exc).__name__, exc, logged_row(row.as_dict() if type(row) is FieldValues else row))
        if rejected is not None:
            rejected.append(str(row.get("request_id")))
    return inserted


def _takes_rows(conn, shape: LedgerRows) -> bool:
    """Whether the ledger takes a good row now: one as the gateway makes them (UsageRecord's defaults, a request
    id of its own), inserted and rolled back; False if it is refused as a row (a trigger, a constraint every
    row violates).  A database that cannot be reached raises, as for any write."""
    row = UsageRecord(request_id=f"req_probe{secrets.token_hex(10)}", started_at=time.time(),
                      endpoint="/v1/messages").as_dict()
    values = shape.values(row, every=True)
    try:
        if dialect(conn) == "sqlite":
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise LedgerUnavailable(str(exc)) from exc
            try:
                conn.execute(shape.insert_one, values)
            finally:
                conn.execute("ROLLBACK")
        else:
            from .pg_ledger import probe
            conn.run(probe(conn.raw, shape.columns, values))
    except _row_errors():
        return False
    return True


def logged_row(row: Mapping[str, Any]) -> str:
    """The row as JSON for the log, also with a value orjson cannot write (an integer past 64 bits, often
    the very value the ledger refused)."""
    try:
        return orjson.dumps(row).decode()
    except TypeError:
        return json.dumps(row, default=str)


# What a row itself can be refused for (OperationalError is the database's state, handled apart).
# ProgrammingError: a value sqlite3 cannot bind (a dict in a field declared as text; converted on the retry).
_ROW_ERRORS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError, sqlite3.ProgrammingError,
               ValueError, TypeError, OverflowError)


# Of those, what only a value of the row itself can cause (a string PostgreSQL cannot store, a number
# out of range): such a row is left out even when it is the only one shipped.  A constraint violated
# by every row says more about the table than about the rows, and sqlite3's ProgrammingError and
# InterfaceError are also what a closed connection raises.
_OWN_ERRORS = (sqlite3.DataError, ValueError, TypeError, OverflowError)


def _row_errors() -> tuple:
    return _with_asyncpg(_ROW_ERRORS, "DataError", "IntegrityConstraintViolationError")


def _own_errors() -> tuple:
    return _with_asyncpg(_OWN_ERRORS, "DataError")


def _with_asyncpg(errors: tuple, *names: str) -> tuple:
    """`errors` and asyncpg's of these names, when asyncpg is installed (the postgres extra)."""
    try:
        import asyncpg
    except ImportError:
        return errors
    return errors + tuple(getattr(asyncpg, name) for name in names)


def _write(conn, shape: LedgerRows, values: list[list], settle: bool) -> int:
    step = shape.per_statement
    whole = len(values) - len(values) % step
    conn.execute("BEGIN IMMEDIATE")
    try:
        before = conn.execute("SELECT COALESCE(MAX(id), 0) FROM usage").fetchone()[0]
        if whole:
            conn.executemany(shape.insert_many, [
                [v for row in values[i:i + step] for v in row] for i in range(0, whole, step)])
        if whole < len(values):
            conn.executemany(shape.insert_one, values[whole:])
        inserted = conn.execute("SELECT COUNT(*) FROM usage WHERE id > ?", (before,)).fetchone()[0]
        if inserted and settle:
            conn.execute(_SETTLE, (before,))
            conn.execute(_SETTLE_PERIODS, (before,))
            conn.execute(_SETTLE_ENDED, (before,))
            conn.execute(_FREE_ADMISSIONS, (before,))
        conn.execute("COMMIT")
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except Exception:
            pass
        raise
    return inserted


def shipped_request_ids(conn, request_ids: Sequence[str]) -> set[str]:
    """Which of these request ids the ledger holds (their spend is in key_spend)."""
    found: set[str] = set()
    chunk = 500
    for i in range(0, len(request_ids), chunk):
        part = list(request_ids[i:i + chunk])
        found.update(map(_first, conn.execute(
            f"SELECT request_id FROM usage WHERE request_id IN ({', '.join('?' * len(part))})", part)))
    return found


def shipped_and_spend(conn, request_ids: Sequence[str], starts: Optional[Mapping[str, str]] = None):
    """(shipped ids, every key's settled spend, the spend in the quota periods starting at `starts`),
    read in one transaction: a request counts either in the spend or as not shipped, never both or
    neither."""
    conn.execute("BEGIN")
    try:
        return (shipped_request_ids(conn, request_ids), read_spend(conn),
                read_period_spend(conn, starts or {}))
    finally:
        conn.execute("ROLLBACK")
