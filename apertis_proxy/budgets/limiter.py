"""This process's side of the admissions kept in the store (store/admissions.py).

A ``Limiter`` holds the process's lease (renewed every third of its length;
a renewal that finds it had run out, the event loop having stalled, takes it
again and logs a warning),
admits and releases requests through the store's admissions access (from the
event loop: an asyncpg pool on PostgreSQL, a connection of its own on SQLite;
never behind a ledger batch), and retries releases the store could not take
when they happened.  Any failure of the store on an admission (unreachable,
too slow, read-only, out of connections or space) is StoreUnavailable: the
client gets 503 with retry-after, never a 500.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sqlite3
from typing import Optional

from ..store.admissions import Decision, Limits, ReleaseNotRun
from ..store.service import StoreUnavailable, is_unreachable

DEFAULT_LEASE_SECONDS = 30.0
RELEASE_TIMEOUT = 2.0       # seconds a release may hold back the answer's end; then it is retried later


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the store cannot serve an admission now (unreachable, too slow, read-only, out of
    connections or space, any error of the database itself) rather than a bug in the caller."""
    if isinstance(exc, (StoreUnavailable, OSError, TimeoutError, sqlite3.DatabaseError)) or is_unreachable(exc):
        return True
    try:
        import asyncpg
    except ImportError:
        return False
    return isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError))


class Limiter:
    def __init__(self, store, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 log: Optional[logging.Logger] = None) -> None:
        self._store = store
        self.admissions = None
        self.lease_seconds = max(0.3, float(lease_seconds))
        self.holder = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self.log = log or logging.getLogger("apertis_proxy.limits")
        # Live leases (gateway processes) when last seen: the share of headroom a
        # process may use on its own while the store cannot be reached.
        self.holders = 1
        self._unreleased: list[tuple[tuple, bool]] = []     # (release()'s arguments, first): see _later
        self._forgotten: list[tuple[int, str, float]] = []     # (key id, request id, until): see _forget
        self._releasing: set[asyncio.Task] = set()
        self._leased = False        # the lease was taken once: a lapse from now on is worth a warning
        self._store_bounds_releases = False
        self._task: Optional[asyncio.Task] = None
        self._tidy_task: Optional[asyncio.Task] = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self.admissions = await self._store.admissions()
        # A store that bounds a release's wait itself (SQLite) spares each release a timer of its own.
        self._store_bounds_releases = hasattr(self.admissions, "release_bound")
        if self._store_bounds_releases:
            self.admissions.release_bound = RELEASE_TIMEOUT
        try:
            await self._renew()
        except Exception as exc:  # noqa: BLE001 - the loop keeps trying
            self.log.error("could not take the limits lease (%s); retrying", exc)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._renew_loop())
        if self.admissions.tidy_interval:
            self._tidy_task = loop.create_task(self._tidy_loop(self.admissions.tidy_interval))

    async def close(self) -> None:
        await self.drain()
        self._stop.set()
        self._wake.set()
        for task in (self._task, self._tidy_task):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._tidy_task = None
        if self.admissions is None:
            return
        try:
            await self._retry_releases()
            await self.admissions.drop_lease(self.holder)
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            self.log.warning("could not hand back the limits lease (%s); it runs out in %gs",
                             exc, self.lease_seconds)
        await self.admissions.close()

    async def admit(self, limits: Limits, request_id: str, bound_cost: float, bound_tokens: int) -> Decision:
        """The store's decision; StoreUnavailable when the store cannot be reached, does not answer in
        time, or refuses the transaction (see unavailable(); any other error is a bug, raised as it is)."""
        try:
            decision = await self.admissions.admit(limits, request_id, self.holder, bound_cost, bound_tokens)
        except asyncio.CancelledError:
            # The request is gone; the store may still have admitted it: forget it there.
            self._forget(limits.key_id, request_id)
            raise
        except Exception as exc:
            # A statement cut off by its timeout may still commit after it: forget it there too.
            self._forget(limits.key_id, request_id)
            if not unavailable(exc):
                raise
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        self.holders = decision.holders
        return decision

    async def release(self, key_id: int, request_id: str, cost: Optional[float], tokens: Optional[int],
                      settled_by_ledger: bool, period: Optional[str] = None, start: Optional[str] = None) -> None:
        """The request ended: its slot is free and its reservation becomes `cost` and `tokens` (None: the
        cost, or the tokens, are unknown and the reservation stands for them)."""
        args = (key_id, request_id, cost, tokens, settled_by_ledger, period, start)
        try:
            if self._store_bounds_releases:
                await self.admissions.release(*args)
            else:
                async with asyncio.timeout(RELEASE_TIMEOUT):       # no task of its own, unlike wait_for
                    await self.admissions.release(*args)
        except asyncio.CancelledError:
            self._later(*args)
            raise
        except Exception as exc:  # noqa: BLE001 - kept and retried by the renewal loop
            self.log.warning("could not release request %s's admission (%s); retrying", request_id, exc)
            # Not run at all: made again as a first release (without a ledger, one settles the cost also
            # when the admission was collected meanwhile); else it may have committed: a retry.
            self._later(*args, first=isinstance(exc, ReleaseNotRun))

    def release_soon(self, *args) -> None:
        """release(*args) without waiting for it (a reservation without a concurrency slot)."""
        task = asyncio.get_running_loop().create_task(self.release(*args))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def drain(self) -> None:
        """Wait for the releases made with release_soon() so far."""
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    def _forget(self, key_id: int, request_id: str) -> None:
        """An admission the caller never got: released now, and again on every renewal for a lease's
        time, since a statement the store received may commit after the caller stopped waiting."""
        self._later(key_id, request_id, 0.0, 0, True)
        until = asyncio.get_running_loop().time() + self.lease_seconds
        self._forgotten.append((key_id, request_id, until))

    async def _release_forgotten(self) -> None:
        now = asyncio.get_running_loop().time()
        for key_id, request_id, _ in self._forgotten:
            # As a retry: it settles nothing either way, and a retry is never dropped for waiting on a lock.
            await self.admissions.release(key_id, request_id, 0.0, 0, True, retry=True)
        self._forgotten = [entry for entry in self._forgotten if entry[2] > now]

    def _later(self, *args, first: bool = False) -> None:
        """A release to make (again) from the renewal loop: as a retry (harmless: it finds nothing if an
        earlier try committed), or as a `first` release when no earlier try ran."""
        self._unreleased.append((args, first))
        self._wake.set()

    async def _renew(self) -> None:
        renewal = await self.admissions.renew_lease(self.holder, self.lease_seconds)
        self.holders = renewal.holders
        if self._leased and (renewal.left is None or renewal.left < 0):
            # Renewals did not happen in time (a stalled event loop, the store away): meanwhile this
            # process's slots and reservations did not count.  Taken again now, they count again.
            if renewal.left is None:
                self.log.warning("the limits lease of %s had run out and was deleted: the admissions it "
                                 "held were forgotten; taken again", self.holder)
            else:
                self.log.warning("the limits lease of %s had run out %.1fs ago: its admissions did not count "
                                 "meanwhile; renewed", self.holder, -renewal.left)
        self._leased = True

    async def _retry_releases(self) -> None:
        while self._unreleased:
            args, first = self._unreleased[0]
            await self.admissions.release(*args, retry=not first)
            self._unreleased.pop(0)

    async def _renew_loop(self) -> None:
        interval = self.lease_seconds / 3
        loop = asyncio.get_running_loop()
        due = loop.time() + interval
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, due - loop.time()))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if loop.time() >= due:
                    await self._renew()
                    due = loop.time() + interval
                    await self._release_forgotten()
                await self._retry_releases()
            except Exception as exc:  # noqa: BLE001 - retried next interval
                self.log.error("could not renew the limits lease (%s); retrying", exc)
                due = loop.time() + min(interval, 1.0)

    async def _tidy_loop(self, interval: float) -> None:
        """The store's upkeep of the admission tables (PostgreSQL: vacuum), off the request path."""
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), interval)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await self.admissions.tidy()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                self.log.warning("could not vacuum the admission tables (%s)", exc)
