"""A fast mock Anthropic upstream for the benchmarks.

It must never be the bottleneck, so it is a raw asyncio Protocol (uvloop when
installed) with a hand-written HTTP/1.1 keep-alive parser and every response
prebuilt as bytes.  It answers any ``POST /v1/messages...`` with:

- a small Anthropic message as JSON (content-length), or
- SSE when the body has ``"stream": true`` (chunked, one chunk per event):
  message_start, content_block_start, ping, N content_block_delta,
  content_block_stop, message_delta (with usage), message_stop.
  * bulk: all events written at once;
  * paced: nothing for ``ttfb_ms``, then the head and the opening events, then one
    delta every ``gap_ms``.  Every paced stream of the process is driven by ONE
    periodic timer: a wheel of buckets keyed by tick number, so 5,000 streams
    cost one callback per tick plus one write per due event;
- a delayed JSON answer (``delay_ms``, one ``call_later`` per request).

The scenario comes from the CLI defaults, overridden per request by the URL
query (``?events=300&ttfb_ms=300&gap_ms=100&delay_ms=0``) or, with the same
syntax, by an ``x-mock`` header.  One process serves every scenario.

    taskset -c 0 python bench/mock_upstream.py --port 0 [--api-key K]

prints ``listening 127.0.0.1:PORT`` once ready.  Loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import re
import resource
import signal
import sys
from typing import Optional
from urllib.parse import parse_qsl

# --- prebuilt response bytes -------------------------------------------------

REQUEST_ID = b"req_0000mock0000000000000000"
MODEL = b"claude-sonnet-5-5"

MESSAGE_BODY = (
    b'{"id":"msg_01MockMockMockMockMockMock","type":"message","role":"assistant",'
    b'"model":"' + MODEL + b'","content":[{"type":"text","text":"Hello from the mock upstream."}],'
    b'"stop_reason":"end_turn","stop_sequence":null,'
    b'"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,'
    b'"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},'
    b'"output_tokens":7,"service_tier":"standard"}}'
)
MESSAGE_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: " + REQUEST_ID
    + b"\r\ncontent-length: %d\r\n\r\n" % len(MESSAGE_BODY) + MESSAGE_BODY
)

# The same answer with a head as the real API sends it: ~25 headers (the request id, the rate-limit set, the
# organisation, Cloudflare's and the load balancer's), for the scenarios with realistic heads (real_head=1).
REAL_MESSAGE_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ndate: Sat, 05 Dec 2026 12:00:00 GMT\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: keep-alive\r\n" % len(MESSAGE_BODY)
    + b"".join(b"anthropic-ratelimit-%s-%s: %s\r\n" % (kind, field, value)
               for kind, limit, left in ((b"input-tokens", b"2000000", b"1999000"),
                                         (b"output-tokens", b"400000", b"400000"),
                                         (b"requests", b"4000", b"3999"), (b"tokens", b"2400000", b"2399000"))
               for field, value in ((b"limit", limit), (b"remaining", left), (b"reset", b"2026-12-05T12:00:01Z")))
    + b"request-id: " + REQUEST_ID + b"\r\n"
    b"strict-transport-security: max-age=31536000; includeSubDomains; preload\r\n"
    b"anthropic-organization-id: 0b7c3e52-8f1d-4d6a-9c2e-5a4f3b2d1c0e\r\nvia: 1.1 google\r\n"
    b"cf-cache-status: DYNAMIC\r\nx-robots-tag: none\r\nserver: cloudflare\r\n"
    b"cf-ray: 8f0a1b2c3d4e5f60-FRA\r\nx-envoy-upstream-service-time: 812\r\n\r\n" + MESSAGE_BODY
)

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\nrequest-id: " + REQUEST_ID + b"\r\ntransfer-encoding: chunked\r\n\r\n"
)
CHUNKED_END = b"0\r\n\r\n"


def _sse_chunk(name: bytes, data: bytes) -> bytes:
    event = b"event: " + name + b"\ndata: " + data + b"\n\n"
    return b"%x\r\n" % len(event) + event + b"\r\n"


SSE_OPENING = (
    _sse_chunk(b"message_start",
               b'{"type":"message_start","message":{"id":"msg_01MockMockMockMockMockMock","type":"message",'
               b'"role":"assistant","content":[],"model":"' + MODEL + b'","stop_reason":null,'
               b'"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,'
               b'"cache_read_input_tokens":0,"output_tokens":1}}}')
    + _sse_chunk(b"content_block_start",
                 b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}')
    + _sse_chunk(b"ping", b'{"type": "ping"}')
)
SSE_DELTA = _sse_chunk(
    b"content_block_delta",
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lorem ipsum "}}')
FIXED_EVENTS = 6  # opening (3) + closing (3) around the deltas


def sse_closing(deltas: int) -> bytes:
    return (
        _sse_chunk(b"content_block_stop", b'{"type":"content_block_stop","index":0}')
        + _sse_chunk(b"message_delta",
                     b'{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
                     b'"usage":{"output_tokens":%d}}' % (deltas * 2))
        + _sse_chunk(b"message_stop", b'{"type":"message_stop"}')
        + CHUNKED_END
    )


def error_response(status: int, reason: bytes, error_type: bytes, message: bytes) -> bytes:
    body = (b'{"type":"error","error":{"type":"' + error_type + b'","message":"' + message
            + b'"},"request_id":"' + REQUEST_ID + b'"}')
    return (b"HTTP/1.1 %d " % status + reason + b"\r\ncontent-type: application/json\r\n"
            b"request-id: " + REQUEST_ID + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)


NOT_FOUND = error_response(404, b"Not Found", b"not_found_error", b"mock: unknown path")
UNAUTHORIZED = error_response(401, b"Unauthorized", b"authentication_error", b"mock: wrong upstream key")
BAD_REQUEST = error_response(400, b"Bad Request", b"invalid_request_error", b"mock: malformed request")

_bulk_cache: dict[int, bytes] = {}
_closing_cache: dict[int, bytes] = {}


def bulk_sse(deltas: int) -> bytes:
    data = _bulk_cache.get(deltas)
    if data is None:
        data = _bulk_cache[deltas] = SSE_HEAD + SSE_OPENING + SSE_DELTA * deltas + sse_closing(deltas)
    return data


def closing_for(deltas: int) -> bytes:
    data = _closing_cache.get(deltas)
    if data is None:
        data = _closing_cache[deltas] = sse_closing(deltas)
    return data


# --- scenarios ---------------------------------------------------------------

class Scenario:
    __slots__ = ("events", "ttfb", "gap", "delay", "message")

    def __init__(self, events: int, ttfb_ms: float, gap_ms: float, delay_ms: float, real_head: int = 0) -> None:
        self.events = events          # content_block_delta events per stream
        self.ttfb = ttfb_ms / 1000.0
        self.gap = gap_ms / 1000.0
        self.delay = delay_ms / 1000.0
        self.message = REAL_MESSAGE_RESPONSE if real_head else MESSAGE_RESPONSE     # the JSON answer

    @property
    def paced(self) -> bool:
        return self.ttfb > 0 or self.gap > 0


_PARAMS = {"events": int, "ttfb_ms": float, "gap_ms": float, "delay_ms": float, "real_head": int}


class ScenarioBook:
    """Defaults from the CLI; per-request overrides parsed once per distinct string."""

    def __init__(self, default: Scenario) -> None:
        self.default = default
        self._cache: dict[bytes, Scenario] = {}

    def get(self, spec: Optional[bytes]) -> Scenario:
        if not spec:
            return self.default
        found = self._cache.get(spec)
        if found is None:
            d = self.default
            values = {"events": d.events, "ttfb_ms": d.ttfb * 1000, "gap_ms": d.gap * 1000,
                      "delay_ms": d.delay * 1000, "real_head": int(d.message is REAL_MESSAGE_RESPONSE)}
            for name, value in parse_qsl(spec.decode("latin-1")):
                if name in _PARAMS:
                    values[name] = _PARAMS[name](value)
            found = Scenario(**values)
            if len(self._cache) < 1024:
                self._cache[spec] = found
        return found


# --- the paced-stream wheel --------------------------------------------------

class PacedStream:
    __slots__ = ("conn", "deltas", "sent", "start", "ttfb", "gap")

    def __init__(self, conn: "MockConnection", sc: Scenario, start: float) -> None:
        self.conn = conn
        self.deltas = sc.events
        self.sent = -1                # -1: head not sent yet
        self.start = start
        self.ttfb = sc.ttfb
        self.gap = sc.gap

    def first_due(self) -> float:
        return self.start + self.ttfb

    def fire(self) -> Optional[float]:
        """Write what is due now; return when the next write is due, or None when done."""
        conn = self.conn
        if conn.transport is None:          # client went away: drop the stream
            return None
        if self.sent < 0:
            self.sent = 0
            if self.deltas == 0:
                conn.finish_response(SSE_HEAD + SSE_OPENING + closing_for(0))
                return None
            conn.transport.write(SSE_HEAD + SSE_OPENING)
        else:
            self.sent += 1
            if self.sent >= self.deltas:
                conn.finish_response(SSE_DELTA + closing_for(self.deltas))
                return None
            conn.transport.write(SSE_DELTA)
        # Absolute schedule from the start: ticks never accumulate drift.
        return self.start + self.ttfb + (self.sent + 1) * self.gap


class Wheel:
    """All paced streams share one timer: buckets of streams keyed by tick number.

    The timer is armed only while streams are waiting, for the earliest bucket.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop = loop
        self.tick = tick
        self.buckets: dict[int, list[PacedStream]] = {}
        self.next_idx = 0             # lowest tick number not yet processed
        self.handle: Optional[asyncio.TimerHandle] = None
        self.armed: Optional[int] = None
        self.ticking = False

    def add(self, stream: PacedStream, due: float) -> None:
        idx = math.ceil(due / self.tick)
        if idx < self.next_idx:       # late: the next tick takes it
            idx = self.next_idx
        bucket = self.buckets.get(idx)
        if bucket is None:
            self.buckets[idx] = [stream]
        else:
            bucket.append(stream)
        if not self.ticking and (self.armed is None or idx < self.armed):
            self._arm(idx)

    def _arm(self, idx: int) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.armed = idx
        self.handle = self.loop.call_at(idx * self.tick, self._on_tick)

    def _on_tick(self) -> None:
        self.handle = self.armed = None
        # A small tolerance: float division can land a hair below the tick that fired us.
        cur = math.floor(self.loop.time() / self.tick + 1e-3)
        buckets = self.buckets
        if cur - self.next_idx > 64:  # after an idle spell: visit the keys, not every tick since
            due_keys = sorted(k for k in buckets if k <= cur)
        else:
            due_keys = range(self.next_idx, cur + 1)
        self.next_idx = cur + 1
        due: list[PacedStream] = []
        for idx in due_keys:
            bucket = buckets.pop(idx, None)
            if bucket:
                due.extend(bucket)
        self.ticking = True           # re-adds below must not re-arm the timer one by one
        add = self.add
        try:
            for stream in due:
                nxt = stream.fire()
                if nxt is not None:
                    add(stream, nxt)
        finally:
            self.ticking = False
        if buckets:
            self._arm(max(min(buckets), self.next_idx))


# --- the HTTP/1.1 connection -------------------------------------------------

_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')


class Stats:
    __slots__ = ("requests", "streams", "connections", "errors")

    def __init__(self) -> None:
        self.requests = self.streams = self.connections = self.errors = 0


class MockServer:
    def __init__(self, book: ScenarioBook, wheel: Wheel, api_key: Optional[bytes]) -> None:
        self.book = book
        self.wheel = wheel
        self.api_key = api_key
        self.stats = Stats()


class MockConnection(asyncio.Protocol):
    __slots__ = ("server", "transport", "buf", "busy", "close_after", "loop")

    def __init__(self, server: MockServer) -> None:
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.buf = b""
        self.busy = False             # a delayed or paced response is in progress
        self.close_after = False
        self.loop = server.wheel.loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.stats.connections += 1

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self._process()

    def finish_response(self, data: bytes) -> None:
        """The last write of a delayed or paced response; continue with queued requests."""
        transport = self.transport
        if transport is None:
            return
        transport.write(data)
        self.busy = False
        if self.close_after:
            transport.close()
            self.transport = None
            return
        transport.resume_reading()
        if self.buf:
            self._process()

    def _process(self) -> None:
        while self.buf and not self.busy and self.transport is not None:
            if not self._one_request():
                return

    def _one_request(self) -> bool:
        """Handle one complete request from the buffer; False when more bytes are needed."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                self._fail()
            return False
        lines = buf[:end].split(b"\r\n")
        try:
            method, target, version = lines[0].split(b" ", 2)
        except ValueError:
            self._fail()
            return False
        length = 0
        chunked = False
        close = version == b"HTTP/1.0"
        api_key = auth = mock_spec = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                value = value.strip().lower()
                close = value == b"close" or (close and value != b"keep-alive")
            elif name == b"x-api-key":
                api_key = value.strip()
            elif name == b"authorization":
                auth = value.strip()
            elif name == b"x-mock":
                mock_spec = value.strip()
        start = end + 4
        if chunked:
            decoded = _dechunk(buf, start)
            if decoded is None:
                return False
            body, consumed = decoded
        else:
            consumed = start + length
            if len(buf) < consumed:
                return False
            body = buf[start:consumed]
        self.buf = buf[consumed:]
        self.close_after = close
        self._respond(method, target, body, api_key, auth, mock_spec)
        return True

    def _respond(self, method: bytes, target: bytes, body: bytes, api_key: Optional[bytes],
                 auth: Optional[bytes], mock_spec: Optional[bytes]) -> None:
        server = self.server
        server.stats.requests += 1
        path, _, query = target.partition(b"?")
        if method != b"POST" or not path.startswith(b"/v1/messages"):
            return self._send(NOT_FOUND)
        want = server.api_key
        if want is not None and api_key != want and auth != b"Bearer " + want:
            server.stats.errors += 1
            return self._send(UNAUTHORIZED)
        sc = server.book.get(mock_spec or query)
        if _STREAM_TRUE.search(body) is None:
            if sc.delay > 0:
                self._hold()
                self.loop.call_later(sc.delay, self.finish_response, sc.message)
                return None
            return self._send(sc.message)
        server.stats.streams += 1
        if not sc.paced:
            return self._send(bulk_sse(sc.events))
        self._hold()
        stream = PacedStream(self, sc, self.loop.time())
        server.wheel.add(stream, stream.first_due())
        return None

    def _hold(self) -> None:
        # One response at a time per connection: queue pipelined requests.
        self.busy = True
        self.transport.pause_reading()

    def _send(self, data: bytes) -> None:
        self.transport.write(data)
        if self.close_after:
            self.transport.close()
            self.transport = None

    def _fail(self) -> None:
        self.server.stats.errors += 1
        self.close_after = True
        self._send(BAD_REQUEST)
        self.buf = b""


def _dechunk(buf: bytes, pos: int) -> Optional[tuple[bytes, int]]:
    """Decode a chunked request body starting at pos; None if incomplete."""
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)      # no trailers expected; skip any
            while end > pos:
                pos = end + 2
                end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            return b"".join(parts), end + 2
        if len(buf) < pos + size + 2:
            return None
        parts.append(buf[pos:pos + size])
        pos += size + 2


# --- entry point ---------------------------------------------------------------

def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        print("mock: uvloop not installed, using the asyncio loop", file=sys.stderr)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--api-key", help="answer 401 unless x-api-key (or Bearer) equals this")
    p.add_argument("--events", type=int, default=300, help="content_block_delta events per stream")
    p.add_argument("--ttfb-ms", type=float, default=0.0, help="paced streams: delay before the first byte")
    p.add_argument("--gap-ms", type=float, default=0.0, help="paced streams: delay between events")
    p.add_argument("--delay-ms", type=float, default=0.0, help="non-streaming: delay before answering")
    p.add_argument("--tick-ms", type=float, default=2.0, help="timer tick that drives paced streams")
    p.add_argument("--backlog", type=int, default=4096)
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("the mock binds loopback only")
    _raise_nofile()
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    book = ScenarioBook(Scenario(args.events, args.ttfb_ms, args.gap_ms, args.delay_ms))
    wheel = Wheel(loop, args.tick_ms / 1000.0)
    server = MockServer(book, wheel, args.api_key.encode() if args.api_key else None)
    srv = loop.run_until_complete(loop.create_server(
        lambda: MockConnection(server), args.host, args.port, backlog=args.backlog, reuse_address=True))
    port = srv.sockets[0].getsockname()[1]
    print(f"listening {args.host}:{port}", flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    try:
        loop.run_until_complete(stop)
    finally:
        s = server.stats
        print(f"mock: {s.requests} requests, {s.streams} streams, {s.connections} connections, "
              f"{s.errors} errors", file=sys.stderr, flush=True)
        srv.close()
        loop.close()


if __name__ == "__main__":
    main()
