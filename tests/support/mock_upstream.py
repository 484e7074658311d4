"""A mock Anthropic upstream on a real socket, faithful to /work/shared/anthropic-protocol.md, for e2e tests.

    async with MockUpstream(api_key="sk-ant-test") as mock:      # or: mock = await MockUpstream().start(); ...
        mock.base_url                                              # "http://127.0.0.1:PORT"  (.port too)
        ... point a client or the gateway at it ...
        mock.requests[-1].headers["anthropic-version"]             # what it received
        mock.served[-1]["usage"]                                   # what it reported
    # (conftest.py has the fixtures `mock_upstream` and `make_mock_upstream`)

Endpoints: ``POST /v1/messages`` (any query string, e.g. ``?beta=true``), ``POST /v1/messages/count_tokens``,
``GET /v1/models`` (``limit``/``after_id``/``before_id`` paging), ``GET /v1/models/{id}``, ``/v1/messages/batches``
(mock_batches.py), ``/v1/files`` (mock_account.py). One mock is one upstream account: its threads,
containers and files are its own
(mock_account.py). HTTP/1.1 through h11 with keep-alive and pipelining; request bodies by content-length or
chunked; JSON answers with content-length, streams chunked. Every response has a ``request-id: req_...``
header; errors have Anthropic's body shape.

Checks, in the real API's order: path (404) -> body size (413 over ``max_body_bytes``, 32 MiB) -> credential (401
unless exactly one of ``x-api-key`` / ``Authorization: Bearer`` equals the key) -> ``anthropic-version`` present and
one of 2023-06-01 / 2026-10-21 (400) -> JSON body and its fields (400; under 2026-10-21 also sampling parameters,
``document`` in an assistant message, ``citations`` on a user text block) -> model known (404, only with
``strict_models=True``). Replies, usage and the prompt cache are deterministic: see ``mock_replies.py``.

Recording:
- ``mock.requests``: every request received, as ``RecordedRequest`` (``method path query target headers
  raw_headers body raw_body request_id status connection_id scenario``; ``disconnected`` is an asyncio.Event set when
  the client went away before the response ended).
- ``mock.served``: one dict per 200 response to ``/v1/messages``: ``{request_id, message_id, model, stream, usage,
  full_usage, completed, events_sent}``. ``usage`` is what the mock had put on the wire by the time it stopped: for a
  stream, ``message_start``'s usage (output_tokens there is the placeholder 1) replaced by any ``message_delta``
  usage sent after it; for JSON, the body's usage if the body went out whole, else zeros. ``full_usage`` is what a
  complete response reports. An event counts as sent once its bytes were handed to the socket: to make "what the
  client read" equal "what was sent" when a client aborts, pace the stream (``event-delay``).
- ``mock.connections_opened``, ``mock.open_connections``, ``mock.disconnects`` (responses the client abandoned), and
  ``await mock.wait_until(lambda: ..., timeout=5)`` to wait for one of these to change.

Scenarios (how to misbehave), merged in this order, later wins: the instance default (``scenario=``), the next
queued one (``mock.queue(...)`` / ``mock.fail_next(...)``, consumed by POSTs to the messages endpoints that passed
validation), the request's ``x-mock-scenario`` header (the gateway forwards unknown headers). Header syntax:
``item; item=value; ...``; items (``Scenario`` fields, dashes for underscores):
    status=529 [error-type=.. error-code=.. message=.. retry-after=2 retry-after-ms=.. should-retry=false]
                           HTTP error before any byte, Anthropic error body (error-code: error.details.error_code)
    drop-after=N           close the connection after N SSE events (JSON: after half the body), no error event
    error-event-after=N    after N events send ``event: error`` (error-type, default overloaded_error) and end
    first-byte-delay=S     wait S seconds before the response head;  event-delay=S  between events
    hang                   never answer (until the client goes away)
    close                  close the connection without answering
    split=awkward|N        write each event in pieces cut mid-line / inside UTF-8 characters (or N-byte pieces)
    tool                   answer with tool_use whenever tools are given
    message-deltas=N       N cumulative message_delta events instead of one
    unknown-event          add an event type clients must ignore
    connection-close       answer with ``connection: close`` and close after the response
    usage={"input_tokens": 10, ...}
                           report this usage (JSON, merged over the planned one): billing tests' known counts,
                           service_tier, iterations, ...; in a stream each field goes where upstream puts it
Per connection: ``mock.refuse_connections(n)`` closes the next n connections as soon as they are accepted.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union
from urllib.parse import parse_qs

import h11

from .mock_account import AccountState, Files
from .mock_batches import Batches
from .mock_replies import (API_VERSIONS, PromptCache, RequestRejected, awkward_pieces, count_input_tokens,
                          error_body, message_json, new_id, plan_reply, reported_usage, sse_bytes, stream_events,
                          validate_request)

MOCK_API_KEY = "sk-ant-test"
# What upstream serves as of December 2026 (anthropic 2.17 types/model.py; claude-sonnet-4-5-20250929 is retired).
DEFAULT_MODELS = (
    ("claude-haiku-5-5", "Claude Haiku 5.5", "2026-10-07T00:00:00Z"),
    ("claude-sonnet-5-5", "Claude Sonnet 5.5", "1970-01-01T00:00:00Z"),      # release date not published
    ("claude-opus-5-5", "Claude Opus 5.5", "2026-09-24T00:00:00Z"),
    ("claude-opus-5", "Claude Opus 5", "2026-07-24T00:00:00Z"),
    ("claude-sonnet-5", "Claude Sonnet 5", "2026-06-30T00:00:00Z"),
    ("claude-opus-4-8", "Claude Opus 4.8", "1970-01-01T00:00:00Z"),
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-01T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
)
MAX_BODY_BYTES = 32 * 1024 * 1024
SPLIT_PAUSE = 0.002  # between pieces of a split write, so they reach the reader as separate reads


@dataclass
class Scenario:
    """How to answer one request; None means "not set" so scenarios can be layered (see `merged`)."""
    status: Optional[int] = None
    error_type: Optional[str] = None
    error_code: Optional[str] = None
    message: Optional[str] = None
    retry_after: Optional[str] = None
    retry_after_ms: Optional[str] = None
    should_retry: Optional[str] = None
    drop_after: Optional[int] = None
    error_event_after: Optional[int] = None
    first_byte_delay: Optional[float] = None
    event_delay: Optional[float] = None
    hang: Optional[bool] = None
    close: Optional[bool] = None
    split: Optional[Union[str, int]] = None
    tool: Optional[bool] = None
    message_deltas: Optional[int] = None
    unknown_event: Optional[bool] = None
    connection_close: Optional[bool] = None
    usage: Optional[dict] = None

    @classmethod
    def parse(cls, text: str) -> "Scenario":
        """Parse the ``x-mock-scenario`` header syntax (``status=529; retry-after=2``); ValueError if unknown."""
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(";"))):
            name, _, raw = item.partition("=")
            key, raw = name.strip().lower().replace("-", "_"), raw.strip()
            if key not in names:
                raise ValueError(f"unknown x-mock-scenario item {name!r}")
            if key in _FLAGS:
                values[key] = raw.lower() not in ("0", "false", "no") if raw else True
            else:
                values[key] = _CONVERTERS.get(key, str)(raw)
        return cls(**values)

    def merged(self, other: Optional["Scenario"]) -> "Scenario":
        if other is None:
            return self
        changes = {f.name: getattr(other, f.name) for f in dataclasses.fields(other)
                   if getattr(other, f.name) is not None}
        return dataclasses.replace(self, **changes)


def _split_mode(raw: str) -> Union[str, int]:
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    if raw != "awkward":
        raise ValueError(f"split must be 'awkward' or a positive size, not {raw!r}")
    return raw


_FLAGS = {"hang", "close", "tool", "unknown_event", "connection_close"}
_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "status": int, "drop_after": int, "error_event_after": int, "message_deltas": int,
    "first_byte_delay": float, "event_delay": float, "split": _split_mode, "usage": json.loads}
ScenarioLike = Union[Scenario, str, None]


def _as_scenario(value: ScenarioLike) -> Scenario:
    if value is None:
        return Scenario()
    return value if isinstance(value, Scenario) else Scenario.parse(value)


@dataclass
class RecordedRequest:
    method: str
    target: str                          # as sent: path plus query string
    path: str
    query: str                           # raw query string, "" when none
    headers: dict[str, str]              # lower-case names; repeated headers joined with ", "
    raw_headers: list[tuple[str, str]]   # every header line in order, names lower-cased
    raw_body: bytes
    body: Any                            # parsed JSON, or None
    connection_id: int
    request_id: str
    received_at: float = field(default_factory=time.monotonic)
    status: Optional[int] = None         # what the mock answered (None: no answer, e.g. hang/close)
    scenario: Optional[Scenario] = None
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def params(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.query, keep_blank_values=True).items()}

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.raw_headers if k == name.lower()]


class _ClientGone(Exception):
    """The client closed its side while a response was being sent."""


class MockUpstream:
    def __init__(self, api_key: str = MOCK_API_KEY, *, scenario: ScenarioLike = None,
                 models: tuple = DEFAULT_MODELS, strict_models: bool = False,
                 max_body_bytes: int = MAX_BODY_BYTES, max_header_bytes: int = 64 * 1024,
                 idle_timeout: Optional[float] = None, verify_signatures: bool = True,
                 host: str = "127.0.0.1"):
        self.api_key = api_key
        self.default_scenario = _as_scenario(scenario)
        self.models = [{"type": "model", "id": mid, "display_name": name, "created_at": created}
                       for mid, name, created in models]
        self.strict_models = strict_models
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.idle_timeout = idle_timeout
        self.verify_signatures = verify_signatures
        self.host = host
        self.port: Optional[int] = None
        self.requests: list[RecordedRequest] = []
        self.served: list[dict[str, Any]] = []
        self.connections_opened = 0
        self.open_connections = 0
        self.disconnects = 0
        self.cache = PromptCache()
        self.account = AccountState()     # threads, containers, files: see mock_account.py
        self.batches = Batches(self)      # /v1/messages/batches: see mock_batches.py
        self.files = Files(self.account)  # /v1/files: see mock_account.py
        self._queued: list[Scenario] = []
        self._refuse = 0
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> "MockUpstream":
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> "MockUpstream":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- programming -----------------------------------------------------------------------------------------

    def queue(self, scenario: ScenarioLike, times: int = 1) -> None:
        """Apply `scenario` to the next `times` valid POSTs to the messages endpoints, whatever the client sends."""
        self._queued.extend([_as_scenario(scenario)] * times)

    def fail_next(self, status: int = 529, times: int = 1, *, retry_after: Optional[float] = None,
                  error_type: Optional[str] = None, message: Optional[str] = None,
                  error_code: Optional[str] = None) -> None:
        """The next `times` valid POSTs to the messages endpoints get HTTP `status` before any byte."""
        self.queue(Scenario(status=status, error_type=error_type, message=message, error_code=error_code,
                            retry_after=None if retry_after is None else str(retry_after)), times)

    def refuse_connections(self, times: int = 1) -> None:
        """Close the next `times` connections as soon as they are accepted, before reading anything."""
        self._refuse += times

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` is true (e.g. ``lambda: mock.disconnects == 1``); AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"mock upstream: condition not reached within {timeout}s")
            await asyncio.sleep(0.01)

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    # -- connections -----------------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections_opened += 1
        self.open_connections += 1
        try:
            if self._refuse:
                self._refuse -= 1
                return
            await _Connection(self, self.connections_opened, reader, writer).serve()
        except asyncio.CancelledError:
            pass
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            writer.close()

    def _scenario_for(self, request: RecordedRequest, consume_queue: bool) -> Scenario:
        scenario = self.default_scenario
        if consume_queue and self._queued:
            scenario = scenario.merged(self._queued.pop(0))
        header = request.headers.get("x-mock-scenario")
        try:
            return scenario.merged(Scenario.parse(header)) if header else scenario
        except ValueError as exc:
            raise RequestRejected(400, f"x-mock-scenario: {exc}") from None

    # -- request handling ------------------------------------------------------------------------------------

    async def _handle(self, conn: "_Connection", request: RecordedRequest) -> None:
        route = self._route(request)
        if route is None:
            return await conn.send_error(request, 404, message=f"Not found: {request.method} {request.path}")
        try:
            self._check_auth(request)
            version = self._check_version(request)
            await route(conn, request, version)
        except RequestRejected as rej:
            await conn.send_error(request, rej.status, rej.error_type, rej.message, error_code=rej.error_code)

    def _route(self, request: RecordedRequest) -> Optional[Callable]:
        if request.method == "POST" and request.path == "/v1/messages":
            return self._messages
        if request.method == "POST" and request.path == "/v1/messages/count_tokens":
            return self._count_tokens
        if request.method == "GET" and (request.path == "/v1/models" or request.path.startswith("/v1/models/")):
            return self._models
        return self.batches.route(request.method, request.path) or self.files.route(request.method, request.path)

    def _check_auth(self, request: RecordedRequest) -> None:
        keys = request.header_values("x-api-key")
        bearers = [v[7:] if v[:7].lower() == "bearer " else None for v in request.header_values("authorization")]
        credentials = keys + bearers
        if not credentials:
            raise RequestRejected(401, "x-api-key header or Authorization: Bearer is required")
        if len(credentials) > 1:
            raise RequestRejected(401, "send exactly one credential: x-api-key or Authorization, not both")
        if credentials[0] != self.api_key:
            raise RequestRejected(401, "invalid x-api-key")

    @staticmethod
    def _check_version(request: RecordedRequest) -> str:
        versions = request.header_values("anthropic-version")
        if not versions:
            raise RequestRejected(400, "anthropic-version: header is required")
        if len(versions) > 1 or versions[0] not in API_VERSIONS:
            raise RequestRejected(400, f"anthropic-version: invalid version {', '.join(versions)!r}")
        return versions[0]

    def _parsed_body(self, request: RecordedRequest, version: str, *, is_messages: bool) -> dict:
        if request.body is None:
            raise RequestRejected(400, "There was an error parsing the body: invalid JSON")
        key = self.api_key if self.verify_signatures else None
        validate_request(request.body, version, needs_max_tokens=is_messages, signature_key=key)
        if self.strict_models and request.body["model"] not in {m["id"] for m in self.models}:
            raise RequestRejected(404, f"model: {request.body['model']}")
        return request.body

    async def _count_tokens(self, conn: "_Connection", request: RecordedRequest, version: str) -> None:
        body = self._parsed_body(request, version, is_messages=False)
        scenario = self._scenario_for(request, consume_queue=True)
        if await conn.misbehave_before_answer(request, scenario):
            return
        await conn.send_json(request, 200, {"input_tokens": count_input_tokens(body)})

    async def _models(self, conn: "_Connection", request: RecordedRequest, version: str) -> None:
        if request.path != "/v1/models":
            model_id = request.path[len("/v1/models/"):]
            model = next((m for m in self.models if m["id"] == model_id), None)
            if model is None:
                raise RequestRejected(404, f"model: {model_id}")
            return await conn.send_json(request, 200, model)
        params = request.params
        limit = int(params.get("limit") or 20)
        ids = [m["id"] for m in self.models]
        if params.get("after_id") in ids:
            window = self.models[ids.index(params["after_id"]) + 1:]
            page, has_more = window[:limit], len(window) > limit
        elif params.get("before_id") in ids:
            window = self.models[:ids.index(params["before_id"])]
            page, has_more = window[-limit:], len(window) > limit
        else:
            page, has_more = self.models[:limit], len(self.models) > limit
        await conn.send_json(request, 200, {"data": page, "has_more": has_more,
                                            "first_id": page[0]["id"] if page else None,
                                            "last_id": page[-1]["id"] if page else None})

    async def _messages(self, conn: "_Connection", request: RecordedRequest, version: str) -> None:
        body = self._parsed_body(request, version, is_messages=True)
        self.account.check_references(body)
        scenario = self._scenario_for(request, consume_queue=True)
        if await conn.misbehave_before_answer(request, scenario):
            return
        reply = plan_reply(body, self.cache, self.api_key, force_tool=bool(scenario.tool))
        if scenario.usage:
            reply = dataclasses.replace(reply, usage={**reply.usage, **scenario.usage})
        container = self.account.container_for(body)
        refusal = self.account.refusal_for(body)
        self.account.answered(body, reply.message_id)
        if refusal is not None:
            reply.stop_reason = "refusal"
        served = {"request_id": request.request_id, "message_id": reply.message_id, "model": body["model"],
                  "stream": body.get("stream") is True, "usage": _zero_usage(), "full_usage": reply.usage,
                  "completed": False, "events_sent": 0}
        self.served.append(served)
        if served["stream"]:
            events = stream_events(reply, body["model"], message_deltas=scenario.message_deltas or 1,
                                   unknown_event=bool(scenario.unknown_event))
            final_delta = next(e for e in reversed(events) if e["type"] == "message_delta")["delta"]
            if container is not None:
                final_delta["container"] = container
            if refusal is not None:
                final_delta["stop_details"] = refusal
            await conn.send_stream(request, scenario, events, served)
        else:
            message = message_json(reply, body["model"])
            if container is not None:
                message["container"] = container
            if refusal is not None:
                message["stop_details"] = refusal
            await conn.send_message(request, scenario, message, served)


def _zero_usage() -> dict[str, Any]:
    return {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


RATE_LIMIT_HEADERS = [
    ("anthropic-ratelimit-requests-limit", "4000"),
    ("anthropic-ratelimit-requests-remaining", "3999"),
    ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:00Z"),
]


class _Connection:
    """One client connection: h11 state plus a reader task, so a client that goes away is noticed at once."""

    def __init__(self, mock: MockUpstream, conn_id: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.mock = mock
        self.id = conn_id
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=mock.max_header_bytes)
        self.inbox = bytearray()
        self.inbox_ready = asyncio.Event()
        self.client_gone = asyncio.Event()
        self.fed_eof = False
        self.discard_input = False

    async def serve(self) -> None:
        pump = asyncio.create_task(self._pump())
        try:
            while await self._one_cycle():
                self.h11.start_next_cycle()
        finally:
            pump.cancel()

    async def _pump(self) -> None:
        """Read the socket all the time (pipelined bytes wait in `inbox`); EOF means the client went away."""
        try:
            while data := await self.reader.read(65536):
                if not self.discard_input:
                    self.inbox += data
                    self.inbox_ready.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.client_gone.set()
            self.inbox_ready.set()

    async def _next_event(self, idle_timeout: Optional[float] = None) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.inbox:
                self.h11.receive_data(bytes(self.inbox))
                self.inbox.clear()
            elif self.client_gone.is_set() and not self.fed_eof:
                self.fed_eof = True
                self.h11.receive_data(b"")
            elif self.fed_eof:
                return h11.ConnectionClosed()
            else:
                self.inbox_ready.clear()
                try:
                    await asyncio.wait_for(self.inbox_ready.wait(), idle_timeout)
                except asyncio.TimeoutError:
                    return h11.ConnectionClosed()

    async def _one_cycle(self) -> bool:
        """Read one request, answer it; True when the connection may serve another."""
        try:
            event = await self._next_event(self.mock.idle_timeout)
            if not isinstance(event, h11.Request):
                return False
            request = self._record(event)
            too_big = self._declared_too_big(event) or await self._read_body(request)
            if too_big:
                await self.send_error(request, 413, extra_headers=[("connection", "close")])
                await self._linger()
                return False
            request.body = _json_or_none(request.raw_body)
            await self.mock._handle(self, request)
        except h11.RemoteProtocolError as exc:
            # Malformed input, or a client that closed mid-request (then there is nobody left to answer).
            if not self.client_gone.is_set() and self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._answer_protocol_error(exc)
            return False
        except _ClientGone:
            return False
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _answer_protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        body = error_body(status, new_id("req_"), message=f"malformed request: {exc}")
        try:
            await self._write_response(status, [("content-type", "application/json")], json.dumps(body).encode())
        except _ClientGone:
            pass

    async def _linger(self, seconds: float = 2.0) -> None:
        """After answering early, finish our side and swallow what the client still sends before closing: closing
        with unread input would reset the connection and could destroy the answer before the client reads it."""
        self.discard_input = True
        self.inbox.clear()
        if self.writer.can_write_eof():
            self.writer.write_eof()
        await self._pause(seconds)

    def _record(self, event: h11.Request) -> RecordedRequest:
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        raw_headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
        headers: dict[str, str] = {}
        for name, value in raw_headers:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        request = RecordedRequest(method=event.method.decode(), target=target, path=path, query=query,
                                  headers=headers, raw_headers=raw_headers, raw_body=b"", body=None,
                                  connection_id=self.id, request_id=new_id("req_"))
        self.mock.requests.append(request)
        return request

    def _declared_too_big(self, event: h11.Request) -> bool:
        """A content-length over the limit is refused before reading the body, as upstream does."""
        return any(name == b"content-length" and int(value) > self.mock.max_body_bytes
                   for name, value in event.headers)

    async def _read_body(self, request: RecordedRequest) -> bool:
        """Read the body into `request.raw_body`; True when it grew past the limit (reading stops there)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.mock.max_body_bytes:
                    return True
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                request.raw_body = b"".join(chunks)
                return False
            else:  # the client closed mid-body
                raise _ClientGone()

    # -- writing ---------------------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if self.client_gone.is_set() or self.writer.is_closing():
            raise _ClientGone()
        self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            raise _ClientGone() from None

    async def _write_response(self, status: int, headers: list, body: bytes) -> None:
        data = self.h11.send(h11.Response(status_code=status, headers=headers + [("content-length", str(len(body)))]))
        data += self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage())
        await self._write(data)

    def _headers(self, request: RecordedRequest, content_type: str, scenario: Optional[Scenario] = None) -> list:
        headers = [("content-type", content_type), ("request-id", request.request_id)]
        if request.path.startswith("/v1/messages"):
            headers += RATE_LIMIT_HEADERS
        if scenario is not None and scenario.connection_close:
            headers.append(("connection", "close"))
        return headers

    async def send_json(self, request: RecordedRequest, status: int, payload: Any,
                        extra_headers: Optional[list] = None) -> None:
        request.status = status
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        await self._write_response(status, self._headers(request, "application/json") + (extra_headers or []), body)

    async def send_raw(self, request: RecordedRequest, status: int, content_type: str, body: bytes) -> None:
        request.status = status
        await self._write_response(status, self._headers(request, content_type), body)

    async def send_error(self, request: RecordedRequest, status: int, error_type: Optional[str] = None,
                         message: Optional[str] = None, extra_headers: Optional[list] = None,
                         error_code: Optional[str] = None) -> None:
        await self.send_json(request, status, error_body(status, request.request_id, error_type, message,
                                                         error_code), extra_headers)

    async def misbehave_before_answer(self, request: RecordedRequest, scenario: Scenario) -> bool:
        """Apply the scenario's effects that come before a 200; True when the request is answered (or never)."""
        request.scenario = scenario
        if scenario.first_byte_delay:
            await self._pause(scenario.first_byte_delay)
            if self.client_gone.is_set():
                self._abandoned(request)
                raise _ClientGone()
        if scenario.close:
            self.writer.close()
            raise _ClientGone()
        if scenario.hang:
            await self.client_gone.wait()
            self._abandoned(request)
            raise _ClientGone()
        if scenario.status:
            extra = [(name, value) for name, value in (("retry-after", scenario.retry_after),
                                                        ("retry-after-ms", scenario.retry_after_ms),
                                                        ("x-should-retry", scenario.should_retry)) if value]
            await self.send_error(request, scenario.status, scenario.error_type, scenario.message, extra,
                                  scenario.error_code)
            return True
        return False

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake as soon as the client goes away."""
        try:
            await asyncio.wait_for(self.client_gone.wait(), seconds)
        except asyncio.TimeoutError:
            return

    def _abandoned(self, request: RecordedRequest) -> None:
        self.mock.disconnects += 1
        request.disconnected.set()

    async def _write_split(self, data: bytes, split: Union[str, int, None]) -> None:
        """Write `data` as one or more chunks (each piece is its own chunk frame and its own socket write)."""
        if not split:
            return await self._write(self.h11.send(h11.Data(data=data)))
        pieces = awkward_pieces(data) if split == "awkward" else [
            data[i:i + int(split)] for i in range(0, len(data), int(split))]
        for n, piece in enumerate(pieces):
            if n:
                await self._pause(SPLIT_PAUSE)
            await self._write(self.h11.send(h11.Data(data=piece)))

    async def send_message(self, request: RecordedRequest, scenario: Scenario, message: dict,
                           served: dict) -> None:
        body = json.dumps(message, ensure_ascii=False).encode("utf-8")
        request.status = 200
        headers = self._headers(request, "application/json", scenario) + [("content-length", str(len(body)))]
        try:
            await self._write(self.h11.send(h11.Response(status_code=200, headers=headers)))
            if scenario.drop_after is not None:
                await self._write(self.h11.send(h11.Data(data=body[:len(body) // 2])))
                self.writer.close()
                return
            await self._write_split(body, scenario.split)
            await self._write(self.h11.send(h11.EndOfMessage()))
        except _ClientGone:
            self._abandoned(request)
            raise
        served["usage"] = dict(message["usage"])
        served["completed"] = True

    async def send_stream(self, request: RecordedRequest, scenario: Scenario, events: list[dict],
                          served: dict) -> None:
        request.status = 200
        headers = self._headers(request, "text/event-stream; charset=utf-8", scenario)
        headers.append(("cache-control", "no-cache"))
        try:
            await self._write(self.h11.send(h11.Response(status_code=200, headers=headers)))
            for n, event in enumerate(events):
                if n == scenario.drop_after:
                    self.writer.close()
                    return
                if n == scenario.error_event_after:
                    error = error_body(529, request.request_id, scenario.error_type or "overloaded_error",
                                       scenario.message)
                    error.pop("request_id")
                    await self._write(self.h11.send(h11.Data(data=sse_bytes(error))))
                    break
                if n and scenario.event_delay:
                    await self._pause(scenario.event_delay)
                await self._write_split(sse_bytes(event), scenario.split)
                served["events_sent"] = n + 1
                reported_usage(served["usage"], event)
            else:
                served["completed"] = True
            await self._write(self.h11.send(h11.EndOfMessage()))
        except _ClientGone:
            self._abandoned(request)
            raise


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None
