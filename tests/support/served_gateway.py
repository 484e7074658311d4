"""A served gateway with its store prepared (one channel to the mock, one key), its ledger read back, and a stream
watched through the SDK while the server drains."""
from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Optional

import anthropic

from apertis_proxy.store import channels, keys, service

from .mock_upstream import MOCK_API_KEY
from .processes import MODEL, ServeProcess, sdk_client


LONG_TEXT = "please keep streaming while the gateway drains its connections one by one"
DRAIN_TIMEOUT = 10.0


def prepare_db(db: str, upstream_url: str) -> str:
    """A store (a SQLite path or a PostgreSQL URL) with one channel to the mock and one key; returns the key."""
    conn = service.connect(db)
    try:
        channels.add_channel(conn, "main", upstream_url, MOCK_API_KEY)
        return keys.create_key(conn, "alice")[1]
    finally:
        conn.close()


def configured_server(tmp_path: Path, upstream_url: str, config: str, *args: str) -> tuple[ServeProcess, str, str]:
    """(an unstarted ServeProcess with `config` as its TOML file, its store, the key): the store has one channel
    to `upstream_url` and one key."""
    db = str(tmp_path / "gateway.db")
    key = prepare_db(db, upstream_url)
    path = tmp_path / "apertis.toml"
    path.write_text(config)
    return ServeProcess(tmp_path, db, "--config", str(path), *args), db, key


def usage_rows(db: str) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
    finally:
        conn.close()


class StreamWatcher:
    """Streams one reply through the SDK in a task; records every event and how it ended."""

    def __init__(self, base_url: str, key: str, scenario: str, text: str = LONG_TEXT) -> None:
        self.events: list[str] = []
        self.pieces: list[str] = []
        self.final: Optional[anthropic.types.Message] = None
        self.error: Optional[BaseException] = None
        self.first_event = asyncio.Event()
        self.task = asyncio.create_task(self._run(base_url, key, scenario, text))

    async def _run(self, base_url: str, key: str, scenario: str, text: str) -> None:
        try:
            async with sdk_client(base_url, key) as client:
                async with client.messages.stream(
                        model=MODEL, max_tokens=256, messages=[{"role": "user", "content": text}],
                        extra_headers={"x-mock-scenario": scenario}) as stream:
                    async for event in stream:
                        self.events.append(event.type)
                        self.first_event.set()
                        if event.type == "text":
                            self.pieces.append(event.text)
                    self.final = await stream.get_final_message()
        except Exception as exc:     # a cut stream surfaces as a transport or API error
            self.error = exc
        finally:
            self.first_event.set()

    async def started(self) -> None:
        await asyncio.wait_for(self.first_event.wait(), DRAIN_TIMEOUT)
        assert self.events, f"the stream failed before its first event: {self.error!r}"

    async def finished(self) -> None:
        await asyncio.wait_for(self.task, DRAIN_TIMEOUT)
