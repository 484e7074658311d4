"""The bound a quota reserves (budgets/reservation.py request_bound) against what pricing.py bills for usage the
API can report for the very same body, on the shipped catalogue: billed <= bound, for input and models the body does
not show.

- `thread: {"type": "continue"}` (SDK 2.17 BetaMessageThreadParam: "only the new turn's messages are sent"): the
  earlier turns are input too; the bound counts a full context window.
- `fallbacks: "default"` (SDK 2.17 BetaFallbacksParam: the API retries a declined request on the model it picks):
  a further turn at a model the body does not name; the bound takes the dearest priced model for it.
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
    record = UsageRecord(request_id="req_bound", started_at=NOW, endpoint="/v1/messages",
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


def turn(kind: str, input_tokens: int, output_tokens: int, model: str | None = None) -> dict:
    return {"type": kind, "input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, **({"model": model} if model else {})}


@pytest.mark.parametrize("model, max_tokens, declined_output, fallback", [
    # Haiku 5.5 declines before any output; it is the catalogue's cheapest model, so the model the API picks
    # for the fallback is dearer (say Haiku 4.5).
    ("claude-haiku-5-5", 4096, 0, "claude-haiku-4-5-20251001"),
    # Fable 5 declines mid-stream after 12,000 tokens of billed output; Opus 4.8 (the chain the docs show)
    # then writes its own max_tokens.
    ("claude-fable-5", 16_000, 12_000, "claude-opus-4-8"),
], ids=["declined-before-output", "declined-mid-stream"])
def test_server_default_fallbacks_are_bounded_by_a_turn_at_any_model(catalog, model, max_tokens, declined_output,
                                                                     fallback):
    body = {"model": model, "max_tokens": max_tokens, "fallbacks": "default",
            "messages": [{"role": "user", "content": "Write the full report."}]}
    usage = {"input_tokens": 300, "output_tokens": declined_output,
             "iterations": [turn("message", 300, declined_output), turn("fallback_message", 300, max_tokens, fallback)]}
    bound, cost = reserved(catalog, body), billed(catalog, body, usage)
    assert cost <= bound, f'fallbacks "default": reserved bound ${bound:.6f} but it bills ${cost:.6f}'


def test_named_fallbacks_are_bounded_at_their_model_and_turn(catalog):
    # Control (holds today): the same request with the fallback named is bounded with a full-context turn at it.
    body = {"model": "claude-haiku-5-5", "max_tokens": 4096, "fallbacks": [{"model": "claude-haiku-4-5-20251001"}],
            "messages": [{"role": "user", "content": "Explain how this exploit sample works."}]}
    usage = {"input_tokens": 300, "output_tokens": 0,
             "iterations": [{"type": "fallback_message", "model": "claude-haiku-4-5-20251001", "input_tokens": 300,
                             "output_tokens": 4096}]}
    assert billed(catalog, body, usage) <= reserved(catalog, body)
