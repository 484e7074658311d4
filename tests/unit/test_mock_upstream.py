"""The mock upstream is faithful: the official SDKs of both generations, sync and async, accept everything it
sends (their own stream accumulators rebuild the final message, tool input and thinking signature), and it enforces
the API's rules, failure scenarios and bookkeeping that the gateway tests rely on."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.support.mock_replies import REPLY_TAIL, thinking_signature
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream, Scenario
from tests.support.rawhttp import RawConnection, chunked, parse_sse, request_bytes
from tests.support.sdk_scenarios import PNG_1X1, WEATHER_TOOL

OLD, NEW = "2023-06-01", "2026-10-21"
MODEL = "claude-haiku-4-5-20251001"


def body_for(text: str = "hi", **fields) -> dict:
    return {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": text}], **fields}


def api_headers(version: str = OLD, key: str = MOCK_API_KEY, **extra: str) -> list[tuple[str, str]]:
    headers = [("x-api-key", key)] if key else []
    if version:
        headers.append(("anthropic-version", version))
    return headers + [(k.replace("_", "-"), v) for k, v in extra.items()]


async def call(mock: MockUpstream, body=None, *, headers=None, method: str = "POST",
               path: str = "/v1/messages", raw_body: bytes = b""):
    async with await RawConnection.open(mock.host, mock.port) as conn:
        return await conn.request(method, path, api_headers() if headers is None else headers, raw_body,
                                  json_body=body)


def assert_error(response, status: int, error_type: str, message_part: str = "") -> None:
    assert response.status == status, response.body
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert message_part in body["error"]["message"]
    assert body["request_id"] == response.header("request-id") and body["request_id"].startswith("req_")


def words(text: str) -> int:
    return len(text.split())


# -- every SDK scenario, both generations, sync and async ---------------------------------------------------------

async def test_plain_message(sdk, mock_upstream):
    result = await sdk.run("plain", mock_upstream.base_url, MOCK_API_KEY, text="Hello there")
    assert result["text"] == f"Echo: Hello there (turn 1) {REPLY_TAIL}"
    message = result["message"]
    assert message["model"] == MODEL and message["stop_reason"] == "end_turn"
    assert message["usage"]["output_tokens"] == words(result["text"])
    request = mock_upstream.last_request
    assert request.header_values(sdk.auth_header) == (
        [f"Bearer {MOCK_API_KEY}"] if sdk.auth_header == "authorization" else [MOCK_API_KEY])
    assert request.headers["anthropic-version"] == sdk.api_version
    assert request.query == ""
    served = mock_upstream.served[-1]
    assert served["completed"] and served["usage"] == message["usage"]
    assert result["request_id"] == request.request_id == served["request_id"]


async def test_system_prompt(sdk, mock_upstream):
    result = await sdk.run("system_prompt", mock_upstream.base_url, MOCK_API_KEY, system="Be brief.")
    assert "system: Be brief." in result["text"]
    assert mock_upstream.last_request.body["system"] == "Be brief."


async def test_multi_turn(sdk, mock_upstream):
    result = await sdk.run("multi_turn", mock_upstream.base_url, MOCK_API_KEY, text="one", follow_up="two")
    assert result["first"]["text"].startswith("Echo: one (turn 1)")
    assert result["second"]["text"].startswith("Echo: two (turn 2)")
    history = mock_upstream.last_request.body["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"] == result["first"]["message"]["content"]


async def test_stream_text_and_final_message(sdk, mock_upstream):
    result = await sdk.run("stream_text", mock_upstream.base_url, MOCK_API_KEY, text="Stream me")
    expected = f"Echo: Stream me (turn 1) {REPLY_TAIL}"
    assert "".join(result["pieces"]) == expected == result["message"]["content"][0]["text"]
    assert len(result["pieces"]) == words(expected)
    served = mock_upstream.served[-1]
    assert served["stream"] and served["completed"]
    assert result["message"]["usage"]["output_tokens"] == served["usage"]["output_tokens"] == words(expected)
    assert result["headers"]["content-type"] == "text/event-stream; charset=utf-8"
    assert result["headers"]["cache-control"] == "no-cache"
    assert result["request_id"] == served["request_id"]


async def test_raw_stream_event_order(sdk, mock_upstream):
    result = await sdk.run("raw_stream", mock_upstream.base_url, MOCK_API_KEY, text="raw")
    types = [e["type"] for e in result["events"]]
    deltas = types.count("content_block_delta")
    assert types == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    assert result["events"][0]["message"]["usage"]["output_tokens"] == 1  # placeholder until message_delta
    assert result["events"][-2]["usage"]["output_tokens"] == deltas == words(result["text"])


async def test_tool_use_streamed(sdk, mock_upstream):
    result = await sdk.run("tool_use_stream", mock_upstream.base_url, MOCK_API_KEY)
    tool_use = result["tool_use"]
    assert tool_use["name"] == "get_weather" and tool_use["id"].startswith("toolu_")
    assert tool_use["input"] == {"city": REPLY_TAIL, "days": 42}
    fragments = result["call"]["input_json"]
    assert fragments[0] == "" and len(fragments) > 2
    assert json.loads("".join(fragments)) == tool_use["input"]
    assert result["call"]["message"]["stop_reason"] == "tool_use"
    assert "Sunny, 21 C" in result["answer"]["text"] and result["answer"]["message"]["stop_reason"] == "end_turn"


async def test_thinking_streamed_with_signature(sdk, mock_upstream):
    result = await sdk.run("thinking_stream", mock_upstream.base_url, MOCK_API_KEY, text="ponder")
    call = result["call"]
    thinking, text = call["message"]["content"][0], call["message"]["content"][1]
    assert thinking["type"] == "thinking" and text["type"] == "text"
    assert "".join(call["thinking"]) == thinking["thinking"] == "Thinking about: ponder ✓"
    assert call["signature"] == thinking["signature"] == thinking_signature(MOCK_API_KEY, thinking["thinking"])
    assert call["events"].index("signature") < call["events"].index("text")
    # The mock accepted the signed block back: the follow-up turn succeeded.
    assert "error" not in result["follow_up"] and "turn 2" in result["follow_up"]["text"]


async def test_image_block(sdk, mock_upstream):
    result = await sdk.run("image", mock_upstream.base_url, MOCK_API_KEY)
    assert "saw 1 image" in result["text"]
    block = mock_upstream.last_request.body["messages"][0]["content"][0]
    assert block["source"] == {"type": "base64", "media_type": "image/png", "data": PNG_1X1}


async def test_pdf_block(sdk, mock_upstream):
    result = await sdk.run("pdf", mock_upstream.base_url, MOCK_API_KEY)
    assert "saw 1 document" in result["text"]
    assert mock_upstream.last_request.body["messages"][0]["content"][0]["source"]["media_type"] == "application/pdf"


async def test_beta_call_marks(sdk, mock_upstream):
    result = await sdk.run("beta_message", mock_upstream.base_url, MOCK_API_KEY, betas=("b-one", "b-two"))
    assert "error" not in result
    request = mock_upstream.last_request
    assert request.path == "/v1/messages" and request.query == sdk.beta_query
    assert request.headers["anthropic-beta"] == "b-one,b-two"


async def test_count_tokens_and_models(sdk, mock_upstream):
    counted = await sdk.run("count_tokens", mock_upstream.base_url, MOCK_API_KEY, text="Count me")
    plain = await sdk.run("plain", mock_upstream.base_url, MOCK_API_KEY, text="Count me")
    assert counted["input_tokens"] == plain["message"]["usage"]["input_tokens"]
    listed = await sdk.run("list_models", mock_upstream.base_url, MOCK_API_KEY, limit=1)
    assert listed["ids"] == [m["id"] for m in mock_upstream.models]
    model_requests = [r for r in mock_upstream.requests if r.path == "/v1/models"]
    assert len(model_requests) == len(mock_upstream.models)  # one page each, followed by after_id


async def test_auth_styles_and_bad_key(sdk, mock_upstream):
    for auth in ("x-api-key", "bearer"):
        assert "error" not in await sdk.run("plain", mock_upstream.base_url, MOCK_API_KEY, auth=auth)
    both = await sdk.run("plain", mock_upstream.base_url, MOCK_API_KEY, auth="both")
    wrong = await sdk.run("plain", mock_upstream.base_url, "sk-ant-wrong")
    for result in (both, wrong):
        assert result["error"]["status"] == 401 and result["error"]["type"] == "authentication_error"


async def test_error_before_stream(sdk, mock_upstream):
    result = await sdk.run("stream_text", mock_upstream.base_url, MOCK_API_KEY,
                           headers={"x-mock-scenario": "status=529"})
    assert result["error"]["status"] == 529 and result["error"]["type"] == "overloaded_error"
    assert result["error"]["class"] == "OverloadedError"
    assert len(mock_upstream.requests) == 1 and mock_upstream.served == []


async def test_drop_mid_stream(sdk, mock_upstream):
    result = await sdk.run("stream_text", mock_upstream.base_url, MOCK_API_KEY,
                           headers={"x-mock-scenario": "drop-after=5"})
    assert result["error"]["status"] is None  # a transport failure, not an HTTP status
    # message_start, content_block_start, ping, then two text deltas went out.
    assert len(result["error"]["partial"]["pieces"]) == 2
    served = mock_upstream.served[-1]
    assert not served["completed"] and served["events_sent"] == 5
    assert served["usage"]["output_tokens"] == 1
    assert served["usage"]["input_tokens"] == served["full_usage"]["input_tokens"]


async def test_error_event_mid_stream(sdk, mock_upstream):
    result = await sdk.run("stream_text", mock_upstream.base_url, MOCK_API_KEY,
                           headers={"x-mock-scenario": "error-event-after=4"})
    assert result["error"]["type"] == "overloaded_error"
    assert result["error"]["partial"]["pieces"] == ["Echo: "]
    assert not mock_upstream.served[-1]["completed"]


async def test_awkward_stream_still_parses(sdk, mock_upstream):
    result = await sdk.run("stream_text", mock_upstream.base_url, MOCK_API_KEY, text="naïve ✓ text",
                           headers={"x-mock-scenario": "split=awkward; unknown-event; message-deltas=3"})
    expected = f"Echo: naïve ✓ text (turn 1) {REPLY_TAIL}"
    assert "".join(result["pieces"]) == expected
    assert result["message"]["usage"]["output_tokens"] == words(expected)  # last delta wins, no sum


async def test_legacy_process_runs_calls_concurrently(make_sdk, mock_upstream, legacy_sdk):
    runner = make_sdk("1.x", "sync")
    results = await asyncio.gather(*[
        runner.run("plain", mock_upstream.base_url, MOCK_API_KEY, text=f"n{i}") for i in range(4)])
    assert legacy_sdk.version == "1.17.0"
    assert sorted(r["text"].split()[1] for r in results) == ["n0", "n1", "n2", "n3"]
    assert all(r.header_values("user-agent") == ["Anthropic/Python 1.17.0"] for r in mock_upstream.requests)


# -- the API's rules, over raw HTTP -------------------------------------------------------------------------------

async def test_credentials(mock_upstream):
    assert (await call(mock_upstream, body_for())).status == 200
    bearer = [("authorization", f"Bearer {MOCK_API_KEY}"), ("anthropic-version", OLD)]
    assert (await call(mock_upstream, body_for(), headers=bearer)).status == 200
    assert_error(await call(mock_upstream, body_for(), headers=api_headers(key="")), 401, "authentication_error")
    assert_error(await call(mock_upstream, body_for(), headers=api_headers(key="sk-nope")), 401,
                 "authentication_error")
    both = api_headers() + [("authorization", f"Bearer {MOCK_API_KEY}")]
    assert_error(await call(mock_upstream, body_for(), headers=both), 401, "authentication_error", "exactly one")
    twice = api_headers() + [("x-api-key", MOCK_API_KEY)]
    assert_error(await call(mock_upstream, body_for(), headers=twice), 401, "authentication_error")
    assert mock_upstream.last_request.header_values("x-api-key") == [MOCK_API_KEY, MOCK_API_KEY]


async def test_version_header(mock_upstream):
    assert_error(await call(mock_upstream, body_for(), headers=api_headers(version="")), 400,
                 "invalid_request_error", "anthropic-version")
    assert_error(await call(mock_upstream, body_for(), headers=api_headers(version="2024-01-01")), 400,
                 "invalid_request_error", "anthropic-version")
    assert (await call(mock_upstream, body_for(), headers=api_headers(version=NEW))).status == 200


@pytest.mark.parametrize("field", ["temperature", "top_p", "top_k"])
async def test_new_version_rejects_sampling_parameters(mock_upstream, field):
    body = body_for(**{field: 1 if field == "top_k" else 0.5})
    assert (await call(mock_upstream, body, headers=api_headers(OLD))).status == 200
    assert_error(await call(mock_upstream, body, headers=api_headers(NEW)), 400, "invalid_request_error",
                 f"{field}: Extra inputs are not permitted")


async def test_new_version_content_rules(mock_upstream):
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}}
    in_assistant = body_for(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": [document]},
                                      {"role": "user", "content": "b"}])
    cited = {"type": "text", "text": "quoted", "citations": [{"type": "char_location", "cited_text": "q"}]}
    citing_user = body_for(messages=[{"role": "user", "content": [cited]}])
    search = {"type": "search_result", "source": "s", "title": "t", "content": [cited]}
    citing_search = body_for(messages=[{"role": "user", "content": [search]}])
    for body in (in_assistant, citing_user, citing_search):
        assert (await call(mock_upstream, body, headers=api_headers(OLD))).status == 200
        assert_error(await call(mock_upstream, body, headers=api_headers(NEW)), 400, "invalid_request_error")


async def test_body_validation(mock_upstream):
    assert_error(await call(mock_upstream, raw_body=b"{not json"), 400, "invalid_request_error", "JSON")
    for missing in ("model", "max_tokens", "messages"):
        body = body_for()
        del body[missing]
        assert_error(await call(mock_upstream, body), 400, "invalid_request_error", f"{missing}: Field required")
    bad_image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "%%%"}}
    assert_error(await call(mock_upstream, body_for(messages=[{"role": "user", "content": [bad_image]}])), 400,
                 "invalid_request_error", "base64")
    bmp = {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": PNG_1X1}}
    assert_error(await call(mock_upstream, body_for(messages=[{"role": "user", "content": [bmp]}])), 400,
                 "invalid_request_error", "media_type")
    assert_error(await call(mock_upstream, body_for(thinking={"type": "enabled", "budget_tokens": 100})), 400,
                 "invalid_request_error", "budget_tokens")
    forged = body_for(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "t", "signature": thinking_signature("another-account", "t")}]},
        {"role": "user", "content": "q2"}])
    assert_error(await call(mock_upstream, forged), 400, "invalid_request_error", "signature")


async def test_paths_and_query(mock_upstream):
    assert_error(await call(mock_upstream, body_for(), path="/v1/complete"), 404, "not_found_error")
    assert_error(await call(mock_upstream, method="GET", path="/v1/messages"), 404, "not_found_error")
    assert (await call(mock_upstream, body_for(), path="/v1/messages?beta=true")).status == 200
    assert mock_upstream.last_request.query == "beta=true"
    assert mock_upstream.last_request.params == {"beta": "true"}


async def test_oversized_body_refused_before_it_is_sent(mock_upstream):
    async with await RawConnection.open(mock_upstream.host, mock_upstream.port) as conn:
        head = request_bytes("POST", "/v1/messages", api_headers() + [("content-length", str(32 * 1024 * 1024 + 1))])
        await conn.send(head)
        response = await conn.read_response()
        assert_error(response, 413, "request_too_large")
        assert response.header("connection") == "close"


async def test_oversized_chunked_body(make_mock_upstream):
    mock = await make_mock_upstream(max_body_bytes=1000)
    async with await RawConnection.open(mock.host, mock.port) as conn:
        headers = api_headers() + [("transfer-encoding", "chunked")]
        await conn.send(request_bytes("POST", "/v1/messages", headers, content_length=False)
                        + chunked(b"x" * 600, b"y" * 600))
        assert_error(await conn.read_response(), 413, "request_too_large")
    small = json.dumps(body_for("fits")).encode()
    async with await RawConnection.open(mock.host, mock.port) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", api_headers() + [("transfer-encoding", "chunked")],
                                      content_length=False) + chunked(small[:10], small[10:]))
        response = await conn.read_response()
        assert response.status == 200 and "fits" in response.json()["content"][0]["text"]


# -- replies and usage ----------------------------------------------------------------------------------------------

async def test_stream_wire_format(mock_upstream):
    response = await call(mock_upstream, body_for("wire", stream=True))
    assert response.status == 200 and response.is_chunked
    assert response.header("content-type") == "text/event-stream; charset=utf-8"
    assert response.header("cache-control") == "no-cache"
    assert response.header("request-id") == mock_upstream.last_request.request_id
    events = response.sse_events()
    assert all(name == json.loads(data)["type"] for name, data in events)
    assert [name for name, _ in events[:3]] == ["message_start", "content_block_start", "ping"]
    assert events[2][1] == '{"type": "ping"}'
    assert response.body.endswith(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
    start, delta = json.loads(events[0][1]), json.loads(events[-2][1])
    served = mock_upstream.served[-1]
    assert delta["usage"]["output_tokens"] == served["full_usage"]["output_tokens"] == served["usage"]["output_tokens"]
    assert delta["usage"]["input_tokens"] == start["message"]["usage"]["input_tokens"]


async def test_awkward_split_cuts_lines_and_characters(mock_upstream):
    plain = await call(mock_upstream, body_for("same ✓", stream=True))
    split = await call(mock_upstream, body_for("same ✓", stream=True), headers=api_headers(
        x_mock_scenario="split=awkward"))

    def without_ids(r):
        return [(n, json.loads(d).get("index")) for n, d in r.sse_events()]
    assert without_ids(split) == without_ids(plain)
    assert len(split.chunks) > 3 * len(split.sse_events())
    cut_in_char = [c for c in split.chunks if not _decodes(c)]
    assert cut_in_char, "some chunk should end inside a multi-byte character"
    assert any(c.endswith(b"}\n") for c in split.chunks), "some chunk should end between the two newlines"


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


async def test_cumulative_message_deltas(mock_upstream):
    response = await call(mock_upstream, body_for("count", stream=True),
                          headers=api_headers(x_mock_scenario="message-deltas=3"))
    outputs = [json.loads(d)["usage"]["output_tokens"] for n, d in response.sse_events() if n == "message_delta"]
    assert len(outputs) == 3 and outputs == sorted(outputs)
    assert outputs[-1] == mock_upstream.served[-1]["usage"]["output_tokens"] < sum(outputs)


async def test_stop_reasons(mock_upstream):
    stopped = (await call(mock_upstream, body_for("alpha STOP beta", stop_sequences=["STOP"]))).json()
    assert stopped["stop_reason"] == "stop_sequence" and stopped["stop_sequence"] == "STOP"
    assert stopped["content"][0]["text"] == "Echo: alpha "
    short = (await call(mock_upstream, body_for("one two three four", max_tokens=3))).json()
    assert short["stop_reason"] == "max_tokens" and short["usage"]["output_tokens"] == 3
    assert short["content"][0]["text"] == "Echo: one two "
    warm = (await call(mock_upstream, body_for("prewarm", max_tokens=0))).json()
    assert warm["content"] == [] and warm["usage"]["output_tokens"] == 0


async def test_prompt_cache_write_then_read(mock_upstream):
    system = [{"type": "text", "text": "A long shared instruction. " * 20, "cache_control": {"type": "ephemeral"}}]
    first = (await call(mock_upstream, body_for("q1", system=system))).json()["usage"]
    second = (await call(mock_upstream, body_for("q2", system=system))).json()["usage"]
    assert first["cache_creation_input_tokens"] > 0 and first["cache_read_input_tokens"] == 0
    assert first["cache_creation"] == {"ephemeral_5m_input_tokens": first["cache_creation_input_tokens"],
                                       "ephemeral_1h_input_tokens": 0}
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    counted = (await call(mock_upstream, body_for("q2", system=system), path="/v1/messages/count_tokens")).json()
    assert counted["input_tokens"] == second["input_tokens"] + second["cache_read_input_tokens"]


async def test_prompt_cache_ttl_split(mock_upstream):
    hour = {"type": "ephemeral", "ttl": "1h"}
    tools = [{**WEATHER_TOOL, "cache_control": hour}]
    system = [{"type": "text", "text": "Five minute part. " * 10, "cache_control": {"type": "ephemeral"}}]
    usage = (await call(mock_upstream, body_for("q", tools=tools, system=system, stream=True))).sse_events()
    start = json.loads(usage[0][1])["message"]["usage"]
    split = start["cache_creation"]
    assert split["ephemeral_1h_input_tokens"] > 0 and split["ephemeral_5m_input_tokens"] > 0
    assert sum(split.values()) == start["cache_creation_input_tokens"]


async def test_web_search_counts_server_tool_use(mock_upstream):
    tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]
    message = (await call(mock_upstream, body_for("please search the web", tools=tools))).json()
    assert [b["type"] for b in message["content"]] == ["server_tool_use", "web_search_tool_result", "text"]
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 1}


async def test_models_pagination(mock_upstream):
    ids = [m["id"] for m in mock_upstream.models]
    first = (await call(mock_upstream, method="GET", path="/v1/models?limit=2")).json()
    assert [m["id"] for m in first["data"]] == ids[:2] and first["has_more"]
    assert (first["first_id"], first["last_id"]) == (ids[0], ids[1])
    rest = (await call(mock_upstream, method="GET", path=f"/v1/models?limit={len(ids)}&after_id={ids[1]}")).json()
    assert [m["id"] for m in rest["data"]] == ids[2:] and not rest["has_more"]
    before = (await call(mock_upstream, method="GET", path=f"/v1/models?before_id={ids[2]}")).json()
    assert [m["id"] for m in before["data"]] == ids[:2]
    one = (await call(mock_upstream, method="GET", path=f"/v1/models/{ids[0]}")).json()
    assert one["type"] == "model" and one["id"] == ids[0]
    assert_error(await call(mock_upstream, method="GET", path="/v1/models/nope"), 404, "not_found_error")


async def test_strict_models(make_mock_upstream):
    mock = await make_mock_upstream(strict_models=True)
    assert_error(await call(mock, body_for() | {"model": "claude-unknown"}), 404, "not_found_error")
    assert (await call(mock, body_for())).status == 200


# -- failure scenarios and bookkeeping ----------------------------------------------------------------------------

async def test_fail_next_then_recover(mock_upstream):
    mock_upstream.fail_next(529, times=2, retry_after=3)
    for _ in range(2):
        response = await call(mock_upstream, body_for())
        assert_error(response, 529, "overloaded_error")
        assert response.header("retry-after") == "3"
    assert (await call(mock_upstream, body_for())).status == 200
    assert [r.status for r in mock_upstream.requests] == [529, 529, 200]
    assert len(mock_upstream.served) == 1


async def test_scenario_header_error_details(mock_upstream):
    response = await call(mock_upstream, body_for(), headers=api_headers(
        x_mock_scenario="status=429; retry-after=7; should-retry=false; message=slow down"))
    assert_error(response, 429, "rate_limit_error", "slow down")
    assert response.header("retry-after") == "7" and response.header("x-should-retry") == "false"
    mock_upstream.queue("status=500", times=1)
    assert_error(await call(mock_upstream, body_for()), 500, "api_error")


def test_scenario_layers():
    base = Scenario.parse("event-delay=0.5; split=awkward")
    layered = base.merged(Scenario.parse("split=16; tool"))
    assert (layered.event_delay, layered.split, layered.tool) == (0.5, 16, True)
    for bad in ("explode", "split=sideways", "status=soon"):
        with pytest.raises(ValueError):
            Scenario.parse(bad)


async def test_bad_scenario_header_is_a_400(mock_upstream):
    assert_error(await call(mock_upstream, body_for(), headers=api_headers(x_mock_scenario="explode")), 400,
                 "invalid_request_error", "x-mock-scenario")


async def test_malformed_request_head(mock_upstream):
    async with await RawConnection.open(mock_upstream.host, mock_upstream.port) as conn:
        await conn.send(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n")
        response = await conn.read_response()
        assert response.status == 400 and response.json()["error"]["type"] == "invalid_request_error"
        assert await conn.wait_closed_by_peer()


async def test_keep_alive_and_pipelining(mock_upstream):
    async with await RawConnection.open(mock_upstream.host, mock_upstream.port) as conn:
        assert (await conn.request("POST", "/v1/messages", api_headers(), json_body=body_for("a"))).status == 200
        assert (await conn.request("POST", "/v1/messages", api_headers(), json_body=body_for("b"))).status == 200
        # Two more in one write: answered in order on the same connection.
        await conn.send(request_bytes("POST", "/v1/messages", api_headers(), json_body=body_for("c"))
                        + request_bytes("POST", "/v1/messages", api_headers(), json_body=body_for("d", stream=True)))
        third, fourth = await conn.read_response(), await conn.read_response()
    assert third.json()["content"][0]["text"].startswith("Echo: c ")
    assert "Echo: d " in "".join(json.loads(d).get("delta", {}).get("text", "") for _, d in fourth.sse_events())
    assert mock_upstream.connections_opened == 1
    assert {r.connection_id for r in mock_upstream.requests} == {1}
    await mock_upstream.wait_until(lambda: mock_upstream.open_connections == 0)


async def test_connection_close_scenario(mock_upstream):
    async with await RawConnection.open(mock_upstream.host, mock_upstream.port) as conn:
        response = await conn.request("POST", "/v1/messages", api_headers(x_mock_scenario="connection-close"),
                                      json_body=body_for())
        assert response.status == 200 and response.header("connection") == "close"
        assert await conn.wait_closed_by_peer()


async def test_client_abandons_paced_stream(mock_upstream):
    async with await RawConnection.open(mock_upstream.host, mock_upstream.port) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", api_headers(x_mock_scenario="event-delay=0.05"),
                                      json_body=body_for("leave early", stream=True)))
        head = await conn.read_head()
        received = b""
        async for chunk in conn.iter_chunks(head):
            received += chunk
            if b"content_block_start" in received:
                break
    request = mock_upstream.last_request
    await asyncio.wait_for(request.disconnected.wait(), 5)
    assert mock_upstream.disconnects == 1
    served = mock_upstream.served[-1]
    assert not served["completed"] and served["events_sent"] < len(parse_sse(received)) + 3
    assert served["usage"]["output_tokens"] == 1 and served["usage"]["input_tokens"] > 0
    await mock_upstream.wait_until(lambda: mock_upstream.open_connections == 0)


async def test_hang_until_client_leaves(mock_upstream):
    conn = await RawConnection.open(mock_upstream.host, mock_upstream.port)
    await conn.send(request_bytes("POST", "/v1/messages", api_headers(x_mock_scenario="hang"), json_body=body_for()))
    await mock_upstream.wait_until(lambda: len(mock_upstream.requests) == 1)
    assert not await conn.wait_closed_by_peer(timeout=0.2)  # no answer, and the connection stays open
    conn.abort()
    await asyncio.wait_for(mock_upstream.last_request.disconnected.wait(), 5)
    assert mock_upstream.last_request.status is None and mock_upstream.served == []


async def test_close_without_answer_and_refused_connections(mock_upstream):
    async with await RawConnection.open(mock_upstream.host, mock_upstream.port) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", api_headers(x_mock_scenario="close"),
                                      json_body=body_for()))
        assert await conn.wait_closed_by_peer()
    mock_upstream.refuse_connections(1)
    async with await RawConnection.open(mock_upstream.host, mock_upstream.port) as conn:
        assert await conn.wait_closed_by_peer()
    assert mock_upstream.connections_opened == 2 and len(mock_upstream.requests) == 1
    assert (await call(mock_upstream, body_for())).status == 200


async def test_json_reply_dropped_half_way(mock_upstream):
    async with await RawConnection.open(mock_upstream.host, mock_upstream.port) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", api_headers(x_mock_scenario="drop-after=0"),
                                      json_body=body_for()))
        with pytest.raises(asyncio.IncompleteReadError):
            await conn.read_response()
    served = mock_upstream.served[-1]
    assert not served["completed"] and served["usage"]["output_tokens"] == 0
    assert served["full_usage"]["output_tokens"] > 0


async def test_idle_connections_are_closed(make_mock_upstream):
    mock = await make_mock_upstream(idle_timeout=0.1)
    async with await RawConnection.open(mock.host, mock.port) as conn:
        assert (await conn.request("POST", "/v1/messages", api_headers(), json_body=body_for())).status == 200
        assert await conn.wait_closed_by_peer(timeout=5)
    await mock.wait_until(lambda: mock.open_connections == 0)


async def test_client_gone_mid_request_body(mock_upstream):
    async with await RawConnection.open(mock_upstream.host, mock_upstream.port) as conn:
        head = request_bytes("POST", "/v1/messages", api_headers() + [("content-length", "500")])
        await conn.send(head + b'{"model": "half')
        await mock_upstream.wait_until(lambda: len(mock_upstream.requests) == 1)
    await mock_upstream.wait_until(lambda: mock_upstream.open_connections == 0)
    assert mock_upstream.last_request.status is None and mock_upstream.last_request.body is None
    assert (await call(mock_upstream, body_for())).status == 200
