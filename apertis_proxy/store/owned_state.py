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

log = logging.getLogger("apertis_proxy.store.owned_state")

_RECENT_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Owned:
    owner: str
    account: str


def find_one(conn, kind: str, ident: str) -> Optional[Owned]:
    row = conn.execute("SELECT owner, account FROM owned_state WHERE kind = ? AND id = ?",
                       (kind, ident)).fetchone()
    return Owned(row[0], row[1]) if row is not None else None


def list_owned(conn, kind: str, owner: str) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in conn.execute(
        "SELECT id, account FROM owned_state WHERE owner = ? AND kind = ? ORDER BY created_at DESC, id",
        (owner, kind))]


def mark_settled(conn, kind: str, ident: str, at: float) -> bool:
    cur = conn.execute("UPDATE owned_state SET settled_at = ? WHERE kind = ? AND id = ? AND settled_at IS NULL",
                       (at, kind, ident))
    return cur.rowcount == 1


def insert_owned(conn, kind: str, ident: str, owner: str, account: str, channel_id: Optional[int],
                 at: float) -> None:
    conn.execute("INSERT OR IGNORE INTO owned_state (kind, id, owner, account, channel_id, created_at)"
                 " VALUES (?, ?, ?, ?, ?, ?)", (kind, ident, owner, account, channel_id, at))


def delete_owned(conn, kind: str, ident: str) -> None:
    conn.execute("DELETE FROM owned_state WHERE kind = ? AND id = ?", (kind, ident))


class OwnedState:
    def __init__(self, store) -> None:
        self._store = store
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
            hit = await self._store.call(find_one, kind, ident)
            if hit is not None:
                found[(kind, ident)] = hit
        return found

    def remember(self, kind: str, ident: str, owner: str, account: str,
                 channel_id: Optional[int]) -> Optional[asyncio.Task]:
        """Record an id as it is created; the first owner stays.  Returns the write (None: known already), for a
        caller that must have it durable before the answer ends."""
        ref = (kind, ident)
        if ref in self._recent:
            return None
        self._recent[ref] = Owned(owner, account)
        while len(self._recent) > _RECENT_MAX:
            self._recent.popitem(last=False)
        task = asyncio.get_running_loop().create_task(self._write(kind, ident, owner, account, channel_id))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    def forget(self, kind: str, ident: str) -> None:
        self._recent.pop((kind, ident), None)
        task = asyncio.get_running_loop().create_task(self._delete(kind, ident))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def owned_by(self, kind: str, owner: str) -> list[tuple[str, str]]:
        """(id, account) of every `kind` the owner has, newest first (for lists)."""
        await self.settle()
        return await self._store.call(list_owned, kind, owner)

    async def settle_once(self, kind: str, ident: str) -> bool:
        """True exactly once per id, across processes: for billing a batch's results once."""
        await self.settle()
        return await self._store.call(mark_settled, kind, ident, time.time())

    async def settle(self) -> None:
        """Wait for the writes in flight (before shutdown, or before reading lists)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def _write(self, kind: str, ident: str, owner: str, account: str, channel_id: Optional[int]) -> None:
        try:
            await self._store.call(insert_owned, kind, ident, owner, account, channel_id, time.time())
        except Exception:
            log.exception("could not record the owner of %s %s", kind, ident)

    async def _delete(self, kind: str, ident: str) -> None:
        try:
            await self._store.call(delete_owned, kind, ident)
        except Exception:
            log.exception("could not forget %s %s", kind, ident)
