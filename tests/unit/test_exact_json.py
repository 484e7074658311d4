"""exact_json.dumps: a parsed body serialized again keeps integers beyond 64 bits as the original bytes wrote them,
also where the gateway changed the body, and costs nothing more when there are none."""
from __future__ import annotations

import json

import orjson

from apertis_proxy.gateway import exact_json

BIG = 123456789012345678901234567890


def test_big_integers_come_back_where_they_were_also_in_a_changed_body():
    raw = json.dumps({"model": "alias", "a": [1, BIG, {"b": -BIG}], "n": 2 ** 64, "m": -(2 ** 63) - 1}).encode()
    body = orjson.loads(raw)
    body["model"] = "claude-x"          # the gateway's own change stays
    body["added"] = 1.5
    assert json.loads(exact_json.dumps(body, raw)) == {
        "model": "claude-x", "a": [1, BIG, {"b": -BIG}], "n": 2 ** 64, "m": -(2 ** 63) - 1, "added": 1.5}


def test_a_part_the_gateway_rebuilt_keeps_what_the_gateway_put_there():
    raw = json.dumps({"a": [BIG, 2], "b": BIG}).encode()
    body = orjson.loads(raw)
    body["a"] = [3.5e30]                # another length: not the client's list any more
    assert json.loads(exact_json.dumps(body, raw)) == {"a": [3.5e30], "b": BIG}


def test_floats_and_text_with_an_exponent_are_unchanged():
    raw = b'{"f":1e30,"g":2.5E+40,"t":"one+two e+ see+","i":18446744073709551615}'
    body = orjson.loads(raw)
    assert exact_json.dumps(body, raw) == orjson.dumps(body)
    assert json.loads(exact_json.dumps(body, raw))["i"] == 2 ** 64 - 1


def test_a_body_without_an_exponent_is_orjsons_own_output():
    raw = b'{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}'
    body = orjson.loads(raw)
    assert exact_json.dumps(body, raw) == orjson.dumps(body)
