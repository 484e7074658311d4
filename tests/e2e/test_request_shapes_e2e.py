"""Request shapes of the December 2026 API through the real gateway: new fields and block types pass unchanged,
mid-conversation system messages pass, per-model parameter rules, compressed request bodies."""
from __future__ import annotations

import gzip
import json
import zlib

import anthropic
import orjson
import pytest

from tests.support.rawhttp import RawConnection

HAIKU = "claude-haiku-4-5-20251001"


async def post_raw(env, key: str, body: bytes, headers: dict | None = None):
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("POST", "/v1/messages", {"x-api-key": key, "content-type": "application/json",
                                                           **(headers or {})}, body)


def ask(**fields) -> dict:
    return {"model": HAIKU, "max_tokens": 64, "messages": [{"role": "user", "content": "shape me"}], **fields}


async def test_a_system_message_mid_conversation_reaches_upstream(gateway):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "system", "content": "From now on answer in one word."},
                {"role": "user", "content": "Why?"}]
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        reply = await client.messages.create(model=HAIKU, max_tokens=64, messages=messages)
    assert reply.content[0].type == "text"
    assert gateway.mock.last_request.body["messages"] == messages


async def test_new_fields_block_types_and_tool_versions_pass_byte_for_byte(gateway):
    # Opus 5.5, since fast mode is priced there (the gateway refuses fast mode it cannot bill).
    body = ask(
        model="claude-opus-5-5", thinking={"type": "adaptive"}, output_config={"effort": "low", "format": {
            "type": "json_schema", "schema": {"type": "object", "properties": {}, "additionalProperties": False}}},
        speed="fast", inference_geo="us", service_tier="auto", cache_control={"type": "ephemeral", "ttl": "1h"},
        container="container_011CUy", context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
        compaction={"trigger": {"type": "input_tokens", "value": 100000}},
        fallbacks=[{"model": "claude-haiku-4-5"}], future_field={"nested": [1, 2.5, None]},
        tools=[{"type": "web_fetch_20260101", "name": "web_fetch"}, {"type": "memory_20250818", "name": "memory"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"},
                                               {"type": "future_block_2026", "payload": {"k": "v"}}]}])
    gateway.mock.account.containers.add("container_011CUy")    # one this upstream account holds
    for thinking in ({"type": "adaptive"}, {"type": "between_tools"}):
        raw = json.dumps({**body, "thinking": thinking}, separators=(",", ":")).encode()
        response = await post_raw(gateway, gateway.key, raw)
        assert response.status == 200, response.body
        assert gateway.mock.last_request.raw_body == raw
        assert response.header("apertis-dropped-params") is None


@pytest.mark.parametrize("model", ["claude-opus-4-8", "claude-sonnet-5", "claude-haiku-5-5"])
async def test_a_seed_clients_temperature_to_a_current_model_still_gets_an_answer(gateway, model):
    """The channel is on 2023-06-01, where the version rule keeps sampling parameters; the model refuses them."""
    response = await post_raw(gateway, gateway.key, json.dumps(ask(model=model, temperature=0.7, top_k=5)).encode(),
                              {"anthropic-version": "2023-06-01"})
    assert response.status == 200, response.body
    assert response.header("apertis-dropped-params") == "temperature, top_k"
    sent = gateway.mock.last_request.body
    assert sent["model"] == model and "temperature" not in sent and "top_k" not in sent


async def test_a_model_that_refuses_sampling_gets_it_from_no_sdk_generation(make_sdk, gateway):
    for generation in ("2.x", "1.x"):
        result = await make_sdk(generation, "async").run(
            "plain", gateway.base_url, gateway.key, model="claude-opus-4-8", extra_body={"temperature": 0.3})
        assert "error" not in result, result
        assert "temperature" not in gateway.mock.last_request.body


async def test_budgeted_thinking_to_a_model_that_thinks_adaptively_is_a_400_naming_the_field(gateway):
    body = ask(model="claude-sonnet-5", max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 2048})
    response = await post_raw(gateway, gateway.key, json.dumps(body).encode())
    assert response.status == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("thinking.type: ")
    assert gateway.mock.requests == []


# -- compressed bodies ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("coding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress),
                                              ("deflate", lambda b: zlib.compress(b, wbits=-15))],
                         ids=["gzip", "deflate", "raw-deflate"])
async def test_a_compressed_body_is_decoded_and_forwarded_plain(gateway, coding, compress):
    raw = json.dumps(ask(messages=[{"role": "user", "content": "squeezed " * 50}])).encode()
    response = await post_raw(gateway, gateway.key, compress(raw), {"content-encoding": coding})
    assert response.status == 200, response.body
    received = gateway.mock.last_request
    assert received.raw_body == orjson.dumps(json.loads(raw)) and "content-encoding" not in received.headers
    [row] = await gateway.usage_rows(1)
    assert row["status"] == 200 and row["input_tokens"] > 0


async def test_a_compression_bomb_is_a_413_and_the_server_stays_up(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(max_body_bytes=1024 * 1024)
    padding = " " * (64 * 1024 * 1024)               # 64 MiB of JSON whitespace, ~64 KiB compressed
    bomb = gzip.compress(json.dumps(ask()).encode()[:-1] + padding.encode() + b"}", compresslevel=9)
    assert len(bomb) < 1024 * 1024
    response = await post_raw(gateway_env, key, bomb, {"content-encoding": "gzip"})
    assert response.status == 413
    assert response.json()["error"]["type"] == "request_too_large"
    assert response.json()["error"]["details"] == {"error_code": "request_body_too_large_after_decoding"}
    assert mock_upstream.requests == []
    again = await post_raw(gateway_env, key, json.dumps(ask()).encode())
    assert again.status == 200
    rows = await gateway_env.usage_rows(2)
    assert [r["status"] for r in rows] == [413, 200]


@pytest.mark.parametrize("coding, body, code", [
    ("br", b"\x0b\x02\x80{}\x03", "request_body_encoding_unsupported"),
    ("gzip", b"not gzip at all", "request_body_encoding_invalid"),
    ("gzip", gzip.compress(b'{"model": "x"}')[:-6], "request_body_encoding_invalid"),
], ids=["brotli", "not-gzip", "truncated-gzip"])
async def test_a_body_that_cannot_be_decoded_is_a_400_in_the_apis_shape(gateway, coding, body, code):
    response = await post_raw(gateway, gateway.key, body, {"content-encoding": coding})
    assert response.status == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["details"] == {"error_code": code} and error["request_id"].startswith("req_")
    assert gateway.mock.requests == []
