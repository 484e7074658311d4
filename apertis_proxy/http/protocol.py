"""HTTP/1.1 server connection: h11 parses requests, this class does the I/O.

h11 is used for what it is good at -- parsing and validating request heads and
bodies, and knowing where one request ends.  Responses are written from
prebuilt bytes (see heads.build_head): h11's response path costs tens of
microseconds per request and its chunk framing ~3 us per SSE event.  Because
h11 never sees our responses, a fresh h11.Connection is started per request
cycle and fed whatever pipelined bytes the previous one had buffered.

One request is handled at a time per connection; pipelined requests wait in
h11's buffer, so responses go out in order.  Reading pauses when more than a
high-water mark of pipelined data piles up.  Writing honours pause_writing:
`Responder.write` waits until the transport drains, so a slow client slows the
upstream read instead of growing memory.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import re
from typing import Awaitable, Callable, Optional, Protocol, Sequence, Union

import h11

from ..deadline import Deadline
from ..flow_control import FlowControl
from ..settings import Settings
from . import fast_head, head_check
from .heads import build_head, header_list, keeps_alive
from .request import Request
from .request_ids import new_request_id
from .responder import ClientGone, ErrorRenderer, Responder

log = logging.getLogger("apertis_proxy.http")

Handler = Callable[[Request, "Responder"], Awaitable[None]]


class Refusal(Protocol):
    """Why a request is refused (the application's error type has these)."""
    status: int
    message: str
    error_type: str


# Told of every request the HTTP layer answers with an error itself, before any
# handler saw it (metrics and the access log count them):
#     refused(status, error_type, reason, request_id, method, path, client)
# `reason` is one of a fixed set (see the _reject_early callers); `method` and
# `path` are None when the head could not be read.
RefusalHook = Callable[[int, str, str, str, Optional[str], Optional[str], str], None]

# A handler may also have `check_head(head) -> Refusal | int | None`: called with a
# request's head (its body b"") when the body still has to be read, so that a
# request its credential will not admit is refused before its body is read; an
# int is a smaller body limit for this request.

_PIPELINE_HIGH_WATER = 256 * 1024


def _origin_form(target: bytes) -> bytes:
    """`/path?query` of an absolute-form target (`http://host/path?query`), which
    RFC 9112 says a server must accept; any other target as it is."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return target
    slash = rest.find(b"/")
    query = rest.find(b"?")
    if slash < 0 or 0 <= query < slash:
        return b"/" + rest[query:] if query >= 0 else b"/"
    return rest[slash:]


def _request_target(target: bytes) -> bytes:
    """The target as the application sees it (origin-form)."""
    return _origin_form(target) if target[:1] != b"/" and target[:4].lower() == b"http" else target


# How often the connection cap is reported in the log, at most (seconds).
_CAP_LOG_INTERVAL = 10.0
# After a scan at the cap found every connection busy, newcomers are refused
# without another scan for this long (a scan of 10,000 costs ~0.5 ms).
_ALL_BUSY_RESCAN = 0.1


class ServerState:
    """Shared by all connections of one listening server: bookkeeping for shutdown
    and for the connection cap."""

    __slots__ = ("connections", "draining", "tasks", "max_connections", "render_error", "refused", "client_of",
                 "_shed", "_refused", "_logged_at", "_all_busy_until")

    def __init__(self, render_error: ErrorRenderer, max_connections: int = 10_000,
                 refused: Optional[RefusalHook] = None) -> None:
        self.render_error = render_error
        self.refused = refused
        # The client a request's head names when its peer is a trusted proxy (peer, headers -> client), for
        # the refusals the HTTP layer logs itself; None: the peer is the client.
        self.client_of: Optional[Callable[[str, list], str]] = None
        self.connections: set["HttpConnection"] = set()
        self.draining = False
        # Handler tasks until they return: a handler still meters its request
        # after the response went out and the connection closed.
        self.tasks: set[asyncio.Task] = set()
        self.max_connections = max_connections
        self._shed = self._refused = 0     # since the last log line
        self._logged_at = -_CAP_LOG_INTERVAL
        self._all_busy_until = 0.0

    def make_room(self, now: float) -> bool:
        """At the cap: close idle connections (keep-alive between requests, or
        not yet sending), a sixteenth of the cap at a time so that a stream of
        new connections does not scan the set each time.  False when every
        connection is busy: the new one is refused (and, for a tenth of a
        second, the ones after it without another scan)."""
        batch = max(1, self.max_connections // 16)
        idle = []
        if now >= self._all_busy_until:
            for conn in self.connections:
                if conn.idle:
                    idle.append(conn)
                    if len(idle) == batch:
                        break
            if not idle:
                self._all_busy_until = now + _ALL_BUSY_RESCAN
        for conn in idle:
            conn.close()
            self.connections.discard(conn)
        if idle:
            self._shed += len(idle)
        else:
            self._refused += 1
        if now - self._logged_at >= _CAP_LOG_INTERVAL:
            self._logged_at = now
            log.warning("connection cap of %d reached: closed %d idle connections, refused %d new ones "
                        "(all busy)", self.max_connections, self._shed, self._refused)
            self._shed = self._refused = 0
        return bool(idle)


class Cycle(enum.Enum):
    """Where a client connection is in its request cycle (one request at a time).

    =========== ============================================== ==========================================
    state       what is going on                               left for
    =========== ============================================== ==========================================
    IDLE        between requests: no byte of the next yet      HEAD (bytes came), FAST_BODY (a whole
                                                               fast-parsed head came); or it closes
                                                               (keep-alive timeout, shutdown)
    HEAD        a head's first bytes came; h11 waits for more  BODY, HANDLING, DISCARDING (refused)
    BODY        head parsed; h11 frames the body               HANDLING (body complete), DISCARDING
    FAST_BODY   fast-parsed head; its Content-Length body is   HANDLING, DISCARDING
                counted here (`_body_left`), without h11
    HANDLING    the handler has the request: its response is   IDLE or HEAD (next cycle: pipelined bytes
                owed, or complete and waiting for the client   may already be here); the connection closes
                to read it before the next cycle               instead when it does not keep alive
    DISCARDING  answered early (refused, timed out): the rest  (closes)
                of the request is swallowed, then the
                connection closes
    =========== ============================================== ==========================================

    Not part of the cycle: `closed` (the transport is closed or closing) and
    `_peer_half_closed` (the client sent EOF while a response was owed).
    """

    IDLE = "idle"
    HEAD = "head"
    BODY = "body"
    FAST_BODY = "fast body"
    HANDLING = "handling"
    DISCARDING = "discarding"


# Module globals: compared by identity on the per-read path.
_IDLE, _HEAD, _BODY, _FAST_BODY, _HANDLING, _DISCARDING = Cycle


class HttpConnection(asyncio.Protocol):
    """One client connection; its request cycle is `_cycle` (see `Cycle`)."""

    def __init__(self, handler: Handler, settings: Settings, state: ServerState) -> None:
        self._handler = handler
        self._check_head: Optional[Callable[[Request], Union[Refusal, int, None]]] = getattr(
            handler, "check_head", None)
        self._settings = settings
        self.state = state
        self._loop = asyncio.get_running_loop()
        self.transport: Optional[asyncio.Transport] = None
        self._h11 = self._new_h11()
        self.closed = False
        self.http11 = True
        self.flow = FlowControl()
        self._client = ""
        # Per request cycle.
        self._cycle = _IDLE
        self._request: Optional[h11.Request] = None     # the parsed head, in BODY and FAST_BODY
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._body_limit = self._settings.max_body_bytes
        self._length: Optional[int] = None  # the body's Content-Length (None: chunked)
        self._h11_is_next = False   # self._h11 already holds only the next cycle's bytes (see _take_body)
        # The answer under way: the handler's (HANDLING), or an early refusal's (DISCARDING).
        self._responder: Optional[Responder] = None
        self._buffered = 0          # bytes received while a handler runs
        self._deadline = Deadline(self._loop, self._on_timeout)
        self._peer_half_closed = False  # the client half-closed while we owe it a response
        # The reads a request head came in, as sent: its size, and what
        # framing_refusal() must see (h11 unfolds obs-fold and lower-cases
        # Transfer-Encoding).
        self._head_reads: list[bytes] = []
        # Body bytes still to come in FAST_BODY.
        self._body_left = 0

    # -- the cycle, as questions ---------------------------------------------
    # (The per-read paths test `self._cycle` against the module globals inline:
    # a property call per read would show in bench/instructions.py.)
    @property
    def busy(self) -> bool:
        """A response is owed or under way: the handler's, or an early refusal's."""
        cycle = self._cycle
        return cycle is _HANDLING or cycle is _DISCARDING

    @property
    def idle(self) -> bool:
        """Open with no request under way: between requests, or not sending yet."""
        return self._cycle is _IDLE and not self.closed

    # -- asyncio callbacks -------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        if self.state.draining:
            # Accepted just before shutdown began: shutdown no longer sees it,
            # so serving it would forward a request nobody waits for.  Reset it,
            # as the kernel does with connections still in the accept queue.
            self.closed = True
            self._cycle = _DISCARDING
            transport.abort()
            return
        state = self.state
        if len(state.connections) >= state.max_connections and not state.make_room(self._loop.time()):
            # Every connection is busy: answer (the SDKs retry a 503 after
            # retry-after) and close, before reading anything.
            self.closed = True
            self._cycle = _DISCARDING
            rid = new_request_id()
            ctype, body = state.render_error(503, "the gateway is at its connection limit; retry shortly",
                                             "overloaded_error", rid)
            head = build_head(503, [(b"content-type", ctype), (b"retry-after", b"1"), (b"request-id", rid.encode())],
                              content_length=len(body), keep_alive=False)
            transport.write(head + body)
            transport.close()
            if state.refused is not None:
                _tell(state.refused, 503, "overloaded_error", "connection_cap", rid, None, None, _peer(transport))
            return
        transport.set_write_buffer_limits(high=self._settings.write_high_water)
        self.flow.transport = transport
        self._client = _peer(transport)
        state.connections.add(self)
        self._arm(self._settings.keepalive_timeout)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.state.connections.discard(self)
        self._deadline.cancel()
        self.flow.wake_writers()
        # A handler streaming a response may be waiting on a quiet upstream and
        # would only notice at its next write: stop it now (it meters the request
        # as interrupted).  One still waiting for a complete answer is left to
        # finish, so its usage is known exactly.
        # (client_left() does nothing once the response is complete.)
        r = self._responder
        if r is not None and (r.started or r.abandon_on_disconnect):
            r.client_left()

    def data_received(self, data: bytes) -> None:
        cycle = self._cycle
        if cycle is _DISCARDING:
            return
        if cycle is _FAST_BODY:
            self._fast_body(data)
            return
        if cycle is _IDLE and self._settings.fast_heads and self._fast_request(data):
            return
        first_bytes = False
        if cycle is _HANDLING:
            # Pipelined bytes: h11 keeps them for the next cycle.
            self._buffered += len(data)
            if self._buffered > _PIPELINE_HIGH_WATER:
                self.flow.pause_reading()
        elif cycle is not _BODY:
            if cycle is _IDLE:
                # First bytes of a new request: the whole head must arrive in time
                # (re-arming per packet would let a trickle keep it open forever).
                self._cycle = _HEAD
                first_bytes = True
            self._head_reads.append(data)
        try:
            self._h11.receive_data(data)
        except h11.RemoteProtocolError as exc:  # pragma: no cover - receive_data rarely raises
            self._protocol_error(exc)
            return
        if cycle is not _HANDLING:
            self._process()
            # Most requests arrive whole in one read: only a head still
            # incomplete after it needs the header timer.
            if first_bytes and self._cycle is _HEAD and not self.closed:
                self._arm(self._settings.header_timeout)

    def eof_received(self) -> Optional[bool]:
        # A client that half-closes after its request still gets the response
        # (keep our side open); one that closes fully is noticed on write.
        r = self._responder
        if self._cycle is _DISCARDING and r is not None and r.finished:
            return None  # refused early and answered: the drain is over, close now
        if self.busy:
            self._peer_half_closed = True
            if r is not None and r.abandon_on_disconnect:
                r.client_left()     # (nothing once the response is complete)
            return True
        return None  # no response owed: let the transport close

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # -- writing -----------------------------------------------------------
    def write(self, *parts: bytes) -> None:
        if self.closed or self.transport is None:
            return
        if len(parts) == 1:
            self.transport.write(parts[0])
        else:
            self.transport.writelines(parts)

    async def drain(self) -> None:
        if not self.flow.write_paused or self.closed:
            return
        await self.flow.drain()
        if self.closed:
            raise ClientGone()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    # -- request cycle -----------------------------------------------------
    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._settings.max_header_bytes)

    def _process(self) -> None:
        conn = self._h11
        while not self.closed:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            if event is h11.PAUSED:  # pragma: no cover - we swap connections before this happens
                self.flow.pause_reading()
                return
            etype = type(event)
            if etype is h11.Request:
                fast_head.COUNTS.request_h11 += 1
                # What follows the head in h11's buffer: a copy, so taken once for the head's size and the body.
                rest = conn.trailing_data[0]
                self._on_request(event, rest)
                if self._cycle is _DISCARDING:  # refused on its head: the rest is never parsed
                    return
                if self._take_body(rest):
                    return
                if not self._admitted(event):   # the body is still to come: not for a refused caller
                    return
                self._arm(self._settings.body_timeout)
            elif etype is h11.Data:
                self._body_size += len(event.data)
                if self._body_size > self._body_limit:
                    self._reject_early(413, f"request body exceeds the limit of "
                                            f"{self._body_limit} bytes", "request_too_large",
                                       "body_too_large")
                    return
                self._body.append(event.data)
                self._arm(self._settings.body_timeout)
            elif etype is h11.EndOfMessage:
                self._dispatch()
                return
            elif etype is h11.ConnectionClosed:
                self.close()
                return

    def _on_request(self, event: h11.Request, rest: bytes) -> None:
        """Take a request head h11 parsed (`rest`: what h11 holds after it), or refuse it."""
        self._cycle = _BODY
        self._request = event
        self._headers = headers = header_list(event.headers)
        self._body = []
        self._body_size = 0
        self._body_limit = self._settings.max_body_bytes
        self.http11 = event.http_version == b"1.1"
        reads, self._head_reads = self._head_reads, []
        received = reads[0] if len(reads) == 1 else b"".join(reads)
        # h11 only bounds a head still incomplete in its buffer; one that came
        # whole is measured here, by its bytes up to the blank line as sent
        # (whitespace included), so however it arrives it gets the same answer.
        if len(received) - len(rest) > self._settings.max_header_bytes:
            self._reject_early(431, "request headers too large", "request_too_large", "headers_too_large")
            return
        if event.http_version not in (b"1.1", b"1.0"):
            self._reject_early(505, f"HTTP/{event.http_version.decode('ascii', 'replace')} is not supported; "
                                    f"use HTTP/1.1", "invalid_request_error", "http_version")
            return
        # h11 has validated the framing headers; without either, a request has no body.
        length: Optional[int] = 0
        has_length = chunked = False
        for name, value in headers:
            if name == b"content-length":
                length = int(value)
                has_length = True
            elif name == b"transfer-encoding":
                chunked = True
        refusal = framing_refusal(received, chunked)
        if refusal is None and chunked:
            refusal = _chunked_refusal(has_length, event.http_version)
        if refusal is not None:
            self._reject_early(400, refusal, "invalid_request_error", "framing")
            return
        if chunked:
            length = None
        self._length = length
        if length is not None and length > self._settings.max_body_bytes:
            self._reject_early(413, f"request body exceeds the limit of "
                                    f"{self._settings.max_body_bytes} bytes", "request_too_large", "body_too_large")

    def _fast_request(self, data: bytes) -> bool:
        """Serve a request whose head came whole in this first read, and is of the
        common shape, without h11 (see fast_head.py); False leaves it to h11."""
        event = fast_head.parse_request(data, self._settings.max_header_bytes)
        if event is None:
            return False
        fast_head.COUNTS.request_fast += 1
        if self._settings.fast_heads_check:
            head_check.check("request", event, head_check.h11_request(data, self._settings.max_header_bytes))
        # What _on_request checks holds by construction here: the head is within the size
        # limit, HTTP/1.1 or 1.0, framed by at most one Content-Length, with no obs-fold.
        self._cycle = _FAST_BODY
        self._request = event           # type: ignore[assignment] - it has the fields of h11.Request used
        self._headers = event.headers
        self._body = []
        self._body_size = 0
        self._body_limit = self._settings.max_body_bytes
        self.http11 = event.http_version == b"1.1"
        self._length = length = event.length
        if length > self._settings.max_body_bytes:
            self._reject_early(413, f"request body exceeds the limit of "
                                    f"{self._settings.max_body_bytes} bytes", "request_too_large", "body_too_large")
            return True
        # self._h11 is untouched: it takes whatever follows the body (pipelined requests).
        self._h11_is_next = True
        end = event.end
        if len(data) - end < length and not self._admitted(event):   # type: ignore[arg-type]
            return True
        self._body_left = length
        self._fast_body(data[end:] if end < len(data) else b"")
        return True

    def _fast_body(self, data: bytes) -> None:
        """Body bytes of a fast-parsed request: kept until its Content-Length is
        in, with the body timeout between reads as h11's path has it."""
        left = self._body_left
        if len(data) < left:
            if data:
                self._body.append(data)
                self._body_size += len(data)
                self._body_left = left - len(data)
            self._arm(self._settings.body_timeout)
            return
        self._body.append(data if len(data) == left else data[:left])
        self._body_size += left
        rest = len(data) - left
        self._buffered = rest       # pipelined bytes already here
        if rest:
            self._h11.receive_data(memoryview(data)[left:])
            if rest > _PIPELINE_HIGH_WATER:
                self.flow.pause_reading()
        self._dispatch()

    def _admitted(self, event: h11.Request) -> bool:
        """Ask the handler whether the request's head admits reading its body;
        refuse it (and close) if not.  Only for a body not already whole in the
        buffer: one that came with its head cost nothing to read, and the
        handler authenticates before anything else anyway."""
        check_head = self._check_head
        if check_head is None:
            return True
        target = _request_target(event.target).decode("latin-1")
        head = Request(event.method.decode("ascii"), target, self._headers, b"", self._client, event.http_version,
                       type(event) is fast_head.FastRequest)
        head.request_id = request_id = new_request_id()
        refusal = check_head(head)
        if refusal is None:
            return True
        if isinstance(refusal, int):
            # No auth plugin vouched for the credential: the smaller body limit holds.
            self._body_limit = refusal
            if self._length is None or self._length <= refusal:
                return True
            self._reject_early(413, f"request body exceeds the limit of {refusal} bytes for a request whose "
                                    "credential no auth plugin checked from its head", "request_too_large",
                               "body_too_large", request_id=request_id)
            return False
        self._reject_early(refusal.status, refusal.message, refusal.error_type, request_id=request_id,
                           headers=[(k.encode(), str(v).encode()) for k, v in refusal.headers.items()])
        return False

    def _take_body(self, data: bytes) -> bool:
        """Take a Content-Length body straight from h11's buffer (`data`: what
        it holds after the head) when it is all there.

        h11 parsed and validated the head; its Data and EndOfMessage events would
        only hand back the same bytes, at a measured ~10% of a small request's
        CPU.  A fresh h11 takes whatever followed the body (pipelined requests),
        so the old one's state never needs to see it."""
        length = self._length
        if length is None:
            return False
        if len(data) < length:
            return False        # still arriving: let h11 frame it
        self._body = [data if len(data) == length else data[:length]]
        self._body_size = length
        # Hand what follows the body (pipelined requests) to a fresh h11 now, so
        # the request's bytes are not held in h11's buffer for the whole response.
        self._h11 = fresh = self._new_h11()
        self._h11_is_next = True
        self._buffered = len(data) - length     # pipelined bytes already here
        if self._buffered:
            fresh.receive_data(memoryview(data)[length:])
            if self._buffered > _PIPELINE_HIGH_WATER:
                self.flow.pause_reading()
        self._dispatch()
        return True

    def _dispatch(self) -> None:
        self._deadline.clear()
        ev = self._request
        assert ev is not None
        # The h11 event is not needed past this point; a long stream should not hold it.
        self._request = None
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body = []
        target = _request_target(ev.target).decode("latin-1")
        fast = type(ev) is fast_head.FastRequest
        request = Request(ev.method.decode("ascii"), target, self._headers, body, self._client, ev.http_version, fast)
        keep_alive = ((ev.keep_alive if fast else keeps_alive(ev.http_version, self._headers))
                      and not self.state.draining)
        responder = Responder(self, new_request_id(), keep_alive, ev.method == b"HEAD")
        self._responder = responder
        self._cycle = _HANDLING
        task = self._loop.create_task(self._run(request, responder))
        # The task leaves state.tasks from its own `finally` (a done callback
        # would cost one more trip through the event loop per request).
        responder._task = task
        self.state.tasks.add(task)

    async def _run(self, request: Request, responder: Responder) -> None:
        cancelled = False
        try:
            await self._handler(request, responder)
        except ClientGone:
            pass
        except asyncio.CancelledError:
            cancelled = True        # client gone, or shutdown past its deadline
            raise
        except Exception:  # noqa: BLE001 - the server must survive any handler bug
            log.exception("unhandled error while handling %s %s", request.method, request.path)
            if not responder.started and not self.closed:
                responder.send_error(500, "internal gateway error", "api_error")
        finally:
            try:
                if not responder.finished:
                    if responder.started or cancelled:
                        # Cut half-way: close without the last chunk, so the client
                        # cannot take a truncated body for a complete one.
                        responder.finished = True
                        self.close()
                    elif not self.closed:
                        responder.send_error(500, "internal gateway error: no response", "api_error")
            finally:
                self.state.tasks.discard(responder._task)

    def response_done(self, responder: Responder) -> None:
        """Called when a response is complete: close, or start the next cycle."""
        if responder is not self._responder:
            return
        if self._cycle is _DISCARDING and not self.closed and self.transport is not None:
            # Closing with unread request bytes would reset the connection and
            # the client might never see the error: half-close, drain, then close.
            if self._peer_half_closed:
                self.close()
            elif self.transport.can_write_eof():
                self.transport.write_eof()
                self._loop.call_later(2.0, self.close)
            else:
                self.close()
            return
        if not responder.keep_alive or self.closed or self._peer_half_closed:
            self._cycle = _IDLE
            self._responder = None
            self.close()
            return
        if self.flow.write_paused:
            # The client is not reading its answers: serve its next pipelined
            # request only once it does, or answers pile up in memory.
            self.flow.on_writable = self._next_cycle
            return
        # At once, not via call_soon (one loop trip less per request): a pipelined
        # request found here starts a new task, so nothing recurses.
        self._next_cycle()

    def _next_cycle(self) -> None:
        # h11 never saw our response, so the next request needs a fresh one
        # holding the bytes received after the last request.
        if self._h11_is_next:
            self._h11_is_next = False   # made in _take_body, or untouched by a fast-parsed request
            # It holds only what came after the request (counted in _buffered), and never an EOF
            # (only this method passes one on): with nothing counted, nothing to read back.
            leftover, eof = self._h11.trailing_data if self._buffered else (b"", False)
        else:
            leftover, eof = self._h11.trailing_data
            self._h11 = self._new_h11()
            if leftover:
                self._h11.receive_data(leftover)
            if eof:
                self._h11.receive_data(b"")
        self._responder = None
        self._buffered = 0
        pending = bool(leftover)
        self._cycle = _HEAD if pending else _IDLE
        self._head_reads = [leftover] if pending else []
        if self.closed:
            return
        if self.state.draining and not pending:
            self.close()
            return
        self._arm(self._settings.header_timeout if pending else self._settings.keepalive_timeout)
        if pending or eof:
            self._process()     # nothing buffered: h11 would only say NEED_DATA
        # Read on unless the request just started leaves a backlog over the
        # high-water mark (_take_body counted it): one client cannot make the
        # gateway hold (and re-copy, each cycle) all it pipelines.
        if not self.flow.reading and not self.closed and (
                not self.busy or self._buffered <= _PIPELINE_HIGH_WATER):
            self.flow.resume_reading()

    # -- errors and timers ---------------------------------------------------
    def _reject_early(self, status: int, message: str, error_type: str, reason: Optional[str] = None, *,
                      request_id: Optional[str] = None, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Answer before the request was read completely, then close.  With a
        `reason`, the HTTP layer refused it on its own: state.refused is told
        (a refusal by the handler's check_head() is the handler's to count).  `headers`
        go with the error (a plugin's refusal: its retry-after)."""
        self._h11 = self._new_h11()  # the rest of the request is never parsed
        self._h11_is_next = False
        self._cycle = _DISCARDING
        responder = self._responder
        ours = responder is None
        if responder is None:
            responder = self._responder = Responder(self, request_id or new_request_id(), keep_alive=False)
        responder.keep_alive = False
        if not responder.started:
            responder.send_error(status, message, error_type, list(headers))
        else:
            self.close()
        state = self.state
        if ours and reason is not None and state.refused is not None:
            event = self._request
            method = path = None
            client = self._client
            if event is not None:
                method = event.method.decode("ascii")
                path = _request_target(event.target).decode("latin-1").partition("?")[0]
                if state.client_of is not None:     # the head was read: its forwarded client, behind a proxy
                    client = state.client_of(client, self._headers)
            _tell(state.refused, status, error_type, reason, responder.request_id, method, path, client)

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint or 400
        if self._responder is not None and self._responder.started:
            self.close()
            return
        # h11's text quotes the offending bytes as a bytearray repr (up to the
        # whole line): say what was wrong, not Python's view of it.
        reason = str(exc).split(": bytearray(")[0].split(": b'")[0].split(': b"')[0][:200]
        if status == 431:
            self._reject_early(431, "request headers too large", "request_too_large", "headers_too_large")
        else:
            self._reject_early(status, f"malformed HTTP request: {reason}", "invalid_request_error", "malformed")

    def _arm(self, delay: float) -> None:
        self._deadline.set(self._loop.time() + delay)

    def _on_timeout(self) -> None:
        if self.closed or self.busy:
            return      # a running handler has its own (upstream) timeouts
        if self._cycle is _IDLE:
            self.close()  # idle keep-alive connection
            return
        self._reject_early(408, "timed out waiting for the request", "timeout_error", "timeout")

    # -- shutdown ------------------------------------------------------------
    def shutdown(self) -> None:
        """Close now unless answering; otherwise the current response is the last."""
        cycle = self._cycle
        if cycle is _HANDLING:
            assert self._responder is not None
            self._responder.keep_alive = False
        elif cycle is not _DISCARDING:
            self.close()        # (an early refusal closes once answered)


# The first line break followed by whitespace (obs-fold) or by the blank line
# that ends the head: one scan decides (three bytes.find calls cost ~3 us).
_FOLD_OR_HEAD_END = re.compile(rb"\n(?:[ \t]|\r?\n)")


def framing_refusal(received: bytes, chunked: bool) -> Optional[str]:
    """Why a request head h11 accepted is still refused, or None.  `received`
    starts with the head as sent.  h11 unfolds obs-fold and lower-cases the
    Transfer-Encoding value; a front end that does neither would frame the
    request differently, so both are refused rather than guessed at."""
    start = 0
    if received[:1] in (b"\r", b"\n"):         # empty lines before the request line
        start = len(received) - len(received.lstrip(b"\r\n"))
    found = _FOLD_OR_HEAD_END.search(received, start)
    end = len(received) if found is None else found.start()
    if found is not None and received[end + 1] in b" \t":
        return "malformed HTTP request: obsolete line folding (a header line starting with whitespace)"
    if chunked:
        for line in received[start:end].split(b"\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"transfer-encoding" and value.strip(b" \t\r") != b"chunked":
                return "malformed HTTP request: Transfer-Encoding must be written exactly as \"chunked\""
    return None


def _chunked_refusal(has_length: bool, http_version: bytes) -> Optional[str]:
    """Why a chunked request is refused whatever its bytes say, or None: a
    front end could frame its body otherwise.  The connection is closed."""
    if has_length:
        # Both, even Content-Length: 0: the classic request-smuggling shape (a front end framing by
        # Content-Length would see another request than we do).  RFC 9112 allows refusing it.
        return "a request must not have both Content-Length and Transfer-Encoding"
    if http_version != b"1.1":
        # RFC 9112 section 6.1: an HTTP/1.0 front end does not know chunked, so it framed the body otherwise.
        return "an HTTP/1.0 request must not have Transfer-Encoding"
    return None


def _tell(refused: RefusalHook, *args) -> None:
    """Call the refusal hook; a failure in it is logged, never lets the refusal fail."""
    try:
        refused(*args)
    except Exception:  # noqa: BLE001 - observability must not break the answer already sent
        log.exception("the refusal hook failed")


def _peer(transport: asyncio.BaseTransport) -> str:
    """The client's "ip:port", "[ipv6]:port" for IPv6."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple):
        return str(peer or "")
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
