"""GET /ready: whether this instance should be sent traffic.

Ready when the store answers, at least one channel is enabled and the server
is not draining.  `/health` stays the liveness probe: it says only that the
process serves HTTP.  The store is read in a thread (a locked database must
not stall the event loop) through a read-only connection, so a probe never
creates or changes the file.
"""
from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Optional

# A store that does not answer within this is not ready (SQLite waits this long on a lock).
STORE_TIMEOUT = 2.0


class StoreUnreachable(Exception):
    pass


class Readiness:
    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        # Set at the start of a graceful shutdown: a load balancer takes the
        # instance out of rotation while its connections still finish.
        self.draining = False

    def _read_channels(self) -> list[tuple[str, bool]]:
        uri = Path(self.db_path).absolute().as_uri() + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=STORE_TIMEOUT)
            try:
                rows = conn.execute("SELECT name, enabled FROM channels ORDER BY name").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreUnreachable(str(exc)) from None
        return [(name, bool(enabled)) for name, enabled in rows]

    async def channels(self) -> list[tuple[str, bool]]:
        """(name, enabled) of every channel in the store; StoreUnreachable if it does not answer."""
        return await asyncio.to_thread(self._read_channels)

    async def problem(self) -> Optional[str]:
        """Why this instance is not ready, or None when it is."""
        if self.draining:
            return "draining: the server is shutting down"
        try:
            channels = await self.channels()
        except StoreUnreachable as exc:
            return f"store unreachable: {exc}"
        if not any(enabled for _, enabled in channels):
            return "no channel is enabled"
        return None
