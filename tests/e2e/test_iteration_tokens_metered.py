"""`apertis_tokens_total` and the tokens billed: advisor iterations (`usage.iterations[]`).

docs/billing.md: `advisor_message`, `compaction` and `fallback_message` iterations are billed on top of the
top-level counts, each at its own model's rates, and a token quota counts their tokens too. The cost counter
includes them (`apertis_cost_usd_total` equals the ledger's cost); the token counter, whose HELP is "Tokens used,
by model and type, as metered", leaves them out: a request whose advisor read 40,000 tokens on Opus shows 200
tokens, and the advisor's model none. Operators dividing cost by tokens, or watching tokens against token quotas,
get figures off by two orders of magnitude.
"""
from __future__ import annotations

import json

from apertis_proxy.observe.recorder import COST_UNIT
from tests.support.metrics import scrape_samples, total
from tests.support.rawhttp import RawConnection

SONNET = "claude-sonnet-5"
ADVISOR = "claude-opus-4-8"
ADVISOR_USAGE = {"input_tokens": 100, "output_tokens": 100,
                 "iterations": [{"type": "message", "input_tokens": 100, "output_tokens": 100},
                                {"type": "advisor_message", "model": ADVISOR, "input_tokens": 40_000,
                                 "output_tokens": 2_000, "cache_read_input_tokens": 0,
                                 "cache_creation_input_tokens": 0}]}
BILLED_TOKENS = 100 + 100 + 40_000 + 2_000      # the top level (the "message" iteration is inside it) + the advisor


async def test_advisor_iteration_tokens_are_in_the_token_counter(gateway_env, mock_upstream):
    gateway_env.add_channel("main", mock_upstream)
    key = gateway_env.add_key("alice")
    gateway = await gateway_env.start()
    body = {"model": SONNET, "max_tokens": 1024,
            "tools": [{"type": "advisor_20260301", "name": "advisor", "model": ADVISOR, "max_uses": 1}],
            "messages": [{"role": "user", "content": "plan the refactor"}]}
    async with await RawConnection.open(gateway.host, gateway.port) as conn:
        reply = await conn.request("POST", "/v1/messages", {
            "x-api-key": key, "anthropic-version": "2023-06-01",
            "x-mock-scenario": f"usage={json.dumps(ADVISOR_USAGE)}"}, json_body=body)
    assert reply.status == 200, reply.body
    [row] = await gateway_env.usage_rows(1)
    assert row["cost"] > 0
    samples = await scrape_samples(gateway_env.base_url)
    assert total(samples, "apertis_cost_usd_total") == round(row["cost"] / COST_UNIT) * COST_UNIT   # billed: yes
    counted = total(samples, "apertis_tokens_total")
    assert counted == BILLED_TOKENS, f"apertis_tokens_total sums {counted:g} of {BILLED_TOKENS} billed tokens"
