"""First-party meter plugin ``sqlite``: the usage ledger in the store's ``usage`` table
(SQLite or PostgreSQL: the name is historical).

``record()`` only appends a row to a list in memory; a background task hands
what has accumulated to ``store.write_ledger`` (one transaction), every
``flush_interval`` seconds or as soon as ``batch_size`` rows are waiting.  A
failed write is logged and retried with the same rows (nothing raises into the
request path); ``close()`` writes everything that
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
import dataclasses
import operator
import sqlite3
from typing import Any, Callable, Optional

import orjson

from apertis_proxy.plugin_api import PluginContext, UsageRecord
from apertis_proxy.store.service import StoreUnavailable, is_unreachable, store_for_plugin

COLUMN_OF_FIELD = {"started_at": "ts"}
JSON_FIELDS = frozenset({"server_tool_use", "prices", "iterations", "raw_usage"})
BOOL_FIELDS = frozenset({"stream", "interrupted", "reached_upstream"})
CLOSE_ATTEMPTS = 5


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
        self._columns: list[str] = []
        self.store = None
        self._owns_store = False
        self._task: Optional[asyncio.Task] = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._lock = asyncio.Lock()   # one transaction at a time on the connection
        self._failures = 0          # consecutive failed writes, for the back-off
        self.written = 0            # rows committed since start
        self.dropped = 0
        self.rejected = 0           # rows SQLite would not take (dropped, each logged)

    async def start(self) -> None:
        self.store, self._owns_store = await store_for_plugin(self.ctx)
        columns = set(await self.store.ledger_columns())
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
        self._columns = names
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
        if not self._queue or self.store is None:
            return True
        # Swap the list out: record() keeps appending to a fresh one meanwhile.
        batch, self._queue = self._queue, []
        try:
            await self.store.write_ledger(self._columns, [self._row(snapshot) for snapshot in batch])
        except (sqlite3.OperationalError, StoreUnavailable):
            # The database refused (locked, disk full, read-only, unreachable): keep the rows, retry later.
            return self._retry_later(batch)
        except Exception as exc:
            if is_unreachable(exc):
                return self._retry_later(batch)
            # Something in the rows themselves: one bad row must not hold back the rest
            # (retried with them, it would stop the ledger for good).
            return await self._flush_one_by_one(batch)
        self._failures = 0
        self.written += len(batch)
        return True

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
        written = 0
        bad: list[tuple[tuple, Exception]] = []
        for snapshot in batch:
            try:
                await self.store.write_ledger(self._columns, [self._row(snapshot)])
                written += 1
            except Exception as exc:     # noqa: BLE001 - this row only
                if isinstance(exc, sqlite3.OperationalError) or is_unreachable(exc):
                    self.written += written
                    return self._retry_later(batch[written + len(bad):])
                bad.append((snapshot, exc))
        if not written:
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
        if self._owns_store and self.store is not None:
            await self.store.close()
            self.store = None
