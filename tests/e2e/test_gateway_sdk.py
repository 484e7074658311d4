"""The official `anthropic` SDK, both generations (2.x in process, 1.x in a child process), sync and async, and the
official JavaScript SDK (`@anthropic-ai/sdk`, async, in a Node child process), through the gateway to the mock
upstream.

Each test checks three things: what the SDK produced, what the upstream received (the channel's credential and
version, the body as sent) and the usage row the meter wrote (equal to the usage the mock reported). Tests that
use the `sdk` fixture run five times; behaviour that does not depend on the client generation uses one runner.
"""
from __future__ import annotations

import json
import re

import pytest

from tests.support.gateway_env import NO_COOLDOWNS
from tests.support.mock_replies import REPLY_TAIL, thinking_signature
from tests.support.mock_upstream import MOCK_API_KEY
from tests.support.rawhttp import RawConnection
from tests.support.sdk_scenarios import DEFAULT_MODEL as MODEL
from tests.support.sdk_scenarios import PDF_TINY, PNG_1X1

REQUEST_ID = re.compile(r"req_[0-9a-f]{24}")
CHANNEL_VERSION = "2023-06-01"          # the channel's anthropic-version (the store's default)
TOKEN_COUNTS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def expected_text(text: str, turn: int = 1, note: str = "") -> str:
    return f"Echo: {text} (turn {turn}{note}) {REPLY_TAIL}"


def assert_upstream_credentials(request) -> None:
    """The channel's key as the one credential, and the channel's version, whatever the SDK sent."""
    assert request.header_values("x-api-key") == [MOCK_API_KEY]
    assert "authorization" not in request.headers
    assert request.header_values("anthropic-version") == [CHANNEL_VERSION]


def assert_row_matches(row: dict, served: dict, *, stream: bool) -> None:
    """A usage row holds exactly what the mock reported, under the gateway's key and channel."""
    assert row["key_name"] == "alice" and row["channel_name"] == "main"
    assert row["status"] == 200 and row["stream"] == int(stream)
    for name in TOKEN_COUNTS:
        assert row[name] == served["usage"][name], name
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0


# -- the basic calls ----------------------------------------------------------------------------------------

async def test_plain_message(sdk, gateway):
    result = await sdk.run("plain", gateway.base_url, gateway.key, text="Hello gateway")
    assert "error" not in result, result
    assert result["text"] == expected_text("Hello gateway")
    message = result["message"]
    assert message["model"] == MODEL and message["stop_reason"] == "end_turn"

    upstream = gateway.mock.last_request
    assert_upstream_credentials(upstream)
    assert upstream.query == "" and upstream.body["messages"] == [{"role": "user", "content": "Hello gateway"}]
    assert upstream.header_values("x-stainless-lang") == [sdk.lang]     # the SDK's own headers pass through
    # The client sees the gateway's request id; the upstream's is kept beside it.
    assert REQUEST_ID.fullmatch(result["request_id"]) and result["request_id"] != upstream.request_id
    assert result["headers"]["upstream-request-id"] == upstream.request_id

    served = gateway.mock.served[-1]
    assert message["usage"] == served["usage"]
    [row] = await gateway.usage_rows(1)
    assert_row_matches(row, served, stream=False)
    assert row["request_id"] == result["request_id"] and row["upstream_request_id"] == upstream.request_id
    assert row["requested_model"] == row["upstream_model"] == MODEL


async def test_system_prompt(sdk, gateway):
    result = await sdk.run("system_prompt", gateway.base_url, gateway.key, text="Who?", system="Be brief.")
    assert result["text"] == expected_text("Who?", note=", system: Be brief.")
    assert gateway.mock.last_request.body["system"] == "Be brief."


async def test_multi_turn(sdk, gateway):
    result = await sdk.run("multi_turn", gateway.base_url, gateway.key, text="one", follow_up="two")
    assert result["first"]["text"] == expected_text("one")
    assert result["second"]["text"] == expected_text("two", turn=2)
    history = gateway.mock.last_request.body["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"] == result["first"]["message"]["content"]
    rows = await gateway.usage_rows(2)
    for row, served in zip(rows, gateway.mock.served, strict=True):
        assert_row_matches(row, served, stream=False)


# -- streaming --------------------------------------------------------------------------------------------------

async def test_stream_text_and_final_message(sdk, gateway):
    result = await sdk.run("stream_text", gateway.base_url, gateway.key, text="Stream me")
    assert "error" not in result, result
    expected = expected_text("Stream me")
    assert "".join(result["pieces"]) == expected == result["message"]["content"][0]["text"]
    assert len(result["pieces"]) == len(expected.split())            # one piece per upstream delta
    assert result["headers"]["content-type"] == "text/event-stream; charset=utf-8"
    assert result["headers"]["cache-control"] == "no-cache"
    assert REQUEST_ID.fullmatch(result["request_id"])

    served = gateway.mock.served[-1]
    assert served["completed"] and result["message"]["usage"]["output_tokens"] == served["usage"]["output_tokens"]
    assert_upstream_credentials(gateway.mock.last_request)
    [row] = await gateway.usage_rows(1)
    assert_row_matches(row, served, stream=True)
    assert row["request_id"] == result["request_id"] and row["interrupted"] == 0


async def test_raw_stream_event_order(sdk, gateway):
    result = await sdk.run("raw_stream", gateway.base_url, gateway.key, text="raw order",
                           headers={"x-mock-scenario": "unknown-event"})
    assert "error" not in result, result
    types = [e["type"] for e in result["events"]]
    known = [t for t in types if t != "mock_future_event"]            # the SDK may or may not pass it on
    deltas = known.count("content_block_delta")
    assert known == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    assert result["text"] == expected_text("raw order")
    assert result["events"][-2]["usage"]["output_tokens"] == deltas == gateway.mock.served[-1]["usage"]["output_tokens"]


async def test_stream_bytes_are_forwarded_unchanged(gateway):
    """Byte for byte what the upstream sends (ping with upstream's own spacing, an unknown event type, raw UTF-8),
    apart from the per-reply message id."""
    body = {"model": MODEL, "max_tokens": 256, "stream": True,
            "messages": [{"role": "user", "content": "wire check ✓"}]}
    scenario = {"x-mock-scenario": "unknown-event"}
    mock = gateway.mock
    async with await RawConnection.open(mock.host, mock.port) as conn:
        direct = await conn.request("POST", "/v1/messages", {"x-api-key": MOCK_API_KEY,
                                                             "anthropic-version": CHANNEL_VERSION, **scenario},
                                    json_body=body)
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        proxied = await conn.request("POST", "/v1/messages", {"x-api-key": gateway.key, **scenario}, json_body=body)
    assert direct.status == proxied.status == 200

    def normalised(data: bytes) -> bytes:
        return re.sub(rb"msg_[0-9a-f]{24}", b"msg_ID", data)

    assert normalised(proxied.body) == normalised(direct.body)
    events = proxied.sse_events()
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert ("ping", '{"type": "ping"}') in events
    assert "mock_future_event" in names
    assert all(json.loads(data)["type"] == name for name, data in events)


async def test_tool_use_with_streamed_input_json(sdk, gateway):
    result = await sdk.run("tool_use_stream", gateway.base_url, gateway.key)
    assert "error" not in result, result
    tool_use = result["tool_use"]
    assert tool_use["name"] == "get_weather" and tool_use["id"].startswith("toolu_")
    assert tool_use["input"] == {"city": REPLY_TAIL, "days": 42}
    fragments = result["call"]["input_json"]
    assert fragments[0] == "" and len(fragments) > 2
    assert json.loads("".join(fragments)) == tool_use["input"]
    assert result["call"]["message"]["stop_reason"] == "tool_use"
    # The tool result went back through the gateway and got its answer.
    last = gateway.mock.last_request.body["messages"][-1]["content"][0]
    assert last == {"type": "tool_result", "tool_use_id": tool_use["id"], "content": "Sunny, 21 C"}
    assert "Sunny, 21 C" in result["answer"]["text"]
    rows = await gateway.usage_rows(2)
    assert_row_matches(rows[0], gateway.mock.served[0], stream=True)
    assert_row_matches(rows[1], gateway.mock.served[1], stream=False)


async def test_extended_thinking_with_signature(sdk, gateway):
    result = await sdk.run("thinking_stream", gateway.base_url, gateway.key, text="ponder")
    assert "error" not in result, result
    call = result["call"]
    thinking, text = call["message"]["content"]
    assert thinking["type"] == "thinking" and text["type"] == "text"
    assert "".join(call["thinking"]) == thinking["thinking"] == "Thinking about: ponder ✓"
    assert call["signature"] == thinking["signature"] == thinking_signature(MOCK_API_KEY, thinking["thinking"])
    assert call["events"].index("signature") < call["events"].index("text")
    # The signed block went back upstream intact: the mock verifies signatures, and the follow-up succeeded.
    assert "error" not in result["follow_up"], result["follow_up"]
    assert result["follow_up"]["text"].startswith("Echo: And then? (turn 2)")
    assert gateway.mock.last_request.body["messages"][1]["content"][0] == thinking
    rows = await gateway.usage_rows(2)
    assert_row_matches(rows[0], gateway.mock.served[0], stream=True)


# -- content blocks and beta calls ------------------------------------------------------------------------------

async def test_image_block(sdk, gateway):
    result = await sdk.run("image", gateway.base_url, gateway.key, text="What is this?")
    assert result["text"] == expected_text("What is this?", note=", saw 1 image")
    block = gateway.mock.last_request.body["messages"][0]["content"][0]
    assert block == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1X1}}


async def test_pdf_document_block(sdk, gateway):
    result = await sdk.run("pdf", gateway.base_url, gateway.key, text="Summarise")
    assert result["text"] == expected_text("Summarise", note=", saw 1 document")
    block = gateway.mock.last_request.body["messages"][0]["content"][0]
    assert block["source"] == {"type": "base64", "media_type": "application/pdf", "data": PDF_TINY}


async def test_beta_call(sdk, gateway):
    result = await sdk.run("beta_message", gateway.base_url, gateway.key, text="beta", betas=("b-one", "b-two"))
    assert "error" not in result, result
    assert result["text"] == expected_text("beta")
    upstream = gateway.mock.last_request
    assert upstream.path == "/v1/messages" and upstream.query == sdk.beta_query   # ?beta=true kept for 1.x
    assert upstream.header_values("anthropic-beta") == ["b-one,b-two"]
    assert_upstream_credentials(upstream)


# -- authentication ---------------------------------------------------------------------------------------------

async def test_both_auth_header_styles(sdk, gateway):
    for auth in ("x-api-key", "bearer"):
        result = await sdk.run("plain", gateway.base_url, gateway.key, auth=auth, text=auth)
        assert result["text"] == expected_text(auth), result
        assert_upstream_credentials(gateway.mock.last_request)
    rows = await gateway.usage_rows(2)
    assert [row["key_name"] for row in rows] == ["alice", "alice"]


async def test_bad_or_missing_key(sdk, gateway):
    for key, auth in (("sk-apertis-wrong", "default"), (gateway.key, "none")):
        result = await sdk.run("plain", gateway.base_url, key, auth=auth)
        error = result["error"]
        assert error["status"] == 401 and error["type"] == "authentication_error"
        assert error["class"] == "AuthenticationError"
        # The gateway's own answer: its request id in the body and in the head, the same.
        assert re.fullmatch(r"req_[0-9a-f]{24}", error["body"]["request_id"]), error["body"]
        assert error["request_id"] == error["body"]["request_id"]
    assert gateway.mock.requests == []


# -- upstream failures ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gateway", [NO_COOLDOWNS], indirect=True)
async def test_upstream_529_before_any_byte(sdk, gateway):
    for scenario in ("plain", "stream_text"):
        result = await sdk.run(scenario, gateway.base_url, gateway.key,
                               headers={"x-mock-scenario": "status=529; message=Upstream is busy"})
        error = result["error"]
        assert error["status"] == 529 and error["type"] == "overloaded_error", error
        assert error["class"] == "OverloadedError" and error["body"]["error"]["message"] == "Upstream is busy"
    assert len(gateway.mock.requests) == 2 and gateway.mock.served == []
    rows = await gateway.usage_rows(2)
    assert [(r["status"], r["error_type"], r["stream"]) for r in rows] == [
        (529, "overloaded_error", 0), (529, "overloaded_error", 1)]
    assert [r["upstream_request_id"] for r in rows] == [r.request_id for r in gateway.mock.requests]


async def test_upstream_drops_mid_stream(sdk, gateway):
    result = await sdk.run("stream_text", gateway.base_url, gateway.key, text="cut short",
                           headers={"x-mock-scenario": "drop-after=5"})
    error = result["error"]
    # The gateway turned the cut into an in-band error event, which the SDK raises as an API error.
    assert error["class"] == sdk.stream_error_class and error["type"] == "api_error", error
    # message_start, content_block_start, ping and two text deltas went out before the cut.
    assert error["partial"]["pieces"] == ["Echo: ", "cut "]
    served = gateway.mock.served[-1]
    assert not served["completed"] and served["events_sent"] == 5
    [row] = await gateway.usage_rows(1)
    assert row["status"] == 200 and row["error_type"] == "api_error" and row["interrupted"] == 0
    assert row["input_tokens"] == served["usage"]["input_tokens"] > 0
    assert row["output_tokens"] == served["usage"]["output_tokens"]


async def test_awkward_chunk_splits_still_parse(sdk, gateway):
    result = await sdk.run("stream_text", gateway.base_url, gateway.key, text="naïve ✓ 日本語 text",
                           headers={"x-mock-scenario": "split=awkward; unknown-event; message-deltas=3"})
    assert "error" not in result, result
    expected = expected_text("naïve ✓ 日本語 text")
    assert "".join(result["pieces"]) == expected == result["message"]["content"][0]["text"]
    served = gateway.mock.served[-1]
    assert result["message"]["usage"]["output_tokens"] == served["usage"]["output_tokens"]
    [row] = await gateway.usage_rows(1)
    assert_row_matches(row, served, stream=True)          # the last cumulative message_delta, not a sum


# -- model aliases and usage ------------------------------------------------------------------------------------

async def test_model_alias_resolved_upstream_and_kept_for_the_client(make_sdk, gateway):
    alias, dated = "claude-haiku-4.5", "claude-haiku-4-5-20251001"
    sdk = make_sdk("2.x", "async")
    created = await sdk.run("plain", gateway.base_url, gateway.key, model=alias, text="alias json")
    streamed = await sdk.run("raw_stream", gateway.base_url, gateway.key, model=alias, text="alias stream")
    assert "error" not in created and "error" not in streamed, (created, streamed)

    assert [r.body["model"] for r in gateway.mock.requests] == [dated, dated]
    assert [s["model"] for s in gateway.mock.served] == [dated, dated]
    assert created["message"]["model"] == alias
    assert streamed["events"][0]["type"] == "message_start"
    assert streamed["events"][0]["message"]["model"] == alias
    assert streamed["text"] == expected_text("alias stream")
    rows = await gateway.usage_rows(2)
    assert [(r["requested_model"], r["upstream_model"]) for r in rows] == [(alias, dated)] * 2
    for row, served, stream in zip(rows, gateway.mock.served, (False, True)):
        assert_row_matches(row, served, stream=stream)


async def test_usage_rows_with_prompt_cache(make_sdk, gateway):
    """Cache writes (with their 5m/1h split) and reads land in the rows exactly as the mock reported them, for
    JSON and SSE answers, and the cost follows from the catalogue's Haiku 4.5 prices."""
    sdk = make_sdk("2.x", "async")
    tool = {"name": "lookup", "description": "Look a thing up " * 20,
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}
    system = [{"type": "text", "text": "You answer from the handbook. " * 40, "cache_control": {"type": "ephemeral"}}]
    calls = [("plain", "first"), ("stream_text", "second"), ("stream_text", "third"), ("plain", "fourth")]
    for scenario, text in calls:
        result = await sdk.run(scenario, gateway.base_url, gateway.key, text=text, system=system, tools=[tool])
        assert "error" not in result, result

    served = gateway.mock.served
    assert served[0]["usage"]["cache_creation_input_tokens"] > 0                 # written once...
    assert all(s["usage"]["cache_read_input_tokens"] > 0 for s in served[1:])     # ...then read
    rows = await gateway.usage_rows(4)
    prices = {"input": 1.0, "output": 5.0, "cache_write_5m": 1.25, "cache_write_1h": 2.0, "cache_read": 0.10}
    for row, s, (scenario, _) in zip(rows, served, calls, strict=True):
        assert_row_matches(row, s, stream=scenario == "stream_text")
        split = s["full_usage"]["cache_creation"]
        assert row["cache_creation_5m_input_tokens"] == split["ephemeral_5m_input_tokens"]
        assert row["cache_creation_1h_input_tokens"] == split["ephemeral_1h_input_tokens"]
        expected_cost = (row["input_tokens"] * prices["input"] + row["output_tokens"] * prices["output"]
                         + split["ephemeral_5m_input_tokens"] * prices["cache_write_5m"]
                         + split["ephemeral_1h_input_tokens"] * prices["cache_write_1h"]
                         + row["cache_read_input_tokens"] * prices["cache_read"]) / 1_000_000
        assert abs(row["cost"] - expected_cost) < 1e-12
    assert rows[0]["cache_creation_1h_input_tokens"] > 0 and rows[0]["cache_creation_5m_input_tokens"] > 0
