"""The `owned_state` table: which key owns an upstream id, and on which account it lives.

Writes go out in the background (the answer that created the id is not held
back for them) and are kept in memory first, so the next request of the same
conversation finds them at once in this process; other worker processes find
them in the database.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import aiosqlite

log = logging.getLogger("apertis_proxy.store.owned_state")

_RECENT_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Owned:
    owner: str
    account: str


class OwnedState:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._recent: collections.OrderedDict[tuple[str, str], Owned] = collections.OrderedDict()
        self._writes: set[asyncio.Task] = set()

    async def find(self, refs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Owned]:
        """The recorded entries among `refs` ((kind, id) pairs); unknown ones are left out."""
        found: dict[tuple[str, str], Owned] = {}
        missing = []
        for ref in refs:
            hit = self._recent.get(ref)
            if hit is not None:
                found[ref] = hit
            else:
                missing.append(ref)
        for kind, ident in missing:
            async with self._conn.execute("SELECT owner, account FROM owned_state WHERE kind = ? AND id = ?",
                                          (kind, ident)) as cur:
                row = await cur.fetchone()
            if row is not None:
                found[(kind, ident)] = Owned(row[0], row[1])
        return found

    def remember(self, kind: str, ident: str, owner: str, account: str, channel_id: Optional[int]) -> None:
        """Record an id as it is created; the first owner stays."""
        ref = (kind, ident)
        if ref in self._recent:
            return
        self._recent[ref] = Owned(owner, account)
        while len(self._recent) > _RECENT_MAX:
            self._recent.popitem(last=False)
        task = asyncio.get_running_loop().create_task(self._write(kind, ident, owner, account, channel_id))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def forget(self, kind: str, ident: str) -> None:
        self._recent.pop((kind, ident), None)
        task = asyncio.get_running_loop().create_task(self._delete(kind, ident))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def owned_by(self, kind: str, owner: str) -> list[tuple[str, str]]:
        """(id, account) of every `kind` the owner has, newest first (for lists)."""
        await self.settle()
        async with self._conn.execute(
                "SELECT id, account FROM owned_state WHERE owner = ? AND kind = ? ORDER BY created_at DESC, id",
                (owner, kind)) as cur:
            return [(row[0], row[1]) for row in await cur.fetchall()]

    async def settle_once(self, kind: str, ident: str) -> bool:
        """True exactly once per id, across processes: for billing a batch's results once."""
        await self.settle()
        async with self._conn.execute(
                "UPDATE owned_state SET settled_at = ? WHERE kind = ? AND id = ? AND settled_at IS NULL",
                (time.time(), kind, ident)) as cur:
            return cur.rowcount == 1

    async def settle(self) -> None:
        """Wait for the writes in flight (before shutdown, or before reading lists)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def _write(self, kind: str, ident: str, owner: str, account: str, channel_id: Optional[int]) -> None:
        try:
            await self._conn.execute(
                "INSERT OR IGNORE INTO owned_state (kind, id, owner, account, channel_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)", (kind, ident, owner, account, channel_id, time.time()))
        except Exception:
            log.exception("could not record the owner of %s %s", kind, ident)

    async def _delete(self, kind: str, ident: str) -> None:
        try:
            await self._conn.execute("DELETE FROM owned_state WHERE kind = ? AND id = ?", (kind, ident))
        except Exception:
            log.exception("could not forget %s %s", kind, ident)
