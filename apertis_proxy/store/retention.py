"""Ledger retention: usage rows (and refusal counts) older than `[ledger] keep_days` go.

On SQLite they are deleted in small batches, each its own short write
transaction with a pause after it, so the meter's writes and the CLI's edits
never wait behind one long delete.  On PostgreSQL whole monthly partitions are
dropped once all of a month is past the retention period (never a mass DELETE).
It runs once at start-up and then every `interval` seconds; one worker process
does it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from . import budgets


BATCH_ROWS = 500
PAUSE_BETWEEN_BATCHES = 0.05    # seconds: room for the meter's writes between deletes
DEFAULT_INTERVAL = 3600.0

class LedgerRetention:
    def __init__(self, store, keep_days: float, log: logging.Logger, *,
                 interval: float = DEFAULT_INTERVAL, batch_rows: int = BATCH_ROWS) -> None:
        self.store = store
        self.keep_seconds = keep_days * 86400.0
        self.interval = interval
        self.batch_rows = batch_rows
        self.log = log
        self.deleted = 0            # rows deleted since start
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception:   # the next round tries again; serving goes on
                self.log.exception("deleting old usage rows failed")
            await asyncio.sleep(self.interval)

    async def prune(self, now: Optional[float] = None) -> int:
        """Delete every row older than the retention period, batch by batch; the count."""
        cutoff = (time.time() if now is None else now) - self.keep_seconds
        deleted = 0
        while True:
            count = await self.store.prune_ledger(cutoff, self.batch_rows)
            deleted += count
            self.deleted += count
            if self.store.backend != "sqlite" or count < self.batch_rows:
                break
            await asyncio.sleep(PAUSE_BETWEEN_BATCHES)
        await self.store.call(budgets.prune_refusals, cutoff)    # one row per day, key and reason: small
        if deleted:
            self.log.info("deleted %d usage rows older than %g days", deleted,
                          self.keep_seconds / 86400.0)
        return deleted
