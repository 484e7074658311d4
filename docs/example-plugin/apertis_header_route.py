"""Example router plugin for apertis-proxy.

A request carrying ``x-apertis-channel: NAME`` goes to the enabled channel of
that name and nowhere else (no failover); a request without the header is left
to the next router of the chain (``return None``).

    [plugins]
    router = ["header-route", "channels"]

    [plugins.options.header-route]
    header = "x-apertis-channel"     # the default

The channels come from the gateway's store (``ctx.store``): its change watcher
holds one configuration snapshot shared by the core and every plugin, and calls
back when an operator's edit produced a new one.  No SQL, no polling here.
"""
from __future__ import annotations

from typing import Optional, Sequence

from apertis_proxy.plugin_api import Caller, Channel, PluginContext, Reject, RequestInfo
from apertis_proxy.store.config import ConfigSnapshot

DEFAULT_HEADER = "x-apertis-channel"


class HeaderRoute:
    def __init__(self, ctx: PluginContext) -> None:
        self.store = ctx.store
        self.header = str(ctx.options.get("header", DEFAULT_HEADER)).lower()
        self.channels: dict[str, Channel] = {}

    async def start(self) -> None:
        # Called now with the current snapshot, then on every change.
        self.store.watcher().subscribe(self.reload)

    async def close(self) -> None:
        self.store.watcher().unsubscribe(self.reload)

    def reload(self, snapshot: ConfigSnapshot) -> None:
        self.channels = {channel.name: channel for channel in snapshot.channels}

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
