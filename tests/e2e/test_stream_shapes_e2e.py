"""Stream shapes of the December 2026 API pass through the gateway untouched and are metered: unknown event names,
events before message_start, compaction blocks, thinking deltas with estimated_tokens, and a final message_delta
carrying context_management and input_transformations."""
from __future__ import annotations

import anthropic
import pytest

from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, chunk, event, message_start, text_events
from tests.support.scripted_gateway import ask, post

MODEL = "claude-haiku-4-5-20251001"


def block(index: int, start: dict, *deltas: dict) -> list[bytes]:
    return [event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}),
            *(event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
              for d in deltas),
            event("content_block_stop", {"type": "content_block_stop", "index": index})]


NEW_SHAPES = [
    event("stream_metadata", {"type": "stream_metadata", "thread": {"previous_message_id": None}}),
    event("message_start", {"type": "message_start", "message": {
        "id": "msg_shapes", "type": "message", "role": "assistant", "model": MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 30, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 0,
                  "output_tokens": 1, "service_tier": "standard", "speed": "standard", "inference_geo": "us"}}}),
    *block(0, {"type": "thinking", "thinking": "", "signature": ""},
           {"type": "thinking_delta", "thinking": "Let me see", "estimated_tokens": 3},
           {"type": "signature_delta", "signature": "sig"}),
    *block(1, {"type": "compaction", "content": ""}, {"type": "compaction_delta", "content": "Earlier: a summary."}),
    event("future_event_2027", {"type": "future_event_2027", "anything": [1, 2]}),
    *block(2, {"type": "text", "text": ""}, {"type": "text_delta", "text": "Answer"}),
    event("message_delta", {
        "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "context_management": {"applied_edits": [{"type": "clear_tool_uses_20250919", "cleared_tool_uses": 2}]},
        "input_transformations": [{"type": "compaction", "input_tokens_before": 90000}],
        "usage": {"input_tokens": 30, "cache_read_input_tokens": 5, "output_tokens": 42, "iterations": [
            {"type": "compaction", "input_tokens": 4000, "output_tokens": 600, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0},
            {"type": "message", "input_tokens": 30, "output_tokens": 42, "cache_read_input_tokens": 5,
             "cache_creation_input_tokens": 0}]}}),
    MESSAGE_STOP,
]


async def test_new_stream_shapes_reach_the_client_byte_for_byte_and_are_metered(scripted):
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in NEW_SHAPES), b"0\r\n\r\n"])
    response = await post(scripted, ask())
    assert response.status == 200
    assert response.body == b"".join(NEW_SHAPES)
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["cache_read_input_tokens"], row["output_tokens"]) == (30, 5, 42)
    assert (row["status"], row["error_type"]) == (200, None)
    # Haiku 4.5 list prices (1 / 5 / cache read 0.10 per million); the compaction iteration is billed on top of the
    # top-level counts, which leave it out.
    assert row["cost"] == pytest.approx((30 * 1 + 42 * 5 + 5 * 0.10 + 4000 * 1 + 600 * 5) / 1_000_000, abs=1e-12)


async def test_the_current_sdk_reads_such_a_stream_through_the_gateway(scripted):
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in NEW_SHAPES), b"0\r\n\r\n"])
    async with anthropic.AsyncAnthropic(base_url=scripted.base_url, api_key=scripted.key, max_retries=0) as client:
        async with client.beta.messages.stream(model=MODEL, max_tokens=64,
                                               messages=[{"role": "user", "content": "hi"}]) as stream:
            final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "compaction", "text"]
    assert final.content[2].text == "Answer" and final.usage.output_tokens == 42
    [row] = await scripted.usage_rows(1)
    assert row["output_tokens"] == 42


async def test_chunks_of_every_shape_each_in_its_own_read_reach_the_client_and_are_metered(scripted):
    """A paced stream: every chunk comes in a read of its own.  The usual ones go out as they came, the rest
    are decoded and framed again; the client reads the same events either way, and the usage is exact."""
    await scripted.start()
    block_start, delta, block_stop, message_delta = text_events("paced", output_tokens=9)
    crlf = delta.replace(b"\n", b"\r\n")
    events = [message_start(21), block_start, delta, delta, crlf, delta + delta, block_stop, message_delta,
              MESSAGE_STOP]
    script = [HEAD_SSE, chunk(events[0]), chunk(block_start),
              b"%04X\r\n%s\r\n" % (len(delta), delta),            # a size written otherwise
              b"%x;ext=1\r\n%s\r\n" % (len(delta), delta),        # with an extension
              *(chunk(e) for e in events[4:]), b"0\r\n\r\n"]
    scripted.channel.queue(script)
    response = await post(scripted, ask())
    assert response.status == 200 and response.is_chunked
    assert response.body == b"".join(events)
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["output_tokens"], row["status"], row["error_type"]) == (21, 9, 200, None)


def test_an_advisor_iteration_is_billed_at_its_own_model(tmp_db):
    from apertis_proxy.gateway.pricing import price
    from apertis_proxy.gateway.usage import UsageMeter
    from apertis_proxy.plugin_api import UsageRecord
    from apertis_proxy.store import schema
    from apertis_proxy.store.catalog import load_catalog
    conn = schema.connect(tmp_db)
    catalog = load_catalog(conn)
    conn.close()
    record = UsageRecord(request_id="req_1", started_at=0.0, endpoint="/v1/messages", upstream_model=MODEL)
    UsageMeter(record).body({"usage": {"input_tokens": 100, "output_tokens": 10, "iterations": [
        {"type": "message", "input_tokens": 100, "output_tokens": 10},
        {"type": "advisor_message", "model": "claude-opus-4-5-20251101", "input_tokens": 1000, "output_tokens": 200,
         "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}]}})
    price(record, catalog)
    # Haiku 4.5 for the top level (1 / 5), Opus 4.5 for the advisor (5 / 25), per million tokens.
    assert record.cost == pytest.approx((100 * 1 + 10 * 5 + 1000 * 5 + 200 * 25) / 1_000_000, abs=1e-12)
    assert (record.input_tokens, record.output_tokens) == (100, 10)


@pytest.mark.parametrize("opening", [
    [event("ping", {"type": "ping"})],
    [event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded",
                                                 "details": {"error_code": "compaction_unavailable"}},
                     "request_id": "req_upstream_inband"})],
], ids=["ping-before-message-start", "only-an-error-event"])
async def test_events_before_message_start_reach_the_client_byte_for_byte(scripted, opening):
    await scripted.start()
    events = opening if opening[0].startswith(b"event: error") else [
        *opening, message_start(), *text_events("after a ping"), MESSAGE_STOP]
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in events), b"0\r\n\r\n"])
    response = await post(scripted, ask())
    assert response.status == 200
    assert response.body == b"".join(events)
    assert response.header("upstream-request-id") == "req_scripted"
