"""exact_json.dumps: an integer just below the signed 64-bit range (-2**63 - 1 down to about -1e19) is also one
orjson reads as a float; orjson prints it with the exponent 18 (-9.223372036854776e+18), so the number that goes
on must still be the integer the client wrote, as for the positive ones past 2**64."""
from __future__ import annotations

import json

import orjson
import pytest

from apertis_proxy.gateway import exact_json


@pytest.mark.parametrize("number", [-(2 ** 63) - 1, -9300000000000000001, -9999999999999999000])
def test_an_integer_just_below_int64_comes_back_as_written(number):
    raw = json.dumps({"model": "m", "input": {"n": number}}).encode()
    body = orjson.loads(raw)
    assert json.loads(exact_json.dumps(body, raw))["input"]["n"] == number


def test_a_negative_integer_past_minus_1e19_comes_back_as_written():
    number = -(10 ** 20) - 1
    raw = json.dumps({"model": "m", "input": {"n": number}}).encode()
    body = orjson.loads(raw)
    assert json.loads(exact_json.dumps(body, raw))["input"]["n"] == number
