"""Integers orjson cannot hold reach the upstream as written also when the gateway sends the request to another
model than the one named (a retired model's alias goes to its successor, model_policy.py), and when the integer is
a negative one just below the signed 64-bit range."""
from __future__ import annotations

import json

import anthropic

BIG = 123456789012345678901234567890
LOW = -(2 ** 63) - 1


def messages(number: int) -> list:
    return [
        {"role": "user", "content": "Send it."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "transfer",
                                           "input": {"account": number}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "done"}]},
    ]


TOOL = {"name": "transfer", "description": "Move money.",
        "input_schema": {"type": "object", "properties": {"account": {"type": "integer"}}}}


async def test_a_big_integer_survives_a_retired_models_redirect(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        raw = await client.messages.with_raw_response.create(model="claude-sonnet-4.5", max_tokens=64,
                                                             tools=[TOOL], messages=messages(BIG))
    assert "-> claude-sonnet-5-5" in raw.headers["apertis-model-redirected"]
    sent = json.loads(gateway.mock.last_request.raw_body)
    assert sent["model"] == "claude-sonnet-5-5"
    assert sent["messages"][1]["content"][0]["input"] == {"account": BIG}


async def test_an_integer_just_below_int64_reaches_upstream_as_written(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        await client.messages.create(model="claude-haiku-4-5-20251001", max_tokens=64, tools=[TOOL],
                                     messages=messages(LOW))
    sent = json.loads(gateway.mock.last_request.raw_body)
    assert sent["messages"][1]["content"][0]["input"] == {"account": LOW}
