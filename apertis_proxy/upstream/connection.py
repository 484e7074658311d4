"""One HTTP/1.1 connection to an upstream channel: h11 client state + asyncio I/O.

h11 keeps the connection state and parses the response head.  The request is
written from bytes (h11's request writer costs ~30 us with an SDK's 15
headers, measured).  h11 is not told about it: a client-side h11 accepts a
final response from a peer it has sent nothing (its state machine lets a
server answer first), and telling it cost ~6% of a small request's
instructions (bench/instructions.py).  Only an interim 1xx response needs the
request on record; the head's bytes are kept until it is parsed so that case
is re-read by an h11 that was told.  The body framing is decoded by
framing.py (h11's per-chunk events are too slow for SSE), and a fresh
h11.Connection starts each request cycle on a kept-alive connection.

The response body is consumed whole with `read_all()`, or piece by piece as
it arrives with `pump(sink)`.  Until a consumer takes them (or while it falls
behind: a slow client downstream), incoming chunks queue up to a high-water
mark and then the socket stops being read: backpressure reaches the upstream
through TCP.

The read timeout applies between bytes, never to the whole response: streams
may last many minutes.  It is checked against the time of the last byte, so
no timer is re-armed per chunk, and time spent paused for a slow client does
not count.

`pump(sink)` is the streaming fast path: each body piece goes to `sink` right
from `data_received`, with no task wake-up per SSE event; the awaiting
coroutine only resumes when the body ends or fails.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import operator
from typing import Callable, Optional

import h11

from ..deadline import Deadline
from ..flow_control import SMALL_WRITE, FlowControl
from ..http import fast_head, head_check
from ..http.heads import header_list, keeps_alive
from .framing import BodyDecoder, ChunkedDecoder, FramingError, decoder_for, framed_decoder

_QUEUE_HIGH_WATER = 256 * 1024
# Interim (1xx) responses read before the final one; a real upstream sends
# none or one.  A storm of them is a broken or hostile peer, not a slow one.
MAX_INTERIM_RESPONSES = 8
# What h11 is told about a request whose response begins with a 1xx: a POST
# with a delimited body, which is what decides how it reads the response.
# Its EndOfMessage is never sent: h11 reads a response whatever our side's
# state, and the connection gets a fresh h11 per request.
_SENT_REQUEST = h11.Request(method=b"POST", target=b"/", headers=[(b"host", b"upstream"),
                                                                   (b"content-length", b"0")])


# The methods send_request writes: their answers are framed as the body
# decoder expects (a HEAD answer has no body: the decoder would wait for one).
_FORWARDED_METHODS = frozenset((b"POST", b"GET", b"DELETE"))
_FIELD_LINE = b": ".join       # (name, value) -> b"name: value"
_NAME = operator.itemgetter(0)
_VALUE = operator.itemgetter(1)
# What RFC 9110 section 5.5 allows in a field value: VCHAR, obs-text, SP and HTAB.  Deleted from the values, it
# leaves the bytes h11 lets through (its grammar excludes only NUL and whitespace) but HTTP does not.
_FIELD_VALUE_BYTES = bytes(range(0x20, 0x7f)) + bytes(range(0x80, 0x100)) + b"\t"


class Phase(enum.Enum):
    """Where a connection is in its request/response exchange."""

    IDLE = "idle"                       # nothing sent since it opened or was recycled
    AWAITING_HEAD = "awaiting head"     # the request is written; the response head is incomplete
    READING_BODY = "reading body"       # the head is parsed; the body is arriving
    DONE = "done"                       # the body's last byte is in


# Module globals: compared by identity on the per-read path.
_IDLE, _AWAITING_HEAD, _READING_BODY, _DONE = Phase


class UpstreamError(Exception):
    """The upstream connection failed.  `phase` says where: connect, send, head, body."""

    def __init__(self, message: str, phase: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.phase = phase
        self.timeout = timeout


class ResponseHead:
    __slots__ = ("status", "headers")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers

    def get(self, name: bytes) -> Optional[bytes]:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("_loop", "transport", "_h11", "_queue", "_queued", "_waiter", "_error", "_phase",
                 "_flow", "closed", "idle_since", "_head", "_decoder", "_keep_alive",
                 "_sink", "_chunk_sink", "_last_rx", "_deadline", "_timeout", "_head_bytes", "_told", "_interim")

    # Well-formed response heads skip h11 (see http/fast_head.py); set from the
    # settings when the server starts.  The check parses each both ways.
    fast_heads = True
    fast_heads_check = False

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport: Optional[asyncio.Transport] = None
        # Made when a response head goes to h11 (~13k instructions each): the fast path needs none.
        self._h11: Optional[h11.Connection] = None
        self._head_bytes = b""      # the response head so far (see the module docstring)
        self._told = False          # self._h11 knows a request went out
        self._interim = 0           # 1xx responses read for this request
        self._queue: collections.deque = collections.deque()
        self._queued = 0
        self._waiter: Optional[asyncio.Future] = None
        self._error: Optional[UpstreamError] = None
        self._phase = _IDLE
        self._flow = FlowControl()
        self._head: Optional[ResponseHead] = None
        self._decoder: Optional[BodyDecoder] = None
        self._keep_alive = True
        self._sink: Optional[Callable[[bytes], bool]] = None
        # pump()'s taker of whole chunks as read (see there); set only for a chunked body.
        self._chunk_sink: Optional[Callable[[bytes, int], bool]] = None
        self._last_rx = 0.0
        self._deadline = Deadline(self._loop, self._on_deadline)
        self._timeout = 0.0
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio callbacks -------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = self._flow.transport = transport

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self._deadline.cancel()
        try:
            if self._decoder is not None:
                self._decoder.eof()
                if self._decoder.done:
                    self._phase = _DONE
            elif self._h11 is not None:
                self._h11.receive_data(b"")
                self._parse_head()
        except (h11.RemoteProtocolError, FramingError):
            pass
        if self._phase is not _DONE and self._error is None:
            self._fail(UpstreamError("upstream closed the connection", "head" if self._head is None
                                     else "body"))
        self._wake()

    def data_received(self, data: bytes) -> None:
        self._last_rx = self._loop.time()
        try:
            if self._chunk_sink is not None:
                # A paced stream's read: one whole chunk, handed on as read (framing
                # included); it never ends the body, so nobody is woken.
                start = self._decoder.one_chunk(data)      # type: ignore[union-attr,attr-defined]
                if start:
                    if not self._chunk_sink(data, start):
                        self.pause()
                    return
                self._body(data, irregular=True)
                if self._phase is not _DONE:
                    return
            elif self._decoder is not None:
                self._body(data)
                if self._sink is not None and self._phase is not _DONE:
                    return          # streaming straight to the sink: nobody to wake
            elif self._phase is _IDLE:
                # Bytes on an idle keep-alive connection (or before our request):
                # they would be read as the answer to the next request sent here,
                # and every later answer would be one behind.  Never reuse it.
                self._keep_alive = False
                self.close()
                return
            elif not self._fast_head(data):
                if not self._told:
                    self._head_bytes += data
                if self._h11 is None:
                    self._h11 = h11.Connection(h11.CLIENT)
                self._h11.receive_data(data)
                self._parse_head()
        except (h11.RemoteProtocolError, FramingError) as exc:
            self._fail(UpstreamError(f"invalid HTTP from upstream: {exc}", "head" if self._head is None
                                     else "body"))
            self.close()
        self._wake()

    def eof_received(self) -> Optional[bool]:
        return None

    # -- parsing -------------------------------------------------------------
    def _parse_head(self) -> None:
        """Parse the response head with h11; then hand the rest to a body decoder."""
        conn = self._h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                if self._told:
                    raise
                # Most likely a 1xx, which h11 reads only after a request: start
                # over with one that was told, on the same bytes.
                self._h11 = conn = h11.Connection(h11.CLIENT)
                conn.send(_SENT_REQUEST)
                self._told = True
                conn.receive_data(self._head_bytes)
                self._head_bytes = b""      # h11 holds them now
                continue
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            etype = type(event)
            if etype is h11.Response:
                fast_head.COUNTS.response_h11 += 1
                headers = header_list(event.headers)
                refusal = response_refusal(event.status_code, event.http_version, headers)
                if refusal is not None:
                    raise FramingError(refusal)
                self._on_head(event.status_code, headers, conn.trailing_data[0],
                              keeps_alive(event.http_version, headers) and not _framed_twice(headers),
                              decoder_for(event.status_code, headers))
                return
            if etype is h11.ConnectionClosed:
                return
            # InformationalResponse (1xx): keep reading for the final head.
            self._interim += 1
            if self._interim > MAX_INTERIM_RESPONSES:
                raise FramingError(f"more than {MAX_INTERIM_RESPONSES} interim (1xx) responses")

    def _fast_head(self, data: bytes) -> bool:
        """Take a final response head that came whole in one read and is of the
        common shape without h11; False leaves it (and anything irregular) to h11."""
        if self._head_bytes or self._told or not self.fast_heads:
            return False        # a head h11 has begun to read, or the fast path is off
        event = fast_head.parse_response(data)
        if event is None:
            return False
        fast_head.COUNTS.response_fast += 1
        if self.fast_heads_check:
            head_check.check("response", event, head_check.h11_response(data))
        end = event.end
        # The parser found the framing and the Connection header by name: no pass over the headers here.
        self._on_head(event.status_code, event.headers, data[end:] if end < len(data) else b"", event.keep_alive,
                      framed_decoder(event.status_code, event.chunked, event.length))
        return True

    def _on_head(self, status: int, headers: list[tuple[bytes, bytes]], rest: bytes, keep_alive: bool,
                 decoder: BodyDecoder) -> None:
        self._head = ResponseHead(status, headers)
        self._keep_alive = keep_alive
        self._decoder = decoder
        self._phase = _READING_BODY
        # The body is framed by hand from here: let h11's state go for the
        # rest of a possibly long stream (recycle() makes a fresh one).
        self._h11 = None
        self._head_bytes = b""
        if rest or self._decoder.done:
            self._body(rest)

    def _body(self, data: bytes, irregular: bool = False) -> None:
        """Decode a read of the body and hand it on (`irregular`: a chunked
        body's read that ChunkedDecoder.one_chunk() declined already)."""
        decoder = self._decoder
        assert decoder is not None
        chunk = decoder.feed_irregular(data) if irregular else decoder.feed(data)     # type: ignore[attr-defined]
        if chunk and self._sink is not None:
            if not self._sink(chunk):
                self.pause()            # the client is slow: stop reading upstream
        elif chunk:
            self._queue.append(chunk)
            self._queued += len(chunk)
            if self._queued > _QUEUE_HIGH_WATER:
                self._flow.pause_reading()
        if decoder.done:
            self._phase = _DONE
            if decoder.leftover:
                self._keep_alive = False   # bytes past the response: never reuse

    def _fail(self, err: UpstreamError) -> None:
        if self._error is None:
            self._error = err

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, timeout: float, phase: str) -> None:
        loop = self._loop
        self._waiter = fut = loop.create_future()
        now = self._last_rx = loop.time()
        self._timeout = timeout
        self._deadline.set(now + timeout)
        try:
            await fut
        finally:
            self._waiter = None
        if fut.result() is _TIMED_OUT:
            self._fail(UpstreamError(f"upstream sent nothing for {timeout:g}s", phase, timeout=True))
            self.close()

    def _on_deadline(self) -> None:
        fut = self._waiter
        if fut is None or fut.done() or self.closed:
            return      # nobody is waiting: no deadline until the next wait
        reading = self._flow.reading
        if reading and self._loop.time() - self._last_rx >= self._timeout:
            fut.set_result(_TIMED_OUT)
            return
        # Bytes came meanwhile, or we are paused for a slow client: look again later.
        self._deadline.set((self._last_rx if reading else self._loop.time()) + self._timeout)

    def pause(self) -> None:
        if not self.closed:
            self._flow.pause_reading()

    def resume(self) -> None:
        if not self._flow.reading and not self.closed:
            self._last_rx = self._loop.time()   # time paused for the consumer is not idle time
            self._flow.resume_reading()

    # -- public API ------------------------------------------------------------
    def send_request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> None:
        """Write a POST, GET or DELETE request, head and body, at once (any
        other method raises UpstreamError).  `headers` must carry host and
        content-length, and be valid: values from the client were validated
        by h11, the gateway's own by gateway.headers."""
        if method not in _FORWARDED_METHODS:
            raise UpstreamError("only POST, GET and DELETE requests are forwarded", "send")
        if self.closed or self.transport is None:
            raise UpstreamError("upstream connection closed before the request was sent", "send")
        # Each header line joined in C (b": ".join of the pair): no Python step per header.
        head = (method, b" ", target, b" HTTP/1.1\r\n", b"\r\n".join(map(_FIELD_LINE, headers)),
                b"\r\n\r\n" if headers else b"\r\n")
        if len(body) < SMALL_WRITE:
            self.transport.write(b"".join((*head, body)))
        else:
            self.transport.writelines((b"".join(head), body))
        self._phase = _AWAITING_HEAD

    async def read_head(self, timeout: float) -> ResponseHead:
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait(timeout, "head")
        return self._head

    async def pump(self, sink: Callable[[bytes], bool], timeout: float,
                   chunk_sink: Optional[Callable[[bytes, int], bool]] = None) -> None:
        """Hand the rest of the body to `sink` as it arrives; return at its end.

        `sink(piece)` returns False to ask for a pause; call `resume()` when the
        consumer can take more.  For a chunked body, `chunk_sink(read, start)`
        takes instead each read that is exactly one whole chunk, not the last,
        as it came (its data is `read[start:-2]`): a consumer that writes chunks
        itself can pass it on without decoding and framing it again.  Raises
        UpstreamError (also on a timeout)."""
        # Reading may have stopped at the queue's high-water mark before a
        # consumer came (or the caller took the queue with buffered()): _take()
        # goes on, unless the sink asks for a pause.
        if self._queue and not sink(b"".join(self._take())):
            self.pause()
        else:
            self.resume()
        self._sink = sink
        if isinstance(self._decoder, ChunkedDecoder):
            self._chunk_sink = chunk_sink
        try:
            while self._phase is not _DONE:
                if self._error is not None:
                    raise self._error
                await self._wait(timeout, "body")
        finally:
            self._sink = self._chunk_sink = None

    async def read_all(self, timeout: float, limit: int) -> bytes:
        """The rest of the body, whole; at most `limit` bytes.  Raises UpstreamError.
        (A small body is usually here already: it is returned without a wait.)"""
        parts: list[bytes] = []
        size = 0
        while True:
            if self._queue:
                size += self._queued
                if size > limit:
                    self.close()
                    raise UpstreamError(f"upstream response larger than {limit} bytes", "body")
                parts += self._take()
            if self._phase is _DONE:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self._error is not None:
                raise self._error
            await self._wait(timeout, "body")

    def buffered(self) -> list[bytes]:
        """Body chunks already received but not yet read (used when abandoning a stream)."""
        chunks = list(self._queue)
        self._queue.clear()
        self._queued = 0
        return chunks

    def _take(self) -> list[bytes]:
        """Empty the queue for a reader, and read the socket again if the queue
        had stopped it at its high-water mark."""
        chunks = self.buffered()
        self.resume()
        return chunks

    def abort(self, error: UpstreamError) -> None:
        """Give up on this response (the consumer found its body unusable): the
        reader gets `error`, and the connection is closed."""
        self._fail(error)
        self.close()
        self._wake()

    def expect_end(self, timeout: float) -> None:
        """The body should end within `timeout` of its last byte: wait no longer
        than that for the rest, whatever the read timeout was."""
        if timeout >= self._timeout or self._phase is _DONE:
            return
        self._timeout = timeout
        self._deadline.set(self._last_rx + timeout)

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def body_complete(self) -> bool:
        """The body's last byte is in: true inside the sink call for its last piece."""
        return self._phase is _DONE or (self._decoder is not None and self._decoder.done)

    @property
    def reusable(self) -> bool:
        """True when the last exchange finished cleanly and the connection may carry another."""
        return not self.closed and self._phase is _DONE and self._keep_alive

    def recycle(self) -> bool:
        """Prepare for the next request; False when the connection cannot be reused."""
        if not self.reusable:
            return False
        self._h11 = None
        self._told = False
        self._interim = 0
        self._head_bytes = b""
        self._decoder = None
        self._head = None
        self._phase = _IDLE
        self._queue.clear()
        self._queued = 0
        # Read while idle, so that anything the upstream writes meanwhile is
        # seen (data_received closes the connection) before it is reused.
        self.resume()
        return True

    def loop_time(self) -> float:
        return self._loop.time()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


_TIMED_OUT = object()


def response_refusal(status: int, http_version: bytes, headers: list[tuple[bytes, bytes]]) -> Optional[str]:
    """Why a final response head h11 accepted is an invalid answer all the same, or None.  The fast parser
    declines each of these, so only h11's path asks (a few C-level passes over the values)."""
    if status > 599:
        return f"status {status} is outside 100-599"
    if b"".join(map(_VALUE, headers)).translate(None, _FIELD_VALUE_BYTES):
        return "a header value holds a control byte"
    if http_version != b"1.1" and b"transfer-encoding" in map(_NAME, headers):
        # RFC 9112 section 6.1: an HTTP/1.0 message's framing is faulty with Transfer-Encoding.
        return "an HTTP/1.0 answer with Transfer-Encoding"
    return None


def _framed_twice(headers: list[tuple[bytes, bytes]]) -> bool:
    """Both Content-Length and Transfer-Encoding: read as chunked (RFC 9112 section 6.3), but perhaps a
    response-splitting attempt, so its connection is never reused."""
    names = list(map(_NAME, headers))
    return b"transfer-encoding" in names and b"content-length" in names
