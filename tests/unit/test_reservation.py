"""The bound a quota reserves for a request (budgets/reservation.py), on the shipped catalogue: the models a
request may be billed at, and what the body shows of its size and of the turns billed to it."""
from __future__ import annotations

import time

import orjson
import pytest

from apertis_proxy.budgets.reservation import (IMAGE_TOKENS, SERVER_LOOP_TURNS, TOOL_PROMPT_TOKENS,
                                               TYPED_TOOL_TOKENS, billed_models, request_bound)
from apertis_proxy.store import catalog as catalog_store
from apertis_proxy.store import schema

HAIKU = "claude-haiku-4-5-20251001"          # $1 / $5; cache writes 1h $2; context 200,000; no geo price
OPUS = "claude-opus-5-5"                     # $4 / $20; cache writes 1h $8; context 1,000,000
NOW = time.time()
GEO = 1.1                                    # the dearest inference geo ("us") of Opus 5.5 and Fable 5.2


@pytest.fixture
def conn(tmp_path):
    conn = schema.connect(str(tmp_path / "gateway.db"))
    yield conn
    conn.close()


def bound(catalog, body, model=None, aliases=()):
    raw = orjson.dumps(body)
    entries = billed_models(catalog, model or body["model"], aliases, NOW)
    return request_bound(catalog, entries, body, len(raw), NOW), len(raw)


def plain(**extra):
    return {"model": HAIKU, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_a_plain_request_is_its_bytes_at_the_top_input_rate_and_max_tokens_of_output(conn):
    catalog = catalog_store.load_catalog(conn)
    b, size = bound(catalog, plain())
    assert b.tokens == size + 1000
    assert b.cost == pytest.approx((size * 2 + 1000 * 5) / 1e6)    # top input rate: the 1h cache write


def test_a_channel_alias_is_bounded_at_the_model_it_sends_upstream(conn):
    catalog = catalog_store.load_catalog(conn)
    body = {**plain(), "model": "fast"}
    alone, size = bound(catalog, body)
    assert alone.cost == 0                                          # no price for a name only a channel knows
    b, _ = bound(catalog, body, aliases=[{"fast": HAIKU}, {"other": OPUS}])
    assert b.cost == pytest.approx((size * 2 + 1000 * 5) / 1e6)
    # Two channels sending the name to different models: the dearer one bounds it.
    b, _ = bound(catalog, body, aliases=[{"fast": HAIKU}, {"fast": OPUS}])
    assert b.cost == pytest.approx((size * 8 + 1000 * 20) / 1e6 * GEO)


def test_a_retired_model_is_bounded_at_the_successor_it_is_sent_to(conn):
    catalog_store.set_model(conn, "claude-sonnet-4-5-20250929", successor=OPUS)   # retired; sent to Opus 5.5
    catalog = catalog_store.load_catalog(conn)
    names = {e.id for e in billed_models(catalog, "claude-sonnet-4-5", (), NOW)}
    assert names == {"claude-sonnet-4-5-20250929", OPUS, "claude-sonnet-5-5"}   # the documented successor too
    b, size = bound(catalog, {**plain(), "model": "claude-sonnet-4-5"})
    assert b.cost == pytest.approx((size * 8 + 1000 * 20) / 1e6 * GEO)
    # A live model is not bounded at its documented successor.
    assert {e.id for e in billed_models(catalog, HAIKU, (), NOW)} == {HAIKU}


def test_the_models_a_request_is_billed_at_change_when_a_price_comes_into_force(conn):
    """They are remembered per model, but not past a moment that changes them: here a new model priced only
    from NOW + 100 is sent to its successor until then."""
    catalog_store.set_model(conn, "claude-next-1", prices={"input": 1, "output": 5}, effective_from=NOW + 100,
                            successor=HAIKU)
    catalog = catalog_store.load_catalog(conn)
    for at, names in ((NOW, {"claude-next-1", HAIKU}), (NOW + 99, {"claude-next-1", HAIKU}),
                      (NOW + 100, {"claude-next-1"}), (NOW + 5000, {"claude-next-1"}),
                      (NOW, {"claude-next-1", HAIKU})):
        assert {e.id for e in billed_models(catalog, "claude-next-1", (), at)} == names, at


def test_tools_add_what_the_api_adds_to_the_prompt(conn):
    catalog = catalog_store.load_catalog(conn)
    custom = {"name": "f", "input_schema": {"type": "object"}}
    b, size = bound(catalog, plain(tools=[custom]))
    assert b.tokens == size + TOOL_PROMPT_TOKENS + 1000
    b, size = bound(catalog, plain(tools=[custom, {"type": "bash_20250124", "name": "bash"}]))
    assert b.tokens == size + TOOL_PROMPT_TOKENS + TYPED_TOOL_TOKENS + 1000


def test_a_server_tool_loop_is_bounded_by_full_context_turns(conn):
    catalog = catalog_store.load_catalog(conn)
    b, size = bound(catalog, plain(tools=[{"type": "web_fetch_20250910", "name": "web_fetch"}]))
    first = size + TOOL_PROMPT_TOKENS + TYPED_TOOL_TOKENS
    further = SERVER_LOOP_TURNS - 1
    assert b.tokens == first + 1000 + further * (200_000 + 1000)
    assert b.cost == pytest.approx((first * 2 + 1000 * 5 + further * (200_000 * 2 + 1000 * 5)) / 1e6)


def test_web_searches_add_their_fee_up_to_max_uses(conn):
    catalog = catalog_store.load_catalog(conn)
    fee = float(catalog.rates.web_search_per_request)
    tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]
    with_search, _ = bound(catalog, plain(tools=tools))
    fetch = [{"type": "web_fetch_20250910", "name": "web_search", "max_uses": 3}]   # same size, no fee
    without, _ = bound(catalog, plain(tools=fetch))
    assert with_search.cost == pytest.approx(without.cost + 3 * fee)


@pytest.mark.parametrize("source", [{"type": "url", "url": "https://example.com/a.pdf"},
                                    {"type": "file", "file_id": "file_011abc"}])
def test_a_document_the_body_does_not_hold_may_fill_the_context(conn, source):
    catalog = catalog_store.load_catalog(conn)
    body = plain(messages=[{"role": "user", "content": [{"type": "document", "source": source},
                                                         {"type": "text", "text": "summarise"}]}])
    b, _ = bound(catalog, body)
    assert b.tokens == 200_000 + 1000
    # Also inside a tool result.
    nested = plain(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document", "source": source}]}]}])
    assert bound(catalog, nested)[0].tokens == 200_000 + 1000


def test_every_image_counts_as_a_large_image(conn):
    """By URL, or a small base64 image (a 1-bit PNG of a megapixel is a few hundred bytes and ~1,600 tokens)."""
    catalog = catalog_store.load_catalog(conn)
    by_url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    tiny = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    b, size = bound(catalog, plain(messages=[{"role": "user", "content": [by_url, tiny]}]))
    assert b.tokens == size + 2 * IMAGE_TOKENS + 1000


def test_a_pdf_may_fill_the_context_whatever_its_size(conn):
    catalog = catalog_store.load_catalog(conn)
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
    assert bound(catalog, plain(messages=[{"role": "user", "content": [pdf]}]))[0].tokens == 200_000 + 1000


def test_absurd_numbers_are_bounded_not_overflowed(conn):
    """A bound must fit the stores' 64-bit columns: no 500 for max_tokens = 2**63 - 1."""
    catalog = catalog_store.load_catalog(conn)
    advisor = {"type": "advisor_20260301", "name": "advisor", "model": OPUS, "max_uses": 10 ** 18}
    b, _ = bound(catalog, plain(max_tokens=2 ** 63 - 1, tools=[advisor]))
    assert 0 < b.tokens <= 2 ** 53 and 0 < b.cost <= 2 ** 53


def test_fallbacks_and_advisors_are_priced_at_the_models_they_name(conn):
    catalog = catalog_store.load_catalog(conn)
    b, size = bound(catalog, plain(fallbacks=[{"model": OPUS}]))
    # The fallback turn may fill Opus's context at Opus's rates; the first turn too is priced at the dearest.
    assert b.tokens == size + 1000 + 1_000_000 + 1000
    assert b.cost >= (1_000_000 * 8 + 1000 * 20) / 1e6
    advisor = {"type": "advisor_20260301", "name": "advisor", "model": OPUS, "max_uses": 2}
    b2, _ = bound(catalog, plain(tools=[advisor]))
    assert b2.cost > 2 * (1_000_000 * 8) / 1e6


def test_fast_mode_and_geo_multiply_the_bound(conn):
    catalog = catalog_store.load_catalog(conn)
    fable = "claude-fable-5-2"          # $16 per million for 1h cache writes, $40 output; fast x2, geo "us" x1.1
    b, size = bound(catalog, {**plain(speed="fast", inference_geo="us"), "model": fable})
    assert b.cost == pytest.approx((size * 16 + 1000 * 40) / 1e6 * 2 * GEO)


@pytest.mark.parametrize("extra", [{}, {"speed": "fast"}, {"max_tokens": 0},
                                   {"messages": [{"role": "user", "content": [
                                       {"type": "image", "source": {"type": "base64", "data": "AA=="}}]}]}])
def test_a_one_turn_request_is_bounded_as_the_general_case_would(conn, extra):
    """Entries as a tuple (billed_models' own) take the one-turn path, kept per entries; any other sequence
    the general one: both give the same bound."""
    catalog = catalog_store.load_catalog(conn)
    body = plain(**extra)
    size = len(orjson.dumps(body))
    for model in (HAIKU, OPUS):
        entries = billed_models(catalog, model, (), NOW)
        assert type(entries) is tuple
        kept = request_bound(catalog, entries, body, size, NOW)
        assert kept == request_bound(catalog, list(entries), body, size, NOW)
        assert kept == request_bound(catalog, entries, body, size, NOW)


def test_the_rates_of_a_one_turn_request_change_when_a_price_comes_into_force(conn):
    catalog_store.set_model(conn, HAIKU, prices={"input": 10, "output": 50}, effective_from=NOW + 100)
    catalog = catalog_store.load_catalog(conn)
    entries = tuple(e for e in billed_models(catalog, HAIKU, (), NOW) if e.id == HAIKU)
    body = plain()
    size = len(orjson.dumps(body))
    before = request_bound(catalog, entries, body, size, NOW + 99)
    after = request_bound(catalog, entries, body, size, NOW + 100)
    assert before.cost == pytest.approx((size * 2 + 1000 * 5) / 1e6)
    assert after.cost == pytest.approx((size * 10 + 1000 * 50) / 1e6)
    assert request_bound(catalog, entries, body, size, NOW).cost == before.cost


@pytest.mark.parametrize("config, turns", [
    ({"edits": [{"type": "clear_tool_uses_20250919"}, {"type": "clear_thinking_20251015"}]}, 0),
    ({"edits": [{"type": "clear_thinking_20251015"}, {"type": "compact_20260112"}]}, 1),
    ({"edits": [{"type": "some_future_edit"}]}, 1),         # an edit not known to only drop context
    ({"edits": "not a list"}, 1),
], ids=["clearing", "compacting", "unknown-edit", "unreadable"])
def test_context_management_adds_a_turn_only_when_it_may_compact(conn, config, turns):
    catalog = catalog_store.load_catalog(conn)
    b, size = bound(catalog, plain(context_management=config))
    context = 200_000                               # Haiku 4.5's window
    assert b.tokens == size + 1000 + turns * (context + 1000)
