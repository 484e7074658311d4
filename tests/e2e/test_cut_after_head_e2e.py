"""An upstream that answered 2xx and then failed before reporting any usage: the request is metered with its cost
unknown (NULL, UsageRecord.usage_unknown), whether the body was cut by the upstream closing the connection or given
up at `read_timeout`; the upstream said it accepted the request and may bill it.  A stream cut after message_start
keeps the input that message_start reported.

A real gateway (in process, real sockets, the SQLite ledger) and a ScriptedChannel writing exact bytes."""
from __future__ import annotations

import json

import pytest

from tests.support.scripted_channel import CLOSE, HANG, HEAD_SSE, chunk, message_start
from tests.support.scripted_gateway import ask, post

BODY = json.dumps({"id": "msg_cut", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001",
                   "content": [{"type": "text", "text": "cut " * 200}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": {"input_tokens": 30, "output_tokens": 400}}).encode()
JSON_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_scripted\r\n"
             b"content-length: %d\r\n\r\n" % len(BODY))


@pytest.mark.parametrize("ending", ["close", "timeout"])
async def test_a_json_answer_cut_after_its_head_has_an_unknown_cost(scripted, ending):
    """The head and the first 100 bytes of a JSON answer, then the connection closes (or goes quiet until
    read_timeout, the control, which passes)."""
    await scripted.start(read_timeout=1.0)
    scripted.channel.queue([JSON_HEAD, BODY[:100], CLOSE if ending == "close" else HANG])
    response = await post(scripted, ask(stream=False))
    assert response.status in (502, 504)
    [row] = await scripted.usage_rows(1)
    assert row["cost"] is None, f"{ending}: status={row['status']} error_type={row['error_type']} cost={row['cost']}"


@pytest.mark.parametrize("ending", ["close", "timeout"])
async def test_a_stream_cut_after_its_head_before_message_start_has_an_unknown_cost(scripted, ending):
    """A 200 event-stream head (and a ping), then the connection closes before message_start (or goes quiet until
    read_timeout, the control, which passes)."""
    await scripted.start(read_timeout=1.0)
    ping = b"event: ping\ndata: {\"type\": \"ping\"}\n\n"
    scripted.channel.queue([HEAD_SSE, chunk(ping), CLOSE if ending == "close" else HANG])
    response = await post(scripted, ask())
    assert response.status == 200
    [row] = await scripted.usage_rows(1)
    assert row["cost"] is None, f"{ending}: status={row['status']} error_type={row['error_type']} cost={row['cost']}"


async def test_a_stream_cut_after_message_start_keeps_its_reported_input(scripted):
    """Control (passes): cut after message_start, the reported input is metered."""
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, chunk(message_start(input_tokens=12)), CLOSE])
    response = await post(scripted, ask())
    assert response.status == 200
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["error_type"]) == (12, "api_error")
