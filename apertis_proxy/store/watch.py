"""Notice CLI edits in a running server: poll `config_rev` and reload on change."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional

import aiosqlite

log = logging.getLogger("apertis_proxy.store")

Reload = Callable[[aiosqlite.Connection], Awaitable[None]]


class RevisionWatcher:
    """Calls `reload(db)` once at start and again whenever `config_rev.rev` changes.

    One integer read per interval is all it costs while nothing changes.
    """

    def __init__(self, db_path: str, reload: Reload, interval: float = 1.0) -> None:
        self._path = db_path
        self._reload = reload
        self._interval = interval
        self._db: Optional[aiosqlite.Connection] = None
        self._task: Optional[asyncio.Task] = None
        self.rev = -1

    async def start(self) -> None:
        self._db = await aiosqlite.connect(self._path)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA busy_timeout=10000")
        await self.check()
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def check(self) -> bool:
        """Reload now if the revision moved; True when it did."""
        assert self._db is not None
        async with self._db.execute("SELECT rev FROM config_rev WHERE id = 1") as cur:
            row = await cur.fetchone()
        rev = row[0] if row else 0
        if rev == self.rev:
            return False
        await self._reload(self._db)
        self.rev = rev
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - a locked or broken DB must not stop polling
                log.exception("reloading configuration from %s failed", self._path)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._db is not None:
            await self._db.close()
            self._db = None
