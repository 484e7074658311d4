"""Review s10d: the bound a quota reserves (budgets/reservation.py request_bound) against what pricing.py then bills
for usage the API can legitimately report for the very same body, on the shipped catalogue.

The promise (README "Limits", reservation.py docstring): the bound is an UPPER bound of the request's cost, so a
quota is overshot by at most one request.  Each test here builds a body, computes the bound the keys plugin would
reserve for it (plugins/keys_auth.py: billed_models + request_bound on the decoded body), prices a usage object the
API may report for it, and asserts billed <= bound.

- `thread: {"type": "continue"}` (beta server-held conversation, anthropic SDK 2.17 BetaMessageThreadParam: "only
  the new turn's messages are sent"): the earlier turns are input the body does not show; the bound counts only the
  body's bytes.
- `fallbacks: "default"` (anthropic SDK 2.17 BetaFallbacksParam; platform docs "Refusals and fallback": the API
  retries a declined request on the fallback model Anthropic recommends): a second billed model turn, at a model
  the body does not name (a `fallback_message` iteration, billed by pricing.py at its own model); the bound counts
  one turn at the requested model only.
"""
from __future__ import annotations

import time

import orjson
import pytest

from apertis_proxy.budgets.reservation import billed_models, request_bound
from apertis_proxy.gateway.pricing import price
from apertis_proxy.gateway.usage import UsageMeter
from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import catalog as catalog_store
from apertis_proxy.store import schema

NOW = time.time()


@pytest.fixture
def catalog(tmp_path):
    conn = schema.connect(str(tmp_path / "gateway.db"))
    try:
        yield catalog_store.load_catalog(conn)
    finally:
        conn.close()


def reserved(catalog, body: dict) -> float:
    """What keys_auth._admit reserves against a USD quota for `body`."""
    raw = orjson.dumps(body)
    entries = billed_models(catalog, body["model"], (), NOW)
    return request_bound(catalog, entries, body, len(raw), NOW).cost


def billed(catalog, body: dict, usage: dict) -> float:
    """What the ledger row of `body` answered with `usage` costs (forward.py: UsageMeter then price())."""
    record = UsageRecord(request_id="req_review", started_at=NOW, endpoint="/v1/messages",
                         requested_model=body["model"], upstream_model=body["model"])
    UsageMeter(record).body({"usage": usage})
    price(record, catalog)
    assert record.cost is not None, record.prices
    return record.cost


def test_a_thread_continuation_is_bounded_by_the_conversation_the_server_holds(catalog):
    # Claude Code's default Sonnet, continuing a server-held thread: only the new user turn is in the body.
    body = {"model": "claude-sonnet-5", "max_tokens": 1024,
            "thread": {"type": "continue", "previous_message_id": "msg_01ReviewThreadAnchor"},
            "messages": [{"role": "user", "content": "And now run the tests again, please."}]}
    # The thread holds 150,000 tokens of earlier turns; even if every one of them is a cache read (the cheapest
    # way the API can bill them, $0.20/M on Sonnet 5), the request costs more than its bound.
    usage = {"input_tokens": 12, "cache_read_input_tokens": 150_000, "cache_creation_input_tokens": 0,
             "output_tokens": 1024}
    bound, cost = reserved(catalog, body), billed(catalog, body, usage)
    assert cost <= bound, (
        f"thread continue: reserved bound ${bound:.6f} but the same request bills ${cost:.6f} "
        f"({cost / bound:.1f}x); N such requests in flight overshoot a USD quota by N x ${cost - bound:.6f}")


def test_a_thread_continuation_uncached_on_haiku_5_5_crosses_the_prompt_band(catalog):
    # The server-held history, not cached, pushes the prompt above Haiku 5.5's 100k band (5x every rate).
    body = {"model": "claude-haiku-5-5", "max_tokens": 1024,
            "thread": {"type": "continue", "previous_message_id": "msg_01ReviewThreadAnchor"},
            "messages": [{"role": "user", "content": "Continue."}]}
    usage = {"input_tokens": 150_000, "output_tokens": 1024}
    bound, cost = reserved(catalog, body), billed(catalog, body, usage)
    assert cost <= bound, (
        f"thread continue on Haiku 5.5: reserved bound ${bound:.6f} but it bills ${cost:.6f} ({cost / bound:.0f}x)")


def test_server_default_fallbacks_are_bounded_by_the_fallback_turn(catalog):
    # Haiku 5.5 has refusal classifiers (platform docs, "Refusals and fallback"); with fallbacks "default" the API
    # retries a declined request on a model Anthropic picks, which the body does not name.  Haiku 5.5 is the
    # cheapest model of the catalogue ($0.10/$0.50), so whichever model serves the fallback is dearer; say Haiku 4.5.
    body = {"model": "claude-haiku-5-5", "max_tokens": 4096, "fallbacks": "default",
            "messages": [{"role": "user", "content": "Explain how this exploit sample works."}]}
    usage = {  # the declined hop (top level, a refusal before any output), then the fallback's answer
        "input_tokens": 300, "output_tokens": 0,
        "iterations": [
            {"type": "message", "input_tokens": 300, "output_tokens": 0,
             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            {"type": "fallback_message", "model": "claude-haiku-4-5-20251001", "input_tokens": 300,
             "output_tokens": 4096, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}]}
    bound, cost = reserved(catalog, body), billed(catalog, body, usage)
    assert cost <= bound, (
        f'fallbacks "default": reserved bound ${bound:.6f} but it bills ${cost:.6f} ({cost / bound:.1f}x): the '
        f"bound has no fallback turn and none of the fallback model's rates")


def test_server_default_fallbacks_bound_a_second_turn_even_at_a_cheaper_model(catalog):
    # Fable 5 falls back to Opus 4.8 (the chain the docs show); a refusal may come mid-stream, after output was
    # generated and billed, and the fallback then writes its own max_tokens.  The bound holds one turn only.
    body = {"model": "claude-fable-5", "max_tokens": 16_000, "fallbacks": "default",
            "messages": [{"role": "user", "content": "Write the full report."}]}
    usage = {"input_tokens": 200, "output_tokens": 12_000,
             "iterations": [
                 {"type": "message", "input_tokens": 200, "output_tokens": 12_000,
                  "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
                 {"type": "fallback_message", "model": "claude-opus-4-8", "input_tokens": 200,
                  "output_tokens": 16_000, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}]}
    bound, cost = reserved(catalog, body), billed(catalog, body, usage)
    assert cost <= bound, (
        f'fallbacks "default" (Fable 5 -> Opus 4.8, refused mid-stream): reserved bound ${bound:.6f} but it bills '
        f"${cost:.6f}")


def test_named_fallbacks_are_bounded_at_their_model_and_turn(catalog):
    # Control (holds today): the same request with the fallback named is bounded with a full-context turn at it.
    body = {"model": "claude-haiku-5-5", "max_tokens": 4096, "fallbacks": [{"model": "claude-haiku-4-5-20251001"}],
            "messages": [{"role": "user", "content": "Explain how this exploit sample works."}]}
    usage = {"input_tokens": 300, "output_tokens": 0,
             "iterations": [{"type": "fallback_message", "model": "claude-haiku-4-5-20251001", "input_tokens": 300,
                             "output_tokens": 4096}]}
    assert billed(catalog, body, usage) <= reserved(catalog, body)
