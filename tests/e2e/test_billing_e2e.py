"""Billing through the real gateway: every shipped model priced from a known usage (expected costs worked out by
hand below, not by the code under test), each billed dimension of the usage object, fail-closed refusal of
unpriced models, effective-dated prices, the lifecycle of retired and deprecated models, /v1/models read by the
official SDK, and the upgrade of a version-1 store.

The mock upstream reports the usage a test scripts (``x-mock-scenario: usage={...}``), in JSON bodies and in
streams (split between message_start and message_delta as upstream does).
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from decimal import Decimal

import anthropic
import pytest

from apertis_proxy import cli, settings
from apertis_proxy.store import catalog as catalog_store
from apertis_proxy.store import channels as channel_store
from apertis_proxy.store import schema
from tests.support.rawhttp import RawConnection, RawResponse

# The known usage: 10,000 input, 2,000 output, 40,000 cache reads, 8,000 cache writes of which 3,000 for 1 h
# (so 5,000 for 5 min).  Prompt = 10,000 + 40,000 + 8,000 = 58,000 tokens (below Haiku 5.5's 100k band).
KNOWN = {"input_tokens": 10_000, "output_tokens": 2_000, "cache_read_input_tokens": 40_000,
         "cache_creation_input_tokens": 8_000,
         "cache_creation": {"ephemeral_5m_input_tokens": 5_000, "ephemeral_1h_input_tokens": 3_000}}

# model -> expected USD, as (10000*in + 2000*out + 40000*read + 5000*w5m + 3000*w1h) / 1e6.
PRICED = {
    # Opus 4.5-5 at 5/25/6.25/10/0.50: 50000 + 50000 + 20000 + 31250 + 30000 = 181250
    "claude-opus-4-5-20251101": "0.18125", "claude-opus-4-6": "0.18125", "claude-opus-4-7": "0.18125",
    "claude-opus-4-8": "0.18125", "claude-opus-5": "0.18125",
    # Opus 5.5 at 4/20/5/8/0.20: 40000 + 40000 + 8000 + 25000 + 24000 = 137000
    "claude-opus-5-5": "0.137",
    # Sonnet 4.x at 3/15/3.75/6/0.30: 30000 + 30000 + 12000 + 18750 + 18000 = 108750
    "claude-sonnet-4-6": "0.10875",
    # Sonnet 5 at 2/10/2.50/4/0.20: 20000 + 20000 + 8000 + 12500 + 12000 = 72500
    "claude-sonnet-5": "0.0725",
    # Sonnet 5.5 since 2026-10-07 at 2/10/2.50/4/0.10: 20000 + 20000 + 4000 + 12500 + 12000 = 68500
    "claude-sonnet-5-5": "0.0685",
    # Haiku 4.5 at 1/5/1.25/2/0.10: 10000 + 10000 + 4000 + 6250 + 6000 = 36250
    "claude-haiku-4-5-20251001": "0.03625",
    # Haiku 5.5 at 0.10/0.50/0.125/0.20/0.01: 1000 + 1000 + 400 + 625 + 600 = 3625
    "claude-haiku-5-5": "0.003625",
    # Fable/Mythos 5 at 10/50/12.50/20/1: 100000 + 100000 + 40000 + 62500 + 60000 = 362500
    "claude-fable-5": "0.3625", "claude-mythos-5": "0.3625",
    # Fable/Mythos 5.1 at 10/50/12.50/20/0.25: 100000 + 100000 + 10000 + 62500 + 60000 = 332500
    "claude-fable-5-1": "0.3325", "claude-mythos-5-1": "0.3325",
    # Fable/Mythos 5.2 at 8/40/10/16/0.20: 80000 + 80000 + 8000 + 50000 + 48000 = 266000
    "claude-fable-5-2": "0.266", "claude-mythos-5-2": "0.266",
}
# Retired, so served only through a successor (tested below), and shipped with no public price.
NOT_REQUESTABLE = {"claude-sonnet-4-5-20250929", "claude-mythos-preview"}


def scenario(**usage) -> dict:
    return {"x-mock-scenario": "usage=" + json.dumps(usage)}


def body(model: str, *, stream: bool = False, **extra) -> dict:
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "bill me"}],
            "stream": stream, **extra}


async def post(env, key: str, payload: dict, headers: dict | None = None) -> RawResponse:
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("POST", "/v1/messages", {"x-api-key": key, **(headers or {})},
                                  json_body=payload)


def charged(row: dict) -> Decimal:
    """The exact cost the gateway computed, kept on the row."""
    return Decimal(json.loads(row["prices"])["cost"])


def test_every_shipped_model_is_in_the_table():
    shipped = {m["id"] for m in catalog_store.read_catalog_file()["models"]}
    assert shipped == set(PRICED) | NOT_REQUESTABLE


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_every_shipped_model_priced_to_the_cent(gateway, stream):
    for model in PRICED:
        response = await post(gateway, gateway.key, body(model, stream=stream), scenario(**KNOWN))
        assert response.status == 200, (model, response.body)
    rows = await gateway.usage_rows(len(PRICED))
    assert len(rows) == len(PRICED)
    for row, (model, expected) in zip(rows, PRICED.items()):
        assert row["upstream_model"] == model
        assert (row["cache_creation_5m_input_tokens"], row["cache_creation_1h_input_tokens"]) == (5_000, 3_000)
        assert charged(row) == Decimal(expected), model
        assert round(row["cost"], 2) == round(float(expected), 2)
        assert json.loads(row["raw_usage"])["cache_creation"] == KNOWN["cache_creation"]


async def test_claude_code_default_models_through_the_gateway_are_priced(gateway, sdk):
    # Claude Code 2.1.x sends these by default.
    models = (("claude-opus-4-8", "0.18125"), ("claude-sonnet-5", "0.0725"), ("claude-haiku-4-5-20251001", "0.03625"))
    for n, (model, expected) in enumerate(models, 1):
        gateway.mock.queue("usage=" + json.dumps(KNOWN))
        result = await sdk.run("plain", gateway.base_url, gateway.key, model=model)
        assert "error" not in result, result
        rows = await gateway.usage_rows(n)
        assert len(rows) == n
        row = rows[-1]
        assert (row["requested_model"], row["status"]) == (model, 200)
        assert charged(row) == Decimal(expected)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_each_billed_dimension(gateway, stream):
    small = {"input_tokens": 1_000, "output_tokens": 100, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0}
    cases = [
        # Web search: Opus 5 (5000 + 2500)/1e6 = 0.0075 plus 3 searches at $0.01 = 0.0375; fetches free.
        ("claude-opus-5", {}, {**small, "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 2}},
         "0.0375"),
        # Fast mode on Opus 4.8 (x2): 0.0075 * 2 = 0.015; on Opus 4.7 (x6): 0.045.
        ("claude-opus-4-8", {"speed": "fast"}, small, "0.015"),
        ("claude-opus-4-7", {"speed": "fast"}, small, "0.045"),
        # inference_geo "us" on Sonnet 5 (x1.1): (2000 + 1000)/1e6 * 1.1 = 0.0033.
        ("claude-sonnet-5", {"inference_geo": "us"}, small, "0.0033"),
        # Batch tier (x0.5) on Opus 5.5: (4000 + 2000)/1e6 * 0.5 = 0.003.
        ("claude-opus-5-5", {}, {**small, "service_tier": "batch"}, "0.003"),
        # Priority tier: recorded, billed at list price: 0.006.
        ("claude-opus-5-5", {}, {**small, "service_tier": "priority"}, "0.006"),
        # Haiku 5.5 above 100k prompt tokens: the whole request at 0.50/2.50/.../0.05:
        # (120000*0.50 + 1000*2.50 + 10000*0.05)/1e6 = (60000 + 2500 + 500)/1e6 = 0.063.
        ("claude-haiku-5-5", {}, {"input_tokens": 120_000, "output_tokens": 1_000,
                                  "cache_read_input_tokens": 10_000, "cache_creation_input_tokens": 0}, "0.063"),
        # ... and at 100,000 exactly, the low band: (100000*0.10 + 1000*0.50)/1e6 = 0.0105.
        ("claude-haiku-5-5", {}, {"input_tokens": 100_000, "output_tokens": 1_000,
                                  "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}, "0.0105"),
        # Iterations billed outside the top level: Sonnet 5 top (2000 + 1000)/1e6 = 0.003; an advisor
        # iteration on Opus 5.5 (2000*4 + 500*20)/1e6 = 0.018; a compaction at Sonnet 5 (5000*2 + 300*10)/1e6
        # = 0.013; a "message" iteration is inside the top level: nothing more.  Total 0.034.
        ("claude-sonnet-5", {}, {**small, "iterations": [
            {"type": "message", "input_tokens": 1_000, "output_tokens": 100, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0},
            {"type": "advisor_message", "model": "claude-opus-5-5", "input_tokens": 2_000, "output_tokens": 500,
             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            {"type": "compaction", "input_tokens": 5_000, "output_tokens": 300, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0}]}, "0.034"),
        # Fast mode on Opus 5.5 (x2): (4000 + 2000)/1e6 * 2 = 0.012.
        ("claude-opus-5-5", {"speed": "fast"}, small, "0.012"),
        # A fallback iteration at its own model: Sonnet 5 top 0.003 plus Haiku 4.5 (1000*1 + 100*5)/1e6
        # = 0.0015.  Total 0.0045.
        ("claude-sonnet-5", {}, {**small, "iterations": [
            {"type": "fallback_message", "model": "claude-haiku-4-5-20251001", "input_tokens": 1_000,
             "output_tokens": 100, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}]}, "0.0045"),
    ]
    for model, extra, usage, _ in cases:
        response = await post(gateway, gateway.key, body(model, stream=stream, **extra), scenario(**usage))
        assert response.status == 200, response.body
    rows = await gateway.usage_rows(len(cases))
    for row, (model, extra, usage, expected) in zip(rows, cases):
        assert charged(row) == Decimal(expected), (model, extra, usage)
    web, fast = rows[0], rows[1]
    assert (web["web_search_requests"], web["web_fetch_requests"]) == (3, 2)
    assert fast["speed"] == "fast" and rows[3]["inference_geo"] == "us"
    assert (rows[4]["service_tier"], rows[5]["service_tier"]) == ("batch", "priority")
    assert json.loads(rows[6]["prices"])["band_above"] == 100_000
    assert json.loads(rows[7]["prices"])["band_above"] is None
    assert [i["type"] for i in json.loads(rows[8]["iterations"])] == ["message", "advisor_message", "compaction"]


async def test_cache_writes_split_from_the_final_counts(gateway):
    # A 1-hour count above the total (as a stale split could say) is capped at the total: all 1 h.
    # Haiku 4.5: (1000*1 + 10*5 + 2000*2)/1e6 = 0.00505.
    usage = {"input_tokens": 1_000, "output_tokens": 10, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 2_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 2_500}}
    assert (await post(gateway, gateway.key, body("claude-haiku-4-5-20251001", stream=True),
                       scenario(**usage))).status == 200
    row = (await gateway.usage_rows(1))[0]
    assert charged(row) == Decimal("0.00505")


# -- fail closed ---------------------------------------------------------------------------------------------------

async def test_unknown_model_is_refused_before_upstream(gateway):
    response = await post(gateway, gateway.key, body("claude-opus-9"))
    assert response.status == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "claude-opus-9" in error["message"] and "prices set claude-opus-9" in error["message"]
    assert gateway.mock.requests == []
    rows = await gateway.usage_rows(1)
    assert rows[0]["cost"] == 0.0 and rows[0]["reached_upstream"] == 0


async def test_unpriced_model_when_allowed(gateway_env, mock_upstream):
    usd = gateway_env.add_key("capped", quota_cost=25.0)
    tokens = gateway_env.add_key("counted", quota_tokens=1_000_000)
    gateway_env.add_channel("main", mock_upstream, options={"allow_unpriced": True})
    await gateway_env.start()
    # A USD-quota key is refused: its spend could not be counted.
    refused = await post(gateway_env, usd, body("claude-opus-9"))
    assert refused.status == 402 and refused.json()["error"]["type"] == "billing_error"
    assert "prices set claude-opus-9" in refused.json()["error"]["message"]
    assert mock_upstream.requests == []
    # A token-quota key is served; the row's cost is unknown (NULL), never $0, and the tokens count.
    served = await post(gateway_env, tokens, body("claude-opus-9"), scenario(**KNOWN))
    assert served.status == 200
    rows = await gateway_env.usage_rows(2)
    assert rows[0]["cost"] == 0.0 and rows[0]["reached_upstream"] == 0
    assert rows[1]["cost"] is None and rows[1]["input_tokens"] == 10_000
    assert "claude-opus-9" in json.loads(rows[1]["prices"])["unpriced"]
    await gateway_env.stop()
    spent = gateway_env.query("SELECT k.name, s.tokens, s.cost FROM key_spend s JOIN keys k ON k.id = s.key_id")
    assert [tuple(r) for r in spent] == [("counted", 60_000, 0.0)]


async def test_unpriced_fast_mode_tool_and_fallback_models_are_refused_before_upstream(gateway_env, mock_upstream):
    usd = gateway_env.add_key("capped", quota_cost=25.0)
    tokens = gateway_env.add_key("counted", quota_tokens=1_000_000)
    gateway_env.add_channel("strict", mock_upstream, models=["claude-mythos-5-2", "claude-sonnet-5"])
    await gateway_env.start()
    advisor = {"tools": [{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-9"}]}
    # Fail closed: fast mode on a model whose fast-mode price is unknown, and a tool naming an unpriced model.
    fast = await post(gateway_env, tokens, body("claude-mythos-5-2", speed="fast"))
    assert fast.status == 400 and fast.json()["error"]["type"] == "invalid_request_error"
    assert "speed" in fast.json()["error"]["message"] and "claude-mythos-5-2" in fast.json()["error"]["message"]
    tool = await post(gateway_env, tokens, body("claude-sonnet-5", **advisor))
    assert tool.status == 400 and "claude-opus-9" in tool.json()["error"]["message"]
    fallback = {"fallbacks": [{"model": "claude-opus-9"}]}
    fell = await post(gateway_env, tokens, body("claude-sonnet-5", **fallback))
    assert fell.status == 400 and "claude-opus-9" in fell.json()["error"]["message"]
    assert mock_upstream.requests == []
    await gateway_env.stop()
    # Allowed unpriced: a USD-quota key is still refused (402), a token-quota key is served with cost unknown.
    channel_store.update_channel(gateway_env.conn, "strict", options={"allow_unpriced": True})
    await gateway_env.start()
    for sent in (body("claude-mythos-5-2", speed="fast"), body("claude-sonnet-5", **advisor),
                 body("claude-sonnet-5", **fallback)):
        refused = await post(gateway_env, usd, sent)
        assert refused.status == 402 and refused.json()["error"]["type"] == "billing_error"
    assert mock_upstream.requests == []
    served = await post(gateway_env, tokens, body("claude-mythos-5-2", speed="fast"), scenario(**KNOWN))
    assert served.status == 200
    rows = await gateway_env.usage_rows(7)
    assert [r["status"] for r in rows] == [400, 400, 400, 402, 402, 402, 200]
    assert rows[-1]["cost"] is None and "fast" in json.loads(rows[-1]["prices"])["unpriced"]
    await gateway_env.stop()


async def test_unpriced_models_allowed_globally_from_the_config_file(gateway_env, mock_upstream, tmp_path):
    config = tmp_path / "apertis.toml"
    config.write_text("[billing]\nallow_unpriced = true\n")
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(allow_unpriced=settings.load(str(config)).allow_unpriced)
    assert (await post(gateway_env, key, body("claude-opus-9", stream=True), scenario(**KNOWN))).status == 200
    row = (await gateway_env.usage_rows(1))[0]
    assert row["cost"] is None and row["cache_creation_1h_input_tokens"] == 3_000
    bad = tmp_path / "bad.toml"
    bad.write_text("[billing]\nallow_unpriced = \"yes\"\n")
    with pytest.raises(ValueError, match="allow_unpriced"):
        settings.load(str(bad))


def test_usage_and_prices_list_report_unpriced_requests(gateway_env, capsys):
    gateway_env.conn.execute(
        "INSERT INTO usage (request_id, ts, endpoint, stream, status, duration_ms, requested_model,"
        " upstream_model, input_tokens, cost) VALUES ('r1', 1, '/v1/messages', 0, 200, 1, 'x', 'claude-opus-9',"
        " 5, NULL), ('r2', 2, '/v1/messages', 0, 200, 1, 'y', 'claude-opus-5', 5, 0.5)")
    assert cli.main(["usage", "--json", "--db", gateway_env.db_path]) == 0
    totals = json.loads(capsys.readouterr().out)
    assert (totals["requests"], totals["cost"], totals["unpriced_requests"]) == (2, 0.5, 1)
    assert cli.main(["usage", "--db", gateway_env.db_path]) == 0
    assert "unpriced, 1 requests" in capsys.readouterr().out
    assert cli.main(["prices", "list", "--db", gateway_env.db_path]) == 0
    out = capsys.readouterr().out
    assert "claude-opus-9: unpriced, 1 requests" in out
    preview = next(line for line in out.splitlines() if line.startswith("claude-mythos-preview"))
    assert "unpriced" in preview and "retired 2026-06-30" in preview
    opus45 = next(line for line in out.splitlines() if line.startswith("claude-opus-4-5-20251101"))
    assert "deprecated, end of life 2027-01-22" in opus45


def test_dated_snapshots_fall_back_to_their_family_and_nothing_else():
    conn = schema.connect(":memory:")
    catalog = catalog_store.load_catalog(conn)
    assert catalog.lookup("claude-opus-4-5-20991231").id == "claude-opus-4-5-20251101"
    assert catalog.lookup("claude-opus-5-5").id == "claude-opus-5-5"
    assert catalog.lookup("claude-opus-5-5").prices["cache_read"] == Decimal("0.2")   # not Opus 5's 0.50
    assert catalog.lookup("claude-sonnet-5-5-20991231").id == "claude-sonnet-5-5"
    assert catalog.lookup("claude-opus-5-6") is None and catalog.lookup("claude-opus-4-5-preview") is None


async def test_dated_snapshot_is_billed_as_its_family(gateway):
    assert (await post(gateway, gateway.key, body("claude-opus-4-5-20991231"), scenario(**KNOWN))).status == 200
    row = (await gateway.usage_rows(1))[0]
    assert charged(row) == Decimal("0.18125")


# -- effective dates -------------------------------------------------------------------------------------------------

async def test_a_price_change_dated_tomorrow_does_not_reprice_today(gateway, capsys):
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86_400))
    assert cli.main(["prices", "set", "claude-opus-5", "--input", "50", "--from", tomorrow,
                     "--db", gateway.db_path]) == 0
    assert (await post(gateway, gateway.key, body("claude-opus-5"), scenario(**KNOWN))).status == 200
    row = (await gateway.usage_rows(1))[0]
    assert charged(row) == Decimal("0.18125")              # today's list price
    entry = catalog_store.load_catalog(gateway.conn).lookup("claude-opus-5")
    later = entry.price_at(time.time() + 2 * 86_400)
    assert later.origin == "operator" and later.rates["input"] == 50 and later.rates["output"] == 25
    # The row keeps what it was charged; the catalogue's history is untouched by the new row.
    assert json.loads(row["prices"])["input"] == 5.0


async def test_sonnet_5_5_cache_read_cut_applies_from_its_date():
    conn = schema.connect(":memory:")
    entry = catalog_store.load_catalog(conn).lookup("claude-sonnet-5-5")
    before = entry.price_at(catalog_store._unix("2026-10-06T23:59:59Z"))
    after = entry.price_at(catalog_store._unix("2026-10-07"))
    assert (before.rates["cache_read"], after.rates["cache_read"]) == (Decimal("0.2"), Decimal("0.1"))


# -- lifecycle ---------------------------------------------------------------------------------------------------------

async def test_retired_model_is_refused_naming_its_successor(gateway):
    response = await post(gateway, gateway.key, body("claude-sonnet-4-5-20250929"))
    assert response.status == 404 and response.json()["error"]["type"] == "not_found_error"
    assert "retired on 2026-11-30" in response.json()["error"]["message"]
    assert "claude-sonnet-5-5" in response.json()["error"]["message"]
    assert gateway.mock.requests == []


async def test_retired_model_mapped_to_the_operators_successor(gateway, capsys):
    assert cli.main(["prices", "set", "claude-sonnet-4-5-20250929", "--successor", "claude-sonnet-4-6",
                     "--db", gateway.db_path]) == 0
    deadline, posted = time.monotonic() + 5, 0
    while True:     # until the running gateway has read the change
        response = await post(gateway, gateway.key, body("claude-sonnet-4-5-20250929"), scenario(**KNOWN))
        posted += 1
        if response.status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert response.status == 200, response.body
    assert "claude-sonnet-4-5-20250929 -> claude-sonnet-4-6" in response.header("apertis-model-redirected")
    assert gateway.mock.requests[-1].body["model"] == "claude-sonnet-4-6"
    row = (await gateway.usage_rows(posted))[-1]
    assert (row["requested_model"], row["upstream_model"]) == ("claude-sonnet-4-5-20250929", "claude-sonnet-4-6")
    assert charged(row) == Decimal("0.10875")


async def test_seed_alias_goes_to_the_documented_successor_and_can_be_pinned(gateway, capsys):
    response = await post(gateway, gateway.key, body("claude-sonnet-4.5"), scenario(**KNOWN))
    assert response.status == 200
    assert response.json()["model"] == "claude-sonnet-4.5"
    assert "-> claude-sonnet-5-5" in response.header("apertis-model-redirected")
    assert gateway.mock.requests[-1].body["model"] == "claude-sonnet-5-5"
    # The operator pins the alias elsewhere.
    assert cli.main(["prices", "set", "claude-sonnet-4-6", "--alias", "claude-sonnet-4.5",
                     "--db", gateway.db_path]) == 0
    deadline = time.monotonic() + 5
    while gateway.mock.requests[-1].body["model"] != "claude-sonnet-4-6" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        response = await post(gateway, gateway.key, body("claude-sonnet-4.5"))
    assert gateway.mock.requests[-1].body["model"] == "claude-sonnet-4-6"
    assert response.header("apertis-model-redirected") is None


async def test_deprecated_model_is_served_with_its_end_of_life(gateway):
    response = await post(gateway, gateway.key, body("claude-opus-4.5"))
    assert response.status == 200
    assert response.header("apertis-model-deprecated") == (
        "claude-opus-4-5-20251101 is deprecated; end of life 2027-01-22; successor claude-opus-5-5")


async def test_models_list_read_by_the_official_sdk_with_lifecycle_and_limit_1000(gateway):
    client = anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0)
    try:
        page = await client.models.list(limit=1000)
        by_id = {m.id: m for m in page.data}
        assert "claude-sonnet-4-5-20250929" not in by_id and "claude-mythos-preview" not in by_id
        opus45 = by_id["claude-opus-4-5-20251101"]
        assert opus45.lifecycle == "deprecated" and opus45.retires_at.isoformat().startswith("2027-01-22")
        assert by_id["claude-opus-5-5"].lifecycle == "active" and by_id["claude-opus-5-5"].max_tokens == 128_000
        assert opus45.deprecated_at.isoformat().startswith("2026-11-23") and opus45.max_input_tokens == 200_000
        # Every model has its release date, and the list is newest first (as the Models API orders it).
        assert all(m.created_at.year >= 2025 for m in page.data)
        assert [m.created_at for m in page.data] == sorted((m.created_at for m in page.data), reverse=True)
        retired = await client.models.list(limit=1000, lifecycle=["retired"])
        assert {m.id for m in retired.data} == {"claude-sonnet-4-5-20250929", "claude-mythos-preview"}
        everything = await client.models.list(limit=1000, lifecycle=["active", "deprecated", "retired"])
        assert len(everything.data) == len(page.data) + 2
    finally:
        await client.close()


async def test_a_model_is_retrieved_by_its_id_or_an_alias_as_the_models_api_resolves_one(gateway):
    client = anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0)
    try:
        for name in ("claude-haiku-4-5-20251001", "claude-haiku-4.5", "claude-haiku-4-5"):
            model = await client.models.retrieve(name)
            assert model.id == "claude-haiku-4-5-20251001", name
        with pytest.raises(anthropic.NotFoundError):
            await client.models.retrieve("claude-haiku-4-5-20991231")    # a dated id the catalogue lacks
    finally:
        await client.close()


# -- store upgrade and catalogue import ----------------------------------------

def make_v1_store(path: str) -> None:
    """A version-1 file as the old code left it: its DDL, its seed (one price edited), one ledger row."""
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in schema._split(schema.DDL + "\n" + schema._trigger_ddl()):      # the version-1 DDL
        conn.execute(stmt)
    # The seed as version 1 wrote it, with the operator's edits: an alias, a display name, a price.
    for row in (("claude-opus-4-5-20251101", "Claude Opus 4.5", ["claude-opus-4.5", "claude-opus-4-5", "opus"],
                 5.0, 25.0, 6.25, 10.0, 0.5),
                ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", ["claude-sonnet-4.5", "claude-sonnet-4-5"],
                 3.0, 15.0, 3.75, 6.0, 0.3),
                ("claude-haiku-4-5-20251001", "Quick Haiku", ["claude-haiku-4.5", "claude-haiku-4-5"],
                 0.8, 4.0, 1.0, 1.6, 0.08)):
        conn.execute("INSERT INTO models (id, display_name, created_at, aliases, input, output, cache_write_5m,"
                     " cache_write_1h, cache_read) VALUES (?, ?, '2025-10-01T00:00:00Z', ?, ?, ?, ?, ?, ?)",
                     (row[0], row[1], json.dumps(row[2]), *row[3:]))
    conn.execute("INSERT INTO usage (request_id, ts, endpoint, stream, status, duration_ms, cost, prices)"
                 " VALUES ('old', 1, '/v1/messages', 0, 200, 1, 0.25, '{}')")
    conn.execute("INSERT INTO meta (k, v) VALUES ('schema_version', '1'), ('seeded', '1')")
    conn.close()


def test_a_version_1_store_upgrades_in_place(tmp_path):
    path = str(tmp_path / "v1.db")
    make_v1_store(path)
    conn = schema.connect(path)
    assert schema.schema_version(conn) == schema.SCHEMA_VERSION == 10
    assert [tuple(r) for r in conn.execute("SELECT request_id, cost FROM usage")] == [("old", 0.25)]
    conn.execute("INSERT INTO usage (request_id, ts, endpoint, stream, status, duration_ms, cost)"
                 " VALUES ('new', 2, '/v1/messages', 0, 200, 1, NULL)")          # cost may now be unknown
    catalog = catalog_store.load_catalog(conn)
    haiku = catalog.lookup("claude-haiku-4-5-20251001")
    assert haiku.prices["input"] == Decimal("0.8")      # the operator's edit survives as an override
    assert haiku.display_name == "Quick Haiku"           # so do their names
    assert catalog.lookup("opus").id == "claude-opus-4-5-20251101"
    assert catalog.lookup("claude-opus-4-5-20251101").display_name == "Claude Opus 4.5"
    assert catalog.lookup("claude-sonnet-4-5-20250929").lifecycle == "retired"
    assert catalog.lookup("claude-opus-5-5") is not None
    conn.close()
    again = schema.connect(path)                          # nothing applied twice
    assert schema.schema_version(again) == schema.SCHEMA_VERSION
    again.close()


def test_import_keeps_operator_overrides(tmp_path, capsys):
    db = str(tmp_path / "store.db")
    assert cli.main(["prices", "set", "claude-opus-5", "--input", "4.5", "--db", db]) == 0
    newer = catalog_store.read_catalog_file()
    newer["version"] = "2099-01-01"
    for m in newer["models"]:
        if m["id"] in ("claude-opus-5", "claude-sonnet-5"):
            m["prices"][0]["input"] = 7
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(newer))
    assert cli.main(["prices", "import", str(path), "--db", db]) == 0
    assert "imported catalogue 2099-01-01" in capsys.readouterr().out
    conn = schema.connect(db)
    catalog = catalog_store.load_catalog(conn)
    assert catalog.lookup("claude-opus-5").prices["input"] == Decimal("4.5")     # operator's price kept
    assert catalog.lookup("claude-sonnet-5").prices["input"] == Decimal("7")     # catalogue updated
    conn.close()


def test_an_operators_price_keeps_the_prompt_size_band(tmp_path):
    """`prices set` on Haiku 5.5: the band above 100k stays, moved by the same factor as the base rate."""
    from apertis_proxy.gateway.pricing import price
    from apertis_proxy.plugin_api import UsageRecord
    db = str(tmp_path / "store.db")
    big = {"input_tokens": 120_000, "output_tokens": 1_000}

    def cost_now() -> Decimal:
        conn = schema.connect(db)
        catalog = catalog_store.load_catalog(conn)
        conn.close()
        record = UsageRecord(request_id="r", started_at=time.time(), endpoint="/v1/messages",
                             upstream_model="claude-haiku-5-5", **big)
        price(record, catalog)
        return Decimal(record.prices["cost"])

    # The shipped band: (120000*0.50 + 1000*2.50)/1e6 = 0.0625.
    assert cli.main(["prices", "set", "claude-haiku-5-5", "--cache-read", "0.01", "--db", db]) == 0
    assert cost_now() == Decimal("0.0625")          # input and output untouched: their band rates too
    assert cli.main(["prices", "set", "claude-haiku-5-5", "--input", "0.2", "--db", db]) == 0
    # Input doubled (0.10 -> 0.20): the band's input doubles too (0.50 -> 1.00): (120000*1 + 2500)/1e6.
    assert cost_now() == Decimal("0.1225")
