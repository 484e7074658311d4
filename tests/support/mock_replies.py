"""What the mock Anthropic upstream answers: request validation, deterministic replies, usage, SSE events.

Pure functions and small data classes, no I/O; `mock_upstream.py` puts them on the wire. Everything here derives
from the request alone (plus the mock's prompt-cache memory), so a test can predict every byte it will get back:

- Reply text: ``Echo: <last user text, max 120 chars> (turn N[, system: <first 40 chars>][, saw 1 image,
  1 document]) héllo ✓`` (the non-ASCII tail puts multi-byte UTF-8 into every stream).
- Tool use: when the request has a custom tool and either ``tool_choice`` is ``any``/``tool``, or the last user
  text mentions "tool" (or the scenario forces it), and the last user turn is not a ``tool_result``: a short text
  block, then a ``tool_use`` block whose input is filled from the tool's ``input_schema``; stop_reason ``tool_use``.
- Web search: a ``web_search_*`` server tool and a last user text mentioning "search": ``server_tool_use`` +
  ``web_search_tool_result`` blocks before the text, ``usage.server_tool_use.web_search_requests == 1``.
- Thinking (``thinking.type`` enabled/adaptive, or left out on a model that thinks by default): a ``thinking``
  block first, its signature an HMAC of the thinking text under the mock's API key (so a signature only verifies on
  the "account" that made it, as upstream).
- Tokens: every streamed delta piece (a word of text or thinking, a fragment of tool JSON) is one output token;
  ``max_tokens`` smaller than that truncates (stop_reason ``max_tokens``). Input tokens: UTF-8 bytes of the
  prompt segments (tools, system, message blocks, ``cache_control`` excluded) divided by 4, at least 1 per segment.
- Prompt cache: when any ``cache_control`` marker is present (or top-level ``cache_control``), the prompt up to the
  last marker is the cached prefix: the first time a mock sees it, it is a cache write (split 5m/1h by the markers'
  ``ttl``), later a cache read; ``input_tokens`` is the rest.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

API_VERSIONS = ("2023-06-01", "2026-10-21")
NEW_API_VERSION = "2026-10-21"
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
REPLY_TAIL = "héllo ✓"

# Models that refuse non-default sampling parameters, and those that refuse thinking.type "enabled", whatever
# the API version (the API's rule as of December 2026).
NO_SAMPLING_MODELS = frozenset(("claude-opus-4-7", "claude-opus-4-8", "claude-opus-5", "claude-opus-5-5",
                                "claude-sonnet-5", "claude-sonnet-5-5", "claude-haiku-5-5"))
ADAPTIVE_ONLY_MODELS = frozenset(("claude-sonnet-5", "claude-sonnet-5-5"))
# Models that think when the request leaves `thinking` out (adaptive thinking on by default, or always on).
THINKS_BY_DEFAULT = frozenset(("claude-opus-5", "claude-opus-5-5", "claude-sonnet-5", "claude-sonnet-5-5",
                               "claude-haiku-5-5", "claude-fable-5", "claude-fable-5-1", "claude-fable-5-2",
                               "claude-mythos-5", "claude-mythos-5-1", "claude-mythos-5-2"))
SAMPLING_DEFAULTS = {"temperature": 1}

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {
    "invalid_request_error": "Invalid request",
    "authentication_error": "invalid x-api-key",
    "billing_error": "Your credit balance is too low",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "Not found",
    "conflict_error": "Conflict",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit",
    "api_error": "Internal server error",
    "timeout_error": "Request timed out",
    "overloaded_error": "Overloaded",
}


def error_type_for(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, request_id: str, error_type: Optional[str] = None,
               message: Optional[str] = None, error_code: Optional[str] = None) -> dict[str, Any]:
    """Anthropic's error body; with `error_code`, the `error.details` that SDK 2.17 types its errors by."""
    etype = error_type or error_type_for(status)
    error: dict[str, Any] = {"type": etype, "message": message or ERROR_MESSAGES.get(etype, "Error")}
    if error_code:
        error["details"] = {"error_code": error_code}
    return {"type": "error", "error": error, "request_id": request_id}


class RequestRejected(Exception):
    """A request the real API would refuse: carries the status, error type and message to answer with."""

    def __init__(self, status: int, message: str, error_type: Optional[str] = None,
                 error_code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or error_type_for(status)
        self.error_code = error_code


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------

def _bad(message: str) -> RequestRejected:
    return RequestRejected(400, message)


def validate_request(body: Any, version: str, *, needs_max_tokens: bool, signature_key: Optional[str]) -> None:
    """Raise RequestRejected for a body the API would answer with 400 (Messages or count_tokens)."""
    if not isinstance(body, dict):
        raise _bad("Input should be a valid JSON object")
    if not isinstance(body.get("model"), str):
        raise _bad("model: Field required" if "model" not in body else "model: Input should be a valid string")
    if needs_max_tokens:
        mt = body.get("max_tokens")
        if "max_tokens" not in body:
            raise _bad("max_tokens: Field required")
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 0:
            raise _bad("max_tokens: Input should be a valid non-negative integer")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _bad("stream: Input should be a valid boolean")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _bad("messages: Field required" if messages is None else "messages: Input should be a valid list")
    if not messages:
        raise _bad("messages: at least one message is required")

    if version == NEW_API_VERSION:
        for name in ("temperature", "top_p", "top_k"):
            if name in body:
                raise _bad(f"{name}: Extra inputs are not permitted")
    if body["model"] in NO_SAMPLING_MODELS:
        for name in ("temperature", "top_p", "top_k"):
            if body.get(name) not in (None, SAMPLING_DEFAULTS.get(name)):
                raise _bad(f"{name}: is not supported by {body['model']}; only the default value is accepted")
    thinking = body.get("thinking")
    if body["model"] in ADAPTIVE_ONLY_MODELS and isinstance(thinking, dict) and thinking.get("type") == "enabled":
        raise _bad(f"thinking.type.enabled: is not supported by {body['model']}; use adaptive thinking")
    else:
        for name in ("temperature", "top_p"):
            value = body.get(name)
            if value is not None and (not isinstance(value, (int, float)) or not 0 <= value <= 1):
                raise _bad(f"{name}: Input should be a number between 0 and 1")

    _validate_thinking(body)
    for i, message in enumerate(messages):
        _validate_message(i, message, version, signature_key)


def _validate_thinking(body: dict) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str):
        raise _bad("thinking: Input should be an object with a type")
    if thinking["type"] == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1024:
            raise _bad("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if "max_tokens" in body and budget >= body["max_tokens"]:
            raise _bad("`max_tokens` must be greater than `thinking.budget_tokens`")


def _validate_message(i: int, message: Any, version: str, signature_key: Optional[str]) -> None:
    where = f"messages.{i}"
    if not isinstance(message, dict):
        raise _bad(f"{where}: Input should be a valid dictionary")
    role = message.get("role")
    if role not in ("user", "assistant", "system"):     # "system" mid-conversation, as SDK 2.17 sends it
        raise _bad(f"{where}.role: Input should be 'user', 'assistant' or 'system'")
    content = message.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _bad(f"{where}.content: Input should be a valid string or list")
    for j, block in enumerate(content):
        _validate_block(f"{where}.content.{j}", block, role, version, signature_key)


def _validate_block(where: str, block: Any, role: str, version: str, signature_key: Optional[str]) -> None:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise _bad(f"{where}: Input should be a content block with a type")
    kind = block["type"]
    if kind == "image":
        _validate_source(where, block.get("source"), IMAGE_MEDIA_TYPES)
    elif kind == "document":
        if role == "assistant" and version == NEW_API_VERSION:
            raise _bad(f"{where}: document blocks are not permitted in assistant messages")
        _validate_source(where, block.get("source"), ("application/pdf",))
    elif kind == "text":
        if not isinstance(block.get("text"), str):
            raise _bad(f"{where}.text: Field required")
        if role == "user" and version == NEW_API_VERSION and block.get("citations"):
            raise _bad(f"{where}.citations: Extra inputs are not permitted")
    elif kind == "search_result":
        if role == "user" and version == NEW_API_VERSION:
            for k, inner in enumerate(block.get("content") or []):
                if isinstance(inner, dict) and inner.get("citations"):
                    raise _bad(f"{where}.content.{k}.citations: Extra inputs are not permitted")
    elif kind == "tool_result":
        for k, inner in enumerate(block.get("content") if isinstance(block.get("content"), list) else []):
            _validate_block(f"{where}.content.{k}", inner, role, version, signature_key)
    elif kind == "thinking" and signature_key is not None:
        expected = thinking_signature(signature_key, block.get("thinking", ""))
        if block.get("signature") != expected:
            raise _bad(f"{where}: Invalid `signature` in `thinking` block")


def _validate_source(where: str, source: Any, media_types: tuple[str, ...]) -> None:
    if not isinstance(source, dict):
        raise _bad(f"{where}.source: Field required")
    kind = source.get("type")
    if kind == "base64":
        if source.get("media_type") not in media_types:
            raise _bad(f"{where}.source.media_type: Input should be {' or '.join(media_types)}")
        data = source.get("data")
        if not isinstance(data, str) or not data:
            raise _bad(f"{where}.source.data: Field required")
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}.source.data: invalid base64 data") from None
    elif kind == "url":
        if not isinstance(source.get("url"), str):
            raise _bad(f"{where}.source.url: Field required")
    elif kind == "file":
        if not isinstance(source.get("file_id"), str):
            raise _bad(f"{where}.source.file_id: Field required")
    elif kind in ("text", "content"):
        pass  # plain-text and content documents: nothing to decode
    else:
        raise _bad(f"{where}.source.type: unknown source type {kind!r}")


def thinking_signature(key: str, thinking: str) -> str:
    """The signature the mock puts on its thinking blocks: valid only under the same API key."""
    digest = hmac.new(key.encode(), thinking.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(b"mock-sig:" + digest).decode()


# ---------------------------------------------------------------------------------------------------------------
# Prompt reading helpers
# ---------------------------------------------------------------------------------------------------------------

def _blocks(content: Any) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _text_of(blocks: list) -> str:
    parts: list[str] = []
    for block in blocks:
        if block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            inner = block.get("content")
            parts.append(inner if isinstance(inner, str) else _text_of(_blocks(inner)))
    return " ".join(p for p in parts if p)


def _count_attachments(messages: list) -> tuple[int, int]:
    images = documents = 0
    for message in messages:
        if message.get("role") != "user":
            continue
        for block in _blocks(message.get("content")):
            nested = _blocks(block.get("content")) if block.get("type") == "tool_result" else []
            for b in [block, *nested]:
                images += b.get("type") == "image"
                documents += b.get("type") == "document"
    return images, documents


def last_user_text(messages: list) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return " ".join(_text_of(_blocks(message.get("content"))).split())
    return ""


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    return " ".join(b.get("text", "") for b in _blocks(system))


# ---------------------------------------------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------------------------------------------

def _without_cache_control(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_cache_control(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_without_cache_control(v) for v in value]
    return value


def _prompt_segments(body: dict) -> list[tuple[Any, Optional[dict]]]:
    """The prompt in cache order (tools, system, message blocks): (segment, its cache_control or None)."""
    segments: list[tuple[Any, Optional[dict]]] = []
    for tool in body.get("tools") or []:
        segments.append((tool, tool.get("cache_control") if isinstance(tool, dict) else None))
    system = body.get("system")
    if isinstance(system, str):
        segments.append((system, None))
    elif isinstance(system, list):
        segments.extend((b, b.get("cache_control")) for b in _blocks(system))
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            segments.append(({"role": message.get("role"), "text": content}, None))
        else:
            segments.extend((b, b.get("cache_control")) for b in _blocks(content))
    if isinstance(body.get("cache_control"), dict) and segments:
        # Automatic caching: a top-level marker caches everything up to the last block.
        last, marker = segments[-1]
        segments[-1] = (last, marker or body["cache_control"])
    return segments


def _segment_tokens(segment: Any) -> int:
    canonical = json.dumps(_without_cache_control(segment), ensure_ascii=False, sort_keys=True,
                           separators=(",", ":"))
    return max(1, len(canonical.encode("utf-8")) // 4)


def count_input_tokens(body: dict) -> int:
    return sum(_segment_tokens(seg) for seg, _ in _prompt_segments(body))


class PromptCache:
    """The prefixes one mock (one upstream account) has cached: first sight writes, later sights read."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    def usage_for(self, body: dict) -> dict[str, Any]:
        """Input-side usage (input, cache read, cache write with its 5m/1h split) for this request."""
        segments = _prompt_segments(body)
        tokens = [_segment_tokens(seg) for seg, _ in segments]
        marked = [i for i, (_, cc) in enumerate(segments) if isinstance(cc, dict)]
        total = sum(tokens)
        usage = {"input_tokens": total, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                 "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}
        if not marked:
            return usage
        end = marked[-1] + 1
        prefix = sum(tokens[:end])
        key = hashlib.sha256(json.dumps([body.get("model"), _without_cache_control([s for s, _ in segments[:end]])],
                                        sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        usage["input_tokens"] = total - prefix
        if key in self._keys:
            usage["cache_read_input_tokens"] = prefix
            return usage
        self._keys.add(key)
        hour_marks = [i for i in marked if segments[i][1].get("ttl") == "1h"]
        one_hour = sum(tokens[:hour_marks[-1] + 1]) if hour_marks else 0
        usage["cache_creation_input_tokens"] = prefix
        usage["cache_creation"] = {"ephemeral_5m_input_tokens": prefix - one_hour,
                                   "ephemeral_1h_input_tokens": one_hour}
        return usage


# ---------------------------------------------------------------------------------------------------------------
# Reply planning
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class PlannedBlock:
    """One content block, as the deltas it streams in and the block it adds up to."""
    start: dict                   # content_block_start payload (the empty/whole block)
    delta_type: Optional[str]     # text_delta, thinking_delta, input_json_delta or None (arrives whole)
    pieces: list[str]             # the deltas' payloads, in order
    final: dict                   # the block in a non-streaming response
    leading_empty_json: bool = False   # stream an "" input_json_delta first, as upstream sometimes does

    @property
    def tokens(self) -> int:
        return len(self.pieces)


@dataclass
class Reply:
    blocks: list[PlannedBlock]
    stop_reason: str
    stop_sequence: Optional[str]
    usage: dict[str, Any]         # final usage (input side from the cache, output from the pieces)
    message_id: str = field(default_factory=lambda: new_id("msg_"))


def _words(text: str) -> list[str]:
    """Pieces that join back to exactly `text`: each word keeps its trailing whitespace."""
    return [p for p in re.findall(r"\S*\s*", text) if p]


def _fragments(text: str, size: int = 7) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _fill_from_schema(schema: Any) -> dict[str, Any]:
    props = schema.get("properties", {}) if isinstance(schema, dict) else {}
    values: dict[str, Any] = {}
    for name, spec in props.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if isinstance(spec, dict) and spec.get("enum"):
            values[name] = spec["enum"][0]
        else:
            values[name] = {"string": REPLY_TAIL, "integer": 42, "number": 4.5, "boolean": True,
                            "array": [], "object": {}}.get(kind)
    return values


def _chosen_tool(body: dict, force: bool) -> Optional[dict]:
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and "input_schema" in t]
    choice = body.get("tool_choice") or {}
    if not tools or choice.get("type") == "none":
        return None
    last = (body.get("messages") or [{}])[-1]
    if last.get("role") == "user" and any(b.get("type") == "tool_result" for b in _blocks(last.get("content"))):
        return None  # the tool already ran: answer in text
    if choice.get("type") == "tool":
        return next((t for t in tools if t.get("name") == choice.get("name")), tools[0])
    if force or choice.get("type") == "any" or "tool" in last_user_text(body["messages"]).lower():
        return tools[0]
    return None


def _reply_text(body: dict) -> str:
    messages = body["messages"]
    notes = [f"turn {sum(1 for m in messages if m.get('role') == 'user')}"]
    system = " ".join(_system_text(body.get("system")).split())
    if system:
        notes.append(f"system: {system[:40]}")
    images, documents = _count_attachments(messages)
    if images or documents:
        seen = [f"{n} {what}{'s' if n != 1 else ''}" for n, what in ((images, "image"), (documents, "document")) if n]
        notes.append("saw " + ", ".join(seen))
    return f"Echo: {last_user_text(messages)[:120]} ({', '.join(notes)}) {REPLY_TAIL}"


def plan_reply(body: dict, cache: PromptCache, signature_key: str, *, force_tool: bool = False) -> Reply:
    """Decide the whole reply (blocks, stop reason, usage) before a byte is sent."""
    blocks: list[PlannedBlock] = []
    last_text = last_user_text(body["messages"])
    server_tool_uses = 0

    thinking = body.get("thinking")
    if (thinking or {}).get("type") in ("enabled", "adaptive") or (
            thinking is None and body["model"] in THINKS_BY_DEFAULT):
        thought = f"Thinking about: {last_text[:60]} ✓"
        signature = thinking_signature(signature_key, thought)
        blocks.append(PlannedBlock(
            start={"type": "thinking", "thinking": "", "signature": ""}, delta_type="thinking_delta",
            pieces=_words(thought), final={"type": "thinking", "thinking": thought, "signature": signature}))

    search = next((t for t in body.get("tools") or []
                   if isinstance(t, dict) and str(t.get("type", "")).startswith("web_search")), None)
    if search is not None and "search" in last_text.lower():
        server_tool_uses = 1
        use_id = new_id("srvtoolu_")
        query = {"query": last_text[:40]}
        blocks.append(PlannedBlock(
            start={"type": "server_tool_use", "id": use_id, "name": "web_search", "input": {}},
            delta_type="input_json_delta", pieces=_fragments(json.dumps(query, ensure_ascii=False)),
            final={"type": "server_tool_use", "id": use_id, "name": "web_search", "input": query}))
        result = {"type": "web_search_tool_result", "tool_use_id": use_id, "content": [
            {"type": "web_search_result", "url": "https://example.com/héllo", "title": "Example ✓",
             "encrypted_content": "ZW5jcnlwdGVk", "page_age": None}]}
        blocks.append(PlannedBlock(start=result, delta_type=None, pieces=[], final=result))

    tool = _chosen_tool(body, force_tool)
    text = f"I will call {tool['name']}. {REPLY_TAIL}" if tool else _reply_text(body)
    stop_reason, stop_sequence = ("tool_use" if tool else "end_turn"), None
    if not tool:
        hits = [(text.find(s), s) for s in body.get("stop_sequences") or [] if isinstance(s, str) and s in text]
        if hits:
            cut, stop_sequence = min(hits)
            text, stop_reason = text[:cut], "stop_sequence"
    blocks.append(PlannedBlock(start={"type": "text", "text": ""}, delta_type="text_delta",
                               pieces=_words(text), final={"type": "text", "text": text}))
    if tool:
        tool_id = new_id("toolu_")
        tool_input = _fill_from_schema(tool.get("input_schema"))
        blocks.append(PlannedBlock(
            start={"type": "tool_use", "id": tool_id, "name": tool["name"], "input": {}},
            delta_type="input_json_delta", pieces=_fragments(json.dumps(tool_input, ensure_ascii=False)),
            final={"type": "tool_use", "id": tool_id, "name": tool["name"], "input": tool_input},
            leading_empty_json=True))

    blocks, truncated = _truncate(blocks, body.get("max_tokens"))
    if truncated:
        stop_reason, stop_sequence = "max_tokens", None
    usage = cache.usage_for(body)
    usage["output_tokens"] = sum(b.tokens for b in blocks)
    usage["service_tier"] = "standard"
    for echoed in ("speed", "inference_geo"):     # upstream reports what the request asked for
        if isinstance(body.get(echoed), str):
            usage[echoed] = body[echoed]
    if server_tool_uses:
        usage["server_tool_use"] = {"web_search_requests": server_tool_uses}
    return Reply(blocks=blocks, stop_reason=stop_reason, stop_sequence=stop_sequence, usage=usage)


def _truncate(blocks: list[PlannedBlock], max_tokens: Optional[int]) -> tuple[list[PlannedBlock], bool]:
    """Cut the reply to max_tokens pieces; tool calls are kept whole or dropped, as a partial one is useless."""
    if max_tokens is None or sum(b.tokens for b in blocks) <= max_tokens:
        return blocks, False
    kept: list[PlannedBlock] = []
    budget = max_tokens
    for block in blocks:
        if block.tokens <= budget:
            kept.append(block)
            budget -= block.tokens
            continue
        if budget > 0 and block.delta_type in ("text_delta", "thinking_delta"):
            pieces = block.pieces[:budget]
            final = dict(block.final)
            final["text" if block.delta_type == "text_delta" else "thinking"] = "".join(pieces)
            kept.append(PlannedBlock(start=block.start, delta_type=block.delta_type, pieces=pieces, final=final))
        break
    return kept, True


def message_json(reply: Reply, model: str) -> dict[str, Any]:
    """The non-streaming response body."""
    return {"id": reply.message_id, "type": "message", "role": "assistant", "model": model,
            "content": [b.final for b in reply.blocks], "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence, "usage": reply.usage}


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------

START_OUTPUT_PLACEHOLDER = 1
INPUT_USAGE_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def stream_events(reply: Reply, model: str, *, message_deltas: int = 1,
                  unknown_event: bool = False) -> list[dict[str, Any]]:
    """The SSE events of the reply, in the order upstream sends them (see anthropic-protocol.md section 3)."""
    # What only message_start carries: the TTL split, tier, speed and geo.
    start_usage = {k: reply.usage[k] for k in (*INPUT_USAGE_KEYS, "cache_creation", "service_tier",
                                                "speed", "inference_geo") if k in reply.usage}
    start_usage["output_tokens"] = START_OUTPUT_PLACEHOLDER
    events: list[dict[str, Any]] = [{"type": "message_start", "message": {
        "id": reply.message_id, "type": "message", "role": "assistant", "content": [], "model": model,
        "stop_reason": None, "stop_sequence": None, "usage": start_usage}}]
    if unknown_event:
        events.append({"type": "mock_future_event", "detail": "clients must ignore this"})
    for index, block in enumerate(reply.blocks):
        events.append({"type": "content_block_start", "index": index, "content_block": block.start})
        if index == 0:
            events.append({"type": "ping"})
        if block.delta_type == "input_json_delta" and block.leading_empty_json:
            events.append(_delta(index, block.delta_type, ""))
        for piece in block.pieces:
            events.append(_delta(index, block.delta_type, piece))
        if block.start["type"] == "thinking":
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "signature_delta", "signature": block.final["signature"]}})
        events.append({"type": "content_block_stop", "index": index})
    final_output = reply.usage["output_tokens"]
    for n in range(1, message_deltas):
        # Earlier deltas carry a smaller cumulative count: a reader must keep the last value, not add them up.
        events.append({"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None},
                       "usage": {"output_tokens": final_output * n // message_deltas}})
    final_usage = {k: reply.usage[k] for k in INPUT_USAGE_KEYS}
    final_usage["output_tokens"] = final_output
    for key in ("server_tool_use", "iterations"):
        if key in reply.usage:
            final_usage[key] = reply.usage[key]
    events.append({"type": "message_delta",
                   "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
                   "usage": final_usage})
    events.append({"type": "message_stop"})
    return events


def _delta(index: int, delta_type: str, piece: str) -> dict[str, Any]:
    key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}[delta_type]
    return {"type": "content_block_delta", "index": index, "delta": {"type": delta_type, key: piece}}


def sse_bytes(event: dict[str, Any]) -> bytes:
    """One event on the wire. Non-ASCII stays raw UTF-8, as upstream sends it."""
    if event["type"] == "ping":
        data = '{"type": "ping"}'  # upstream's own spacing
    else:
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def reported_usage(usage: dict[str, Any], event: dict[str, Any]) -> None:
    """Fold an event just sent into `usage`: what a reader of the stream so far knows (later values replace)."""
    if event["type"] == "message_start":
        usage.update(event["message"]["usage"])
    elif event["type"] == "message_delta":
        usage.update({k: v for k, v in event["usage"].items() if v is not None})


def awkward_pieces(data: bytes) -> list[bytes]:
    """Split one event's bytes where a careless reader breaks: inside the `event:` name, inside the `data:` prefix,
    inside a multi-byte UTF-8 character, and between the two newlines that end the event."""
    cuts = {4, len(data) - 1}
    data_line = data.find(b"\ndata:")
    if data_line >= 0:
        cuts.add(data_line + 3)
    lead = next((i for i, b in enumerate(data) if b >= 0xC0), None)
    if lead is not None:
        cuts.add(lead + 1)
    points = sorted(c for c in cuts if 0 < c < len(data))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
