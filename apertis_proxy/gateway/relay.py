"""Moving an upstream's answer to the client, once its head said 2xx.

`JsonRelay` reads a whole body, takes its usage and sends it; `EncodedRelay` does
the same for a body in a content coding the gateway did not ask for.  `StreamRelay`
splices an SSE body event by event as it arrives, inside the upstream socket's
callback: complete events go out as they come, the read that completes the
upstream's body goes out in the write that ends ours, and any failure after the
first byte becomes an in-band `event: error` (nothing is added after
message_stop: the answer was complete).  A stream whose client leaves is
still read to its end (bounded: `drain_stream`), because the upstream bills
what it generated.  Both record the outcome in the request's UsageRecord;
neither knows about channels, plugins or the connection pool.
"""
from __future__ import annotations

import asyncio
import zlib
from typing import Optional

import orjson

from ..errors import sse_error_event
from ..http.responder import ClientGone, Responder
from ..plugin_api import UsageRecord
from ..upstream.connection import UpstreamConnection, UpstreamError
from . import exact_json
from .sse import EventTooLarge, SseSplicer
from .usage import UsageMeter

_RESPONSE_LIMIT = 256 * 1024 * 1024
# After message_stop the upstream's body should end at once; a channel that
# goes quiet instead is not waited for (read_timeout is minutes).
_END_AFTER_STOP = 5.0
# A stream whose client left is read on until its usage is final, for at most
# this long and this many bytes; past either bound the upstream connection is
# closed and the usage seen so far is what gets metered.
DRAIN_SECONDS = 30.0
DRAIN_BYTES = 4 * 1024 * 1024


class Relay:
    """One 2xx answer on its way to the client: the upstream connection it is
    read from, the client's Responder, the head that goes out, and the request's
    UsageRecord the outcome goes to.  The connection belongs to the caller's
    pool lease: a relay reads it, or closes it when its body is unusable, and
    never hands it back."""

    __slots__ = ("conn", "resp", "status", "headers", "record", "read_timeout")     # set by each kind

    async def run(self) -> None:
        raise NotImplementedError

    @property
    def upstream_refused(self) -> bool:
        """Whether the upstream's own error answered the request in-band (a stream's `event: error`)."""
        return False


class JsonRelay(Relay):
    """A whole (JSON) body: read it, take its usage, rename the model back, send it."""

    __slots__ = ("meter", "rename", "count_tokens")

    def __init__(self, conn: UpstreamConnection, resp: Responder, status: int, headers: list,
                 record: UsageRecord, read_timeout: float, meter: UsageMeter,
                 rename: Optional[tuple[str, str]], count_tokens: bool) -> None:
        self.conn, self.resp, self.status, self.headers = conn, resp, status, headers
        self.record, self.read_timeout = record, read_timeout
        self.meter = meter
        self.rename = rename            # (upstream's model name, the client's)
        self.count_tokens = count_tokens

    async def run(self) -> None:
        try:
            data = await self.conn.read_all(self.read_timeout, _RESPONSE_LIMIT)
        except UpstreamError as exc:
            self.upstream_failed(exc)
            return
        self.finish(data)

    def upstream_failed(self, exc: UpstreamError) -> None:
        status, etype = (504, "timeout_error") if exc.timeout else (502, "api_error")
        self.record.status, self.record.error_type = status, etype
        self.resp.send_error(status, f"upstream failed while sending the response: {exc}", etype)

    def finish(self, data: bytes, readable: bool = True) -> None:
        """Take the usage of `data` (unless not `readable`: then it stays unknown) and send it."""
        try:
            obj = orjson.loads(data) if readable else None
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            if not self.count_tokens:
                self.meter.body(obj)
            rename = self.rename
            if rename and obj.get("model") == rename[0]:
                obj["model"] = rename[1]
                data = exact_json.dumps(obj, data)
        record = self.record
        record.status = self.status
        if self.resp.client_gone:
            # Answered and billed upstream, but nobody took it.
            record.interrupted = True
            record.status, record.error_type = 499, "client_closed_request"
        self.resp.send(self.status, self.headers, data)


class EncodedRelay(JsonRelay):
    """A 2xx body in a content coding the gateway did not ask for (it asks for identity): a JSON body in gzip or
    deflate is decoded and goes on as any; anything else (another coding, a stream, a body that does not
    decode) goes to the client whole, as it came, with its coding named, and its usage stays unknown."""

    __slots__ = ("encoding", "decode")

    def __init__(self, conn: UpstreamConnection, resp: Responder, status: int, headers: list,
                 record: UsageRecord, read_timeout: float, meter: UsageMeter,
                 rename: Optional[tuple[str, str]], count_tokens: bool, encoding: bytes, decode: bool) -> None:
        super().__init__(conn, resp, status, headers, record, read_timeout, meter, rename, count_tokens)
        self.encoding = encoding        # lower-case (downstream_headers)
        self.decode = decode

    def finish(self, data: bytes, readable: bool = True) -> None:
        plain = _decoded(data, self.encoding) if self.decode else None
        if plain is not None:
            self.headers = [h for h in self.headers if h[0] != b"content-encoding"]
            super().finish(plain)
            return
        super().finish(data, readable=False)


def _decoded(data: bytes, coding: bytes) -> Optional[bytes]:
    """`data` decoded from gzip or deflate (zlib-wrapped or raw; `coding` lower-case), if whole and within the
    response limit."""
    if coding in (b"gzip", b"x-gzip"):
        tries = (31,)
    elif coding == b"deflate":
        tries = (15, -15)
    else:
        return None
    for wbits in tries:
        try:
            decoder = zlib.decompressobj(wbits)
            plain = decoder.decompress(data, _RESPONSE_LIMIT)
        except zlib.error:
            continue
        if decoder.eof and not decoder.unconsumed_tail:
            return plain
    return None


class StreamRelay(Relay):
    """An SSE body, spliced event by event as it arrives (see the module's
    docstring).  `run()` pumps the body into `piece()` and ends in one of
    `client_gone()`, `shutdown_cut()`, `upstream_failed()` or `finish()`."""

    __slots__ = ("splicer", "held")

    def __init__(self, conn: UpstreamConnection, resp: Responder, status: int, headers: list,
                 record: UsageRecord, read_timeout: float, splicer: SseSplicer) -> None:
        self.conn, self.resp, self.status, self.headers = conn, resp, status, headers
        self.record, self.read_timeout = record, read_timeout
        self.splicer = splicer
        # The body's last piece (message_stop, usually) is held back for the
        # write that ends our chunked body.
        self.held: list[bytes] = []

    async def run(self) -> None:
        conn, resp = self.conn, self.resp
        self.record.status = self.status
        # What came with the response head (often the opening events) goes out
        # with ours, in one write; a whole stream that came with it, ends in it.
        first = _feed(self.splicer, conn, b"".join(conn.buffered())) or b""
        if self.splicer.saw_stop:
            self._stopped()
        if conn.body_complete:
            if resp.client_gone:
                self.record.interrupted = True
            resp.start(self.status, self.headers, first + _stream_end(self.splicer, self.record), complete=True)
            return
        resp.start(self.status, self.headers, first)
        try:
            await conn.pump(self.piece, self.read_timeout, self.chunk if resp.chunked else None)
        except ClientGone:
            await self.client_gone()
            return
        except asyncio.CancelledError:
            if not resp.client_gone:
                self.shutdown_cut()
                raise
            # The cancellation only said the client left: the drain is this
            # task's work now (and shutdown may still cancel it).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self.client_gone()
            return
        except UpstreamError as exc:
            await self.upstream_failed(exc)
            return
        self.finish()

    def piece(self, piece: bytes) -> bool:
        """A piece of the body, inside the upstream socket callback: splice and
        write, no task switch.  False asks the connection to pause reading."""
        conn = self.conn
        try:                    # _feed(), inline: a call per read on the per-event path
            out = self.splicer.feed(piece)
        except EventTooLarge as exc:
            conn.abort(UpstreamError(str(exc), "body"))
            return False
        if self.splicer.saw_stop:
            # The message is complete: the body's end should follow at once.
            conn.expect_end(_END_AFTER_STOP)
            self._stopped()
        if not out:
            return True
        if conn.body_complete:
            self.held.append(out)
            return True
        resp = self.resp
        if not resp.write_nowait(out):
            resp.when_writable(conn.resume)
            return False
        return True

    def _stopped(self) -> None:
        """message_stop was read: its delta's usage is checkpointed unless the body ended in the same read (its
        final row follows at once); an upstream lingering after it may be cut or killed before the end."""
        splicer = self.splicer
        if splicer.unreported and not self.conn.body_complete:
            splicer.unreported = False
            splicer.meter.reported()

    def chunk(self, read: bytes, start: int) -> bool:
        """A read that is exactly one whole chunk of the body (its data is
        read[start:-2]), inside the upstream socket callback.  Events that end
        in it and need no look go out as they came, framing and all: the
        upstream's chunk is ours.  Anything else goes through `piece()`."""
        if read[-4:-2] == b"\n\n" and self.splicer.passes_through(read):
            resp = self.resp
            if not resp.write_chunk_nowait(read):
                resp.when_writable(self.conn.resume)
                return False
            return True
        return self.piece(read[start:-2])

    @property
    def upstream_refused(self) -> bool:
        return self.splicer.error is not None

    async def client_gone(self) -> None:
        """The client left: the rest is read for its usage (bounded), not sent.  How the upstream ended it
        counts as if the client had stayed: an in-band error, or a cut before message_stop, is the channel's
        failure all the same (its health, the row's error); the gateway's own drain limits are not."""
        record, splicer = self.record, self.splicer
        record.interrupted = True
        failure = await drain_stream(self.conn, splicer, self.read_timeout)
        if splicer.error is not None:
            record.error_type = splicer.error_type
        elif failure is not None and not splicer.saw_stop:
            record.error_type = "timeout_error" if failure.timeout else "api_error"
        self.resp.end()

    def shutdown_cut(self) -> None:
        """Shutdown's deadline cut the stream while the client still reads it:
        say so in-band; the connection then closes without the final chunk, so
        the stream never looks complete.  A message already whole (its
        message_stop read, the upstream lingering) ends as if its body had."""
        resp, record, splicer = self.resp, self.record, self.splicer
        if splicer.saw_stop:
            self.conn.close()
            resp.end(b"".join(self.held))
            return
        record.interrupted = True
        if self.held:
            resp.write_nowait(b"".join(self.held))
        # Usage already received but not yet forwarded still counts.
        try:
            for chunk in self.conn.buffered():
                splicer.feed(chunk)
        except EventTooLarge:
            pass
        self.conn.close()
        record.error_type = "gateway_stopped"       # the row's; the client is told it is overloaded (retryable)
        resp.write_nowait(sse_error_event("overloaded_error", "the gateway is shutting down"))

    async def upstream_failed(self, exc: UpstreamError) -> None:
        resp, record, splicer = self.resp, self.record, self.splicer
        splicer.drop_tail()
        if splicer.saw_stop or splicer.error is not None:
            # The message was complete, or the upstream already said in-band what
            # went wrong: a transport failure after that tells the client nothing.
            if splicer.error is not None:
                record.error_type = splicer.error_type
            last = b"".join(self.held)
            if last and resp.client_gone:
                record.interrupted = True
            resp.end(last)
            return
        etype = "timeout_error" if exc.timeout else "api_error"
        record.error_type = etype
        if not resp.client_gone:
            try:
                await resp.write(sse_error_event(etype, f"upstream stream failed: {exc}"))
            except ClientGone:
                record.interrupted = True
        resp.keep_alive = False
        resp.end()

    def finish(self) -> None:
        """The upstream ended the body cleanly."""
        last = b"".join(self.held) + _stream_end(self.splicer, self.record)
        if last and self.resp.client_gone:
            self.record.interrupted = True       # the stream's end found nobody to take it
        self.resp.end(last)


async def drain_stream(conn: UpstreamConnection, splicer: SseSplicer,
                       read_timeout: float) -> Optional[UpstreamError]:
    """Read the rest of a stream nobody will take, for its usage: the upstream
    bills what it generated, not what the client read.  Nothing is kept but the
    splicer's event tail.  Ends at the body's end (the connection can be reused),
    or after DRAIN_SECONDS or DRAIN_BYTES, or on an upstream failure (the
    connection is closed); the usage seen by then is what counts.  Returns the
    upstream's failure, if that is what ended it (None: the body's end, or the
    drain's own limits)."""
    drained = 0
    limited = False

    def sink(piece: bytes) -> bool:
        nonlocal drained, limited
        drained += len(piece)
        try:
            splicer.feed(piece)
        except EventTooLarge as exc:
            conn.abort(UpstreamError(str(exc), "body"))
            return False
        if drained > DRAIN_BYTES:
            limited = True
            conn.abort(UpstreamError(f"more than {DRAIN_BYTES} bytes after the client left", "body"))
            return False
        if splicer.saw_stop:
            conn.expect_end(_END_AFTER_STOP)
        return True

    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            await conn.pump(sink, read_timeout)
    except UpstreamError as exc:
        conn.close()
        return None if limited else exc
    except TimeoutError:
        conn.close()
    return None


def _stream_end(splicer: SseSplicer, record: UsageRecord) -> bytes:
    """What a stream the upstream ended cleanly still needs to send, and its outcome."""
    tail = splicer.flush()
    if splicer.error is not None:
        record.error_type = splicer.error_type
    elif not splicer.saw_stop:
        # A cleanly ended body that lacks message_stop is still a cut message.
        record.error_type = "api_error"
        tail += sse_error_event("api_error", "upstream ended the stream before message_stop")
    return tail


def _feed(splicer: SseSplicer, conn: UpstreamConnection, piece: bytes) -> Optional[bytes]:
    """The splicer's output for `piece`; None when the upstream overran the event
    size limit, and the connection is then failed (the stream ends in-band)."""
    try:
        return splicer.feed(piece)
    except EventTooLarge as exc:
        conn.abort(UpstreamError(str(exc), "body"))
        return None
