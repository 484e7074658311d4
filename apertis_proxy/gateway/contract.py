"""The documented request contract, as pure functions (no I/O, no state).

``validate(body)`` runs once per request and answers 400 ``invalid_request_error``
naming the field.  ``prepare_for_channel(body, channel, ...)`` runs once per
attempt and returns the body that channel should receive: model alias resolved,
OpenAI-style extras translated or removed, the body fitted to the channel's
``anthropic-version``.  The table in docs/request-contract.md lists every rule.

Hot path: both functions run on every request.  Validation dispatches on the
keys the body actually has; preparation copies only the containers it changes
(the top dict, and a message list only when a block in it changes) and leaves
the body untouched when no rule applies, so the caller can forward the
client's bytes as they came.

The protocol facts these rules rest on (structured outputs, stop sequences,
citations) are stated, with their sources, in docs/request-contract.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import orjson

from ..errors import GatewayError
from ..plugin_api import DEFAULT_API_VERSION, Channel
from .model_rules import SAMPLING, THINKING_ENABLED, refused_by

__all__ = [
    "DROPPED_PARAMS_HEADER", "NEW_API_VERSION", "OPENAI_EXTRAS", "SAMPLING_PARAMS",
    "Prepared", "validate", "prepare_for_channel", "is_claude_model_name",
    "upstream_api_version", "dropped_header_value",
]

DROPPED_PARAMS_HEADER = "apertis-dropped-params"
NEW_API_VERSION = "2026-10-21"
THINKING_BUDGET_MIN = 1024
MAX_STOP = 4

# OpenAI-style parameters accepted for compatibility (validated, then
# translated or removed unless the channel forwards them).
OPENAI_EXTRAS = frozenset({
    "stop", "user", "n", "response_format",
    "presence_penalty", "frequency_penalty", "logit_bias", "seed",
})
# Present at all -> 400 under 2026-10-21, so they are removed for such channels.
SAMPLING_PARAMS = frozenset({"temperature", "top_p", "top_k"})


def _bad(field: str, problem: str) -> GatewayError:
    return GatewayError(400, f"{field}: {problem}")


def _is_int(v: Any) -> bool:
    return type(v) is int            # bool is not an int here


def _is_number(v: Any) -> bool:
    t = type(v)
    return t is int or t is float


def _json(v: Any) -> str:
    """A short JSON rendering of a client value for an error message."""
    try:
        text = orjson.dumps(v).decode()
    except TypeError:
        text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------- validation

def validate(body: object, *, thinking_budget_max: int = 32768,
             require_max_tokens: bool = True) -> None:
    """Raise GatewayError(400, "<field>: <what is wrong>") for a body that
    breaks the contract.  Unknown fields and block types are accepted.

    ``require_max_tokens=False`` serves count_tokens, whose body has none.
    """
    if not isinstance(body, dict):
        raise _bad("body", "must be a JSON object")

    model = body.get("model")
    if model is None:
        raise _bad("model", "field required")
    if type(model) is not str or not model:
        raise _bad("model", "must be a non-empty string")
    if not _PLAIN_MODEL_ID.fullmatch(model):
        raise _bad("model", f"must be a plain model id: lowercase letters, digits and . _ - : @ / only "
                            f"(got {model[:100]!r})")

    _check_messages(body.get("messages"))

    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        if require_max_tokens:
            raise _bad("max_tokens", "field required")
    elif not _is_int(max_tokens) or max_tokens < 0:
        raise _bad("max_tokens", "must be an integer >= 0")

    # Optional fields: dispatch on the keys present (a few, typically) rather
    # than probing every known name.  null counts as absent.
    for key, value in body.items():
        check = _OPTIONAL_CHECKS.get(key)
        if check is not None and value is not None:
            check(value)

    thinking = body.get("thinking")
    if thinking is not None:
        _check_thinking(thinking, max_tokens, thinking_budget_max)


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise _bad("messages", "field required")
    if type(messages) is not list:
        raise _bad("messages", "must be an array of messages")
    if not messages:
        raise _bad("messages", "at least one message is required")
    for i, msg in enumerate(messages):
        if type(msg) is not dict:
            raise _bad(f"messages[{i}]", "must be an object with role and content")
        role = msg.get("role")
        if role != "user" and role != "assistant" and role != "system":
            # "system" mid-conversation: SDK 2.17's MessageParam allows it.
            raise _bad(f"messages[{i}].role",
                       f'must be "user", "assistant" or "system" (got {_json(role)})')
        content = msg.get("content")
        if type(content) is str:
            continue
        if type(content) is not list:
            if "content" not in msg:
                raise _bad(f"messages[{i}].content", "field required")
            raise _bad(f"messages[{i}].content",
                       "must be a string or an array of content blocks")
        for j, block in enumerate(content):
            if type(block) is not dict or type(block.get("type")) is not str:
                raise _bad(f"messages[{i}].content[{j}]",
                           'must be a content block: an object with a string "type"')


def _check_thinking(thinking: Any, max_tokens: Any, budget_max: int) -> None:
    if type(thinking) is not dict:
        raise _bad("thinking", 'must be an object with a "type"')
    kind = thinking.get("type")
    if type(kind) is not str:
        raise _bad("thinking.type", 'must be a string such as "enabled" or "disabled"')
    if kind != "enabled":
        return                          # disabled, adaptive, newer types: upstream decides
    budget = thinking.get("budget_tokens")
    if not _is_int(budget):
        raise _bad("thinking.budget_tokens", 'must be an integer when thinking.type is "enabled"')
    if budget < THINKING_BUDGET_MIN:
        raise _bad("thinking.budget_tokens", f"must be at least {THINKING_BUDGET_MIN} (got {budget})")
    if budget > budget_max:
        raise _bad("thinking.budget_tokens", f"must be at most {budget_max} (got {budget})")
    if _is_int(max_tokens) and budget >= max_tokens:
        raise _bad("thinking.budget_tokens",
                   f"must be less than max_tokens (got {budget} >= {max_tokens})")


def _unit_interval(name: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not _is_number(v) or not 0 <= v <= 1:
            raise _bad(name, "must be a number between 0 and 1")
    return check


def _penalty(name: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not _is_number(v) or not -2 <= v <= 2:
            raise _bad(name, "must be a number between -2 and 2")
    return check


def _check_top_k(v: Any) -> None:
    if not _is_int(v) or v < 0:
        raise _bad("top_k", "must be an integer >= 0")


def _check_stream(v: Any) -> None:
    if type(v) is not bool:
        raise _bad("stream", "must be a boolean")


def _is_str_list(v: Any) -> bool:
    return type(v) is list and all(type(s) is str for s in v)


def _check_stop_sequences(v: Any) -> None:
    if not _is_str_list(v):
        raise _bad("stop_sequences", "must be an array of strings")


def _check_system(v: Any) -> None:
    if type(v) is str:
        return
    if type(v) is not list:
        raise _bad("system", "must be a string or an array of text blocks")
    for i, block in enumerate(v):
        if (type(block) is not dict or block.get("type") != "text"
                or type(block.get("text")) is not str):
            raise _bad(f"system[{i}]", 'must be a text block: {"type": "text", "text": "..."}')


def _check_metadata(v: Any) -> None:
    if type(v) is not dict:
        raise _bad("metadata", "must be an object")


def _check_tools(v: Any) -> None:
    if type(v) is not list:
        raise _bad("tools", "must be an array of tool definitions")
    for i, tool in enumerate(v):
        if type(tool) is not dict:
            raise _bad(f"tools[{i}]", "must be an object")


def _check_tool_choice(v: Any) -> None:
    if type(v) is not dict:
        raise _bad("tool_choice", 'must be an object such as {"type": "auto"}')


def _check_stop(v: Any) -> None:
    if type(v) is str:
        return
    if not _is_str_list(v) or len(v) > MAX_STOP:
        raise _bad("stop", f"must be a string or an array of up to {MAX_STOP} strings")


def _check_user(v: Any) -> None:
    if type(v) is not str:
        raise _bad("user", "must be a string")


def _check_n(v: Any) -> None:
    if not _is_int(v):
        raise _bad("n", "must be an integer")
    if v > 1:
        raise _bad("n", f"this endpoint produces one completion per request, so n must be 1 "
                        f"(got {v}); send {v} separate requests instead")
    if v < 1:
        raise _bad("n", f"must be 1 (got {v})")


_RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def _check_response_format(v: Any) -> None:
    if type(v) is not dict:
        raise _bad("response_format", 'must be an object such as {"type": "json_object"}')
    kind = v.get("type")
    if kind not in _RESPONSE_FORMAT_TYPES:
        raise _bad("response_format.type",
                   f'must be "text", "json_object" or "json_schema" (got {_json(kind)})')
    if kind == "json_schema" and type(_json_schema_of(v)) is not dict:
        raise _bad("response_format.json_schema.schema",
                   'a JSON Schema object is required when type is "json_schema"')


def _json_schema_of(response_format: dict) -> Any:
    """The schema of an OpenAI json_schema response format: Chat Completions
    nests it as ``json_schema.schema``; the flat ``schema`` form is accepted too."""
    nested = response_format.get("json_schema")
    if type(nested) is dict and "schema" in nested:
        return nested["schema"]
    return response_format.get("schema")


def _check_logit_bias(v: Any) -> None:
    if type(v) is not dict:
        raise _bad("logit_bias", "must be an object mapping token ids to numbers between -100 and 100")
    for token, bias in v.items():
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise _bad(f'logit_bias["{token}"]', "must be a number between -100 and 100")


def _check_seed(v: Any) -> None:
    if not _is_int(v):
        raise _bad("seed", "must be an integer")


def _check_billing_policy(v: Any) -> None:
    # Who pays is the operator's choice: the gateway's accounts pay, and the
    # user profile that "user_profile" would bill is never forwarded.
    if type(v) is not dict:
        raise _bad("billing_policy", 'must be an object such as {"type": "billing_policy", "bill_to": "self"}')
    bill_to = v.get("bill_to")
    if bill_to is not None and bill_to != "self":
        raise _bad("billing_policy.bill_to", f'only "self" is accepted through this gateway (got {_json(bill_to)})')


_OPTIONAL_CHECKS: dict[str, Callable[[Any], None]] = {
    "temperature": _unit_interval("temperature"),
    "top_p": _unit_interval("top_p"),
    "top_k": _check_top_k,
    "stream": _check_stream,
    "stop_sequences": _check_stop_sequences,
    "system": _check_system,
    "metadata": _check_metadata,
    "tools": _check_tools,
    "tool_choice": _check_tool_choice,
    "stop": _check_stop,
    "user": _check_user,
    "n": _check_n,
    "response_format": _check_response_format,
    "presence_penalty": _penalty("presence_penalty"),
    "frequency_penalty": _penalty("frequency_penalty"),
    "logit_bias": _check_logit_bias,
    "seed": _check_seed,
    "billing_policy": _check_billing_policy,
}


# ---------------------------------------------------------------- model names

# What a model id is made of: Anthropic's ids and aliases, Vertex's
# (`claude-x@date`), Bedrock's (`anthropic.claude-x-v1:0`), `vendor/model`.
# Another case, whitespace, control or invisible characters would miss the
# allow-list and the price list while an upstream might still accept them.
_PLAIN_MODEL_ID = re.compile(r"[a-z0-9][a-z0-9._:@/-]{0,255}")

# Other vendors' model families, as name prefixes.  Anything else (including
# operator aliases such as "fast") may be Claude behind an alias, so it is not
# refused here; the check only picks the wording of "no channel serves this".
_OTHER_VENDOR_PREFIXES = (
    # OpenAI
    "gpt", "chatgpt", "text-embedding", "text-davinci", "text-moderation", "davinci",
    "babbage", "dall-e", "whisper", "tts-", "omni-moderation", "codex-", "computer-use-preview",
    # Google
    "gemini", "gemma", "learnlm", "imagen", "veo-", "chat-bison", "text-bison",
    # Meta, Mistral, Cohere, xAI, DeepSeek, Alibaba, Zhipu, Moonshot, others
    "llama", "meta-llama", "codellama", "meta.", "mistral", "mixtral", "codestral", "ministral",
    "pixtral", "magistral", "devstral", "open-mistral", "open-mixtral", "command-", "cohere.",
    "c4ai-", "grok", "deepseek", "qwen", "qwq", "glm-", "chatglm", "kimi", "moonshot", "yi-",
    "phi-", "nova-", "amazon.", "ai21.", "jamba", "sonar", "ernie", "doubao", "hunyuan",
    "minimax", "baichuan", "nemotron", "starcoder", "wizardlm", "reka-", "dbrx",
)
_O_SERIES = re.compile(r"o\d+(?:[-_.]|$)")                  # o1, o3-mini, o4-mini-high
_BEDROCK_REGION = re.compile(r"(?:us|eu|apac|global|us-gov)\.")   # cross-region profile ids


def is_claude_model_name(model: str) -> bool:
    """False for names that clearly belong to another vendor (``gpt-4o``,
    ``o3-mini``, ``gemini-2.5-pro``, ``openai/gpt-4o``, ``meta.llama3-70b``),
    so the gateway can say this endpoint serves Anthropic-type channels only."""
    name = model.strip().lower()
    if "claude" in name:
        return True
    name = name.rsplit("/", 1)[-1]          # router-style "vendor/model": judge the model part
    region = _BEDROCK_REGION.match(name)
    if region:
        name = name[region.end():]
    return not (name.startswith(_OTHER_VENDOR_PREFIXES) or _O_SERIES.match(name))


# ---------------------------------------------------------- per-channel body

@dataclass(slots=True)
class Prepared:
    body: dict            # the body to send upstream (a new dict when changed; the input is never mutated)
    dropped: list[str]    # client parameters removed or translated, for the apertis-dropped-params header
    api_version: str      # anthropic-version to send upstream
    changed: bool         # False: body is the client's own dict, nothing in it was rewritten


def upstream_api_version(channel: Channel, client_version: Optional[str],
                         default_version: str = DEFAULT_API_VERSION) -> str:
    if channel.forward_client_version and client_version:
        return client_version
    return channel.api_version or default_version


def dropped_header_value(dropped: list[str]) -> str:
    """Value of the apertis-dropped-params response header."""
    return ", ".join(dropped)


def _is_new_version(version: str) -> bool:
    # Versions are dates; the 2026-10-21 restrictions are assumed to hold for
    # later versions too.  Anything that is not a date is treated as old.
    return len(version) == 10 and version[4] == "-" and version >= NEW_API_VERSION


def prepare_for_channel(body: dict, channel: Channel, *, client_version: Optional[str],
                        default_version: str = DEFAULT_API_VERSION,
                        catalog_rules: Optional[Callable[[str], Optional[Mapping[str, Any]]]] = None) -> Prepared:
    """Fit a validated body to one channel.  Called per attempt: failover
    prepares the client's original body again for the next channel.
    `catalog_rules(model)` gives the catalogue's request rules for an upstream
    model id (None: not in the catalogue; see model_rules.py)."""
    api_version = upstream_api_version(channel, client_version, default_version)
    new_version = _is_new_version(api_version)
    translate_extras = not channel.forward_extras

    out: Optional[dict] = None       # shallow copy, made on the first change
    dropped: list[str] = []

    model = body.get("model")
    refused: frozenset[str] = frozenset()
    if type(model) is str:
        upstream_model = channel.upstream_model(model)
        if upstream_model != model:
            out = dict(body)
            out["model"] = upstream_model
        refused = refused_by(upstream_model, catalog_rules(upstream_model) if catalog_rules else None)
        if THINKING_ENABLED in refused:
            _check_thinking_allowed(body.get("thinking"), upstream_model)
    strip_sampling = new_version or SAMPLING in refused

    for key in body:                 # body order -> stable, readable header
        if translate_extras and key in OPENAI_EXTRAS:
            if out is None:
                out = dict(body)
            _translate_extra(key, out)
            dropped.append(key)
        elif strip_sampling and key in SAMPLING_PARAMS:
            if out is None:
                out = dict(body)
            del out[key]
            dropped.append(key)

    if new_version:
        messages = body.get("messages")
        if type(messages) is list:
            fitted = _fit_messages_to_new_version(messages, api_version)
            if fitted is not None:
                if out is None:
                    out = dict(body)
                out["messages"] = fitted

    if out is None:
        return Prepared(body=body, dropped=dropped, api_version=api_version, changed=False)
    return Prepared(body=out, dropped=dropped, api_version=api_version, changed=True)


def _check_thinking_allowed(thinking: Any, model: str) -> None:
    if type(thinking) is dict and thinking.get("type") == "enabled":
        raise _bad("thinking.type", f'"enabled" is not supported by {model}, which thinks adaptively; '
                                    f'send {{"type": "adaptive"}} (with output_config.effort) instead')


def _translate_extra(key: str, out: dict) -> None:
    """Remove one OpenAI-style parameter from ``out`` (the shallow copy),
    carrying its meaning over to the Anthropic field where one exists.  Nested
    containers are replaced, never written to: they still belong to the client."""
    value = out.pop(key)
    if value is None:
        return
    if key == "stop":
        added = [value] if type(value) is str else value
        if added:
            existing = out.get("stop_sequences") or []
            out["stop_sequences"] = list(dict.fromkeys([*existing, *added]))
    elif key == "user":
        metadata = out.get("metadata")
        if type(metadata) is not dict:
            out["metadata"] = {"user_id": value}
        elif metadata.get("user_id") is None:
            out["metadata"] = {**metadata, "user_id": value}
    elif key == "response_format":
        if type(value) is dict and value.get("type") == "json_schema":
            _set_output_format(out, _json_schema_of(value))
        # "text" is the default; "json_object" has no accepted equivalent
        # (see docs/request-contract.md): both are simply removed.
    # n == 1, penalties, logit_bias, seed: nothing to carry over.


def _set_output_format(out: dict, schema: dict) -> None:
    # A structured-output request the client wrote natively wins over the
    # translated one; sending both would make upstream pick or refuse.
    if out.get("output_format") is not None:
        return
    config = out.get("output_config")
    if type(config) is dict:
        if config.get("format") is not None:
            return
        out["output_config"] = {**config, "format": {"type": "json_schema", "schema": schema}}
    else:
        out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}


def _fit_messages_to_new_version(messages: list, api_version: str) -> Optional[list]:
    """Apply the 2026-10-21 message rules.  Returns a new list when a user
    message had to change, None when nothing did; raises for what cannot be
    fixed silently (a document in an assistant message)."""
    fitted: Optional[list] = None
    for i, msg in enumerate(messages):
        content = msg.get("content") if type(msg) is dict else None
        if type(content) is not list:
            continue
        role = msg.get("role")
        if role == "assistant":
            for j, block in enumerate(content):
                if type(block) is dict and block.get("type") == "document":
                    raise _bad(f"messages[{i}].content[{j}]",
                               "a document block cannot be placed directly in an assistant message "
                               f"under anthropic-version {api_version}, which this channel uses; "
                               "send documents in a user message")
        elif role == "user":
            blocks = _without_citations(content)
            if blocks is not None:
                if fitted is None:
                    fitted = list(messages)
                fitted[i] = {**msg, "content": blocks}
    return fitted


def _without_citations(blocks: list) -> Optional[list]:
    """Drop non-empty ``citations`` arrays from text blocks, also inside
    search_result and tool_result content.  New list when something changed."""
    fixed: Optional[list] = None
    for j, block in enumerate(blocks):
        if type(block) is not dict:
            continue
        kind = block.get("type")
        new_block = None
        if kind == "text":
            citations = block.get("citations")
            if type(citations) is list and citations:
                new_block = {k: v for k, v in block.items() if k != "citations"}
        elif kind == "search_result" or kind == "tool_result":
            inner = block.get("content")
            if type(inner) is list:
                inner_fixed = _without_citations(inner)
                if inner_fixed is not None:
                    new_block = {**block, "content": inner_fixed}
        if new_block is not None:
            if fixed is None:
                fixed = list(blocks)
            fixed[j] = new_block
    return fixed
