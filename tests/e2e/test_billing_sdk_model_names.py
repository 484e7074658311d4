"""Every model name the installed official SDK lists (`anthropic.types.Model`: ids, dated snapshots and aliases) is
either billed at a price (never $0 for usage) or refused before it goes upstream, as docs/billing.md says.

Each name is asked once through the real gateway in front of the mock upstream with the same usage (1,000 input,
100 output tokens); a name served must leave a row with a positive cost equal to its model's list rates, a name
refused must leave the upstream untouched.
"""
from __future__ import annotations

import json
import typing
from decimal import Decimal

from anthropic.types import Model

from apertis_proxy.store import catalog as catalog_store
from apertis_proxy.store import schema
from tests.support.gateway_requests import post

USAGE = {"input_tokens": 1_000, "output_tokens": 100, "cache_read_input_tokens": 0,
         "cache_creation_input_tokens": 0}


def sdk_model_names() -> list[str]:
    literal = next(a for a in typing.get_args(Model) if typing.get_origin(a) is typing.Literal)
    return list(typing.get_args(literal))


async def test_every_sdk_model_name_is_priced_or_refused(gateway):
    conn = schema.connect(":memory:")
    catalog = catalog_store.load_catalog(conn)
    conn.close()
    names = sdk_model_names()
    assert "claude-haiku-4-5" in names and "claude-opus-5-5" in names
    outcomes = {}
    for name in names:
        sent_before = len(gateway.mock.requests)
        response = await post(gateway, gateway.key, {
            "model": name, "max_tokens": 64, "messages": [{"role": "user", "content": "bill me"}]},
            {"x-mock-scenario": "usage=" + json.dumps(USAGE)})
        outcomes[name] = (response.status, len(gateway.mock.requests) - sent_before)
    rows = await gateway.usage_rows(len(names))
    assert len(rows) == len(names)
    wrong = {}
    for name, row in zip(names, rows):
        status, sent = outcomes[name]
        if status == 200:
            entry = catalog.lookup(row["upstream_model"])
            rates = entry.prices
            expected = (1_000 * rates["input"] + 100 * rates["output"]) / Decimal(1_000_000)
            cost = Decimal(json.loads(row["prices"])["cost"]) if row["cost"] is not None else None
            if cost is None or cost <= 0 or cost != expected:
                wrong[name] = f"served, cost {cost} (list {expected})"
        elif not (status in (400, 402, 404) and sent == 0 and not row["input_tokens"]):
            wrong[name] = f"status {status}, {sent} upstream request(s), {row['input_tokens']} tokens"
    assert not wrong, wrong
