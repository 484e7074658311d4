"""A real gateway for e2e tests: a SQLite store in tmp_path, keys, channels, and
`apertis_proxy.server.Gateway` listening on 127.0.0.1:0 in the test's event loop.

    env = GatewayEnv(tmp_db)
    env.add_channel("main", mock)                # a MockUpstream or a base URL
    key = env.add_key("alice", rpm=10)
    gw = await env.start()                       # env.base_url
    ...
    rows = await env.usage_rows(n=1)             # waits for the meter's batch to land
    await env.stop()

Plugins poll the store every 0.1 s and the meter flushes every 20 ms here, so
CLI-style edits and usage rows show up quickly in tests.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from typing import Any, Optional

from apertis_proxy.server import Gateway
from apertis_proxy.settings import Settings
from apertis_proxy.store import channels, dbfile, keys, schema
from .mock_upstream import MOCK_API_KEY


# Settings overrides for tests that send one channel failure after another: a resting channel would
# refuse the next request with 503 instead of trying it.
NO_COOLDOWNS = {"plugin_options": {"channels": {
    "cooldown_rate_limited": 0, "cooldown_overloaded": 0, "cooldown_server_error": 0, "cooldown_connect_error": 0}}}


def migrated_store(path: str) -> None:
    """A store at `path`, made as schema.connect makes it, to copy from (new_store)."""
    schema.connect(path).close()        # the last connection's close folds the WAL into the file


def new_store(path: str, template: str) -> None:
    """A new store at `path`: a private file (as schema.connect creates it) holding a copy of `template`.
    Migrating a new file (the schema, the shipped catalogue) takes some 30 ms, a copy under 1 ms."""
    dbfile.create_private(path)
    shutil.copyfile(template, path)


class GatewayEnv:
    def __init__(self, db_path: str, template: Optional[str] = None) -> None:
        """`template`: a store made by migrated_store, copied to `db_path` when it is not there yet."""
        self.db_path = db_path
        if template is not None and not os.path.exists(db_path):
            new_store(db_path, template)
        self.conn = schema.connect(db_path)
        self.gateway: Optional[Gateway] = None

    def add_key(self, name: str = "alice", **kw: Any) -> str:
        _, plain = keys.create_key(self.conn, name, **kw)
        return plain

    def add_channel(self, name: str, upstream: Any, *, api_key: str = MOCK_API_KEY, **kw: Any) -> int:
        base_url = upstream if isinstance(upstream, str) else upstream.base_url
        return channels.add_channel(self.conn, name, base_url, api_key, **kw)

    def settings(self, **overrides: Any) -> Settings:
        options = {
            "keys": {"poll_interval": 0.1},
            "channels": {"poll_interval": 0.1},
            "sqlite": {"flush_interval": 0.02},
        }
        for name, opts in overrides.pop("plugin_options", {}).items():
            options.setdefault(name, {}).update(opts)
        base = Settings(host="127.0.0.1", port=0, db=self.db_path, config_poll_interval=0.1,
                        shutdown_timeout=5.0, plugin_options=options)
        return base.replace(**overrides)

    async def start(self, **overrides: Any) -> Gateway:
        gateway = Gateway(self.settings(**overrides))
        await gateway.start()       # one that fails has let go of what it started: nothing for stop() to do
        self.gateway = gateway
        return gateway

    @property
    def base_url(self) -> str:
        assert self.gateway is not None
        return self.gateway.base_url

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.shutdown(timeout=5.0)
            self.gateway = None

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall()

    async def usage_rows(self, n: int = 1, timeout: float = 5.0) -> list[dict]:
        """All usage rows, once at least n are there (the meter writes in batches)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            rows = [dict(r) for r in self.query("SELECT * FROM usage ORDER BY id")]
            if len(rows) >= n or loop.time() > deadline:
                return rows
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self.conn.close()
