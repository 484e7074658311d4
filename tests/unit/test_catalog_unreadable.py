"""What a catalogue file must hold, and what reading the store's catalogue and pricing a record do with data
that got past those checks: a model that cannot be read is left out (unpriced), never the whole configuration;
a record whose usage cannot be priced is left unpriced, never kept from the meters."""
from __future__ import annotations

import json
import logging
import time

import pytest

from apertis_proxy.gateway.pricing import price
from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import catalog as catalog_store
from apertis_proxy.store import schema

RATES = {"input": 6, "output": 30, "cache_write_5m": 7.5, "cache_write_1h": 12, "cache_read": 0.6}


@pytest.fixture
def conn():
    conn = schema.connect(":memory:")       # holds the shipped catalogue
    try:
        yield conn
    finally:
        conn.close()


def refusal(tmp_path, text: str) -> str:
    path = tmp_path / "catalog.json"
    path.write_text(text)
    with pytest.raises(ValueError) as refused:
        catalog_store.read_catalog_file(path)
    return str(refused.value)


def one_model(**fields) -> str:
    return json.dumps({"version": "2099-01-01", "models": [{"id": "claude-opus-6", **fields}]})


@pytest.mark.parametrize(("fields", "named"), [
    ({"prices": [{**RATES, "bands": [{"above_prompt_tokens": 1000, **RATES, "cache_read": None}]}]},
     "prices[0].bands[0].cache_read"),
    ({"prices": [{**RATES, "bands": [{"above_prompt_tokens": 0, **RATES}]}]}, "prices[0].bands[0].above_prompt"),
    ({"prices": [{**RATES, "bands": [{"above_prompt_tokens": 9, **RATES}, {"above_prompt_tokens": 9, **RATES}]}]},
     "prices[0].bands[1].above_prompt"),
    ({"prices": [{**RATES, "output": True}]}, "prices[0].output"),
    ({"prices": [{**RATES, "input": 1e400}]}, "prices[0].input"),     # Infinity in the file
    ({"prices": [{**RATES, "from": 20260101}]}, "prices[0].from"),
    ({"prices": [RATES], "fast_multiplier": "2"}, "fast_multiplier"),
    ({"prices": [RATES], "geo_multipliers": {"us": -1.1}}, "geo_multipliers.us"),
])
def test_a_file_is_refused_naming_the_model_and_the_field(tmp_path, fields, named):
    message = refusal(tmp_path, one_model(**fields))
    assert "claude-opus-6" in message and named in message and "\n" not in message


@pytest.mark.parametrize(("top", "named"), [({"web_search_per_request": -0.01}, "web_search_per_request"),
                                            ({"service_tiers": {"batch": "0.5"}}, "service_tiers.batch")])
def test_billing_rates_of_a_file_are_checked(tmp_path, top, named):
    assert named in refusal(tmp_path, json.dumps({"version": "2099-01-01", "models": [], **top}))


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_price_that_is_not_finite_is_refused_naming_it(tmp_path, number):
    text = one_model(prices=[RATES]).replace('"input": 6', f'"input": {number}')
    assert "prices[0].input" in refusal(tmp_path, text)


@pytest.mark.parametrize("constant", ["NaN", "Infinity"])
def test_nan_and_infinity_are_refused_in_any_field(tmp_path, constant):
    text = one_model(prices=[RATES], max_tokens=0).replace('"max_tokens": 0', f'"max_tokens": {constant}')
    assert constant in refusal(tmp_path, text)


def test_the_shipped_catalogue_passes_its_checks():
    assert catalog_store.read_catalog_file()["models"]


@pytest.mark.parametrize("stored", [
    ("UPDATE model_prices SET bands = ? WHERE model_id = 'claude-opus-5'",
     (json.dumps([{"above_prompt_tokens": 200_000, "input": 12, "output": 45}]),)),
    ("UPDATE model_prices SET input = ? WHERE model_id = 'claude-opus-5'", (float("inf"),)),
    ("UPDATE models SET geo_multipliers = ? WHERE id = 'claude-opus-5'", ('{"us": "x"}',)),
], ids=["band-without-cache-rates", "infinite-rate", "bad-geo-multiplier"])
def test_a_model_the_store_holds_unreadable_is_left_out_alone(conn, caplog, stored):
    conn.execute(*stored)
    with caplog.at_level(logging.WARNING, logger="apertis_proxy.store.catalog"):
        catalog = catalog_store.load_catalog(conn)
    assert catalog.lookup("claude-opus-5") is None
    assert catalog.lookup("claude-haiku-4-5") is not None and catalog.rates.service_tiers
    assert [r.getMessage() for r in caplog.records if "claude-opus-5" in r.getMessage()] != []
    assert len(caplog.records) == 1


def test_unreadable_billing_rates_leave_only_them_out(conn, caplog):
    conn.execute("UPDATE meta SET v = ? WHERE k = 'billing_rates'", ('{"service_tiers": {"batch": null}}',))
    with caplog.at_level(logging.WARNING, logger="apertis_proxy.store.catalog"):
        catalog = catalog_store.load_catalog(conn)
    assert catalog.rates == catalog_store.BillingRates() and catalog.lookup("claude-opus-5") is not None
    assert len(caplog.records) == 1


@pytest.mark.parametrize("iteration", [{"type": ["compaction"], "input_tokens": 5}, "compaction"])
def test_usage_pricing_cannot_read_leaves_the_record_unpriced(conn, caplog, iteration):
    record = UsageRecord(request_id="r", started_at=time.time(), endpoint="/v1/messages",
                         upstream_model="claude-opus-5", input_tokens=10, iterations=[iteration])
    with caplog.at_level(logging.WARNING, logger="apertis_proxy.gateway.pricing"):
        price(record, catalog_store.load_catalog(conn))
    assert record.cost is None and record.prices["unpriced"] and len(caplog.records) <= 1


@pytest.mark.parametrize(("tier", "cost"), [(None, 0.0075), ("standard", 0.0075), ("priority", 0.0075),
                                            ("batch", 0.00375), ("flex", None)])
def test_a_service_tier_is_billed_only_at_a_multiplier_the_catalogue_lists(conn, tier, cost):
    record = UsageRecord(request_id="r", started_at=time.time(), endpoint="/v1/messages",
                         upstream_model="claude-opus-5", input_tokens=1_000, output_tokens=100, service_tier=tier)
    price(record, catalog_store.load_catalog(conn))
    assert record.cost == cost
