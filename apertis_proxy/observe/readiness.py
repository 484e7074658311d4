"""GET /ready: whether this instance should be sent traffic.

Ready when the store answers, at least one channel is enabled (and loaded by this
instance's router, when it tells which it holds), new requests
are not refused (a meter that cannot take rows: the ledger spool full) and
the server is not draining.  `/health` stays the liveness probe: it says only that the
process serves HTTP.  The store is read in a thread (a locked database must
not stall the event loop) by the store's own thread, with a time limit.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

# A store that does not answer within this is not ready (SQLite waits this long on a lock).
STORE_TIMEOUT = 2.0
DRAINING = "draining: the server is shutting down"


class StoreUnreachable(Exception):
    pass


class Readiness:
    def __init__(self, store: Any, refusal: Callable[[], Optional[tuple[str, int]]] = lambda: None,
                 loaded: Callable[[], Optional[set[str]]] = lambda: None) -> None:
        self.store = store
        self.refusal = refusal      # PluginHost.refusal: why new requests get 503 now
        # The channels this instance's router holds (None: no router tells): an enabled channel it could not
        # load (its key sealed with a secret key this host lacks) serves nothing here.
        self.loaded = loaded
        # Set at the start of a graceful shutdown: a load balancer takes the
        # instance out of rotation while its connections still finish.
        self.draining = False

    async def channels(self) -> list[tuple[str, bool]]:
        """(name, enabled) of every channel in the store; StoreUnreachable if it does not answer."""
        try:
            return await asyncio.wait_for(self.store.channel_states(), STORE_TIMEOUT)
        except Exception as exc:    # noqa: BLE001 - any failure of the store means "not ready"
            raise StoreUnreachable(self.store.url.scrub(str(exc)) or type(exc).__name__) from None

    async def problem(self) -> Optional[str]:
        """Why this instance is not ready, or None when it is."""
        if self.draining:
            return DRAINING
        refused = self.refusal()
        if refused is not None:
            return f"refusing new requests: {refused[0]}"
        try:
            channels = await self.channels()
        except StoreUnreachable as exc:
            return f"store unreachable: {exc}"
        if self.draining:       # the shutdown began while the store was asked
            return DRAINING
        enabled = [name for name, on in channels if on]
        if not enabled:
            return "no channel is enabled"
        loaded = self.loaded()
        if loaded is not None and not loaded.intersection(enabled):
            return ("no enabled channel can be used by this instance (its router left them out: see the log, "
                    "e.g. an upstream key sealed with a secret key this host does not have)")
        return None
