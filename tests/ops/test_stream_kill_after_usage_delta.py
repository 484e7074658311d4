"""A gateway process stopped in the middle of a stream whose message_delta had already reported usage beyond
message_start's (revised input and cache counts, server-tool searches, output): after `kill -9` and a restart on
the same database and spool, or after SIGTERM whose deadline cut the stream, the request has exactly one row, and
it holds the usage the gateway had read.

docs/billing.md and README ("The ledger spool"): a worker that dies mid-stream has its interim row shipped by
whoever adopts its spool, "so the ledger and the key's quota count the input and the cache tokens reported so
far".  protocol notes section 3: message_delta usage is cumulative and may carry input and cache counts and
server_tool_use.  Real `apertis-proxy serve` processes, real SQLite files, a ScriptedChannel upstream."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from tests.ops.test_ledger_faults import ledger_holds, setup_store
from tests.support.gateway_process import GatewayProcess
from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, ScriptedChannel, chunk, event, message_start
from tests.support.scripted_gateway import ask

# Haiku 4.5: input $1, output $5, cache read $0.10 per million tokens; web searches $0.01 each.
REVISED = {"input_tokens": 4000, "cache_read_input_tokens": 1000, "output_tokens": 250,
           "server_tool_use": {"web_search_requests": 2}}
KNOWN_COST = (4000 * 1 + 250 * 5 + 1000 * 0.10) / 1e6 + 2 * 0.01


def _script(pause: float) -> list:
    delta = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                        "stop_sequence": None},
                                    "usage": REVISED})
    block = [event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
             event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": "searched"}}),
             event("content_block_stop", {"type": "content_block_stop", "index": 0})]
    return [HEAD_SSE, *(chunk(e) for e in [message_start(12), *block, delta]), pause, chunk(MESSAGE_STOP),
            b"0\r\n\r\n"]


async def read_until_event(port: int, key: str, name: bytes) -> tuple[RawConnection, str, bytes]:
    """A stream through the gateway, read until the event `name` arrived whole; (the open connection, the request
    id, what was read)."""
    conn = await RawConnection.open("127.0.0.1", port)
    await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key}, json_body=ask()))
    head = await conn.read_head()
    assert head.status == 200
    seen = b""
    async for piece in conn.iter_chunks(head):
        seen += piece
        if b"event: " + name in seen and seen.endswith(b"\n\n"):
            break
    return conn, head.header("request-id"), seen


async def _read_until_delta(port: int, key: str) -> tuple[RawConnection, str]:
    conn, request_id, seen = await read_until_event(port, key, b"message_delta")
    assert b"message_stop" not in seen
    return conn, request_id


async def adopted_rows(db: str, workdir, request_id: str) -> list[dict]:
    """The ledger rows of `request_id` once a gateway started again on the dead one's spool has shipped it."""
    again = await asyncio.to_thread(GatewayProcess.start, db, workdir)
    try:
        assert request_id in await ledger_holds(db, {request_id}, timeout=10.0)
        return await asyncio.to_thread(rows_of, db, request_id)
    finally:
        await asyncio.to_thread(again.kill)


def rows_of(db: str, request_id: str) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,))]
    finally:
        conn.close()


def known_usage(row: dict) -> tuple:
    return (row["input_tokens"], row["cache_read_input_tokens"], row["output_tokens"], row["web_search_requests"])


async def test_kill9_after_a_usage_revising_message_delta_keeps_the_usage_read_so_far(tmp_path):
    db = str(tmp_path / "gw.db")
    async with ScriptedChannel() as upstream:
        key = await asyncio.to_thread(setup_store, db, upstream)
        upstream.queue(_script(pause=30.0))
        first = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        try:
            conn, request_id = await _read_until_delta(first.port, key)
        finally:
            await asyncio.to_thread(first.kill)
        conn.abort()
        rows = await adopted_rows(db, tmp_path / "gw", request_id)
    assert len(rows) == 1
    [row] = rows
    assert row["interrupted"] == 1
    assert known_usage(row) == (4000, 1000, 250, 2), (
        f"metered input={row['input_tokens']} cache_read={row['cache_read_input_tokens']} "
        f"output={row['output_tokens']} searches={row['web_search_requests']} cost={row['cost']}")
    assert row["cost"] == pytest.approx(KNOWN_COST, abs=1e-12)


async def test_sigterm_cutting_a_stream_after_its_message_delta_meters_it_once(tmp_path):
    """Control: SIGTERM, the deadline (2 s) cuts the stream after its message_delta; the row, written by the
    stopping gateway, holds what was read, and a restart on the same spool adds no second row."""
    db = str(tmp_path / "gw.db")
    async with ScriptedChannel() as upstream:
        key = await asyncio.to_thread(setup_store, db, upstream)
        upstream.queue(_script(pause=30.0))
        first = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        try:
            conn, request_id = await _read_until_delta(first.port, key)
            await asyncio.to_thread(first.stop)
        finally:
            await asyncio.to_thread(first.kill)
        conn.abort()
        rows = await asyncio.to_thread(rows_of, db, request_id)
        again = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        try:
            await asyncio.sleep(1.0)        # adoption at start, a few shipments
            after = await asyncio.to_thread(rows_of, db, request_id)
        finally:
            await asyncio.to_thread(again.kill)
    assert len(rows) == 1 and len(after) == 1
    assert known_usage(after[0]) == (4000, 1000, 250, 2)
    assert after[0]["cost"] == pytest.approx(KNOWN_COST, abs=1e-12)
