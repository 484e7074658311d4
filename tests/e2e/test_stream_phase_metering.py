"""A stream cut at each phase, by the upstream or by the client, is metered once with what the upstream reported:
tool_use input_json_delta, thinking deltas, after the final message_delta before message_stop, an in-band
overloaded_error after some output, and usage that only the final message_delta carries.

A real gateway (in process, real sockets, the SQLite ledger) in front of a ScriptedChannel writing exact bytes."""
from __future__ import annotations

import pytest

from tests.support.scripted_channel import CLOSE, HEAD_SSE, MESSAGE_STOP, chunk, event, message_start
from tests.support.scripted_gateway import ask, post, stream_until

MODEL = "claude-haiku-4-5-20251001"
# Haiku 4.5, USD per million tokens: input 1, output 5, cache read 0.10, cache write 5 m 1.25.
IN, OUT, READ, WRITE_5M = 1, 5, 0.10, 1.25
SEARCH = 0.01


def _block(index: int, start: dict, *deltas: dict) -> list[bytes]:
    return [event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}),
            *(event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
              for d in deltas),
            event("content_block_stop", {"type": "content_block_stop", "index": index})]


THINKING = _block(0, {"type": "thinking", "thinking": "", "signature": ""},
                  {"type": "thinking_delta", "thinking": "Let me think"},
                  {"type": "thinking_delta", "thinking": " about it"},
                  {"type": "signature_delta", "signature": "c2lnbmF0dXJl"})
TOOL = _block(1, {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}},
              {"type": "input_json_delta", "partial_json": ""},
              {"type": "input_json_delta", "partial_json": "{\"q\": \"we"},
              {"type": "input_json_delta", "partial_json": "ather\"}"})
FINAL = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                "usage": {"output_tokens": 40}})
EVENTS = [message_start(12), *THINKING, *TOOL, FINAL, MESSAGE_STOP]


def _cost(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * IN + output_tokens * OUT) / 1e6


def _upto(marker: bytes, nth: int = 1) -> list[bytes]:
    """The events up to and including the nth one whose bytes hold `marker`."""
    seen = 0
    for i, e in enumerate(EVENTS):
        if marker in e:
            seen += 1
            if seen == nth:
                return EVENTS[:i + 1]
    raise AssertionError(marker)


UPSTREAM_CUTS = {
    "during-thinking": (_upto(b"thinking_delta", 1), 1),
    "during-input-json": (_upto(b"input_json_delta", 2), 1),
    "after-message-delta": (_upto(b"message_delta"), 40),
}


@pytest.mark.parametrize("phase", list(UPSTREAM_CUTS))
async def test_an_upstream_cut_at_each_phase_meters_what_it_reported(scripted, phase):
    """The upstream closes the connection mid-stream: the client gets an in-band api_error, and the row holds the
    input of message_start and the output last reported (message_start's placeholder 1 until a message_delta)."""
    events, output = UPSTREAM_CUTS[phase]
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in events), CLOSE])
    response = await post(scripted, ask())
    assert response.status == 200
    assert response.sse_events()[-1][0] == "error"
    [row] = await scripted.usage_rows(1)
    assert (row["status"], row["error_type"]) == (200, "api_error")
    assert (row["input_tokens"], row["output_tokens"]) == (12, output)
    assert row["cost"] == pytest.approx(_cost(12, output), abs=1e-12)


@pytest.mark.parametrize("ending", ["clean-end", "close"])
async def test_an_in_band_overloaded_error_after_some_output_is_metered_once(scripted, ending):
    """message_start, a thinking block and part of a tool input, then `event: error` overloaded_error: the row
    keeps the reported input (priced), with the error's type."""
    await scripted.start()
    err = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    tail = [b"0\r\n\r\n"] if ending == "clean-end" else [CLOSE]
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in _upto(b"input_json_delta", 2)), chunk(err), *tail])
    response = await post(scripted, ask())
    assert response.status == 200
    assert [n for n, _ in response.sse_events()].count("error") == 1
    rows = await scripted.usage_rows(1)
    assert len(rows) == 1
    [row] = rows
    assert (row["status"], row["error_type"], row["input_tokens"]) == (200, "overloaded_error", 12)
    assert row["cost"] == pytest.approx(_cost(12, row["output_tokens"]), abs=1e-12)


async def _leave_after(env, marker: bytes) -> None:
    conn, seen = await stream_until(env, marker)
    conn.abort()
    assert b"message_stop" not in seen


@pytest.mark.parametrize("marker", [b"thinking_delta", b"input_json_delta", b"message_delta"],
                         ids=["thinking", "input-json", "message-delta"])
async def test_a_client_leaving_at_each_phase_is_billed_the_final_usage(scripted, marker):
    """The client leaves during thinking, during a tool's input, or after the final message_delta but before
    message_stop: the rest is drained and the row holds the final output (40), once."""
    await scripted.start()
    script: list = [HEAD_SSE]
    for e in EVENTS:
        script.append(chunk(e))
        if marker in e:
            script.append(0.4)
    scripted.channel.queue(script + [b"0\r\n\r\n"])
    await _leave_after(scripted, marker)
    await scripted.channel.wait_finished(1)
    rows = await scripted.usage_rows(1)
    assert len(rows) == 1
    [row] = rows
    assert (row["status"], row["interrupted"], row["error_type"]) == (200, 1, None)
    assert (row["input_tokens"], row["output_tokens"]) == (12, 40)
    assert row["cost"] == pytest.approx(_cost(12, 40), abs=1e-12)


async def test_usage_reported_only_in_the_final_message_delta_is_billed(scripted):
    """A message_start whose usage has only the output placeholder; the final message_delta carries the input,
    cache and server-tool counts (cumulative): all of them are billed."""
    await scripted.start()
    start = event("message_start", {"type": "message_start", "message": {
        "id": "msg_late", "type": "message", "role": "assistant", "model": MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"output_tokens": 1}}})
    final = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                        "stop_sequence": None},
                                    "usage": {"input_tokens": 300, "cache_read_input_tokens": 200,
                                              "cache_creation_input_tokens": 100, "output_tokens": 50,
                                              "server_tool_use": {"web_search_requests": 3}}})
    events = [start, *_block(0, {"type": "text", "text": ""}, {"type": "text_delta", "text": "ok"}), final,
              MESSAGE_STOP]
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in events), b"0\r\n\r\n"])
    response = await post(scripted, ask())
    assert response.status == 200
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["cache_read_input_tokens"], row["cache_creation_input_tokens"],
            row["output_tokens"], row["web_search_requests"]) == (300, 200, 100, 50, 3)
    expected = (300 * IN + 50 * OUT + 200 * READ + 100 * WRITE_5M) / 1e6 + 3 * SEARCH
    assert row["cost"] == pytest.approx(expected, abs=1e-12)
