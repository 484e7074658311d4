"""Usage the catalogue has no price for makes a row unpriced (cost None), never billed as if it were something
else: the rule docs/billing.md states for a server tool's count ("recorded and makes the row unpriced, as the
catalogue has no price for it") applied to the other parts of the usage object that change the bill.

Priced with the shipped catalogue (Opus 5 at 5 / 25 USD per million tokens): 1,000 input and 100 output tokens are
(5000 + 2500)/1e6 = 0.0075 at list price.
"""
from __future__ import annotations

import time

import pytest

from apertis_proxy.gateway.pricing import price
from apertis_proxy.gateway.usage import UsageMeter
from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import catalog as catalog_store
from apertis_proxy.store import schema

SMALL = {"input_tokens": 1_000, "output_tokens": 100, "cache_read_input_tokens": 0,
         "cache_creation_input_tokens": 0}


@pytest.fixture(scope="module")
def catalog():
    conn = schema.connect(":memory:")
    try:
        yield catalog_store.load_catalog(conn)
    finally:
        conn.close()


def priced(catalog, usage: dict, model: str = "claude-opus-5") -> UsageRecord:
    record = UsageRecord(request_id="r", started_at=time.time(), endpoint="/v1/messages", upstream_model=model,
                         requested_model=model)
    UsageMeter(record).apply(usage)
    price(record, catalog)
    return record


def test_a_server_tool_without_a_price_makes_the_row_unpriced(catalog):
    """The documented rule, for reference (holds)."""
    record = priced(catalog, {**SMALL, "server_tool_use": {"web_search_requests": 0,
                                                           "code_execution_requests": 2}})
    assert record.cost is None and "code_execution_requests" in record.prices["unpriced"]


def test_an_iteration_of_a_kind_without_a_price_is_not_billed_as_nothing(catalog):
    """usage.iterations[] entries of a kind the gateway does not know (the beta adds kinds: advisor, compaction and
    fallback entries came one by one) are skipped: 50,000 input and 4,000 output tokens of such an entry add $0 and
    the row says nothing.  A server tool count of an unknown kind makes the row unpriced; so should this."""
    usage = {**SMALL, "iterations": [
        {"type": "message", **SMALL},
        {"type": "tool_search_message", "model": "claude-opus-5", "input_tokens": 50_000, "output_tokens": 4_000,
         "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}]}
    record = priced(catalog, usage)
    assert record.iterations is not None and len(record.iterations) == 2      # kept on the row
    assert record.cost is None, (
        f"an iteration of unknown kind with 54,000 tokens was billed ${record.cost} (the top level only), "
        f"prices={record.prices}")


def test_a_service_tier_without_a_multiplier_is_not_billed_at_list_price(catalog):
    """The catalogue lists the tiers standard, priority and batch; a usage object reporting another tier (as a
    new tier, a flex one, would be reported) is billed at the standard list price, $0.0075, with no multiplier
    listed and nothing telling the row apart from a standard one."""
    record = priced(catalog, {**SMALL, "service_tier": "flex"})
    assert record.service_tier == "flex"
    assert record.cost is None, (
        f"service tier 'flex' (no multiplier in the catalogue) was billed ${record.cost} with multipliers "
        f"{record.prices.get('multipliers')!r}")

