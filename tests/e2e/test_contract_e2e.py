"""The request contract (docs/request-contract.md), row by row, through the real gateway.

Every test sends a request over a real socket (the official SDK, or RawConnection where the exact body matters or
the SDK would refuse to send it) and checks both sides: what the client got (status, error type, a message that
starts with the field, the `apertis-dropped-params` header) and what the mock upstream received (body, headers,
target).  The mock enforces the 2026-10-21 rules like the real API, so a missing adaptation fails as an upstream
400; strict mocks (unknown model -> 404) catch an alias that was not resolved.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional
from urllib.parse import urlsplit

import orjson
import pytest

from apertis_proxy.store import channels as channel_store
from tests.support.rawhttp import RawConnection, RawResponse

OLD, NEW = "2023-06-01", "2026-10-21"
HAIKU = "claude-haiku-4-5-20251001"
SONNET = "claude-sonnet-5-5"
OPUS = "claude-opus-4-5-20251101"
DROPPED = "apertis-dropped-params"
UPSTREAM_KEY = "sk-ant-test"
_ABSENT = object()


def body(**fields: Any) -> dict:
    """A minimal valid Messages body; a field given as _ABSENT is left out."""
    out: dict = {"model": HAIKU, "max_tokens": 256, "messages": [{"role": "user", "content": "Hello contract"}]}
    out.update(fields)
    return {k: v for k, v in out.items() if v is not _ABSENT}


async def post(env, payload: Any, *, path: str = "/v1/messages", headers: Optional[list] = None,
               raw: Optional[bytes] = None) -> RawResponse:
    """POST `payload` as JSON (or `raw` bytes) with the env's key; the whole response."""
    url = urlsplit(env.base_url)
    pairs = [("x-api-key", env.key), ("content-type", "application/json"), *(headers or [])]
    data = raw if raw is not None else json.dumps(payload).encode()
    async with await RawConnection.open(url.hostname, url.port) as conn:
        return await conn.request("POST", path, pairs, data)


def sent_bytes(payload: Any) -> bytes:
    """What goes upstream for a body the contract leaves alone: the body as checked, serialized again."""
    return orjson.dumps(payload)


def gateway_400(resp: RawResponse, mock, field: str, *fragments: str) -> str:
    """The gateway itself refused with 400 naming `field`; nothing went upstream.  Returns the message."""
    assert resp.status == 400, resp.body
    err = resp.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", err
    message = err["error"]["message"]
    assert message.startswith(f"{field}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert err["request_id"] == resp.header("request-id")
    assert mock.requests == [], "a request the gateway refused must not reach upstream"
    return message


def sdk_400(result: dict, field: str, *fragments: str) -> None:
    """The SDK raised BadRequestError for a gateway 400 naming `field`."""
    error = result.get("error")
    assert error is not None, result
    assert (error["class"], error["status"], error["type"]) == ("BadRequestError", 400, "invalid_request_error")
    message = error["body"]["error"]["message"]           # the body the SDK parsed, not its formatting of it
    assert message.startswith(f"{field}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert error["request_id"] == error["body"]["request_id"]


def ok(result: dict) -> dict:
    assert "error" not in result, result
    return result


async def start(gateway_env, mock, *, channel: str = "main", key_kw: Optional[dict] = None,
                start_kw: Optional[dict] = None, **channel_kw: Any):
    """A started gateway with one key (env.key) and one channel to `mock`."""
    gateway_env.key = gateway_env.add_key("alice", **(key_kw or {}))
    gateway_env.add_channel(channel, mock, **channel_kw)
    await gateway_env.start(**(start_kw or {}))
    gateway_env.mock = mock
    return gateway_env


@pytest.fixture
async def strict_mock(make_mock_upstream):
    """An upstream that answers 404 for a model id it does not know (so aliases must be resolved)."""
    return await make_mock_upstream(strict_models=True)


@pytest.fixture
async def old_gw(gateway_env, strict_mock):
    """Gateway with one channel on 2023-06-01 (the default)."""
    return await start(gateway_env, strict_mock)


@pytest.fixture
async def new_gw(gateway_env, strict_mock):
    """Gateway with one channel on 2026-10-21."""
    return await start(gateway_env, strict_mock, api_version=NEW)


@pytest.fixture
def sdk2(make_sdk):
    return make_sdk("2.x", "async")


# =====================================================================================================================
# Validation: the gateway answers 400 itself, naming the field
# =====================================================================================================================

FIVE_STOPS = ["a", "b", "c", "d", "e"]
REJECTED = [
    # id, body, field named, message fragments
    ("body-not-object", [body()], "body", ["must be a JSON object"]),
    ("model-missing", body(model=_ABSENT), "model", ["field required"]),
    ("model-not-string", body(model=42), "model", ["must be a non-empty string"]),
    ("model-empty", body(model=""), "model", ["must be a non-empty string"]),
    ("messages-missing", body(messages=_ABSENT), "messages", ["field required"]),
    ("messages-not-array", body(messages="hi"), "messages", ["must be an array"]),
    ("messages-empty", body(messages=[]), "messages", ["at least one message is required"]),
    ("message-role-tool", body(messages=[{"role": "tool", "content": "be brief"}]), "messages[0].role",
     ['must be "user", "assistant" or "system" (got "tool")']),
    ("message-content-missing", body(messages=[{"role": "user"}]), "messages[0].content", ["field required"]),
    ("message-content-number", body(messages=[{"role": "user", "content": 7}]), "messages[0].content",
     ["must be a string or an array of content blocks"]),
    ("block-without-type", body(messages=[{"role": "user", "content": [{"text": "hi"}]}]),
     "messages[0].content[0]", ['a string "type"']),
    ("max_tokens-missing", body(max_tokens=_ABSENT), "max_tokens", ["field required"]),
    ("max_tokens-negative", body(max_tokens=-1), "max_tokens", ["must be an integer >= 0"]),
    ("max_tokens-float", body(max_tokens=10.5), "max_tokens", ["must be an integer >= 0"]),
    ("max_tokens-bool", body(max_tokens=True), "max_tokens", ["must be an integer >= 0"]),
    ("temperature-above-1", body(temperature=1.5), "temperature", ["must be a number between 0 and 1"]),
    ("temperature-string", body(temperature="0.5"), "temperature", ["must be a number between 0 and 1"]),
    ("top_p-negative", body(top_p=-0.1), "top_p", ["must be a number between 0 and 1"]),
    ("top_k-negative", body(top_k=-1), "top_k", ["must be an integer >= 0"]),
    ("top_k-float", body(top_k=2.5), "top_k", ["must be an integer >= 0"]),
    ("stream-string", body(stream="yes"), "stream", ["must be a boolean"]),
    ("stop_sequences-string", body(stop_sequences="END"), "stop_sequences", ["must be an array of strings"]),
    ("stop_sequences-number-item", body(stop_sequences=["END", 3]), "stop_sequences",
     ["must be an array of strings"]),
    ("system-number", body(system=5), "system", ["must be a string or an array of text blocks"]),
    ("system-image-block", body(system=[{"type": "image"}]), "system[0]", ["must be a text block"]),
    ("metadata-string", body(metadata="user-1"), "metadata", ["must be an object"]),
    ("tools-object", body(tools={"name": "x"}), "tools", ["must be an array"]),
    ("tools-item-string", body(tools=["get_weather"]), "tools[0]", ["must be an object"]),
    ("tool_choice-string", body(tool_choice="auto"), "tool_choice", ["must be an object"]),
    ("thinking-string", body(thinking="on"), "thinking", ["must be an object"]),
    ("thinking-type-missing", body(thinking={"budget_tokens": 2000}), "thinking.type", ["must be a string"]),
    ("budget-missing", body(max_tokens=4096, thinking={"type": "enabled"}), "thinking.budget_tokens",
     ["must be an integer"]),
    ("budget-below-1024", body(max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 1023}),
     "thinking.budget_tokens", ["must be at least 1024 (got 1023)"]),
    ("budget-above-32768", body(max_tokens=40000, thinking={"type": "enabled", "budget_tokens": 32769}),
     "thinking.budget_tokens", ["must be at most 32768 (got 32769)"]),
    ("budget-not-below-max_tokens", body(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 2048}),
     "thinking.budget_tokens", ["must be less than max_tokens (got 2048 >= 2048)"]),
    # OpenAI-style extras are validated before they are translated or removed.
    ("stop-five-strings", body(stop=FIVE_STOPS), "stop", ["a string or an array of up to 4 strings"]),
    ("stop-number", body(stop=5), "stop", ["a string or an array of up to 4 strings"]),
    ("user-number", body(user=5), "user", ["must be a string"]),
    ("n-two", body(n=2), "n", ["one completion per request", "(got 2)"]),
    ("n-zero", body(n=0), "n", ["must be 1 (got 0)"]),
    ("response_format-unknown-type", body(response_format={"type": "xml"}), "response_format.type",
     ['"text", "json_object" or "json_schema"']),
    ("response_format-schema-missing", body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema.schema", ["JSON Schema object is required"]),
    ("presence_penalty-above-2", body(presence_penalty=2.5), "presence_penalty",
     ["must be a number between -2 and 2"]),
    ("frequency_penalty-below-minus-2", body(frequency_penalty=-3), "frequency_penalty",
     ["must be a number between -2 and 2"]),
    ("logit_bias-array", body(logit_bias=[1]), "logit_bias", ["must be an object"]),
    ("logit_bias-value-out-of-range", body(logit_bias={"50256": 101}), 'logit_bias["50256"]',
     ["must be a number between -100 and 100"]),
    ("seed-float", body(seed=1.5), "seed", ["must be an integer"]),
]


@pytest.mark.parametrize("payload, field, fragments", [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
async def test_gateway_rejects_a_broken_field_itself(old_gw, payload, field, fragments):
    resp = await post(old_gw, payload)
    gateway_400(resp, old_gw.mock, field, *fragments)


async def test_invalid_json_is_a_400_before_anything_else(old_gw):
    resp = await post(old_gw, None, raw=b'{"model": "claude-haiku-4-5-20251001", ')
    gateway_400(resp, old_gw.mock, "request body is not valid JSON")


async def test_sdk_sees_the_gateway_400_naming_the_field(old_gw, sdk2):
    """The official SDK surfaces the gateway's own 400 as BadRequestError with the field in the message."""
    result = await sdk2.run("plain", old_gw.base_url, old_gw.key, extra_body={"temperature": 1.5})
    sdk_400(result, "temperature", "must be a number between 0 and 1")
    assert old_gw.mock.requests == []


ACCEPTED = [
    ("max_tokens-0-cache-prewarm", body(max_tokens=0)),
    ("temperature-0-top_p-1", body(temperature=0, top_p=1)),
    ("temperature-1-top_k-0", body(temperature=1.0, top_k=0)),
    ("stream-false", body(stream=False)),
    ("stop_sequences", body(stop_sequences=["END", "\n\nHuman:"])),
    ("system-string", body(system="You are terse.")),
    ("system-blocks-cache_control", body(system=[{"type": "text", "text": "You are terse.",
                                                  "cache_control": {"type": "ephemeral", "ttl": "1h"}}])),
    ("metadata", body(metadata={"user_id": "user-7"})),
    ("tools-custom-server-unknown", body(tools=[
        {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
        {"type": "future_tool_20310101", "name": "future", "knobs": {"a": 1}}])),
    ("tool_choice-none", body(tool_choice={"type": "none"})),
    ("thinking-disabled", body(thinking={"type": "disabled"})),
    ("thinking-adaptive", body(thinking={"type": "adaptive"})),
    ("thinking-unknown-type", body(thinking={"type": "deliberate_2031", "depth": 3})),
    ("thinking-budget-1024", body(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024})),
    ("thinking-budget-32768", body(max_tokens=40000, thinking={"type": "enabled", "budget_tokens": 32768})),
    ("null-means-absent", body(temperature=None, top_k=None, metadata=None)),
    ("unknown-top-level-fields", body(service_tier="auto",
                                      output_config={"effort": "low"}, context_management={"edits": []},
                                      mcp_servers=[{"type": "url", "url": "https://mcp.example", "name": "m"}],
                                      future_param_2031={"nested": [1, {"deep": True}]})),
    ("unknown-block-types", body(messages=[
        {"role": "user", "content": [{"type": "hologram_2031", "payload": {"x": 1}},
                                     {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": [{"type": "future_block", "data": "z"}]},
        {"role": "user", "content": "go on"}])),
]


@pytest.mark.parametrize("payload", [r[1] for r in ACCEPTED], ids=[r[0] for r in ACCEPTED])
async def test_valid_values_and_unknown_fields_pass_through_unchanged(old_gw, payload):
    resp = await post(old_gw, payload)
    assert resp.status == 200, resp.body
    assert resp.json()["type"] == "message"
    assert resp.header(DROPPED) is None
    upstream = old_gw.mock.requests[-1]
    assert upstream.raw_body == sent_bytes(payload)     # nothing to change: the body as checked
    assert upstream.body == payload


async def test_operator_lowers_the_thinking_budget_bound(gateway_env, strict_mock):
    env = await start(gateway_env, strict_mock, start_kw={"thinking_budget_max": 8000})
    too_big = body(max_tokens=20000, thinking={"type": "enabled", "budget_tokens": 8001})
    gateway_400(await post(env, too_big), strict_mock, "thinking.budget_tokens", "must be at most 8000 (got 8001)")

    at_bound = body(max_tokens=20000, thinking={"type": "enabled", "budget_tokens": 8000})
    resp = await post(env, at_bound)
    assert resp.status == 200, resp.body
    assert strict_mock.requests[-1].body["thinking"] == {"type": "enabled", "budget_tokens": 8000}


async def test_operator_raises_the_thinking_budget_bound(gateway_env, strict_mock):
    env = await start(gateway_env, strict_mock, start_kw={"thinking_budget_max": 64000})
    payload = body(max_tokens=64001, stream=True, thinking={"type": "enabled", "budget_tokens": 64000})
    resp = await post(env, payload)
    assert resp.status == 200, resp.body
    assert [name for name, _ in resp.sse_events()][-1] == "message_stop"
    assert strict_mock.requests[-1].body["thinking"]["budget_tokens"] == 64000


# =====================================================================================================================
# count_tokens: the same validation, without max_tokens
# =====================================================================================================================

async def test_count_tokens_is_validated_without_requiring_max_tokens(new_gw, sdk2):
    thinking = {"type": "enabled", "budget_tokens": 2048}     # no max_tokens to compare against
    result = ok(await sdk2.run("count_tokens", new_gw.base_url, new_gw.key, model="claude-haiku-4.5",
                               thinking=thinking, extra_body={"temperature": 0.2}))
    assert result["input_tokens"] > 0
    upstream = new_gw.mock.requests[-1]
    assert upstream.path == "/v1/messages/count_tokens"
    assert "max_tokens" not in upstream.body
    assert upstream.body["model"] == HAIKU                  # alias resolved here too
    assert "temperature" not in upstream.body               # and fitted to the channel's 2026-10-21
    assert upstream.body["thinking"] == thinking
    assert upstream.headers["anthropic-version"] == NEW


async def test_count_tokens_gets_the_gateway_400(old_gw, sdk2):
    result = await sdk2.run("count_tokens", old_gw.base_url, old_gw.key,
                            thinking={"type": "enabled", "budget_tokens": 512})
    sdk_400(result, "thinking.budget_tokens", "must be at least 1024")
    resp = await post(old_gw, {"model": HAIKU, "messages": []}, path="/v1/messages/count_tokens")
    gateway_400(resp, old_gw.mock, "messages", "at least one message is required")


# =====================================================================================================================
# OpenAI-style extras: translated or removed, listed in apertis-dropped-params
# =====================================================================================================================

async def test_stop_string_is_merged_into_stop_sequences(old_gw, sdk2):
    result = ok(await sdk2.run("plain", old_gw.base_url, old_gw.key, stop_sequences=["END"],
                               extra_body={"stop": "HALT"}))
    assert result["headers"][DROPPED] == "stop"
    upstream = old_gw.mock.requests[-1].body
    assert upstream["stop_sequences"] == ["END", "HALT"]
    assert "stop" not in upstream


async def test_stop_list_is_merged_without_duplicates_in_order(old_gw):
    resp = await post(old_gw, body(stop_sequences=["A", "B"], stop=["B", "C", "A", "D"]))
    assert resp.status == 200, resp.body
    assert resp.header(DROPPED) == "stop"
    assert old_gw.mock.requests[-1].body["stop_sequences"] == ["A", "B", "C", "D"]

    resp = await post(old_gw, body(stop=["X", "X"]))           # no stop_sequences of its own
    assert resp.status == 200
    upstream = old_gw.mock.requests[-1].body
    assert upstream["stop_sequences"] == ["X"] and "stop" not in upstream


async def test_user_becomes_metadata_user_id(old_gw, sdk2):
    result = ok(await sdk2.run("plain", old_gw.base_url, old_gw.key, extra_body={"user": "end-user-42"}))
    assert result["headers"][DROPPED] == "user"
    upstream = old_gw.mock.requests[-1].body
    assert upstream["metadata"] == {"user_id": "end-user-42"}
    assert "user" not in upstream


async def test_user_does_not_override_metadata_user_id(old_gw, sdk2):
    result = ok(await sdk2.run("plain", old_gw.base_url, old_gw.key, metadata={"user_id": "already-set"},
                               extra_body={"user": "end-user-42"}))
    assert result["headers"][DROPPED] == "user"
    upstream = old_gw.mock.requests[-1].body
    assert upstream["metadata"] == {"user_id": "already-set"}
    assert "user" not in upstream


async def test_n_1_is_removed_and_n_above_1_is_refused(old_gw, sdk2):
    result = ok(await sdk2.run("plain", old_gw.base_url, old_gw.key, extra_body={"n": 1}))
    assert result["headers"][DROPPED] == "n"
    assert "n" not in old_gw.mock.requests[-1].body

    sent = len(old_gw.mock.requests)
    result = await sdk2.run("plain", old_gw.base_url, old_gw.key, extra_body={"n": 3})
    sdk_400(result, "n", "one completion per request", "(got 3)")
    assert len(old_gw.mock.requests) == sent


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
          "additionalProperties": False}


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "place", "strict": True, "schema": SCHEMA}},
    {"type": "json_schema", "schema": SCHEMA},
], ids=["chat-completions-nested", "flat"])
async def test_response_format_json_schema_becomes_output_config_format(old_gw, sdk2, response_format):
    result = ok(await sdk2.run("plain", old_gw.base_url, old_gw.key, output_config={"effort": "low"},
                               extra_body={"response_format": response_format}))
    assert result["headers"][DROPPED] == "response_format"
    upstream = old_gw.mock.requests[-1].body
    assert upstream["output_config"] == {"effort": "low", "format": {"type": "json_schema", "schema": SCHEMA}}
    assert "response_format" not in upstream


async def test_response_format_does_not_override_a_native_output_format(old_gw):
    native = {"type": "json_schema", "schema": {"type": "object", "properties": {},
                                                 "additionalProperties": False}}
    payload = body(output_config={"format": native}, response_format={"type": "json_schema", "schema": SCHEMA})
    resp = await post(old_gw, payload)
    assert resp.status == 200, resp.body
    assert resp.header(DROPPED) == "response_format"
    upstream = old_gw.mock.requests[-1].body
    assert upstream["output_config"] == {"format": native} and "response_format" not in upstream


@pytest.mark.parametrize("kind", ["json_object", "text"])
async def test_response_format_json_object_and_text_are_removed(old_gw, sdk2, kind):
    result = ok(await sdk2.run("plain", old_gw.base_url, old_gw.key,
                               extra_body={"response_format": {"type": kind}}))
    assert result["headers"][DROPPED] == "response_format"
    upstream = old_gw.mock.requests[-1].body
    assert "response_format" not in upstream and "output_config" not in upstream


async def test_penalties_logit_bias_and_seed_are_validated_then_removed(old_gw, sdk2):
    extras = {"presence_penalty": 0.5, "frequency_penalty": -2, "logit_bias": {"50256": -100, "11": 2.5},
              "seed": 7}
    result = ok(await sdk2.run("plain", old_gw.base_url, old_gw.key, extra_body=extras))
    assert result["headers"][DROPPED] == "presence_penalty, frequency_penalty, logit_bias, seed"
    upstream = old_gw.mock.requests[-1].body
    assert set(upstream) == {"model", "max_tokens", "messages"}


async def test_dropped_params_header_keeps_the_clients_order(new_gw):
    """The documented example: stop merged, user translated, temperature removed for a 2026-10-21 channel."""
    payload = {"model": HAIKU, "stop": "END", "max_tokens": 64, "user": "u-1", "temperature": 0.3,
               "messages": [{"role": "user", "content": "hi"}]}
    resp = await post(new_gw, payload)
    assert resp.status == 200, resp.body
    assert resp.header(DROPPED) == "stop, user, temperature"
    upstream = new_gw.mock.requests[-1].body
    assert upstream == {"model": HAIKU, "max_tokens": 64, "messages": payload["messages"],
                        "stop_sequences": ["END"], "metadata": {"user_id": "u-1"}}


async def test_dropped_params_header_on_a_stream(old_gw, sdk2):
    result = ok(await sdk2.run("raw_stream", old_gw.base_url, old_gw.key, extra_body={"seed": 1, "user": "u"}))
    assert result["headers"][DROPPED] == "seed, user"
    assert result["events"][-1]["type"] == "message_stop"
    upstream = old_gw.mock.requests[-1].body
    assert upstream["stream"] is True and "seed" not in upstream and upstream["metadata"] == {"user_id": "u"}


ALL_EXTRAS = {"stop": ["HALT", "END"], "user": "u-9", "n": 1, "response_format": {"type": "json_object"},
              "presence_penalty": 1, "frequency_penalty": 0.5, "logit_bias": {"42": 10}, "seed": 3}


async def test_forward_extras_channel_sends_them_unchanged(gateway_env, strict_mock):
    env = await start(gateway_env, strict_mock, options={"forward_extras": True})
    payload = body(stop_sequences=["END"], **ALL_EXTRAS)
    resp = await post(env, payload)
    assert resp.status == 200, resp.body
    assert resp.header(DROPPED) is None
    upstream = strict_mock.requests[-1]
    assert upstream.raw_body == sent_bytes(payload)
    assert upstream.body == payload

    # Validation still applies: the gateway returns one completion per request whatever the channel.
    strict_mock.requests.clear()
    gateway_400(await post(env, body(n=2)), strict_mock, "n", "one completion per request")


async def test_forward_extras_still_fits_the_body_to_2026_10_21(gateway_env, strict_mock, sdk2):
    env = await start(gateway_env, strict_mock, api_version=NEW, options={"forward_extras": True})
    result = ok(await sdk2.run("plain", env.base_url, env.key, extra_body={**ALL_EXTRAS, "top_p": 0.9}))
    assert result["headers"][DROPPED] == "top_p"
    upstream = strict_mock.requests[-1].body
    assert {k: upstream[k] for k in ALL_EXTRAS} == ALL_EXTRAS
    assert "top_p" not in upstream


# =====================================================================================================================
# Models
# =====================================================================================================================

# claude-sonnet-4.5 names a retired model: by default it goes to the documented successor.
SEED_NAMES = {"claude-opus-4-5-20251101": OPUS, "claude-sonnet-4.5": "claude-sonnet-5-5", "claude-haiku-4.5": HAIKU,
              "claude-opus-4.5": OPUS}


@pytest.mark.parametrize("name", list(SEED_NAMES))
async def test_seed_model_names_work_out_of_the_box(old_gw, sdk2, name):
    result = ok(await sdk2.run("plain", old_gw.base_url, old_gw.key, model=name))
    assert result["message"]["model"] == name                       # the name the client asked for
    assert old_gw.mock.requests[-1].body["model"] == SEED_NAMES[name]  # the dated id upstream

    result = ok(await sdk2.run("raw_stream", old_gw.base_url, old_gw.key, model=name))
    start_event = result["events"][0]
    assert start_event["type"] == "message_start" and start_event["message"]["model"] == name
    assert old_gw.mock.requests[-1].body["model"] == SEED_NAMES[name]

    rows = await old_gw.usage_rows(2)
    assert [(r["requested_model"], r["upstream_model"], r["status"]) for r in rows] == \
        [(name, SEED_NAMES[name], 200)] * 2


async def test_models_endpoint_lists_the_seed_models(old_gw, sdk2):
    result = ok(await sdk2.run("list_models", old_gw.base_url, old_gw.key, limit=2))
    assert set(result["ids"]) >= {OPUS, SONNET, HAIKU}


async def test_operator_adds_a_channel_alias(gateway_env, strict_mock, sdk2):
    env = await start(gateway_env, strict_mock)
    before = await sdk2.run("plain", env.base_url, env.key, model="team-fast")
    assert before["error"]["status"] == 400                          # no price: refused, not sent upstream
    assert "prices set team-fast" in before["error"]["body"]["error"]["message"]
    assert strict_mock.requests == []

    channel_store.update_channel(env.conn, "main", set_aliases={"team-fast": HAIKU})
    for _ in range(100):                                              # the gateway polls the store
        result = await sdk2.run("plain", env.base_url, env.key, model="team-fast")
        if "error" not in result:
            break
        await asyncio.sleep(0.05)
    ok(result)
    assert result["message"]["model"] == "team-fast"
    assert strict_mock.requests[-1].body["model"] == HAIKU


async def test_operator_changes_a_seed_alias_on_one_channel(gateway_env, strict_mock, sdk2):
    env = await start(gateway_env, strict_mock, aliases={"claude-sonnet-4.5": HAIKU})
    result = ok(await sdk2.run("raw_stream", env.base_url, env.key, model="claude-sonnet-4.5"))
    assert result["events"][0]["message"]["model"] == "claude-sonnet-4.5"
    assert strict_mock.requests[-1].body["model"] == HAIKU


async def test_model_no_channel_serves_is_404_listing_the_keys_models(gateway_env, strict_mock, sdk2):
    env = await start(gateway_env, strict_mock, models=[HAIKU], aliases={"team-fast": HAIKU})
    result = await sdk2.run("plain", env.base_url, env.key, model="claude-opus-4.5")
    error = result["error"]
    assert (error["class"], error["status"], error["type"]) == ("NotFoundError", 404, "not_found_error")
    message = error["body"]["error"]["message"]
    assert "claude-opus-4.5" in message
    assert f"models this key can use: team-fast, {HAIKU}" in message or \
        f"models this key can use: {HAIKU}, team-fast" in message, message
    assert SONNET not in message and OPUS not in message
    assert strict_mock.requests == []


@pytest.mark.parametrize("model", ["gpt-4o", "openai/gpt-4o", "gemini-2.5-pro"])
@pytest.mark.parametrize("served", ["any-model", "listed-models"])
async def test_other_vendor_model_gets_the_anthropic_only_error(gateway_env, strict_mock, model, served):
    env = await start(gateway_env, strict_mock, models=None if served == "any-model" else [HAIKU])
    resp = await post(env, body(model=model))
    assert resp.status == 404, resp.body
    err = resp.json()["error"]
    assert err["type"] == "not_found_error"
    assert err["message"].startswith(f"model: {model}") and "Anthropic-type channels only" in err["message"]
    assert strict_mock.requests == []


async def test_other_vendor_name_works_when_the_operator_aliases_it(gateway_env, strict_mock):
    """A gateway in front of OpenAI-style clients may map "gpt-4o" to a Claude model on purpose."""
    env = await start(gateway_env, strict_mock, aliases={"gpt-4o": SONNET})
    resp = await post(env, body(model="gpt-4o"))
    assert resp.status == 200, resp.body
    assert resp.json()["model"] == "gpt-4o"
    assert strict_mock.requests[-1].body["model"] == SONNET


# =====================================================================================================================
# API versions and SDK generations
# =====================================================================================================================

def _credentials(upstream) -> list[str]:
    return upstream.header_values("x-api-key") + upstream.header_values("authorization")


@pytest.mark.parametrize("channel_version", [OLD, NEW])
@pytest.mark.parametrize("generation", ["1.x", "2.x"])
async def test_either_sdk_generation_works_against_either_channel_version(
        gateway_env, strict_mock, make_sdk, generation, channel_version):
    env = await start(gateway_env, strict_mock, api_version=channel_version)
    sdk = make_sdk(generation, "async")
    # Neither SDK types sampling parameters any more, but clients written for 2023-06-01 (and Claude Code)
    # still send them.
    sampling = {"temperature": 0.4, "top_k": 20}
    result = ok(await sdk.run("plain", env.base_url, env.key, text="versions", extra_body=sampling))
    assert "versions" in result["text"]

    upstream = strict_mock.requests[-1]
    assert upstream.header_values("anthropic-version") == [channel_version]
    assert _credentials(upstream) == [UPSTREAM_KEY]                  # the channel's key, once
    if channel_version == NEW:
        assert result["headers"][DROPPED] == "temperature, top_k"
        assert not {"temperature", "top_k"} & set(upstream.body)
    else:
        assert DROPPED not in result["headers"]
        assert {k: upstream.body[k] for k in sampling} == sampling


CITATION = {"type": "char_location", "cited_text": "Paris", "document_index": 0, "document_title": "Atlas",
            "start_char_index": 0, "end_char_index": 5}
DOC = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Paris is in France."},
       "title": "Atlas", "citations": {"enabled": True}}


def _citations_conversation() -> list:
    return [
        {"role": "user", "content": [DOC, {"type": "text", "text": "Where is Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "In France.", "citations": [CITATION]},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "capital", "citations": [CITATION]}]},
            {"type": "search_result", "source": "https://atlas.example", "title": "Atlas",
             "content": [{"type": "text", "text": "Paris, France", "citations": [CITATION]}],
             "citations": {"enabled": True}},
            {"type": "text", "text": "You said: In France.", "citations": [CITATION]},
            {"type": "text", "text": "And?", "citations": []}]},
    ]


def _without_user_citations(messages: list) -> list:
    """What a 2026-10-21 channel must receive: the non-empty citations of user text blocks removed."""
    fixed = json.loads(json.dumps(messages))
    user = fixed[2]["content"]
    del user[0]["content"][0]["citations"]
    del user[1]["content"][0]["citations"]
    del user[2]["citations"]
    return fixed


@pytest.mark.parametrize("channel_version", [OLD, NEW])
async def test_user_text_citations_are_removed_for_2026_10_21(gateway_env, strict_mock, channel_version):
    env = await start(gateway_env, strict_mock, api_version=channel_version)
    messages = _citations_conversation()
    payload = body(messages=messages, tools=[{"name": "lookup", "input_schema": {"type": "object"}}])
    resp = await post(env, payload)
    assert resp.status == 200, resp.body
    assert resp.header(DROPPED) is None                 # a value fix, not a removed parameter
    upstream = strict_mock.requests[-1]
    if channel_version == OLD:
        assert upstream.raw_body == sent_bytes(payload)
    else:
        assert upstream.body["messages"] == _without_user_citations(messages)
        # kept: the assistant's citations, the document's and the search result's citation settings
        assert upstream.body["messages"][1] == messages[1]
        assert upstream.body["messages"][0]["content"][0]["citations"] == {"enabled": True}
        assert upstream.body["messages"][2]["content"][1]["citations"] == {"enabled": True}


@pytest.mark.parametrize("channel_version", [OLD, NEW])
async def test_document_in_an_assistant_message(gateway_env, strict_mock, channel_version):
    """Legal under 2023-06-01 (what this client speaks), refused with a clear 400 for a 2026-10-21 channel."""
    env = await start(gateway_env, strict_mock, api_version=channel_version)
    messages = [{"role": "user", "content": "Draft something"},
                {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, DOC]},
                {"role": "user", "content": "Thanks"}]
    resp = await post(env, body(messages=messages), headers=[("anthropic-version", OLD)])
    if channel_version == OLD:
        assert resp.status == 200, resp.body
        assert strict_mock.requests[-1].body["messages"] == messages
    else:
        gateway_400(resp, strict_mock, "messages[1].content[1]",
                    "a document block cannot be placed directly in an assistant message under "
                    "anthropic-version 2026-10-21, which this channel uses", "send documents in a user message")


@pytest.mark.parametrize("client_version", [None, OLD, NEW, "1999-01-01"])
async def test_client_version_is_optional_and_ignored(old_gw, client_version):
    headers = [("anthropic-version", client_version)] if client_version else []
    resp = await post(old_gw, body(), headers=headers)
    assert resp.status == 200, resp.body
    assert old_gw.mock.requests[-1].header_values("anthropic-version") == [OLD]


@pytest.mark.parametrize("channel_version", [OLD, NEW])
@pytest.mark.parametrize("client", ["1.x", "2.x", "raw-without-version"])
async def test_forward_client_version_channel_sends_the_clients_version(
        gateway_env, strict_mock, make_sdk, client, channel_version):
    env = await start(gateway_env, strict_mock, api_version=channel_version,
                      options={"forward_client_version": True})
    if client == "raw-without-version":
        resp = await post(env, body(temperature=0.5))
        assert resp.status == 200, resp.body
        expected, dropped = channel_version, resp.header(DROPPED)
    else:
        result = ok(await make_sdk(client, "async").run("plain", env.base_url, env.key,
                                                        extra_body={"temperature": 0.5}))
        expected = OLD if client == "1.x" else NEW
        dropped = result["headers"].get(DROPPED)
    upstream = strict_mock.requests[-1]
    assert upstream.header_values("anthropic-version") == [expected]
    if expected == NEW:
        assert dropped == "temperature" and "temperature" not in upstream.body
    else:
        assert dropped is None and upstream.body["temperature"] == 0.5


async def test_failover_prepares_the_original_body_for_each_channel(gateway_env, make_mock_upstream):
    """A 2026-10-21 channel fails before any byte; the 2023-06-01 one then gets temperature back."""
    first, second = await make_mock_upstream(), await make_mock_upstream()
    gateway_env.key = gateway_env.add_key("alice")
    gateway_env.add_channel("new", first, api_version=NEW, priority=10)
    gateway_env.add_channel("old", second, api_version=OLD, priority=0)
    await gateway_env.start()
    first.fail_next(529)
    resp = await post(gateway_env, body(temperature=0.5, stop="END"))
    assert resp.status == 200, resp.body
    assert resp.header(DROPPED) == "stop"               # the header describes what the serving channel got
    assert "temperature" not in first.requests[-1].body
    assert first.requests[-1].headers["anthropic-version"] == NEW
    assert second.requests[-1].body["temperature"] == 0.5
    assert second.requests[-1].headers["anthropic-version"] == OLD


# =====================================================================================================================
# Headers and routes
# =====================================================================================================================

async def test_anthropic_headers_are_forwarded_as_sent_except_who_pays(old_gw):
    sent = [("anthropic-beta", "context-management-2025-06-27,  files-api-2025-04-14"),
            ("anthropic-beta", "mock-beta-2025-01-01"),
            ("anthropic-workspace-id", "wrkspc_01ABC"),
            ("anthropic-user-profile-id", "uprof_01XYZ"),
            ("anthropic-future-header", "Mixed Case;value=1")]
    resp = await post(old_gw, body(), headers=sent)
    assert resp.status == 200, resp.body
    upstream = old_gw.mock.requests[-1]
    for name in ("anthropic-beta", "anthropic-future-header"):
        assert upstream.header_values(name) == [v for n, v in sent if n == name]
    # The headers that choose who pays are the operator's (a channel option), never a client's.
    assert "anthropic-workspace-id" not in upstream.headers and "anthropic-user-profile-id" not in upstream.headers


async def test_sdk_workspace_and_user_profile_headers_are_not_forwarded(old_gw, sdk2):
    ok(await sdk2.run("beta_message", old_gw.base_url, old_gw.key, betas=("mock-beta-2025-01-01",),
                      workspace_id="wrkspc_01ABC", user_profile_id="uprof_01XYZ"))
    upstream = old_gw.mock.requests[-1]
    assert upstream.headers["anthropic-beta"] == "mock-beta-2025-01-01"
    assert "anthropic-workspace-id" not in upstream.headers and "anthropic-user-profile-id" not in upstream.headers


@pytest.mark.parametrize("generation", ["1.x", "2.x"])
async def test_beta_calls_with_or_without_query_are_the_same_route(old_gw, make_sdk, generation):
    sdk = make_sdk(generation, "async")
    result = ok(await sdk.run("beta_message", old_gw.base_url, old_gw.key, betas=("mock-beta-2025-01-01",)))
    assert "Beta hello" in result["text"]
    upstream = old_gw.mock.requests[-1]
    assert upstream.path == "/v1/messages"
    assert upstream.query == sdk.beta_query                         # "beta=true" from 1.x, nothing from 2.x
    assert upstream.headers["anthropic-beta"] == "mock-beta-2025-01-01"


async def test_query_string_is_kept_upstream(old_gw):
    resp = await post(old_gw, body(), path="/v1/messages?beta=true&trace=1")
    assert resp.status == 200, resp.body
    assert old_gw.mock.requests[-1].target == "/v1/messages?beta=true&trace=1"
    resp = await post(old_gw, {"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]},
                      path="/v1/messages/count_tokens?beta=true")
    assert resp.status == 200, resp.body
    assert old_gw.mock.requests[-1].target == "/v1/messages/count_tokens?beta=true"
    # validation applies on the query route as well
    sent = len(old_gw.mock.requests)
    resp = await post(old_gw, body(top_k=-3), path="/v1/messages?beta=true")
    assert resp.status == 400 and resp.json()["error"]["message"].startswith("top_k: ")
    assert len(old_gw.mock.requests) == sent


@pytest.mark.parametrize("model", ["Claude-Haiku-4-5-20251001", "CLAUDE-HAIKU-4-5-20251001", f" {HAIKU}", f"{HAIKU} ",
                                   f"{HAIKU}\n", f"{HAIKU}\x00", "claude-haiku\u200b-4-5-20251001",
                                   "\ufeffclaude-haiku-4-5-20251001", "claude haiku 4.5", f"{HAIKU}\r\nx-a: b"],
                         ids=["mixed-case", "upper-case", "leading-space", "trailing-space", "newline", "nul",
                              "zero-width-space", "byte-order-mark", "inner-spaces", "header-injection"])
async def test_a_model_name_that_is_not_a_plain_model_id_is_refused(gateway, model):
    """A name that only looks like a model id (another case, whitespace, control or invisible characters) is
    refused before routing: forwarded verbatim it would miss the allow-list's and the price list's entries."""
    message = gateway_400(await post(gateway, body(model=model)), gateway.mock, "model", "plain model id")
    assert "\x00" not in message and "\n" not in message and "\u200b" not in message
    count = await post(gateway, body(model=model), path="/v1/messages/count_tokens")
    gateway_400(count, gateway.mock, "model", "plain model id")


@pytest.mark.parametrize("model", ["claude-haiku-4.5", "anthropic/claude-haiku-4.5", "claude-3-5-sonnet@20240620",
                                   "anthropic.claude-3-5-sonnet-20240620-v1:0", "claude_custom-1"])
async def test_plain_model_ids_of_every_form_pass_the_check(gateway, model):
    """Aliases, vendor/model, Vertex (@) and Bedrock (. and :) ids are plain: they reach routing."""
    response = await post(gateway, body(model=model))
    # Past the name check: served, not served (404), or refused as unpriced (the catalogue lacks the name).
    assert response.status in (200, 404) or b"has no price" in response.body, response.body
    if response.status == 404:
        assert response.json()["error"]["type"] == "not_found_error"
