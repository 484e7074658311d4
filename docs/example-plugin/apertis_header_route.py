"""Example router plugin for apertis-proxy.

A request carrying ``x-apertis-channel: NAME`` goes to the enabled channel of
that name and nowhere else (no failover); a request without the header is left
to the next router of the chain (``return None``).

    [plugins]
    router = ["header-route", "channels"]

    [plugins.options.header-route]
    header = "x-apertis-channel"     # the default
    poll_interval = 1.0              # seconds between checks for CLI edits
"""
from __future__ import annotations

import asyncio
from typing import Optional, Sequence

import aiosqlite

from apertis_proxy.plugin_api import Caller, Channel, PluginContext, Reject, RequestInfo
from apertis_proxy.store.catalog import read_catalog
from apertis_proxy.store.channels import CHANNEL_COLUMNS, row_to_channel

DEFAULT_HEADER = "x-apertis-channel"


class HeaderRoute:
    def __init__(self, ctx: PluginContext) -> None:
        self.db_path = ctx.db_path
        self.log = ctx.log
        self.header = str(ctx.options.get("header", DEFAULT_HEADER)).lower()
        self.poll_interval = float(ctx.options.get("poll_interval", 1.0))
        self.channels: dict[str, Channel] = {}
        self._rev: Optional[int] = None
        self._conn: Optional[aiosqlite.Connection] = None
        self._poller: Optional[asyncio.Task] = None

    async def start(self) -> None:
        self._conn = await aiosqlite.connect(self.db_path, timeout=10.0)
        self._conn.row_factory = aiosqlite.Row
        await self.reload_if_changed()
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()       # it only reads: safe to stop anywhere
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.reload_if_changed()
            except Exception:
                self.log.exception("reading channels failed; retrying")

    async def reload_if_changed(self) -> None:
        # Every CLI edit of keys, channels or models bumps config_rev.
        (rev,), = await self._conn.execute_fetchall("SELECT rev FROM config_rev")
        if rev == self._rev:
            return
        catalog = await read_catalog(self._conn)
        rows = await self._conn.execute_fetchall(
            f"SELECT {CHANNEL_COLUMNS} FROM channels WHERE enabled = 1")
        self.channels = {row["name"]: row_to_channel(row, catalog.aliases) for row in rows}
        self._rev = rev

    async def route(self, request: RequestInfo, caller: Caller) -> Optional[Sequence[Channel]]:
        name = request.headers.get(self.header, "").strip()
        if not name:
            return None                 # not ours: the next router decides
        channel = self.channels.get(name)
        if channel is None:
            raise Reject(400, "invalid_request_error",
                         f"{self.header}: no enabled channel is named '{name}'")
        model = request.model
        if model is not None:
            if not channel.serves(model):
                raise Reject(400, "invalid_request_error",
                             f"{self.header}: channel '{name}' does not serve model '{model}'")
            if not caller.may_use(channel.upstream_model(model), (model,)):
                raise Reject(403, "permission_error",
                             f"this API key may not use model '{model}'")
        return [channel]
