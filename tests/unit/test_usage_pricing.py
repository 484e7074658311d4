"""Usage taken from answers, and the price of a request: the per-request shortcuts give what the general
path gives (raw usage as reported, the row in force at the request's start, the record's fields in order)."""
from __future__ import annotations

import json
from decimal import Decimal

from apertis_proxy.gateway.batches import bill_results
from apertis_proxy.gateway.pricing import price
from apertis_proxy.gateway.usage import UsageMeter
from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store.catalog import BillingRates, Catalog, ModelEntry, PriceRow

FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")


def _record(**kw) -> UsageRecord:
    return UsageRecord(request_id="r", started_at=kw.pop("started_at", 1000.0), endpoint="/v1/messages", **kw)


def test_raw_usage_is_the_first_report_without_nulls_then_merged():
    rec = _record()
    meter = UsageMeter(rec)
    first = {"input_tokens": 25, "output_tokens": 1, "cache_creation": {"ephemeral_5m_input_tokens": 3},
             "service_tier": "standard"}
    meter.apply(first)
    assert rec.raw_usage == first and rec.raw_usage is not first
    assert list(rec.raw_usage) == list(first)
    meter.apply({"output_tokens": 9, "server_tool_use": None})
    assert rec.raw_usage == {**first, "output_tokens": 9}
    assert (rec.input_tokens, rec.output_tokens, rec.cache_creation_5m_input_tokens) == (25, 9, 3)
    assert rec.cache_creation_1h_input_tokens is None


def test_raw_usage_drops_nulls_and_keeps_the_first_64_fields():
    rec = _record()
    UsageMeter(rec).apply({"input_tokens": 5, "inference_geo": None, "speed": "fast"})
    assert rec.raw_usage == {"input_tokens": 5, "speed": "fast"}
    assert (rec.inference_geo, rec.speed) == (None, "fast")
    rec = _record()
    many = {f"k{i}": i for i in range(70)}
    UsageMeter(rec).apply(many)
    assert list(rec.raw_usage) == [f"k{i}" for i in range(64)]


def test_counts_out_of_range_or_of_another_type_are_ignored():
    rec = _record()
    UsageMeter(rec).apply({"input_tokens": -1, "output_tokens": 2 ** 53, "cache_read_input_tokens": True,
                           "cache_creation_input_tokens": 4.0, "service_tier": "x" * 65,
                           "cache_creation": {"ephemeral_1h_input_tokens": 7}})
    assert (rec.input_tokens, rec.output_tokens, rec.cache_read_input_tokens, rec.cache_creation_input_tokens) \
        == (0, 0, 0, 0)
    assert rec.service_tier is None and rec.cache_creation_1h_input_tokens == 7


def _rates(scale: str) -> dict:
    return {f: Decimal(scale) * (i + 1) for i, f in enumerate(FIELDS)}


def _catalog(*rows: PriceRow) -> Catalog:
    entry = ModelEntry(id="m", display_name="M", created_at="2026-01-01", price_rows=rows)
    return Catalog(entries=(entry,), by_name={"m": entry},
                   rates=BillingRates(service_tiers={"standard": Decimal(1), "batch": Decimal("0.5")}))


def test_the_row_in_force_at_each_start_also_when_the_clock_goes_back():
    catalog = _catalog(PriceRow(effective_from=0.0, origin="catalog", rates=_rates("1")),
                       PriceRow(effective_from=2000.0, origin="catalog", rates=_rates("2")),
                       PriceRow(effective_from=3000.0, origin="operator", rates=_rates("3")))
    seen = []
    for ts in (1000.0, 1999.0, 2000.0, 2500.0, 3000.0, 1500.0, 3500.0, 0.0):
        rec = _record(started_at=ts, upstream_model="m", input_tokens=1_000_000)
        price(rec, catalog)
        seen.append((rec.prices["effective_from"], rec.prices["origin"], rec.prices["input"], rec.cost))
    assert seen == [(0.0, "catalog", 1.0, 1.0), (0.0, "catalog", 1.0, 1.0), (2000.0, "catalog", 2.0, 2.0),
                    (2000.0, "catalog", 2.0, 2.0), (3000.0, "operator", 3.0, 3.0), (0.0, "catalog", 1.0, 1.0),
                    (3000.0, "operator", 3.0, 3.0), (0.0, "catalog", 1.0, 1.0)]


def test_a_new_catalogue_is_priced_by_its_own_rows_and_the_record_keeps_its_order():
    rec = _record(upstream_model="m", input_tokens=10, output_tokens=20, cache_creation_input_tokens=8,
                  cache_creation_1h_input_tokens=3, service_tier="batch")
    price(rec, _catalog(PriceRow(effective_from=0.0, origin="catalog", rates=_rates("1"))))
    first = rec.prices
    rec = _record(upstream_model="m", input_tokens=10, output_tokens=20, cache_creation_input_tokens=8,
                  cache_creation_1h_input_tokens=3, service_tier="batch")
    banded = PriceRow(effective_from=0.0, origin="catalog", rates=_rates("2"), bands=((5, _rates("4")),))
    price(rec, _catalog(banded))
    assert list(rec.prices) == list(first) == [
        "model", *FIELDS, "effective_from", "origin", "band_above", "cache_write_5m_tokens",
        "cache_write_1h_tokens", "multipliers", "cost"]
    assert first["input"] == 1.0 and first["band_above"] is None
    assert rec.prices["input"] == 4.0 and rec.prices["band_above"] == 5
    assert rec.prices["multipliers"] == {"tier": "0.5"}
    assert (rec.prices["cache_write_5m_tokens"], rec.prices["cache_write_1h_tokens"]) == (5, 3)
    # 4 x (10 input + 2 x 20 output + 3 x 5 writes (5 m) + 4 x 3 writes (1 h)) per million, at half price
    assert Decimal(rec.prices["cost"]) == Decimal(4 * (10 + 40 + 15 + 12)) / 1_000_000 / 2


def test_billed_tokens_adds_the_tokens_of_the_iterations_billed_apart():
    """The top-level counts, plus input, output, cache read and cache write tokens of each advisor, compaction
    and fallback iteration; a `message` iteration is inside the top level, a count that is no non-negative
    integer counts 0."""
    rec = _record(input_tokens=10, output_tokens=20, cache_read_input_tokens=30, cache_creation_input_tokens=40)
    assert rec.billed_tokens == rec.total_tokens == 100
    UsageMeter(rec).apply({"iterations": [
        {"type": "message", "input_tokens": 10, "output_tokens": 20},
        {"type": "advisor_message", "model": "claude-opus-4-8", "input_tokens": 1000, "output_tokens": 200,
         "cache_read_input_tokens": 30, "cache_creation_input_tokens": 4},
        {"type": "compaction", "input_tokens": 500, "output_tokens": 50},
        {"type": "fallback_message", "output_tokens": 7, "input_tokens": -3, "cache_read_input_tokens": 1.0,
         "cache_creation_input_tokens": True},
        {"type": "future_kind", "input_tokens": 9999}]})
    assert rec.total_tokens == 100
    assert rec.billed_tokens == 100 + 1234 + 550 + 7
    assert _record(output_tokens=5, iterations=[]).billed_tokens == 5


def test_batch_results_keep_their_separately_billed_iterations_for_token_quotas():
    """A batch's results are one record: the iterations billed apart from their counts stay on it (and
    count in billed_tokens); `message` iterations, already inside the counts, do not."""
    catalog = _catalog(PriceRow(effective_from=0.0, origin="catalog", rates=_rates("1")))
    advisor = {"type": "advisor_message", "model": "m", "input_tokens": 1000, "output_tokens": 100}
    lines = [{"custom_id": "a", "result": {"type": "succeeded", "message": {"model": "m", "usage": {
                 "input_tokens": 10, "output_tokens": 5,
                 "iterations": [{"type": "message", "input_tokens": 10, "output_tokens": 5}, advisor]}}}},
             {"custom_id": "b", "result": {"type": "succeeded", "message": {"model": "m", "usage": {
                 "input_tokens": 20, "output_tokens": 5}}}}]
    rec = _record()
    bill_results(b"\n".join(json.dumps(line).encode() for line in lines), rec, catalog, 1000.0)
    assert rec.iterations == [advisor]
    assert (rec.total_tokens, rec.billed_tokens) == (40, 40 + 1100)
    assert rec.cost is not None
