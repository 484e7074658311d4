"""An OpenAI-style `response_format` is carried over to `output_config.format` (contract.py): the schema it holds
moves, and a bound in it written as an integer beyond 64 bits must still reach the upstream as that integer."""
from __future__ import annotations

import json

from tests.support.gateway_requests import message, post

BIG = 10 ** 30
SCHEMA = {"type": "object", "properties": {"account": {"type": "integer", "maximum": BIG}}}


async def test_a_big_integer_in_a_translated_response_format_reaches_upstream(gateway):
    body = message(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
                   metadata={"user_id": "u"}, stop_sequences=["END"])
    body["tools"] = [{"name": "t", "description": "d", "input_schema": SCHEMA}]
    response = await post(gateway, gateway.key, body)
    assert response.status == 200, response.body
    sent = json.loads(gateway.mock.last_request.raw_body)
    assert "response_format" not in sent
    assert sent["tools"][0]["input_schema"]["properties"]["account"]["maximum"] == BIG
    assert sent["output_config"]["format"]["schema"]["properties"]["account"]["maximum"] == BIG
