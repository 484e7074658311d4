"""First-party meter plugin ``sqlite``: the usage ledger in the ``usage`` table.

``record()`` only appends a row to a list in memory; a background task writes
what has accumulated in one transaction of multi-row INSERTs (64 rows per
statement), every ``flush_interval`` seconds or as soon as ``batch_size``
rows are waiting.  A failed write is logged and retried with the same rows
(nothing raises into the request path); ``close()`` writes everything that
is left.

Every UsageRecord field is stored in the column of the same name (``started_at``
in ``ts``; ``server_tool_use``, ``iterations``, ``raw_usage`` and ``prices`` as JSON).  Columns are matched at
start-up, so a field gains a column by a schema change alone.

Options (``[plugins.options.sqlite]``):
  flush_interval  seconds between writes (0.5)
  batch_size      rows that trigger a write before the interval ends (500)
  max_queue       rows kept in memory while the database refuses writes;
                  beyond it the oldest are dropped, loudly (200000)
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import operator
import sqlite3
from typing import Any, AsyncIterator, Callable, Optional

import aiosqlite
import orjson

from apertis_proxy.plugin_api import PluginContext, UsageRecord

from apertis_proxy.store.watch import open_db

COLUMN_OF_FIELD = {"started_at": "ts"}
JSON_FIELDS = frozenset({"server_tool_use", "prices", "iterations", "raw_usage", "attempt_log"})
BOOL_FIELDS = frozenset({"stream", "interrupted", "reached_upstream"})
CLOSE_ATTEMPTS = 5
# Host parameters one statement may bind: SQLite's default limit since 3.32,
# and the old default before it.
MAX_PARAMS = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


def _json(value: Any) -> Optional[str]:
    return None if value is None else orjson.dumps(value).decode()


def _bool(value: Any) -> int:
    return 1 if value else 0


def _plain(value: Any) -> Any:
    return value


class SqliteMeter:
    def __init__(self, ctx: PluginContext) -> None:
        opts = ctx.options
        self.ctx = ctx
        self.log = ctx.log
        self.flush_interval = max(0.01, float(opts.get("flush_interval", 0.5)))
        self.batch_size = max(1, int(opts.get("batch_size", 500)))
        self.max_queue = max(self.batch_size, int(opts.get("max_queue", 200_000)))
        self._queue: list[tuple] = []
        self._fields: list[tuple[str, Callable[[Any], Any]]] = []
        self._insert = ""           # INSERT of one row
        self._insert_many = ""      # INSERT of `_per_statement` rows
        self._per_statement = 1
        self._conn: Optional[aiosqlite.Connection] = None
        self._task: Optional[asyncio.Task] = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._lock = asyncio.Lock()   # one transaction at a time on the connection
        self._failures = 0          # consecutive failed writes, for the back-off
        self.written = 0            # rows committed since start
        self.dropped = 0
        self.rejected = 0           # rows SQLite would not take (dropped, each logged)

    async def start(self) -> None:
        self._conn = await open_db(self.ctx.db_path)
        columns = {row[1] for row in await self._conn.execute_fetchall("PRAGMA table_info(usage)")}
        names = []
        for f in dataclasses.fields(UsageRecord):
            column = COLUMN_OF_FIELD.get(f.name, f.name)
            if column not in columns:
                continue        # e.g. reached_upstream: not part of the ledger (yet)
            convert = _json if f.name in JSON_FIELDS else _bool if f.name in BOOL_FIELDS else _plain
            self._fields.append((f.name, convert))
            names.append(column)
        # The request path only snapshots the fields (one C call); converting
        # them for SQLite happens in the writer task, off the hot path.
        self._snapshot = operator.attrgetter(*(name for name, _ in self._fields))
        self._converters = tuple((i, convert) for i, (_, convert) in enumerate(self._fields)
                                 if convert is not _plain)
        # Multi-row INSERTs: a statement stepped once per row costs ~3k more
        # instructions per row (callgrind).  Two statement texts only, so
        # SQLite's statement cache keeps both compiled.
        insert = f"INSERT INTO usage ({', '.join(names)}) VALUES "
        values = f"({', '.join('?' * len(names))})"
        self._per_statement = max(1, min(64, MAX_PARAMS // len(names)))
        self._insert = insert + values
        self._insert_many = insert + ", ".join([values] * self._per_statement)
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- request path: no I/O --------------------------------------------------

    async def record(self, record: UsageRecord) -> None:
        self._queue.append(self._snapshot(record))
        if len(self._queue) > self.max_queue:
            excess = len(self._queue) - self.max_queue
            del self._queue[:excess]
            self.dropped += excess
            self.log.error("usage ledger unwritable: dropped %d oldest rows (%d in all)",
                           excess, self.dropped)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- writer ------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            # Back off while the database keeps failing (locked, disk full).
            delay = self.flush_interval * min(2 ** self._failures, 20)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> bool:
        """Write every queued row; False (and the rows kept) if the write failed."""
        async with self._lock:
            return await self._flush()

    async def _flush(self) -> bool:
        if not self._queue or self._conn is None:
            return True
        # Swap the list out: record() keeps appending to a fresh one meanwhile.
        batch, self._queue = self._queue, []
        converters = self._converters
        try:
            values: list = []          # every row's values, one after another
            for snapshot in batch:
                row = list(snapshot)   # _row(), inline: a call per row was measurable
                for i, convert in converters:
                    row[i] = convert(row[i])
                values += row
            width = len(self._fields)
            step = self._per_statement * width
            whole = len(values) - len(values) % step
            async with self._transaction():
                if whole:
                    await self._conn.executemany(
                        self._insert_many, [values[i:i + step] for i in range(0, whole, step)])
                if whole < len(values):
                    await self._conn.executemany(
                        self._insert, [values[i:i + width] for i in range(whole, len(values), width)])
        except sqlite3.OperationalError:
            # The database refused (locked, disk full, read-only): keep the rows, retry later.
            return self._retry_later(batch)
        except Exception:
            # Something in the rows themselves: one bad row must not hold back the rest
            # (retried with them, it would stop the ledger for good).
            return await self._flush_one_by_one(batch)
        self._failures = 0
        self.written += len(batch)
        return True

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        assert self._conn is not None
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            await self._conn.execute("COMMIT")
        except BaseException:
            try:
                await self._conn.execute("ROLLBACK")
            except Exception:
                pass
            raise

    def _retry_later(self, batch: list[tuple]) -> bool:
        self._queue[:0] = batch
        self._failures += 1
        self.log.exception("writing %d usage rows failed; will retry", len(batch))
        return False

    def _row(self, snapshot: tuple) -> list:
        row = list(snapshot)
        for i, convert in self._converters:
            row[i] = convert(row[i])
        return row

    async def _flush_one_by_one(self, batch: list[tuple]) -> bool:
        """Write the rows that can be written and drop, loudly, the ones that cannot.
        When no row can be written the database is refusing, not the rows: keep
        them all for the retry."""
        assert self._conn is not None
        written = 0
        bad: list[tuple[tuple, Exception]] = []
        try:
            async with self._transaction():
                for snapshot in batch:
                    try:
                        await self._conn.execute(self._insert, self._row(snapshot))
                        written += 1
                    except sqlite3.OperationalError:
                        raise
                    except Exception as exc:     # noqa: BLE001 - this row only
                        bad.append((snapshot, exc))
                if not written:
                    raise bad[0][1]
        except Exception:
            return self._retry_later(batch)
        for snapshot, exc in bad:
            self.rejected += 1
            self.log.error("usage row for request %s rejected and dropped (%s: %s)",
                           snapshot[0], type(exc).__name__, exc)    # [0]: request_id
        self._failures = 0
        self.written += written
        return True

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task          # never cancelled: it may be mid-transaction
            self._task = None
        for attempt in range(CLOSE_ATTEMPTS):
            if await self.flush():
                break
            await asyncio.sleep(0.1 * 2 ** attempt)
        else:
            self.log.error("shutting down with %d usage rows unwritten", len(self._queue))
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
