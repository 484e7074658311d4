"""The model that answered is the one recorded and billed, when the upstream's answer names another model than the
one the gateway sent.

Anthropic's own examples of that: a Claude Fable 5 request declined by its safety classifier and served by Claude
Opus 4.8 (`fallbacks`), whose answer says `"model": "claude-opus-4-8"` and is billed at Opus 4.8's rates; the ledger's
`upstream_model` column is documented as "the model that answered".  The channel here is a ScriptedChannel, so the
answer is written byte for byte (a JSON body, then a stream whose message_start names the model).

Fable 5 lists at 10 / 50 USD per million tokens, Opus 4.8 at 5 / 25 (anthropic-protocol.md section 9).  The usage:
1,000 input and 100 output tokens: at Opus 4.8 (1000*5 + 100*25)/1e6 = 0.0075; at Fable 5 (10000 + 5000)/1e6 = 0.015.
"""
from __future__ import annotations

import json
from decimal import Decimal

from tests.support.gateway_requests import post
from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, chunk, event, json_response, text_events

ASKED = "claude-fable-5"
ANSWERED = "claude-opus-4-8"
USAGE = {"input_tokens": 1_000, "output_tokens": 100, "cache_read_input_tokens": 0,
         "cache_creation_input_tokens": 0}
AT_ANSWERING_MODEL = Decimal("0.0075")


def body(stream: bool) -> dict:
    return {"model": ASKED, "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": "explain base64"}]}


def charged(row: dict) -> Decimal:
    return Decimal(json.loads(row["prices"])["cost"])


async def test_json_answer_from_another_model_is_billed_at_the_answering_model(scripted):
    await scripted.start()
    answer = {"id": "msg_fb", "type": "message", "role": "assistant", "model": ANSWERED,
              "content": [{"type": "text", "text": "Base64 maps 3 bytes to 4 characters."}],
              "stop_reason": "end_turn", "stop_sequence": None, "usage": USAGE}
    scripted.channel.queue([json_response(200, answer)])
    response = await post(scripted, scripted.key, body(False))
    assert response.status == 200 and response.json()["model"] == ANSWERED
    [row] = await scripted.usage_rows(1)
    assert (row["upstream_model"], charged(row)) == (ANSWERED, AT_ANSWERING_MODEL), (
        f"the answer says model {ANSWERED}; the row records upstream_model={row['upstream_model']!r} and bills "
        f"${charged(row)} (at {json.loads(row['prices'])['model']}'s rates), not ${AT_ANSWERING_MODEL}")


async def test_stream_from_another_model_is_billed_at_the_answering_model(scripted):
    await scripted.start()
    start = event("message_start", {"type": "message_start", "message": {
        "id": "msg_fb", "type": "message", "role": "assistant", "model": ANSWERED, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {**USAGE, "output_tokens": 1}}})
    events = [start, *text_events("Base64 maps 3 bytes to 4 characters.", output_tokens=100), MESSAGE_STOP]
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in events), b"0\r\n\r\n"])
    response = await post(scripted, scripted.key, body(True))
    assert response.status == 200
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["output_tokens"]) == (1_000, 100)
    assert (row["upstream_model"], charged(row)) == (ANSWERED, AT_ANSWERING_MODEL), (
        f"message_start says model {ANSWERED}; the row records upstream_model={row['upstream_model']!r} and "
        f"bills ${charged(row)} (at {json.loads(row['prices'])['model']}'s rates), not ${AT_ANSWERING_MODEL}")
