"""One change watcher per worker: it holds the current ConfigSnapshot and
publishes a new one to its subscribers (the core and every plugin) when the
stored configuration changed.

How a change is noticed:
* SQLite: every config write bumps ``config_rev`` (triggers); the watcher reads
  that one integer every `interval` seconds: the smallest interval any of its
  users asked for (the server's and each plugin's ``poll_interval``).
* PostgreSQL: config writes also ``NOTIFY apertis_config``; the watcher LISTENs on
  a connection of its own and re-reads at once.  After that connection is lost
  and made again it re-reads everything (notifications sent meanwhile are gone),
  and it still reads ``config_rev`` every `slow_poll` seconds as a safety net.

A failed read is logged and retried; until a read succeeds again ``reachable``
is False, so callers can tell "not in the snapshot" from "store down".
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from .config import ConfigSnapshot
from .url import StoreURL

log = logging.getLogger("apertis_proxy.store.changes")

SLOW_POLL = 5.0          # seconds between safety-net reads on PostgreSQL
MIN_INTERVAL = 0.01      # the shortest poll interval taken

Subscriber = Callable[[ConfigSnapshot], None]


class ChangeWatcher:
    def __init__(self, store, interval: float = 1.0) -> None:
        self.store = store
        self.interval = max(MIN_INTERVAL, float(interval))
        self.snapshot = ConfigSnapshot()
        self.reachable = True
        self._subscribers: list[Subscriber] = []
        self._wake = asyncio.Event()
        self._force = True
        self._task: Optional[asyncio.Task] = None
        self._lock = asyncio.Lock()
        self._listener = None          # the LISTEN connection (PostgreSQL)
        self._stopping = False
        self.started = False

    def poll_within(self, interval: float) -> None:
        """Poll at least every `interval` seconds: the watcher is shared, so the most eager
        user sets the pace.  A shorter interval applies at once (the wait in progress ends)."""
        interval = max(MIN_INTERVAL, float(interval))
        if interval < self.interval:
            self.interval = interval
            self._wake.set()

    def subscribe(self, callback: Subscriber) -> None:
        """Call `callback(snapshot)` now (when a snapshot is loaded) and on every new snapshot."""
        self._subscribers.append(callback)
        if self.started:
            callback(self.snapshot)

    def unsubscribe(self, callback: Subscriber) -> None:
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    async def start(self) -> None:
        """Load the first snapshot (errors propagate: the server refuses to start), then watch."""
        if self.started:
            return
        await self.refresh(force=True)
        self.started = True
        if self.store.url.is_postgres:
            await self._listen()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def poke(self) -> None:
        self._wake.set()

    async def refresh(self, force: bool = False) -> ConfigSnapshot:
        """Read the revision and, if it moved (or `force`), the whole configuration."""
        async with self._lock:
            try:
                force = force or self._force
                if not force and await self.store.config_rev() == self.snapshot.rev:
                    self.reachable = True
                    return self.snapshot
                snapshot = await self.store.read_config()
            except BaseException:
                self.reachable = False
                raise
            self.reachable = True
            self._force = False
            self.snapshot = snapshot
            for callback in list(self._subscribers):
                try:
                    callback(snapshot)
                except Exception:
                    log.exception("a configuration subscriber failed")
            return snapshot

    async def _loop(self) -> None:
        postgres = self.store.url.is_postgres
        while not self._stopping:
            listening = self._listener is not None and not self._listener.is_closed()
            timeout = max(self.interval, SLOW_POLL) if postgres and listening else self.interval
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                break
            if postgres and not listening:
                await self._listen()
            try:
                await self.refresh()
            except Exception as exc:
                log.error("reading the configuration from %s failed (%s); retrying",
                          self.store.redacted_url, self.store.url.scrub(str(exc)) or type(exc).__name__)

    async def _listen(self) -> None:
        """(Re)open the LISTEN connection; a fresh one means a full re-read."""
        import asyncpg

        from .pg_schema import NOTIFY_CHANNEL
        url: StoreURL = self.store.url
        await self._close_listener()
        try:
            conn = await asyncpg.connect(url.dsn, timeout=5.0)
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
            conn.add_termination_listener(self._lost)
        except Exception as exc:
            self.reachable = False
            log.error("cannot listen for configuration changes on %s (%s); retrying",
                      url.redacted(), url.scrub(str(exc)) or type(exc).__name__)
            return
        self._listener = conn
        self._force = True
        self._wake.set()

    def _notified(self, *args) -> None:
        self._wake.set()

    def _lost(self, *args) -> None:
        self.reachable = False
        self._wake.set()

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                conn.terminate()

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._close_listener()
