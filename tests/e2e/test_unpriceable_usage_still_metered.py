"""Usage the pricing cannot make sense of never costs the request its ledger row: the answer went to the client,
the upstream billed it, so the row is written (its cost unknown, NULL) whatever pricing raised.

MessagesForwarder.handle prices the record and hands it to the meters in its `finally`; an exception out of
pricing there skips the meters.  Here the upstream's `usage.iterations[]` holds an entry whose `type` is not a
string (a relay's or a future API's shape): the request is still metered once.  A real gateway (in process, real
sockets, the SQLite ledger), a ScriptedChannel."""
from __future__ import annotations

import pytest

from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, chunk, event, json_response, message_start
from tests.support.scripted_gateway import ask, post

MODEL = "claude-haiku-4-5-20251001"
ODD_USAGE = {"input_tokens": 11, "output_tokens": 4,
             "iterations": [{"type": ["compaction"], "input_tokens": 5, "output_tokens": 1}]}


def _json() -> list:
    body = {"id": "msg_odd", "type": "message", "role": "assistant", "model": MODEL,
            "content": [{"type": "text", "text": "x"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": ODD_USAGE}
    return [json_response(200, body)]


def _stream() -> list:
    final = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                        "stop_sequence": None},
                                    "usage": ODD_USAGE})
    return [HEAD_SSE, *(chunk(e) for e in (message_start(11), final, MESSAGE_STOP)), b"0\r\n\r\n"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_an_answer_whose_usage_pricing_chokes_on_still_gets_its_row(scripted, stream):
    await scripted.start()
    scripted.channel.queue(_stream() if stream else _json())
    response = await post(scripted, ask(stream))
    assert response.status == 200
    rows = await scripted.usage_rows(1, timeout=3.0)
    assert len(rows) == 1, "the request the client got an answer to has no ledger row"
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (11, 4)
