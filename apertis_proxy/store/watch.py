"""Notice CLI edits in a running server: an aiosqlite connection and a
background loop that polls ``config_rev`` (used by the core and by plugins).

Every write to keys, channels or models bumps ``config_rev.rev`` (triggers in
store/schema.py), so a running plugin learns about a CLI edit by reading one
integer; only then does it reload its tables into memory.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional

import aiosqlite

from . import schema



async def open_db(path: str) -> aiosqlite.Connection:
    """Open the gateway's database in autocommit mode, schema guaranteed."""
    # The schema check is synchronous and runs once at start-up, before the
    # server accepts connections.
    schema.connect(path).close()
    conn = await aiosqlite.connect(path, timeout=10.0, isolation_level=None)
    conn.row_factory = aiosqlite.Row
    for pragma in schema.PRAGMAS:
        await conn.execute(pragma)
    return conn


async def read_rev(conn: aiosqlite.Connection) -> int:
    async with conn.execute("SELECT rev FROM config_rev WHERE id = 1") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


# tick(conn, changed): `changed` is True on the first tick and whenever the
# configuration revision moved since the previous tick.
Tick = Callable[[aiosqlite.Connection, bool], Awaitable[None]]


class RevisionWatcher:
    """Calls ``tick`` once at start and then every ``interval`` seconds.

    A failing tick (database locked for longer than busy_timeout, disk full,
    a bug) is logged and retried on the next interval; the loop never dies,
    and a reload that failed is attempted again on the next tick.
    """

    def __init__(self, db_path: str, interval: float, tick: Tick, log: logging.Logger) -> None:
        self.db_path = db_path
        self.interval = max(0.01, float(interval))
        self._tick = tick
        self._log = log
        self._conn: Optional[aiosqlite.Connection] = None
        self._task: Optional[asyncio.Task] = None
        self._rev: Optional[int] = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._lock = asyncio.Lock()

    @property
    def started(self) -> bool:
        return self._conn is not None

    @property
    def conn(self) -> aiosqlite.Connection:
        assert self._conn is not None, "RevisionWatcher.start() was not called"
        return self._conn

    async def start(self) -> None:
        self._conn = await open_db(self.db_path)
        # The first load happens here, so the plugin is ready when start()
        # returns; errors surface to the loader, which refuses to start.
        await self.run_once()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def run_once(self) -> None:
        # Serialised: an explicit refresh may race the loop, and a tick may
        # hold a write transaction on the shared connection.
        async with self._lock:
            rev = await read_rev(self.conn)
            changed = rev != self._rev
            await self._tick(self.conn, changed)
            # Remember the revision only once the reload succeeded.
            self._rev = rev

    def poke(self) -> None:
        """Run the next tick now instead of waiting for the interval."""
        self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                break
            try:
                await self.run_once()
            except Exception:
                self._log.exception("periodic refresh from %s failed; retrying", self.db_path)

    async def stop(self) -> None:
        """End the loop after the tick in progress (never cancelled half-way:
        a tick may be inside a write transaction)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def close(self) -> None:
        await self.stop()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
