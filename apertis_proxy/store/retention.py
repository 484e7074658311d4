"""Ledger retention: usage rows (and refusal counts) older than `[ledger] keep_days` are deleted.

Deletion runs in the background, in small batches, each its own short write
transaction with a pause after it, so the meter's writes and the CLI's edits
never wait behind one long delete.  It runs once at start-up and then every
`interval` seconds; one worker process does it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from .watch import open_db

BATCH_ROWS = 500
PAUSE_BETWEEN_BATCHES = 0.05    # seconds: room for the meter's writes between deletes
DEFAULT_INTERVAL = 3600.0

_DELETE_BATCH = ("DELETE FROM usage WHERE id IN"
                 " (SELECT id FROM usage WHERE ts < ? ORDER BY ts LIMIT ?)")
# Refusals are counted per UTC day: a day goes once all of it is past the cutoff.
_DELETE_REFUSALS = "DELETE FROM refusals WHERE day < strftime('%Y-%m-%d', ?, 'unixepoch')"


class LedgerRetention:
    def __init__(self, db_path: str, keep_days: float, log: logging.Logger, *,
                 interval: float = DEFAULT_INTERVAL, batch_rows: int = BATCH_ROWS) -> None:
        self.db_path = db_path
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
        conn = await open_db(self.db_path)
        deleted = 0
        try:
            while True:
                cur = await conn.execute(_DELETE_BATCH, (cutoff, self.batch_rows))
                deleted += cur.rowcount
                self.deleted += cur.rowcount
                if cur.rowcount < self.batch_rows:
                    break
                await asyncio.sleep(PAUSE_BETWEEN_BATCHES)
            await conn.execute(_DELETE_REFUSALS, (cutoff,))      # one row per day, key and reason: small
        finally:
            await conn.close()
        if deleted:
            self.log.info("deleted %d usage rows older than %g days", deleted,
                          self.keep_seconds / 86400.0)
        return deleted
