"""Money for the usage shapes of December 2026: iterations, the geo multiplier, batches, stream revisions.

Each test runs the real gateway on 127.0.0.1 in front of the mock upstream (usage scripted with
``x-mock-scenario: usage=...``) or a ScriptedChannel (a stream written byte for byte), and compares the
ledger row with a hand computation in Decimal (list prices of Dec 2026, anthropic-protocol.md section 9).
"""
from __future__ import annotations

import json
from decimal import Decimal

import anthropic

from tests.support.rawhttp import RawConnection, RawResponse
from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, chunk, event

M = Decimal(1_000_000)
SMALL = {"input_tokens": 1_000, "output_tokens": 100, "cache_read_input_tokens": 0,
         "cache_creation_input_tokens": 0}


def scenario(**usage) -> dict:
    return {"x-mock-scenario": "usage=" + json.dumps(usage)}


def body(model: str, *, stream: bool = False, **extra) -> dict:
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "bill me"}],
            "stream": stream, **extra}


async def post(env, payload: dict, headers: dict | None = None, path: str = "/v1/messages") -> RawResponse:
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("POST", path, {"x-api-key": env.key, **(headers or {})}, json_body=payload)


def charged(row: dict) -> Decimal:
    prices = json.loads(row["prices"]) if row["prices"] else {}
    return Decimal(prices["cost"]) if "cost" in prices else Decimal(repr(row["cost"]))


def iteration(kind: str, i: int, o: int, model: str | None = None) -> dict:
    it = {"type": kind, "input_tokens": i, "output_tokens": o, "cache_read_input_tokens": 0,
          "cache_creation_input_tokens": 0}
    if model:
        it["model"] = model
    return it


# -- iterations, geo and batches --------------------------------------------------------------------------------------

async def test_geo_us_multiplier_applies_to_compaction_iteration(gateway):
    """inference_geo "us" multiplies every token charge of a Claude 4.6+ request by 1.1, a compaction
    iteration's too (same model, same region).
    Sonnet 5 (2/10): top level (1000*2 + 100*10) = 3000; compaction (5000*2 + 300*10) = 13000; both x1.1:
    16000 * 1.1 / 1e6 = 0.0176."""
    usage = {**SMALL, "inference_geo": "us", "iterations": [iteration("message", 1_000, 100),
                                                             iteration("compaction", 5_000, 300)]}
    for stream in (False, True):
        assert (await post(gateway, body("claude-sonnet-5", stream=stream), scenario(**usage))).status == 200
    rows = await gateway.usage_rows(2)
    expected = (Decimal(3_000) + Decimal(13_000)) * Decimal("1.1") / M
    for row in rows:
        assert row["inference_geo"] == "us"
        assert charged(row) == expected, (
            f"stream={bool(row['stream'])}: expected ${expected} (compaction also x1.1 in the us geo), "
            f"got ${charged(row)}")


async def test_geo_us_multiplier_applies_to_advisor_iteration_on_a_4_6_plus_model(gateway):
    """An advisor sub-inference on Opus 5.5 inside a request served in the "us" geo takes the 1.1x geo
    multiplier its model (4.6+) carries.  Sonnet 5 top 3000 x1.1 = 3300; advisor Opus 5.5 (4/20):
    (2000*4 + 500*20) = 18000 x1.1 = 19800; total 23100/1e6 = 0.0231."""
    usage = {**SMALL, "inference_geo": "us",
             "iterations": [iteration("advisor_message", 2_000, 500, "claude-opus-5-5")]}
    assert (await post(gateway, body("claude-sonnet-5"), scenario(**usage))).status == 200
    [row] = await gateway.usage_rows(1)
    expected = Decimal("23100") / M
    [advisor] = json.loads(row["prices"])["iterations"]
    assert (advisor["model"], advisor["geo"], Decimal(advisor["cost"])) == ("claude-opus-5-5", "1.1", Decimal("0.0198"))
    assert charged(row) == expected, f"expected ${expected} (advisor on Opus 5.5 also x1.1 in us), got ${charged(row)}"


async def test_iterations_beyond_256_are_still_billed(gateway):
    """Every entry of usage.iterations is billed, however many: a compaction reported after a long
    server-side loop of 299 sampling iterations too.
    Sonnet 5: top 3000; 299 "message" entries (inside the top level: 0); then a compaction (5000*2 + 300*10)
    = 13000: total 16000/1e6 = 0.016."""
    its = [iteration("message", 10, 1) for _ in range(299)] + [iteration("compaction", 5_000, 300)]
    usage = {**SMALL, "iterations": its}
    assert (await post(gateway, body("claude-sonnet-5"), scenario(**usage))).status == 200
    [row] = await gateway.usage_rows(1)
    expected = Decimal(16_000) / M
    assert row["cost"] is None or charged(row) == expected, (
        f"expected ${expected} (or an unpriced row), got ${charged(row)}: the compaction at iteration 300 was dropped")


# -- streams, thinking, bands, free requests ---------------------------------------------------------------------

async def test_stream_delta_revises_input_cache_and_searches(scripted):
    """A stream whose message_delta revises the input and cache counts and brings web searches: the last values
    win, the 1 h split comes from message_start capped at the final total, fast + geo from message_start.
    Opus 4.8 (5/25/6.25/10/0.50), fast x2, us x1.1:
      input 1500*5 = 7500; output 40*25 = 1000; cache read 2000*0.5 = 1000;
      writes final 1200, 1h = min(1000, 1200) = 1000 -> 1000*10 = 10000; 5m 200*6.25 = 1250
      tokens 20750 * 2 * 1.1 = 45650 -> 0.04565; plus 2 searches * 0.01 = 0.02 -> 0.06565."""
    await scripted.start()
    start = event("message_start", {"type": "message_start", "message": {
        "id": "msg_rev", "type": "message", "role": "assistant", "model": "claude-opus-4-8", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 1000, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 0,
                  "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1000},
                  "output_tokens": 1, "service_tier": "standard", "speed": "fast", "inference_geo": "us"}}})
    blocks = [
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "hi"}}),
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None},
                                "usage": {"output_tokens": 20}}),
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": 40, "input_tokens": 1500, "cache_read_input_tokens": 2000,
                                          "cache_creation_input_tokens": 1200,
                                          "output_tokens_details": {"thinking_tokens": 30},
                                          "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1}}}),
    ]
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in [start, *blocks, MESSAGE_STOP]), b"0\r\n\r\n"])
    client = anthropic.AsyncAnthropic(api_key=scripted.key, base_url=scripted.base_url, max_retries=0)
    async with client.messages.stream(model="claude-opus-4-8", max_tokens=64,
                                      messages=[{"role": "user", "content": "hi"}], speed="fast") as s:
        final = await s.get_final_message()
    assert final.usage.output_tokens == 40
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_input_tokens"],
            row["cache_creation_input_tokens"]) == (1500, 40, 2000, 1200)
    assert (row["cache_creation_1h_input_tokens"], row["web_search_requests"],
            row["web_fetch_requests"]) == (1000, 2, 1)
    assert (row["speed"], row["inference_geo"]) == ("fast", "us")
    expected = Decimal(20_750) * 2 * Decimal("1.1") / M + Decimal("0.02")
    assert charged(row) == expected, f"expected ${expected}, got ${charged(row)}"


async def test_thinking_tokens_are_not_billed_twice(gateway):
    """output_tokens_details.thinking_tokens is inside output_tokens: Opus 5.5 (4/20) 1000 in, 900 out of which
    800 thinking: (4000 + 18000)/1e6 = 0.022, JSON and stream."""
    usage = {"input_tokens": 1_000, "output_tokens": 900, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0, "output_tokens_details": {"thinking_tokens": 800}}
    for stream in (False, True):
        assert (await post(gateway, body("claude-opus-5-5", stream=stream), scenario(**usage))).status == 200
    for row in await gateway.usage_rows(2):
        assert row["output_tokens"] == 900
        assert charged(row) == Decimal("0.022"), f"expected $0.022, got ${charged(row)}"


async def test_haiku_5_5_band_counts_cache_writes_and_applies_with_geo_and_batch(gateway):
    """Haiku 5.5: 60k input + 30k read + 20k writes (1h 5k) = 110k prompt > 100k: the whole request at the high
    band (0.50/2.50/0.625/1.00/0.05), then x1.1 (us) and x0.5 (batch):
      60000*0.5 = 30000; 2000*2.5 = 5000; 30000*0.05 = 1500; 15000*0.625 = 9375; 5000*1 = 5000 -> 50875
      * 1.1 * 0.5 = 27981.25 -> 0.02798125."""
    usage = {"input_tokens": 60_000, "output_tokens": 2_000, "cache_read_input_tokens": 30_000,
             "cache_creation_input_tokens": 20_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 15_000, "ephemeral_1h_input_tokens": 5_000},
             "inference_geo": "us", "service_tier": "batch"}
    for stream in (False, True):
        assert (await post(gateway, body("claude-haiku-5-5", stream=stream), scenario(**usage))).status == 200
    for row in await gateway.usage_rows(2):
        assert charged(row) == Decimal("0.02798125"), f"expected $0.02798125, got ${charged(row)}"
        assert json.loads(row["prices"])["band_above"] == 100_000


async def test_count_tokens_is_free_and_spend_equals_ledger(gateway):
    """count_tokens costs nothing and counts no tokens; the key's settled spend is the sum of its rows' costs;
    an upstream error answer costs 0."""
    ct = await post(gateway, {"model": "claude-opus-5", "messages": [{"role": "user", "content": "x"}]},
                    path="/v1/messages/count_tokens")
    assert ct.status == 200
    usage = {**SMALL, "cache_creation_input_tokens": 0}
    for model in ("claude-opus-5", "claude-sonnet-5-5", "claude-haiku-5-5"):
        assert (await post(gateway, body(model), scenario(**usage))).status == 200
    err = await post(gateway, body("claude-opus-5"), {"x-mock-scenario": "status=400"})
    assert err.status == 400
    rows = await gateway.usage_rows(5)
    assert len(rows) == 5
    assert rows[0]["cost"] == 0.0 and rows[0]["input_tokens"] == 0, rows[0]
    assert rows[-1]["cost"] == 0.0 and rows[-1]["input_tokens"] == 0
    # Opus 5 7500, Sonnet 5.5 3000, Haiku 5.5 150 -> 0.01065
    total = sum((charged(r) for r in rows[1:4]), Decimal(0))
    assert total == Decimal("0.01065"), total
    await gateway.stop()
    [(spent, tokens)] = [tuple(r) for r in gateway.query("SELECT cost, tokens FROM key_spend")]
    assert abs(Decimal(repr(spent)) - total) < Decimal("1e-9"), f"key spend {spent} != ledger {total}"
    assert tokens == 3 * 1_100


async def test_in_band_error_after_message_start_bills_reported_input(scripted):
    """An in-band error after message_start: the row keeps the input message_start reported (Opus 5: 2000 * 5
    = 0.01 plus the placeholder output 1 * 25 = 0.000025), is flagged, and the key's spend equals its cost."""
    await scripted.start()
    start = event("message_start", {"type": "message_start", "message": {
        "id": "msg_err", "type": "message", "role": "assistant", "model": "claude-opus-5", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 2000, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 1}}})
    err = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    scripted.channel.queue([HEAD_SSE, chunk(start), chunk(err), b"0\r\n\r\n"])
    async with await RawConnection.open(scripted.gateway.host, scripted.gateway.port) as conn:
        resp = await conn.request("POST", "/v1/messages", {"x-api-key": scripted.key},
                                  json_body=body("claude-opus-5", stream=True))
    assert resp.status == 200
    [row] = await scripted.usage_rows(1)
    assert row["error_type"] == "overloaded_error", row["error_type"]
    assert row["input_tokens"] == 2000
    assert charged(row) == Decimal("0.010025"), f"expected $0.010025, got ${charged(row)}"


async def test_batch_row_records_every_billed_dimension(gateway_env, mock_upstream):
    """Batch results (service tier batch, x0.5) are priced exactly, and the ledger row keeps the cache writes
    by TTL as they were billed (docs/billing.md: every billed dimension is recorded), per model too.
    Result a, Opus 5 (5/25/6.25/10/0.50), us x1.1, batch x0.5:
      1000*5 + 100*25 + 2000*0.5 + 1000*6.25 + 3000*10 = 5000+2500+1000+6250+30000 = 44750 -> *0.55 = 24612.5
      -> 0.0246125, plus 1 search 0.01 -> 0.0346125.
    Result b, Sonnet 5.5 (2/10/2.5/4/0.10), standard geo, batch: 1000*2 + 100*10 + 4000*4 = 19000 * 0.5 = 9500
      -> 0.0095.  Total 0.0441125."""
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    req = lambda cid, model: {"custom_id": cid, "params": {"model": model, "max_tokens": 64,  # noqa: E731
                                                            "messages": [{"role": "user", "content": "hi"}]}}
    usages = {
        "a": {"input_tokens": 1000, "output_tokens": 100, "cache_read_input_tokens": 2000,
              "cache_creation_input_tokens": 4000,
              "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 3000},
              "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0},
              "service_tier": "batch", "inference_geo": "us"},
        "b": {"input_tokens": 1000, "output_tokens": 100, "cache_read_input_tokens": 0,
              "cache_creation_input_tokens": 4000,
              "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 4000},
              "service_tier": "batch"},
    }
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        batch = await client.messages.batches.create(requests=[req("a", "claude-opus-5"),
                                                               req("b", "claude-sonnet-5-5")])
        for item in mock_upstream.batches.results[batch.id]:
            item["result"]["message"]["usage"] = usages[item["custom_id"]]
        results = [r async for r in await client.messages.batches.results(batch.id)]
    assert len(results) == 2
    [billed] = [r for r in await gateway_env.usage_rows(3) if r["cost"]]
    expected = Decimal("0.0441125")
    assert charged(billed) == expected, f"expected ${expected}, got ${charged(billed)}"
    assert billed["web_search_requests"] == 1
    assert billed["cache_creation_input_tokens"] == 8000
    assert billed["cache_creation_1h_input_tokens"] == 7000, (
        f"the batch row bills 7000 1-hour cache-write tokens (at 2x input) but records "
        f"cache_creation_1h_input_tokens={billed['cache_creation_1h_input_tokens']!r}: not auditable")
    assert billed["cache_creation_5m_input_tokens"] == 1000
    models = json.loads(billed["prices"])["models"]
    assert [(models[m]["cache_creation_5m_input_tokens"], models[m]["cache_creation_1h_input_tokens"])
            for m in ("claude-opus-5", "claude-sonnet-5-5")] == [(1000, 3000), (0, 4000)]
