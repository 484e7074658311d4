"""The request contract (apertis_proxy.gateway.contract), rule by rule.

Each rule of docs/request-contract.md has a passing and a failing case here;
failing cases assert the field named in the 400 and the explanation.
"""
from __future__ import annotations

import copy

import pytest

from apertis_proxy.errors import GatewayError
from apertis_proxy.gateway.contract import (
    DROPPED_PARAMS_HEADER,
    dropped_header_value,
    is_claude_model_name,
    prepare_for_channel,
    upstream_api_version,
    validate,
)
from apertis_proxy.gateway.model_rules import SAMPLING, THINKING_ENABLED, refused_by
from apertis_proxy.plugin_api import Channel

NEW = "2026-10-21"
OLD = "2023-06-01"


def body(**fields):
    base = {"model": "claude-sonnet-4.5", "max_tokens": 2048,
            "messages": [{"role": "user", "content": "Hello"}]}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _ABSENT}


_ABSENT = object()


def channel(**fields):
    defaults = dict(id=1, name="main", base_url="http://127.0.0.1:1", api_key="sk-upstream")
    defaults.update(fields)
    return Channel(**defaults)


def rejected(payload, **kw) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        validate(payload, **kw)
    err = info.value
    assert err.status == 400
    assert err.error_type == "invalid_request_error"
    return err


# ------------------------------------------------------------------ validation

def test_minimal_body_is_valid():
    validate(body())


@pytest.mark.parametrize("payload", [[], "text", None, 3, [body()]])
def test_body_must_be_an_object(payload):
    assert rejected(payload).message == "body: must be a JSON object"


@pytest.mark.parametrize("model, message", [
    (_ABSENT, "model: field required"),
    (None, "model: field required"),
    (123, "model: must be a non-empty string"),
    ("", "model: must be a non-empty string"),
    (["claude"], "model: must be a non-empty string"),
])
def test_model_required_non_empty_string(model, message):
    assert rejected(body(model=model)).message == message


@pytest.mark.parametrize("messages, message", [
    (_ABSENT, "messages: field required"),
    ("Hello", "messages: must be an array of messages"),
    ({"role": "user", "content": "x"}, "messages: must be an array of messages"),
    ([], "messages: at least one message is required"),
    (["Hello"], "messages[0]: must be an object with role and content"),
    ([{"content": "x"}], 'messages[0].role: must be "user", "assistant" or "system" (got null)'),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
     'messages[1].role: must be "user", "assistant" or "system" (got "tool")'),
    ([{"role": "user"}], "messages[0].content: field required"),
    ([{"role": "user", "content": 5}],
     "messages[0].content: must be a string or an array of content blocks"),
    ([{"role": "user", "content": {"type": "text", "text": "x"}}],
     "messages[0].content: must be a string or an array of content blocks"),
    ([{"role": "user", "content": ["plain string"]}],
     'messages[0].content[0]: must be a content block: an object with a string "type"'),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "no type"}]}],
     'messages[0].content[1]: must be a content block: an object with a string "type"'),
    ([{"role": "user", "content": [{"type": 7}]}],
     'messages[0].content[0]: must be a content block: an object with a string "type"'),
])
def test_messages_rules(messages, message):
    assert rejected(body(messages=messages)).message == message


def test_system_messages_mid_conversation_are_accepted_and_forwarded_unchanged():
    payload = body(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                             {"role": "system", "content": [{"type": "text", "text": "Now be brief"}]},
                             {"role": "user", "content": "Why?"}])
    validate(payload)
    for version in (OLD, NEW):
        assert not prepare_for_channel(payload, channel(api_version=version), client_version=None).changed


def test_messages_accept_strings_blocks_and_unknown_block_types():
    validate(body(messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "look", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
            {"type": "block_type_from_the_future", "anything": [1, 2]},
        ]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]},
        {"role": "assistant", "content": "Done"},
    ]))


@pytest.mark.parametrize("max_tokens, message", [
    (_ABSENT, "max_tokens: field required"),
    (-1, "max_tokens: must be an integer >= 0"),
    (1.5, "max_tokens: must be an integer >= 0"),
    (1024.0, "max_tokens: must be an integer >= 0"),
    (True, "max_tokens: must be an integer >= 0"),
    ("1024", "max_tokens: must be an integer >= 0"),
])
def test_max_tokens_rules(max_tokens, message):
    assert rejected(body(max_tokens=max_tokens)).message == message


def test_max_tokens_zero_is_allowed_for_cache_prewarm():
    validate(body(max_tokens=0))


def test_count_tokens_bodies_need_no_max_tokens():
    validate(body(max_tokens=_ABSENT), require_max_tokens=False)
    validate(body(max_tokens=_ABSENT, thinking={"type": "enabled", "budget_tokens": 2000}),
             require_max_tokens=False)
    assert rejected(body(max_tokens=-3), require_max_tokens=False).message == \
        "max_tokens: must be an integer >= 0"


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [-0.1, 1.01, 2, "0.5", True, [0.5]])
def test_unit_interval_numbers_rejected(field, value):
    assert rejected(body(**{field: value})).message == f"{field}: must be a number between 0 and 1"


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [0, 0.0, 0.7, 1, 1.0])
def test_unit_interval_numbers_accepted(field, value):
    validate(body(**{field: value}))


@pytest.mark.parametrize("value, ok", [(0, True), (40, True), (-1, False), (1.5, False),
                                       (False, False), ("5", False)])
def test_top_k(value, ok):
    if ok:
        validate(body(top_k=value))
    else:
        assert rejected(body(top_k=value)).message == "top_k: must be an integer >= 0"


@pytest.mark.parametrize("value, ok", [(True, True), (False, True), ("true", False),
                                       (1, False), (0, False)])
def test_stream(value, ok):
    if ok:
        validate(body(stream=value))
    else:
        assert rejected(body(stream=value)).message == "stream: must be a boolean"


@pytest.mark.parametrize("value, ok", [([], True), (["\n\nHuman:", "END"], True),
                                       ("END", False), (["a", 1], False), ({"a": 1}, False)])
def test_stop_sequences(value, ok):
    if ok:
        validate(body(stop_sequences=value))
    else:
        assert rejected(body(stop_sequences=value)).message == \
            "stop_sequences: must be an array of strings"


@pytest.mark.parametrize("value", [
    "You are terse.",
    [],
    [{"type": "text", "text": "A"},
     {"type": "text", "text": "B", "cache_control": {"type": "ephemeral"}}],
])
def test_system_accepted(value):
    validate(body(system=value))


@pytest.mark.parametrize("value, message", [
    (5, "system: must be a string or an array of text blocks"),
    ({"type": "text", "text": "x"}, "system: must be a string or an array of text blocks"),
    (["plain"], 'system[0]: must be a text block: {"type": "text", "text": "..."}'),
    ([{"type": "text", "text": "a"}, {"type": "image", "source": {}}],
     'system[1]: must be a text block: {"type": "text", "text": "..."}'),
    ([{"type": "text"}], 'system[0]: must be a text block: {"type": "text", "text": "..."}'),
])
def test_system_rejected(value, message):
    assert rejected(body(system=value)).message == message


@pytest.mark.parametrize("value, ok", [({}, True), ({"user_id": "u-1"}, True),
                                       ([], False), ("u-1", False)])
def test_metadata(value, ok):
    if ok:
        validate(body(metadata=value))
    else:
        assert rejected(body(metadata=value)).message == "metadata: must be an object"


def test_tools():
    validate(body(tools=[]))
    validate(body(tools=[{"name": "f", "input_schema": {"type": "object"}},
                         {"type": "web_search_20250305", "name": "web_search"},
                         {"type": "server_tool_from_the_future_20991231", "name": "x"}]))
    assert rejected(body(tools={"name": "f"})).message == "tools: must be an array of tool definitions"
    assert rejected(body(tools=[{"name": "f"}, "g"])).message == "tools[1]: must be an object"


def test_tool_choice():
    validate(body(tool_choice={"type": "auto"}))
    validate(body(tool_choice={"type": "tool", "name": "f", "disable_parallel_tool_use": True}))
    assert rejected(body(tool_choice="auto")).message == \
        'tool_choice: must be an object such as {"type": "auto"}'


# thinking

@pytest.mark.parametrize("thinking", [
    {"type": "enabled", "budget_tokens": 1024},
    {"type": "enabled", "budget_tokens": 2047},
    {"type": "disabled"},
    {"type": "adaptive"},
    {"type": "a_thinking_mode_from_the_future", "knob": 3},
])
def test_thinking_accepted(thinking):
    validate(body(max_tokens=2048, thinking=thinking))


@pytest.mark.parametrize("thinking, message", [
    ("enabled", 'thinking: must be an object with a "type"'),
    ({}, 'thinking.type: must be a string such as "enabled" or "disabled"'),
    ({"type": 1}, 'thinking.type: must be a string such as "enabled" or "disabled"'),
    ({"type": "enabled"},
     'thinking.budget_tokens: must be an integer when thinking.type is "enabled"'),
    ({"type": "enabled", "budget_tokens": 2000.0},
     'thinking.budget_tokens: must be an integer when thinking.type is "enabled"'),
    ({"type": "enabled", "budget_tokens": 1023},
     "thinking.budget_tokens: must be at least 1024 (got 1023)"),
    ({"type": "enabled", "budget_tokens": 32769},
     "thinking.budget_tokens: must be at most 32768 (got 32769)"),
])
def test_thinking_rejected(thinking, message):
    assert rejected(body(max_tokens=64000, thinking=thinking)).message == message


def test_thinking_budget_must_be_below_max_tokens():
    err = rejected(body(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 4096}))
    assert err.message == "thinking.budget_tokens: must be less than max_tokens (got 4096 >= 2048)"
    err = rejected(body(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 2048}))
    assert err.message == "thinking.budget_tokens: must be less than max_tokens (got 2048 >= 2048)"


def test_thinking_budget_upper_bound_is_the_operators():
    big = body(max_tokens=100_000, thinking={"type": "enabled", "budget_tokens": 60_000})
    assert "must be at most 32768" in rejected(big).message
    validate(big, thinking_budget_max=65_536)
    assert rejected(big, thinking_budget_max=50_000).message == \
        "thinking.budget_tokens: must be at most 50000 (got 60000)"


# OpenAI-style extras

@pytest.mark.parametrize("stop", ["END", [], ["a"], ["a", "b", "c", "d"]])
def test_stop_accepted(stop):
    validate(body(stop=stop))


@pytest.mark.parametrize("stop", [5, ["a", "b", "c", "d", "e"], ["a", 2], {"a": 1}])
def test_stop_rejected(stop):
    assert rejected(body(stop=stop)).message == "stop: must be a string or an array of up to 4 strings"


def test_user():
    validate(body(user="customer-42"))
    assert rejected(body(user=42)).message == "user: must be a string"


def test_n_one_is_accepted():
    validate(body(n=1))


def test_n_above_one_explains_one_completion_per_request():
    err = rejected(body(n=3))
    assert err.message.startswith("n: this endpoint produces one completion per request, so n must be 1 (got 3)")


@pytest.mark.parametrize("n, message", [(0, "n: must be 1 (got 0)"), (-2, "n: must be 1 (got -2)"),
                                        (1.0, "n: must be an integer"), (True, "n: must be an integer"),
                                        ("1", "n: must be an integer")])
def test_n_rejected(n, message):
    assert rejected(body(n=n)).message == message


@pytest.mark.parametrize("response_format", [
    {"type": "text"},
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "r", "strict": True,
                                            "schema": {"type": "object", "properties": {},
                                                       "additionalProperties": False}}},
    {"type": "json_schema", "name": "r", "schema": {"type": "object", "additionalProperties": False}},
])
def test_response_format_accepted(response_format):
    validate(body(response_format=response_format))


@pytest.mark.parametrize("response_format, message", [
    ("json", 'response_format: must be an object such as {"type": "json_object"}'),
    ({}, 'response_format.type: must be "text", "json_object" or "json_schema" (got null)'),
    ({"type": "xml"}, 'response_format.type: must be "text", "json_object" or "json_schema" (got "xml")'),
    ({"type": "json_schema"},
     'response_format.json_schema.schema: a JSON Schema object is required when type is "json_schema"'),
    ({"type": "json_schema", "json_schema": {"name": "r"}},
     'response_format.json_schema.schema: a JSON Schema object is required when type is "json_schema"'),
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": "object"}},
     'response_format.json_schema.schema: a JSON Schema object is required when type is "json_schema"'),
])
def test_response_format_rejected(response_format, message):
    assert rejected(body(response_format=response_format)).message == message


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties(field):
    for ok in (-2, -1.5, 0, 2, 2.0):
        validate(body(**{field: ok}))
    for bad in (-2.01, 3, "1", True):
        assert rejected(body(**{field: bad})).message == f"{field}: must be a number between -2 and 2"


def test_logit_bias():
    validate(body(logit_bias={}))
    validate(body(logit_bias={"50256": -100, "1": 100, "2": 0.5}))
    assert rejected(body(logit_bias=[1])).message == \
        "logit_bias: must be an object mapping token ids to numbers between -100 and 100"
    assert rejected(body(logit_bias={"50256": 101})).message == \
        'logit_bias["50256"]: must be a number between -100 and 100'
    assert rejected(body(logit_bias={"7": "high"})).message == \
        'logit_bias["7"]: must be a number between -100 and 100'


def test_seed():
    validate(body(seed=42))
    validate(body(seed=-1))
    for bad in (1.5, "42", True):
        assert rejected(body(seed=bad)).message == "seed: must be an integer"


def test_null_optional_fields_count_as_absent():
    validate(body(temperature=None, stop=None, user=None, n=None, response_format=None,
                  seed=None, system=None, thinking=None, metadata=None))


def test_unknown_top_level_fields_pass():
    validate(body(service_tier="auto", container="c_1", mcp_servers=[{"type": "url"}],
                  context_management={"edits": []}, output_config={"effort": "high"},
                  a_field_from_next_year={"nested": True}))


def test_first_broken_rule_in_body_order_is_reported():
    err = rejected(body(temperature=3, top_k=-1))
    assert err.message.startswith("temperature:")


# ----------------------------------------------------------------- model names

@pytest.mark.parametrize("name", [
    "claude-opus-4-5-20251101", "claude-sonnet-4.5", "claude-haiku-4.5", "claude-3-5-haiku-latest",
    "anthropic/claude-sonnet-4.5", "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
    "claude-sonnet-4-5@20250929", "fast", "sonnet", "opus", "my-team-model", "Claude-Opus-4.5",
])
def test_claude_or_unknown_names_are_not_refused(name):
    assert is_claude_model_name(name) is True


@pytest.mark.parametrize("name", [
    "gpt-4o", "gpt-4.1-mini", "GPT-4o", "chatgpt-4o-latest", "o1", "o1-mini", "o3-mini", "o4-mini",
    "text-embedding-3-small", "gemini-2.5-pro", "models/gemini-1.5-flash", "gemma-2-9b",
    "llama-3.1-70b", "meta-llama/Llama-3-8b", "us.meta.llama3-70b-instruct-v1:0",
    "mistral-large-latest", "mixtral-8x7b", "command-r-plus", "grok-2", "deepseek-chat",
    "qwen2.5-72b", "openai/gpt-4o", "amazon.nova-pro-v1:0",
])
def test_other_vendors_names_are_recognised(name):
    assert is_claude_model_name(name) is False


# --------------------------------------------------------- prepare_for_channel

def prepared(payload, ch=None, client_version=None, **kw):
    """prepare_for_channel, asserting on the way that the input is left intact."""
    before = copy.deepcopy(payload)
    result = prepare_for_channel(payload, ch or channel(), client_version=client_version, **kw)
    assert payload == before, "prepare_for_channel mutated its input"
    return result


def test_nothing_to_do_returns_the_client_body_itself():
    payload = body(temperature=0.2, top_k=5, metadata={"user_id": "u"})
    result = prepared(payload)
    assert result.body is payload
    assert result.changed is False
    assert result.dropped == []
    assert result.api_version == OLD


def test_alias_becomes_the_upstream_id():
    ch = channel(aliases={"claude-sonnet-4.5": "claude-sonnet-4-5-20250929"})
    payload = body()
    result = prepared(payload, ch)
    assert result.body["model"] == "claude-sonnet-4-5-20250929"
    assert result.changed is True
    assert result.dropped == []
    assert result.body["messages"] is payload["messages"]       # shallow copy only


def test_unaliased_model_is_sent_as_asked():
    ch = channel(aliases={"claude-haiku-4.5": "claude-haiku-4-5-20251001"})
    result = prepared(body(model="claude-opus-4-5-20251101"), ch)
    assert result.body["model"] == "claude-opus-4-5-20251101"
    assert result.changed is False


@pytest.mark.parametrize("stop_sequences, stop, expected", [
    (_ABSENT, "END", ["END"]),
    (_ABSENT, ["A", "B"], ["A", "B"]),
    (["X", "END"], "END", ["X", "END"]),
    (["X"], ["END", "X", "Y", "END"], ["X", "END", "Y"]),
    ([], ["A"], ["A"]),
])
def test_stop_merges_into_stop_sequences(stop_sequences, stop, expected):
    result = prepared(body(stop_sequences=stop_sequences, stop=stop))
    assert "stop" not in result.body
    assert result.body["stop_sequences"] == expected
    assert result.dropped == ["stop"]
    assert result.changed is True


def test_empty_or_null_stop_is_removed_without_adding_stop_sequences():
    for stop in ([], None):
        result = prepared(body(stop=stop))
        assert "stop" not in result.body and "stop_sequences" not in result.body
        assert result.dropped == ["stop"]


def test_user_becomes_metadata_user_id():
    result = prepared(body(user="customer-42"))
    assert result.body["metadata"] == {"user_id": "customer-42"}
    assert "user" not in result.body
    assert result.dropped == ["user"]


def test_user_joins_existing_metadata_keys():
    result = prepared(body(user="customer-42", metadata={"trace": "t-1"}))
    assert result.body["metadata"] == {"trace": "t-1", "user_id": "customer-42"}


def test_user_does_not_override_metadata_user_id():
    payload = body(user="from-user-field", metadata={"user_id": "from-metadata"})
    result = prepared(payload)
    assert result.body["metadata"] == {"user_id": "from-metadata"}
    assert "user" not in result.body
    assert result.dropped == ["user"]


def test_n_one_is_removed():
    result = prepared(body(n=1))
    assert "n" not in result.body
    assert result.dropped == ["n"]


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
          "required": ["city"], "additionalProperties": False}


def test_json_schema_becomes_output_config_format():
    payload = body(response_format={"type": "json_schema",
                                    "json_schema": {"name": "place", "strict": True, "schema": SCHEMA}})
    result = prepared(payload)
    assert "response_format" not in result.body
    assert result.body["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    assert result.dropped == ["response_format"]


def test_flat_json_schema_form_is_translated_too():
    result = prepared(body(response_format={"type": "json_schema", "name": "p", "schema": SCHEMA}))
    assert result.body["output_config"]["format"] == {"type": "json_schema", "schema": SCHEMA}


def test_json_schema_keeps_other_output_config_keys():
    payload = body(output_config={"effort": "low"},
                   response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    result = prepared(payload)
    assert result.body["output_config"] == {"effort": "low",
                                            "format": {"type": "json_schema", "schema": SCHEMA}}


def test_native_structured_output_wins_over_response_format():
    native = {"format": {"type": "json_schema", "schema": {"type": "object", "properties": {},
                                                           "additionalProperties": False}}}
    result = prepared(body(output_config=native,
                           response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}}))
    assert result.body["output_config"] == native
    assert result.dropped == ["response_format"]
    beta = {"type": "json_schema", "schema": SCHEMA}
    result = prepared(body(output_format=beta,
                           response_format={"type": "json_schema", "json_schema": {"schema": {"type": "string"}}}))
    assert result.body["output_format"] == beta and "output_config" not in result.body


@pytest.mark.parametrize("kind", ["json_object", "text"])
def test_json_object_and_text_are_removed(kind):
    # json_object: Anthropic accepts no "any object" schema (objects must set
    # additionalProperties false), so it is removed and reported, not faked.
    result = prepared(body(response_format={"type": kind}))
    assert "response_format" not in result.body
    assert "output_config" not in result.body
    assert result.dropped == ["response_format"]


def test_penalties_logit_bias_and_seed_are_removed():
    payload = body(presence_penalty=0.5, frequency_penalty=-1, logit_bias={"1": 5}, seed=7)
    result = prepared(payload)
    for key in ("presence_penalty", "frequency_penalty", "logit_bias", "seed"):
        assert key not in result.body
    assert result.dropped == ["presence_penalty", "frequency_penalty", "logit_bias", "seed"]
    assert result.body == body()


def test_dropped_names_follow_the_clients_order_and_make_the_header():
    payload = body(seed=1, stop="X", user="u", n=1)
    result = prepared(payload)
    assert result.dropped == ["seed", "stop", "user", "n"]
    assert DROPPED_PARAMS_HEADER == "apertis-dropped-params"
    assert dropped_header_value(result.dropped) == "seed, stop, user, n"
    assert dropped_header_value([]) == ""


def test_forward_extras_channel_gets_them_unchanged():
    payload = body(stop="X", user="u", n=1, response_format={"type": "json_object"},
                   presence_penalty=1, frequency_penalty=1, logit_bias={"1": 1}, seed=3)
    result = prepared(payload, channel(forward_extras=True))
    assert result.body is payload
    assert result.changed is False
    assert result.dropped == []


# API versions

def test_upstream_version_is_the_channels_by_default():
    ch = channel(api_version=NEW)
    assert upstream_api_version(ch, OLD) == NEW
    assert upstream_api_version(channel(), NEW) == OLD
    assert upstream_api_version(channel(api_version=""), None, "2023-01-01") == "2023-01-01"
    assert prepared(body(), channel(api_version=""), default_version=NEW).api_version == NEW


def test_forward_client_version_sends_the_clients_version():
    ch = channel(forward_client_version=True)
    assert upstream_api_version(ch, NEW) == NEW
    assert upstream_api_version(ch, None) == OLD
    assert upstream_api_version(ch, "") == OLD


def test_old_version_keeps_sampling_parameters():
    payload = body(temperature=0.3, top_p=0.9, top_k=10)
    result = prepared(payload, channel(api_version=OLD))
    assert result.body is payload and result.dropped == []


def test_new_version_removes_sampling_parameters():
    payload = body(temperature=1, top_p=0.9, top_k=10, stream=True)
    result = prepared(payload, channel(api_version=NEW))
    assert result.api_version == NEW
    assert result.dropped == ["temperature", "top_p", "top_k"]
    assert result.body == body(stream=True)
    assert result.changed is True


def test_sampling_rule_follows_the_forwarded_client_version():
    payload = body(temperature=0.5)
    on_new = prepared(payload, channel(forward_client_version=True), client_version=NEW)
    assert on_new.api_version == NEW and on_new.dropped == ["temperature"]
    on_old = prepared(payload, channel(forward_client_version=True, api_version=NEW), client_version=OLD)
    assert on_old.api_version == OLD and on_old.dropped == [] and on_old.body is payload
    ignored = prepared(payload, channel(api_version=OLD), client_version=NEW)
    assert ignored.api_version == OLD and ignored.body is payload


@pytest.mark.parametrize("version, fitted", [("2027-03-01", True), ("2024-01-01", False),
                                              ("bedrock-2023-05-31", False)])
def test_later_dated_versions_keep_the_new_rules(version, fitted):
    result = prepared(body(top_k=5), channel(api_version=version))
    assert result.api_version == version
    assert result.dropped == (["top_k"] if fitted else [])


def test_new_version_with_nothing_to_fit_is_unchanged():
    payload = body(messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "citations": []}]}])
    result = prepared(payload, channel(api_version=NEW))
    assert result.body is payload and result.changed is False


CITATION = {"type": "char_location", "cited_text": "x", "document_index": 0,
            "start_char_index": 0, "end_char_index": 1}


def test_new_version_removes_citations_from_user_text_blocks_only():
    untouched = {"role": "user", "content": "first question"}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": "a", "citations": [CITATION]}]}
    user = {"role": "user", "content": [
        {"type": "text", "text": "quoted", "citations": [CITATION], "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "plain"},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"},
         "citations": {"enabled": True}},
    ]}
    payload = body(messages=[untouched, assistant, user])
    result = prepared(payload, channel(api_version=NEW))
    sent = result.body["messages"]
    assert sent[2]["content"][0] == {"type": "text", "text": "quoted", "cache_control": {"type": "ephemeral"}}
    assert sent[2]["content"][1] is user["content"][1]
    assert sent[2]["content"][2] is user["content"][2]          # document citations config stays
    assert sent[0] is untouched and sent[1] is assistant         # only the changed message is copied
    assert result.changed is True
    assert result.dropped == []


def test_new_version_removes_citations_inside_search_results_and_tool_results():
    search = {"type": "search_result", "source": "https://e.x", "title": "T",
              "citations": {"enabled": True},
              "content": [{"type": "text", "text": "r", "citations": [CITATION]}]}
    tool_result = {"type": "tool_result", "tool_use_id": "t1", "content": [
        {"type": "search_result", "source": "s", "title": "t",
         "content": [{"type": "text", "text": "deep", "citations": [CITATION]}]},
        {"type": "text", "text": "note", "citations": [CITATION]},
    ]}
    payload = body(messages=[{"role": "user", "content": [search]},
                             {"role": "assistant", "content": [{"type": "tool_use", "id": "t1",
                                                                "name": "s", "input": {}}]},
                             {"role": "user", "content": [tool_result]}])
    result = prepared(payload, channel(api_version=NEW))
    sent = result.body["messages"]
    assert sent[0]["content"][0] == {**search, "content": [{"type": "text", "text": "r"}]}
    assert sent[0]["content"][0]["citations"] == {"enabled": True}
    assert sent[2]["content"][0]["content"] == [
        {"type": "search_result", "source": "s", "title": "t", "content": [{"type": "text", "text": "deep"}]},
        {"type": "text", "text": "note"},
    ]


def test_old_version_keeps_citations():
    payload = body(messages=[{"role": "user", "content": [{"type": "text", "text": "q",
                                                           "citations": [CITATION]}]}])
    assert prepared(payload, channel(api_version=OLD)).body is payload


def test_new_version_refuses_a_document_in_an_assistant_message():
    payload = body(messages=[
        {"role": "user", "content": "summarise"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "here"},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"}}]},
        {"role": "user", "content": "thanks"},
    ])
    before = copy.deepcopy(payload)
    with pytest.raises(GatewayError) as info:
        prepare_for_channel(payload, channel(api_version=NEW), client_version=None)
    assert payload == before
    err = info.value
    assert err.status == 400 and err.error_type == "invalid_request_error"
    assert err.message.startswith("messages[1].content[1]: a document block cannot be placed directly "
                                  "in an assistant message under anthropic-version 2026-10-21")
    # The same body is fine for a channel on the older version (failover re-prepares).
    assert prepared(payload, channel(api_version=OLD)).body is payload


def test_document_in_a_user_message_is_fine_on_the_new_version():
    payload = body(messages=[{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}},
        {"type": "text", "text": "summarise"}]}])
    assert prepared(payload, channel(api_version=NEW)).body is payload


def test_everything_at_once_leaves_the_input_intact_and_unknown_fields_alone():
    payload = body(
        model="claude-opus-4.5", stream=True, temperature=0.1, top_p=0.5, top_k=3,
        stop_sequences=["S"], stop=["S", "T"], user="u1", metadata={"k": "v"}, n=1,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}},
        output_config={"effort": "high"}, presence_penalty=1, frequency_penalty=1,
        logit_bias={"1": 1}, seed=9, service_tier="auto", future_field={"x": [1, 2]},
        system=[{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "q", "citations": [CITATION]},
                                               {"type": "future_block", "payload": 1}]}],
    )
    ch = channel(api_version=NEW, aliases={"claude-opus-4.5": "claude-opus-4-5-20251101"})
    result = prepared(payload, ch)
    sent = result.body
    assert sent["model"] == "claude-opus-4-5-20251101"
    assert sent["stop_sequences"] == ["S", "T"]
    assert sent["metadata"] == {"k": "v", "user_id": "u1"}
    assert sent["output_config"] == {"effort": "high", "format": {"type": "json_schema", "schema": SCHEMA}}
    assert sent["service_tier"] == "auto" and sent["future_field"] is payload["future_field"]
    assert sent["system"] is payload["system"]
    assert sent["messages"][0]["content"] == [{"type": "text", "text": "q"}, {"type": "future_block", "payload": 1}]
    assert set(result.dropped) == {"temperature", "top_p", "top_k", "stop", "user", "n", "response_format",
                                   "presence_penalty", "frequency_penalty", "logit_bias", "seed"}
    assert not set(result.dropped) & set(sent)
    validate(sent)   # what goes upstream is itself a valid request


def test_failover_prepares_each_channel_from_the_clients_body():
    payload = body(temperature=0.4, stop="X")
    first = prepared(payload, channel(id=1, api_version=NEW, aliases={"claude-sonnet-4.5": "a-id"}))
    second = prepared(payload, channel(id=2, api_version=OLD, forward_extras=True))
    assert first.body == {**body(model="a-id"), "stop_sequences": ["X"]}
    assert first.dropped == ["temperature", "stop"]
    assert second.body is payload and second.dropped == []


# ------------------------------------------------------------------ model rules

@pytest.mark.parametrize("model, refuses_sampling, refuses_enabled_thinking", [
    ("claude-opus-4-5-20251101", False, False), ("claude-opus-4-6", False, False),
    ("claude-opus-4-7", True, False), ("claude-opus-4-8", True, False), ("claude-opus-5", True, False),
    ("claude-opus-5-5", True, False), ("claude-sonnet-4-6", False, False), ("claude-sonnet-5", True, True),
    ("claude-sonnet-5-5", True, True), ("claude-haiku-4-5-20251001", False, False),
    ("claude-haiku-5-5", True, False), ("claude-3-5-sonnet-20241022", False, False), ("my-model", False, False),
])
def test_model_rules_follow_the_family_and_version(model, refuses_sampling, refuses_enabled_thinking):
    rules = refused_by(model)
    assert (SAMPLING in rules, THINKING_ENABLED in rules) == (refuses_sampling, refuses_enabled_thinking)


def test_sampling_parameters_are_removed_for_a_model_that_refuses_them_on_either_version():
    payload = body(model="claude-opus-4-8", temperature=0.7, top_p=0.9, top_k=5)
    for version in (OLD, NEW):
        result = prepare_for_channel(payload, channel(api_version=version), client_version=None)
        assert result.dropped == ["temperature", "top_p", "top_k"]
        assert not {"temperature", "top_p", "top_k"} & result.body.keys()
    kept = prepare_for_channel(body(model="claude-opus-4-6", temperature=0.7), channel(), client_version=None)
    assert kept.body["temperature"] == 0.7 and not kept.dropped


def test_model_rules_apply_to_the_upstream_id_an_alias_resolves_to():
    aliased = channel(aliases={"smart": "claude-sonnet-5"})
    result = prepare_for_channel(body(model="smart", temperature=0.7), aliased, client_version=None)
    assert result.body["model"] == "claude-sonnet-5" and result.dropped == ["temperature"]


def test_enabled_thinking_to_a_model_that_thinks_adaptively_is_a_400_naming_the_field():
    with pytest.raises(GatewayError) as info:
        prepare_for_channel(body(model="claude-sonnet-5", thinking={"type": "enabled", "budget_tokens": 1024}),
                            channel(), client_version=None)
    assert info.value.status == 400 and info.value.message.startswith("thinking.type: ")
    for thinking in ({"type": "adaptive"}, {"type": "between_tools"}, {"type": "disabled"}):
        assert not prepare_for_channel(body(model="claude-sonnet-5", thinking=thinking), channel(),
                                       client_version=None).changed


def test_the_catalogues_rules_decide_for_a_model_it_lists():
    catalog = {"claude-opus-4-6": {"sampling_defaults_only": True},
               "claude-sonnet-5": {"sampling_defaults_only": False, "thinking_enabled_refused": False},
               "claude-opus-6": {}}     # priced by the operator: no rules stated
    rules_of = catalog.get
    strict = prepare_for_channel(body(model="claude-opus-4-6", temperature=0.7), channel(), client_version=None,
                                 catalog_rules=rules_of)
    assert strict.dropped == ["temperature"] and "temperature" not in strict.body
    relaxed = prepare_for_channel(body(model="claude-sonnet-5", temperature=0.7,
                                       thinking={"type": "enabled", "budget_tokens": 1024}),
                                  channel(), client_version=None, catalog_rules=rules_of)
    assert relaxed.body["temperature"] == 0.7 and not relaxed.dropped
    # A model the catalogue does not list, or lists without rules, falls back to the family table.
    for model in ("claude-opus-4-9", "claude-opus-6"):
        fallback = prepare_for_channel(body(model=model, temperature=0.7), channel(), client_version=None,
                                       catalog_rules=rules_of)
        assert fallback.dropped == ["temperature"], model


def test_the_shipped_catalogue_agrees_with_the_family_table(tmp_path):
    """Every model the shipped catalogue lists refuses what its family and version say."""
    from apertis_proxy.store import schema
    from apertis_proxy.store.catalog import load_catalog
    conn = schema.connect(str(tmp_path / "a.db"))
    entries = load_catalog(conn).entries
    conn.close()
    assert len(entries) >= 10
    for entry in entries:
        assert refused_by(entry.id, entry.rules) == refused_by(entry.id), entry.id
