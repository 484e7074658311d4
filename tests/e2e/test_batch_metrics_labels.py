"""Metrics of Message Batches: the spend of a batch's results by its model, and batch calls under their endpoint.

A batch's results are billed once, on the first fetch of its results (README), and the ledger row names the
model (`upstream_model`, and `prices.models`). `apertis_tokens_total` and `apertis_cost_usd_total` are "by model",
and the README's first query is spend per hour by model: the batch's tokens and cost must be under the batch's
model, not under `none` (the label of requests that named no model). And `/v1/messages/batches` is a path the
gateway serves (README's table of endpoints): its calls must not share the `other` endpoint label with unknown
paths (`other` is for "an unknown path").
"""
from __future__ import annotations

import anthropic
import pytest

from apertis_proxy.observe.recorder import COST_UNIT
from tests.support.metrics import scrape_samples, total, value
from tests.support.processes import wait_for
from tests.support.rawhttp import RawConnection

HAIKU = "claude-haiku-4-5-20251001"


@pytest.fixture
async def fetched_batch(gateway_env, mock_upstream):
    """A batch of two Haiku requests created and its results fetched (billed); its ledger row; a scrape."""
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    gateway = await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        batch = await client.messages.batches.create(requests=[
            {"custom_id": name, "params": {"model": HAIKU, "max_tokens": 32,
                                           "messages": [{"role": "user", "content": f"question {name}"}]}}
            for name in ("one", "two")])
        results = [r async for r in await client.messages.batches.results(batch.id)]
    assert [r.result.type for r in results] == ["succeeded", "succeeded"]
    async with await RawConnection.open(gateway.host, gateway.port) as conn:      # an unknown path
        assert (await conn.request("GET", "/wp-login.php")).status == 404
    billed_rows: list[dict] = []

    async def billed_row_landed() -> bool:
        billed_rows[:] = [r for r in await gateway_env.usage_rows(2) if r["cost"] > 0]
        return bool(billed_rows)
    await wait_for(billed_row_landed, 5.0, "the batch's billed usage row")
    [billed] = billed_rows
    assert billed["upstream_model"] == HAIKU and billed["input_tokens"] > 0
    return billed, await scrape_samples(gateway_env.base_url)


async def test_a_batchs_tokens_and_cost_are_counted_under_its_model(fetched_batch):
    billed, samples = fetched_batch
    assert total(samples, "apertis_cost_usd_total") == round(billed["cost"] / COST_UNIT) * COST_UNIT
    assert value(samples, "apertis_tokens_total", model=HAIKU, type="input") == billed["input_tokens"], (
        f"batch input tokens under model=none: {value(samples, 'apertis_tokens_total', model='none', type='input')}")
    assert value(samples, "apertis_cost_usd_total", model=HAIKU) == round(billed["cost"] / COST_UNIT) * COST_UNIT


async def test_batch_calls_are_not_counted_as_unknown_paths(fetched_batch):
    _, samples = fetched_batch
    unknown = total(samples, "apertis_requests_total", endpoint="other")
    assert unknown == 1, f"{unknown:g} requests under endpoint=other: the 404 and {unknown - 1:g} batch calls"
