"""A synchronous, sqlite3-shaped connection to PostgreSQL (over asyncpg on a private event loop).

The store's functions (keys.py, channels.py, catalog.py, usage.py) are written
once against the small part of the sqlite3 connection interface they use:
``execute``/``executemany`` with ``?`` parameters, cursors with ``fetchone``,
``fetchall``, ``rowcount`` and ``lastrowid``, ``BEGIN IMMEDIATE``/``COMMIT``/
``ROLLBACK`` and ``with conn:``.  This class gives PostgreSQL that interface, so
the CLI and the store's background work run the same code on either backend.
What differs between the two SQL dialects is written out where it occurs (see
``url.dialect()``); here only the mechanical part is translated:

* ``?`` and ``?N`` parameters become ``$N``;
* ``BEGIN IMMEDIATE`` becomes ``BEGIN`` (PostgreSQL takes row locks as it writes);
* ``INSERT OR IGNORE`` / ``INSERT OR REPLACE`` become ``ON CONFLICT`` clauses on the
  table's primary key (CONFLICT_KEYS);
* an INSERT into a table with an ``id`` serial returns it as ``lastrowid``;
* parameters are coerced to the column types PostgreSQL inferred (SQLite's columns
  take any type: prices arrive as decimal strings, flags as ints).

A connection is used by one thread at a time (the store's executor, or the CLI).
"""
from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from decimal import Decimal
from typing import Any, Iterable, Optional, Sequence

import asyncpg

from .url import StoreURL

# Tables written with INSERT OR IGNORE / OR REPLACE, and the columns of their primary key.
CONFLICT_KEYS = {
    "meta": ("k",),
    "key_grace": ("key_hash",),
    "deleted_keys": ("id",),
    "model_prices": ("model_id", "origin", "effective_from"),
    "owned_state": ("kind", "id"),
    "key_spend": ("key_id",),
    "budget_alerts": ("key_id", "period", "start", "threshold"),
    "key_period_spend": ("key_id", "period", "start"),
    "refusals": ("day", "key_name", "reason"),
}
# Tables whose INSERTs report the new row's id as lastrowid.
SERIAL_TABLES = ("keys", "channels")

CONNECT_TIMEOUT = 10.0

_PARAM = re.compile(r"\?(\d*)")
_OR_CLAUSE = re.compile(r"^\s*INSERT\s+OR\s+(IGNORE|REPLACE)\s+INTO\s+(\w+)\s*(\(([^)]*)\))?", re.I | re.S)
_INSERT_INTO = re.compile(r"^\s*INSERT\s+INTO\s+(\w+)", re.I)


def translate(sql: str) -> str:
    """SQLite-flavoured statement text -> PostgreSQL (see the module docstring)."""
    stripped = sql.strip()
    if stripped.upper().startswith("BEGIN"):
        return "BEGIN"
    counter = 0

    def number(match: re.Match) -> str:
        nonlocal counter
        if match.group(1):
            return f"${match.group(1)}"
        counter += 1
        return f"${counter}"

    sql = _PARAM.sub(number, sql)
    conflict = _OR_CLAUSE.match(sql)
    if conflict:
        mode, table, columns = conflict.group(1).upper(), conflict.group(2), conflict.group(4)
        sql = "INSERT INTO" + sql[conflict.start(2) - 1:]
        key = CONFLICT_KEYS.get(table)
        if mode == "IGNORE" or key is None:
            sql += " ON CONFLICT DO NOTHING"
        else:
            cols = [c.strip() for c in (columns or "").split(",") if c.strip()]
            updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c not in key)
            sql += f" ON CONFLICT ({', '.join(key)}) DO " + (f"UPDATE SET {updates}" if updates else "NOTHING")
    insert = _INSERT_INTO.match(sql)
    if insert and insert.group(1) in SERIAL_TABLES and "RETURNING" not in sql.upper():
        sql += " RETURNING id"
    return sql


def _coerce(value: Any, type_name: str) -> Any:
    if value is None:
        return None
    if type_name in ("float8", "float4"):
        return float(value) if not isinstance(value, float) else value
    if type_name == "numeric":
        return value if isinstance(value, Decimal) else Decimal(str(value))
    if type_name in ("int8", "int4", "int2"):
        return int(value) if not isinstance(value, int) or isinstance(value, bool) else value
    if type_name in ("text", "varchar"):
        return value if isinstance(value, str) else str(value)
    if type_name == "bool":
        return bool(value)
    return value


class PgCursor:
    def __init__(self, rows: list, rowcount: int, lastrowid: Optional[int], names: Sequence[str] = ()) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.lastrowid = lastrowid
        # DB-API's description: one 7-tuple per column, only the name filled in.
        self.description = [(name, None, None, None, None, None, None) for name in names] or None

    def fetchone(self):
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list:
        rows, self._rows = self._rows, []
        return rows

    def __iter__(self):
        return iter(self.fetchall())


class PgConnection:
    """sqlite3-shaped access to one PostgreSQL connection; see the module docstring."""

    row_factory: Any = None        # accepted and ignored: asyncpg records are read by name and index

    def __init__(self, url: StoreURL, *, timeout: float = CONNECT_TIMEOUT) -> None:
        self.url = url
        # The connection lives on a loop of its own, in a thread of its own: callers block
        # on it from any thread, including one that runs another event loop.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="apertis-pg", daemon=True)
        self._thread.start()
        self._statements: dict[str, str] = {}
        try:
            self._conn: asyncpg.Connection = self._run(asyncpg.connect(url.dsn, timeout=timeout))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def raw(self) -> asyncpg.Connection:
        return self._conn

    def run(self, coro):
        """Run a coroutine using `raw` (for the few operations beyond the sqlite3 interface)."""
        return self._run(coro)

    @property
    def in_transaction(self) -> bool:
        return self._conn.is_in_transaction()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> PgCursor:
        try:
            return self._run(self._execute(self._translated(sql), params))
        except asyncpg.IntegrityConstraintViolationError as exc:
            # The store's functions tell a taken name from other failures by this type.
            raise sqlite3.IntegrityError(str(exc)) from exc

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> PgCursor:
        total = 0
        for params in seq:
            total += self.execute(sql, params).rowcount
        return PgCursor([], total, None)

    def executescript(self, script: str) -> None:
        self._run(self._conn.execute(script))

    def _translated(self, sql: str) -> str:
        text = self._statements.get(sql)
        if text is None:
            text = self._statements[sql] = translate(sql)
        return text

    async def _execute(self, text: str, params: Sequence[Any]) -> PgCursor:
        if text in ("BEGIN", "COMMIT", "ROLLBACK") or not params and not _returns_rows(text):
            status = await self._conn.execute(text)
            return PgCursor([], _count(status), None)
        stmt = await self._conn.prepare(text)
        args = [_coerce(v, t.name) for v, t in zip(params, stmt.get_parameters())]
        if stmt.get_attributes():
            rows = await stmt.fetch(*args)
            lastrowid = rows[0][0] if rows and text.rstrip().endswith("RETURNING id") else None
            return PgCursor(list(rows), len(rows) if lastrowid is None else 1, lastrowid,
                            [a.name for a in stmt.get_attributes()])
        await stmt.fetch(*args)
        return PgCursor([], _count(stmt.get_statusmsg()), None)

    def commit(self) -> None:
        if self.in_transaction:
            self._run(self._conn.execute("COMMIT"))

    def rollback(self) -> None:
        if self.in_transaction:
            self._run(self._conn.execute("ROLLBACK"))

    def __enter__(self) -> "PgConnection":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        return False

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._conn.close(timeout=2))
        except Exception:
            self._loop.call_soon_threadsafe(self._conn.terminate)
        self._stop_loop()


def _returns_rows(text: str) -> bool:
    head = text.lstrip()[:6].upper()
    return head in ("SELECT", "WITH  ", "VALUES") or head.startswith("WITH") or "RETURNING" in text.upper()


def _count(status: Optional[str]) -> int:
    """The row count of a command tag such as "UPDATE 3" or "INSERT 0 1"."""
    if not status:
        return 0
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0
