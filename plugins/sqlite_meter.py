"""First-party meter plugin ``sqlite``: the usage ledger in the store's ``usage`` table
(SQLite or PostgreSQL: the name is historical).

``checkpoint()`` spools a running stream's usage as first reported (its
message_start), so a worker that dies mid-stream still has the input the
upstream billed metered (by the adopter of its spool); ``record()`` replaces it.
``record()`` appends the row to this worker's ledger spool (one JSON array line,
written before the response's last bytes go to the client: see
apertis_proxy.store.ledger_spool), so a row the client's answer depended on
survives a ``kill -9``.  A background task ships the spooled rows every
``flush_interval`` seconds, or as soon as ``batch_size`` rows are waiting,
with ``store.write_ledger``: idempotent (one row per request id) and with the
keys' settled spend in the same transaction.  While the database refuses
writes (locked, read-only, disk full, unreachable) rows stay spooled and the shipping is
retried with a back-off; at start, and every ``adopt_interval`` seconds,
spools left by stopped workers are adopted and shipped.

Every UsageRecord field is stored in the column of the same name (``started_at``
in ``ts``; dicts and lists as JSON); a field gains a column by a schema change alone.

Options (``[plugins.options.sqlite]``):
  flush_interval  seconds between shipments (0.5)
  batch_size      rows that trigger a shipment before the interval ends (500)
  adopt_interval  seconds between looks for spools of stopped workers (5)
The spool's own settings come from ``[ledger]`` (the host hands them over as
options): spool_dir, spool_max_bytes, spool_warn_bytes, fsync.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import operator
import os
import time
from typing import Optional

import orjson

from apertis_proxy.plugin_api import PluginContext, UsageRecord
from apertis_proxy.store.ledger_spool import LedgerSpool, default_spool_dir, interim_line, sent_line
from apertis_proxy.store.ledger_write import FieldValues, RowFields, stored_values
from apertis_proxy.store.service import is_unreachable, store_for_plugin

CLOSE_ATTEMPTS = 5
# The ledger row of a record: its fields' values in declaration order, those that may hold dicts,
# lists or bools (declared with a type other than str, int or float) converted as the ledger stores
# them (stored_values) before they are spooled: the spool line and the shipped row hold the same.
_NAMES = [f.name for f in dataclasses.fields(UsageRecord)]
_LOOSE_AT = tuple(i for i, f in enumerate(dataclasses.fields(UsageRecord))
                  if str(f.type).removeprefix("Optional[").removesuffix("]") not in ("str", "int", "float"))
FIELDS = RowFields(_NAMES, ())      # nothing left to convert
_field_values = operator.attrgetter(*_NAMES)
# How long a 503 for a full spool asks the client to wait.
FULL_RETRY_AFTER = 5


class SqliteMeter:
    def __init__(self, ctx: PluginContext) -> None:
        opts = ctx.options
        self.ctx = ctx
        self.log = ctx.log
        self.flush_interval = max(0.01, float(opts.get("flush_interval", 0.5)))
        self.batch_size = max(1, int(opts.get("batch_size", 500)))
        self.adopt_interval = max(0.1, float(opts.get("adopt_interval", 5.0)))
        self.spool = LedgerSpool(str(opts.get("spool_dir") or default_spool_dir(ctx.db_path)), self.log,
                                 max_bytes=int(opts.get("spool_max_bytes", 256 << 20)),
                                 warn_bytes=int(opts.get("spool_warn_bytes", 16 << 20)),
                                 fsync=str(opts.get("fsync", "batch")), fields=FIELDS.names)
        self.store = None
        self._owns_store = False
        self._shape = None          # the ledger's columns (ledger_write.LedgerRows), once started
        self._task: Optional[asyncio.Task] = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._lock = asyncio.Lock()   # one shipment at a time
        self._failures = 0          # consecutive failed shipments, for the back-off
        self._adopted_at = 0.0
        self.written = 0            # rows inserted since start
        self.shipped = 0            # rows shipped since start (inserted or already there)
        self.rejected = 0           # rows the ledger refused (each logged with its content)

    async def start(self) -> None:
        self.store, self._owns_store = await store_for_plugin(self.ctx)
        try:
            # The spool directory is this database's alone (ledger_spool.py): one of another database's
            # stops the gateway here, before a segment of it is adopted or one of this worker's added.
            self._shape = await self.store.ledger_shape()       # what a row read back must hold
            url = self.store.url
            name = url.redacted() if url.is_postgres else os.path.abspath(url.target)
            self.spool.open(await self.store.database_id(), name)
        except BaseException:
            if self._owns_store:
                await self.store.close()
            self.store = None
            raise
        self._adopt()
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- request path: one write(2) ---------------------------------------------

    async def record(self, record: UsageRecord) -> None:
        # The row's values as they are now: spooled as one JSON array, shipped from memory as they are.
        values = stored_values(_field_values(record), _LOOSE_AT)
        try:
            line = orjson.dumps(values, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:
            # A value orjson cannot write (an integer past 64 bits): spooled all the same.
            line = json.dumps(values, default=str).encode() + b"\n"
        self.spool.finished(record.request_id)
        self.spool.append(line, FieldValues(FIELDS, values))
        if self.spool.current is not None and len(self.spool.current.lines) >= self.batch_size:
            self._wake.set()

    def sent(self, record: UsageRecord) -> None:
        """The request goes upstream: spooled (not shipped) as sent, for a stopped worker's adopter to meter
        with its usage unknown if this worker dies before checkpoint() or record()."""
        self.spool.append_interim(record.request_id, sent_line({
            "request_id": record.request_id, "started_at": record.started_at, "endpoint": record.endpoint,
            "client": record.client, "key_id": record.key_id, "key_name": record.key_name,
            "channel_id": record.channel_id, "channel_name": record.channel_name,
            "requested_model": record.requested_model, "upstream_model": record.upstream_model,
            "stream": record.stream, "attempts": record.attempts, "attempt_log": record.attempt_log}))

    def checkpoint(self, record: UsageRecord) -> None:
        """A running request's usage so far, spooled (not shipped): what a stopped worker's adopter meters
        if this worker dies before record() (apertis_proxy.store.ledger_spool)."""
        values = stored_values(_field_values(record), _LOOSE_AT)
        self.spool.append_interim(record.request_id, interim_line(values))

    def refusal(self) -> Optional[tuple[str, int]]:
        """Why new requests are refused (503 overloaded_error), with a retry-after; None to admit."""
        if self.spool.full:
            return "the usage ledger cannot be written; try again shortly", FULL_RETRY_AFTER
        return None

    @property
    def pending(self) -> int:
        return self.spool.pending

    # -- shipping ----------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            # Back off while the database keeps failing (locked, disk full).
            delay = self.flush_interval * min(2 ** self._failures, 20)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if time.monotonic() - self._adopted_at >= self.adopt_interval:
                self._adopt()
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - shipping must outlive any one failure
                self._failures += 1
                self.log.exception("shipping usage rows failed; %d rows stay spooled and are retried",
                                   self.spool.pending)

    def _adopt(self) -> None:
        self._adopted_at = time.monotonic()
        try:
            self.spool.adopt()
        except OSError:
            self.log.exception("could not look for the ledger spools of stopped workers")

    async def flush(self) -> bool:
        """Ship every spooled row; False (and the rows kept) if the database refused."""
        async with self._lock:
            if self.store is None:
                return True
            if self.spool.sealed and not await self._ship(self.spool.seal()):
                return False            # what waited from before (failed shipments, adopted spools) first
            return await self._ship(self.spool.seal())

    async def _ship(self, segments: list) -> bool:
        """Ship these segments, oldest first; False (and the rest kept) at the first the database refused."""
        for seg in segments:
            rows = seg.rows(self.log, self._shape)
            rejected: list[str] = []
            try:
                inserted = await self.store.write_ledger(rows, rejected)
            except Exception as exc:
                # Whatever the database answered (unreachable, read-only during a failover, its disk
                # full, a statement timeout): the rows it did not take stay spooled and are retried.
                self._failures += 1
                why = str(exc) if is_unreachable(exc) else f"{type(exc).__name__}: {exc}"
                self.log.error("shipping %d usage rows failed (%s); they stay spooled (%d rows) and are "
                               "retried", len(rows), why, self.spool.pending)
                return False
            self.spool.shipped(seg)
            self.written += inserted
            self.shipped += len(rows)
            self.rejected += len(rejected)
        self._failures = 0
        return True

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task          # never cancelled: it may be mid-transaction
            self._task = None
        for attempt in range(CLOSE_ATTEMPTS):
            try:
                if await self.flush():
                    break
            except Exception:  # noqa: BLE001 - the rows stay spooled for the next start
                self.log.exception("shipping usage rows at shutdown failed")
            await asyncio.sleep(0.1 * 2 ** attempt)
        else:
            self.log.error("shutting down with %d usage rows unshipped; they stay in %s for the next start",
                           self.spool.pending, self.spool.directory)
        self.spool.close()
        if self._owns_store and self.store is not None:
            await self.store.close()
            self.store = None
