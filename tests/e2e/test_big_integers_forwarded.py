"""Integers beyond 64 bits are valid JSON and reach the API as written: a tool call's input in the conversation
(an account number, a calculator's result, an id written as a number) or a bound in a tool's input schema. The
gateway parses and re-serializes every body (docs/request-contract.md, "forwarded unchanged in content"), so the
number the upstream reads must still be that integer, not a rounded float."""
from __future__ import annotations

import json

import anthropic

HAIKU = "claude-haiku-4-5-20251001"
BIG = 123456789012345678901234567890
TOOL = {"name": "transfer", "description": "Move money between accounts.",
        "input_schema": {"type": "object", "properties": {"account": {"type": "integer", "maximum": 10 ** 30}},
                         "required": ["account"]}}
MESSAGES = [
    {"role": "user", "content": f"Send it to account {BIG}."},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "transfer",
                                       "input": {"account": BIG}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "done"}]},
]


async def test_an_integer_beyond_64_bits_reaches_upstream_as_the_same_integer(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        reply = await client.messages.create(model=HAIKU, max_tokens=64, tools=[TOOL], messages=MESSAGES)
    assert reply.content
    sent = json.loads(gateway.mock.last_request.raw_body)
    assert sent["messages"][1]["content"][0]["input"] == {"account": BIG}
    assert sent["tools"][0]["input_schema"]["properties"]["account"]["maximum"] == 10 ** 30
