"""A gateway process killed with -9 after a stream's final message_delta and its message_stop came in one read,
while the upstream's body had not ended yet (its last chunk still to come): the message is whole, the client has
read it, and the row the spool's adopter writes should hold the usage that delta reported.

The meters' checkpoint follows a message_delta "unless the stream ended in the same read" (sse.py): message_stop
is not the body's end, and until the body ends (the relay waits up to 5 s after message_stop for it) the only
interim line is message_start's.  Real `apertis-proxy serve` processes, real SQLite files, a ScriptedChannel."""
from __future__ import annotations

import asyncio

import pytest

from tests.ops.test_ledger_faults import setup_store
from tests.ops.test_stream_kill_after_usage_delta import (KNOWN_COST, REVISED, adopted_rows, known_usage,
                                                          read_until_event)
from tests.support.gateway_process import GatewayProcess
from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, ScriptedChannel, chunk, event, message_start


def _script() -> list:
    delta = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                        "stop_sequence": None},
                                    "usage": REVISED})
    block = [event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
             event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": "searched"}}),
             event("content_block_stop", {"type": "content_block_stop", "index": 0})]
    # The delta and message_stop in one chunk (one read), the body's last chunk 30 s later.
    return [HEAD_SSE, *(chunk(e) for e in [message_start(12), *block]), chunk(delta + MESSAGE_STOP), 30.0,
            b"0\r\n\r\n"]


async def test_kill9_after_delta_and_message_stop_in_one_read_keeps_the_delta_usage(tmp_path):
    db = str(tmp_path / "gw.db")
    async with ScriptedChannel() as upstream:
        key = await asyncio.to_thread(setup_store, db, upstream)
        upstream.queue(_script())
        first = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        try:
            conn, request_id, _ = await read_until_event(first.port, key, b"message_stop")
        finally:
            await asyncio.to_thread(first.kill)
        conn.abort()
        rows = await adopted_rows(db, tmp_path / "gw", request_id)
    assert len(rows) == 1
    [row] = rows
    assert known_usage(row) == (4000, 1000, 250, 2), (
        f"the client read the whole message (delta: input 4000, cache read 1000, output 250, 2 searches); the "
        f"row metered input={row['input_tokens']} cache_read={row['cache_read_input_tokens']} "
        f"output={row['output_tokens']} searches={row['web_search_requests']} cost={row['cost']}")
    assert row["cost"] == pytest.approx(KNOWN_COST, abs=1e-12)
