"""Client scenarios written once, run by the official `anthropic` SDK of either generation, sync or async.

This module imports only `anthropic` and `httpx2` (the SDK's HTTP library), so it runs in the test process (SDK
2.x) and in the legacy subprocess (SDK 1.17.0, see sdk_legacy.py). Tests do not call it directly; they use the
`sdk` fixture (conftest.py / sdk_harness.py):

    result = await sdk.run("stream_text", base_url, api_key, text="hi", headers={"x-mock-scenario": "tool"})

A scenario is a generator function ``name(**kw)`` that yields SDK calls (``Call(kind, params)``) and receives what
each call produced; it returns a JSON-able dict. `run_sync` / `run_async` execute the calls with
``anthropic.Anthropic`` / ``anthropic.AsyncAnthropic``, which is how one scenario serves both client kinds.

Common keyword arguments of every message scenario: ``model``, ``max_tokens``, ``text`` (the user message),
``headers`` (extra request headers, e.g. ``x-mock-scenario``), ``extra_body`` (extra JSON fields, e.g. ``temperature``),
plus any Messages parameter (``stop_sequences=[...]``, ``metadata={...}``).

What a call produces (the dict the scenario gets back, and mostly returns):
- create / beta_create: ``{"message": <Message as JSON>, "text": <joined text blocks>, "request_id", "headers"}``
- text_stream: ``{"pieces": [text_stream items], "text", "message": <get_final_message()>, "request_id", "headers"}``
- event_stream: like text_stream plus ``"events"`` (event types of the SDK's MessageStream), ``"input_json"``
  (partial_json fragments), ``"thinking"`` (thinking deltas), ``"signature"`` (last signature event)
- raw_stream (``messages.create(stream=True)``): ``{"events": [raw events as JSON], "text", "headers"}``
- count_tokens: ``{"input_tokens"}``;  list_models: ``{"ids": [...]}`` (auto-paginated)

Failures never raise out of `run_sync`/`run_async`: an SDK error (``anthropic.APIError``) or a transport error
(``httpx2.HTTPError``, e.g. a stream cut mid-body) becomes ``{"error": {"class", "status", "type", "body",
"request_id", "message", "partial"}}``: ``body`` is the error body the SDK parsed and ``request_id`` the one it read
from the head; ``message`` is the SDK's own text, which changes between releases, so tests assert on ``body``;
``partial`` holds what a stream produced before it failed (``{"pieces": [...]}``).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable, Generator, Optional

import anthropic
import httpx2

DEFAULT_MODEL = "claude-haiku-4-5-20251001"  # the SDKs warn on deprecated ids (sonnet/opus 4.5)
# 1x1 transparent PNG, and the smallest PDF the mock accepts (it checks the base64 shape, not the document).
PNG_1X1 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
PDF_TINY = base64.b64encode(b"%PDF-1.4\n1 0 obj <</Type /Catalog>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n").decode()
WEATHER_TOOL = {"name": "get_weather", "description": "Current weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                                  "days": {"type": "integer"}},
                                 "required": ["city"]}}


@dataclass
class Call:
    kind: str      # create | beta_create | text_stream | event_stream | raw_stream | count_tokens | list_models
    params: dict


Scenario = Callable[..., Generator[Call, Any, dict]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def _params(messages: list, *, model: str = DEFAULT_MODEL, max_tokens: int = 256,
            headers: Optional[dict] = None, extra_body: Optional[dict] = None, **params: Any) -> dict:
    out = {"model": model, "max_tokens": max_tokens, "messages": messages, **params}
    if headers:
        out["extra_headers"] = headers
    if extra_body:
        out["extra_body"] = extra_body
    return out


def _user(text: str, *blocks: dict) -> dict:
    return {"role": "user", "content": [*blocks, {"type": "text", "text": text}] if blocks else text}


# -- scenarios -------------------------------------------------------------------------------------------------

@scenario
def plain(text: str = "Hello, mock", **kw: Any):
    return (yield Call("create", _params([_user(text)], **kw)))


@scenario
def system_prompt(text: str = "Who are you?", system: str = "You are a terse test assistant.", **kw: Any):
    return (yield Call("create", _params([_user(text)], system=system, **kw)))


@scenario
def multi_turn(text: str = "First question", follow_up: str = "Second question", **kw: Any):
    """Two calls: the second carries the first exchange as history."""
    first = yield Call("create", _params([_user(text)], **kw))
    history = [_user(text), {"role": "assistant", "content": first["message"]["content"]}, _user(follow_up)]
    second = yield Call("create", _params(history, **kw))
    return {"first": first, "second": second}


@scenario
def stream_text(text: str = "Stream to me", **kw: Any):
    return (yield Call("text_stream", _params([_user(text)], **kw)))


@scenario
def raw_stream(text: str = "Raw events please", **kw: Any):
    return (yield Call("raw_stream", _params([_user(text)], **kw)))


@scenario
def tool_use_stream(text: str = "What is the weather? Use the tool.", **kw: Any):
    """Stream a tool call, then send its result back and get the final answer."""
    kw.setdefault("tools", [WEATHER_TOOL])
    call = yield Call("event_stream", _params([_user(text)], **kw))
    tool_use = next((b for b in call["message"]["content"] if b["type"] == "tool_use"), None)
    if tool_use is None:
        return {"call": call, "tool_use": None}
    history = [_user(text), {"role": "assistant", "content": call["message"]["content"]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"],
                                             "content": "Sunny, 21 C"}]}]
    answer = yield Call("create", _params(history, **kw))
    return {"call": call, "tool_use": tool_use, "answer": answer}


@scenario
def thinking_stream(text: str = "Think first", budget_tokens: int = 1024, **kw: Any):
    """Stream with extended thinking, then send the signed thinking block back in the next turn."""
    kw.setdefault("max_tokens", 2048)
    thinking = {"type": "enabled", "budget_tokens": budget_tokens}
    call = yield Call("event_stream", _params([_user(text)], thinking=thinking, **kw))
    history = [_user(text), {"role": "assistant", "content": call["message"]["content"]}, _user("And then?")]
    follow_up = yield Call("create", _params(history, thinking=thinking, **kw))
    return {"call": call, "follow_up": follow_up}


@scenario
def image(text: str = "Describe this image", **kw: Any):
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1X1}}
    return (yield Call("create", _params([_user(text, block)], **kw)))


@scenario
def pdf(text: str = "Summarise this document", **kw: Any):
    block = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_TINY}}
    return (yield Call("create", _params([_user(text, block)], **kw)))


@scenario
def beta_message(text: str = "Beta hello", betas: tuple = ("mock-beta-2025-01-01",), **kw: Any):
    return (yield Call("beta_create", _params([_user(text)], betas=list(betas), **kw)))


@scenario
def count_tokens(text: str = "Count me", model: str = DEFAULT_MODEL, headers: Optional[dict] = None, **kw: Any):
    params = {"model": model, "messages": [_user(text)], **kw}
    if headers:
        params["extra_headers"] = headers
    return (yield Call("count_tokens", params))


@scenario
def list_models(limit: int = 1, headers: Optional[dict] = None):
    params: dict = {"limit": limit}
    if headers:
        params["extra_headers"] = headers
    return (yield Call("list_models", params))


# -- executing calls -------------------------------------------------------------------------------------------

def _text(message: dict) -> str:
    return "".join(b.get("text", "") for b in message["content"] if b.get("type") == "text")


def _message_outcome(message: Any, headers: Any) -> dict:
    data = message.to_dict(mode="json")
    return {"message": data, "text": _text(data), "request_id": headers.get("request-id"),
            "headers": {k.lower(): v for k, v in headers.items()}}


class _EventSummary:
    """What a MessageStream's events showed, kept also when the stream fails half-way."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.pieces: list[str] = []
        self.input_json: list[str] = []
        self.thinking: list[str] = []
        self.signature: Optional[str] = None

    def add(self, event: Any) -> None:
        self.events.append(event.type)
        if event.type == "text":
            self.pieces.append(event.text)
        elif event.type == "input_json":
            self.input_json.append(event.partial_json)
        elif event.type == "thinking":
            self.thinking.append(event.thinking)
        elif event.type == "signature":
            self.signature = event.signature

    def as_dict(self) -> dict:
        return {"events": self.events, "pieces": self.pieces, "input_json": self.input_json,
                "thinking": self.thinking, "signature": self.signature}


def _partial(exc: BaseException, partial: dict) -> BaseException:
    exc.partial = partial  # type: ignore[attr-defined]
    return exc


def _call_sync(client: anthropic.Anthropic, call: Call) -> dict:
    p = call.params
    if call.kind in ("create", "beta_create"):
        api = client.messages if call.kind == "create" else client.beta.messages
        raw = api.with_raw_response.create(**p)
        return _message_outcome(raw.parse(), raw.headers)
    if call.kind in ("text_stream", "event_stream"):
        summary = _EventSummary()
        try:
            with client.messages.stream(**p) as stream:
                if call.kind == "text_stream":
                    for piece in stream.text_stream:
                        summary.pieces.append(piece)
                else:
                    for event in stream:
                        summary.add(event)
                outcome = _message_outcome(stream.get_final_message(), stream.response.headers)
        except Exception as exc:
            raise _partial(exc, summary.as_dict())
        return {**outcome, **summary.as_dict(), "text": "".join(summary.pieces)}
    if call.kind == "raw_stream":
        events: list[dict] = []
        try:
            stream = client.messages.create(stream=True, **p)
            for event in stream:
                events.append(event.to_dict(mode="json"))
        except Exception as exc:
            raise _partial(exc, {"events": events})
        return _raw_stream_outcome(events, stream.response.headers)
    if call.kind == "count_tokens":
        return client.messages.count_tokens(**p).to_dict(mode="json")
    if call.kind == "list_models":
        return {"ids": [m.id for m in client.models.list(**p)]}
    raise ValueError(f"unknown call kind {call.kind!r}")


async def _call_async(client: anthropic.AsyncAnthropic, call: Call) -> dict:
    p = call.params
    if call.kind in ("create", "beta_create"):
        api = client.messages if call.kind == "create" else client.beta.messages
        raw = await api.with_raw_response.create(**p)
        return _message_outcome(await raw.parse(), raw.headers)
    if call.kind in ("text_stream", "event_stream"):
        summary = _EventSummary()
        try:
            async with client.messages.stream(**p) as stream:
                if call.kind == "text_stream":
                    async for piece in stream.text_stream:
                        summary.pieces.append(piece)
                else:
                    async for event in stream:
                        summary.add(event)
                outcome = _message_outcome(await stream.get_final_message(), stream.response.headers)
        except Exception as exc:
            raise _partial(exc, summary.as_dict())
        return {**outcome, **summary.as_dict(), "text": "".join(summary.pieces)}
    if call.kind == "raw_stream":
        events: list[dict] = []
        try:
            stream = await client.messages.create(stream=True, **p)
            async for event in stream:
                events.append(event.to_dict(mode="json"))
        except Exception as exc:
            raise _partial(exc, {"events": events})
        return _raw_stream_outcome(events, stream.response.headers)
    if call.kind == "count_tokens":
        return (await client.messages.count_tokens(**p)).to_dict(mode="json")
    if call.kind == "list_models":
        return {"ids": [m.id async for m in client.models.list(**p)]}
    raise ValueError(f"unknown call kind {call.kind!r}")


def _raw_stream_outcome(events: list[dict], headers: Any) -> dict:
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    return {"events": events, "text": text, "request_id": headers.get("request-id"),
            "headers": {k.lower(): v for k, v in headers.items()}}


# -- clients and drivers ---------------------------------------------------------------------------------------

AUTH_STYLES = ("default", "x-api-key", "bearer", "both", "none")


def client_kwargs(base_url: str, api_key: str, auth: str = "default", options: Optional[dict] = None) -> dict:
    """Constructor arguments. `auth`: default (the generation's own style: 1.x x-api-key, 2.x Bearer), x-api-key,
    bearer, both (two credentials), none. The key is always passed as api_key, so no ANTHROPIC_* variable leaks in;
    headers the style must not send are omitted explicitly. `options` (max_retries, timeout, default_headers...)
    pass through; max_retries defaults to 0 so a test sees each upstream answer."""
    headers: dict[str, Any] = {
        "default": {},
        "x-api-key": {"Authorization": anthropic.Omit(), "X-Api-Key": api_key},
        "bearer": {"X-Api-Key": anthropic.Omit(), "Authorization": f"Bearer {api_key}"},
        "both": {"X-Api-Key": api_key, "Authorization": f"Bearer {api_key}"},
        "none": {"X-Api-Key": anthropic.Omit(), "Authorization": anthropic.Omit()},
    }[auth]
    options = dict(options or {})
    headers.update(options.pop("default_headers", {}))
    return {"base_url": base_url, "api_key": api_key, "max_retries": 0, "default_headers": headers, **options}


def _describe(exc: BaseException) -> dict:
    """What a test may assert of an SDK failure: the class, the status, and the body the SDK parsed (with the
    request id it read from the response head). `message` is the SDK's own formatting, kept for failure reports
    only: it changes between releases, so no test matches it."""
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    return {"class": type(exc).__name__, "status": getattr(exc, "status_code", None),
            "type": error.get("type") if isinstance(error, dict) else None,
            "body": body if isinstance(body, dict) else None,
            "request_id": getattr(exc, "request_id", None),
            "error_code": getattr(exc, "error_code", None),    # SDK 2.17: error.details.error_code
            "message": str(exc)[:500], "partial": getattr(exc, "partial", None)}


FAILURES = (anthropic.APIError, httpx2.HTTPError)


def run_sync(name: str, base_url: str, api_key: str, *, auth: str = "default",
             client_options: Optional[dict] = None, **kw: Any) -> dict:
    with anthropic.Anthropic(**client_kwargs(base_url, api_key, auth, client_options)) as client:
        steps = SCENARIOS[name](**kw)
        try:
            call = next(steps)
            while True:
                call = steps.send(_call_sync(client, call))
        except StopIteration as done:
            return done.value
        except FAILURES as exc:
            return {"error": _describe(exc)}


async def run_async(name: str, base_url: str, api_key: str, *, auth: str = "default",
                    client_options: Optional[dict] = None, **kw: Any) -> dict:
    async with anthropic.AsyncAnthropic(**client_kwargs(base_url, api_key, auth, client_options)) as client:
        steps = SCENARIOS[name](**kw)
        try:
            call = next(steps)
            while True:
                call = steps.send(await _call_async(client, call))
        except StopIteration as done:
            return done.value
        except FAILURES as exc:
            return {"error": _describe(exc)}
