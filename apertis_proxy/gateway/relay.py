"""Moving an upstream's answer to the client, once its head said 2xx.

`relay_json` reads a whole body, takes its usage and sends it.  `relay_stream`
splices an SSE body event by event as it arrives, inside the upstream socket's
callback: complete events go out as they come, the read that completes the
upstream's body goes out in the write that ends ours, and any failure after the
first byte becomes an in-band `event: error` (nothing is added after
message_stop: the answer was complete).  A stream whose client leaves is
still read to its end (bounded: `drain_stream`), because the upstream bills
what it generated.  Both record the outcome in the request's UsageRecord;
neither knows about channels or plugins.
"""
from __future__ import annotations

import asyncio
from typing import Optional

import orjson

from ..errors import sse_error_event
from ..http.protocol import ClientGone, Responder
from ..plugin_api import UsageRecord
from ..upstream.connection import UpstreamConnection, UpstreamError
from ..upstream.pool import Pool
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


async def relay_json(conn: UpstreamConnection, pool: Pool, resp: Responder, status: int, headers: list,
                     meter: UsageMeter, rename: Optional[tuple[str, str]], record: UsageRecord,
                     count_tokens: bool, read_timeout: float) -> None:
    """A whole (JSON) body: read it, take its usage, rename the model back, send it."""
    try:
        data = await conn.read_all(read_timeout, _RESPONSE_LIMIT)
    except asyncio.CancelledError:
        pool.discard(conn)
        raise
    except UpstreamError as exc:
        pool.discard(conn)
        status, etype = (504, "timeout_error") if exc.timeout else (502, "api_error")
        record.status, record.error_type = status, etype
        resp.send_error(status, f"upstream failed while sending the response: {exc}", etype)
        return
    pool.release(conn)
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        if not count_tokens:
            meter.body(obj)
        if rename and obj.get("model") == rename[0]:
            obj["model"] = rename[1]
            data = orjson.dumps(obj)
    record.status = status
    if resp.client_gone:
        # Answered and billed upstream, but nobody took it.
        record.interrupted = True
        record.status, record.error_type = 499, "client_closed_request"
    resp.send(status, headers, data)


async def relay_stream(conn: UpstreamConnection, pool: Pool, resp: Responder, status: int, headers: list,
                       splicer: SseSplicer, record: UsageRecord, read_timeout: float) -> None:
    """An SSE body, spliced event by event as it arrives (see the module's docstring)."""
    record.status = status
    # What came with the response head (often the opening events) goes out
    # with ours, in one write; a whole stream that came with it, ends in it.
    first = _feed(splicer, conn, b"".join(conn.buffered())) or b""
    if conn.body_complete:
        pool.release(conn)
        if resp.client_gone:
            record.interrupted = True
        resp.start(status, headers, first + _stream_end(splicer, record), complete=True)
        return
    resp.start(status, headers, first)
    # The body's last piece (message_stop, usually) is held back for the
    # write that ends our chunked body.
    held: list[bytes] = []

    def sink(piece: bytes) -> bool:
        # Runs inside the upstream socket callback: splice and write, no task switch.
        try:                    # _feed(), inline: a call per read on the per-event path
            out = splicer.feed(piece)
        except EventTooLarge as exc:
            conn.abort(UpstreamError(str(exc), "body"))
            return False
        if splicer.saw_stop:
            # The message is complete: the body's end should follow at once.
            conn.expect_end(_END_AFTER_STOP)
        if not out:
            return True
        if conn.body_complete:
            held.append(out)
            return True
        if not resp.write_nowait(out):
            resp.when_writable(conn.resume)
            return False
        return True

    try:
        await conn.pump(sink, read_timeout)
    except (ClientGone, asyncio.CancelledError) as exc:
        # The client left, or shutdown cut the stream at its deadline.
        record.interrupted = True
        if resp.client_gone:
            if isinstance(exc, asyncio.CancelledError):
                # The cancellation only said the client left: the drain below is
                # this task's work now (and shutdown may still cancel it).
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            await drain_stream(conn, pool, splicer, read_timeout)
            resp.end()
            return
        if held:
            resp.write_nowait(b"".join(held))
        # Usage already received but not yet forwarded still counts.
        try:
            for chunk in conn.buffered():
                splicer.feed(chunk)
        except EventTooLarge:
            pass
        pool.discard(conn)
        if isinstance(exc, asyncio.CancelledError):
            # Shutdown deadline: say so in-band; the connection then closes
            # without the final chunk, so the stream never looks complete.
            record.error_type = "overloaded_error"
            resp.write_nowait(sse_error_event("overloaded_error", "the gateway is shutting down"))
            raise
        resp.end()
        return
    except UpstreamError as exc:
        pool.discard(conn)
        splicer.drop_tail()
        if splicer.saw_stop or splicer.error is not None:
            # The message was complete, or the upstream already said in-band what
            # went wrong: a transport failure after that tells the client nothing.
            if splicer.error is not None:
                record.error_type = splicer.error_type
            last = b"".join(held)
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
        return
    pool.release(conn)
    last = b"".join(held) + _stream_end(splicer, record)
    if last and resp.client_gone:
        record.interrupted = True       # the stream's end found nobody to take it
    resp.end(last)


async def drain_stream(conn: UpstreamConnection, pool: Pool, splicer: SseSplicer, read_timeout: float) -> None:
    """Read the rest of a stream nobody will take, for its usage: the upstream
    bills what it generated, not what the client read.  Nothing is kept but the
    splicer's event tail.  Ends at the body's end (the connection goes back to
    the pool), or after DRAIN_SECONDS or DRAIN_BYTES, or on an upstream failure
    (the connection is closed); the usage seen by then is what counts."""
    drained = 0

    def sink(piece: bytes) -> bool:
        nonlocal drained
        drained += len(piece)
        try:
            splicer.feed(piece)
        except EventTooLarge as exc:
            conn.abort(UpstreamError(str(exc), "body"))
            return False
        if drained > DRAIN_BYTES:
            conn.abort(UpstreamError(f"more than {DRAIN_BYTES} bytes after the client left", "body"))
            return False
        if splicer.saw_stop:
            conn.expect_end(_END_AFTER_STOP)
        return True

    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            await conn.pump(sink, read_timeout)
    except (UpstreamError, TimeoutError):
        pool.discard(conn)
    except asyncio.CancelledError:
        pool.discard(conn)          # shutdown's deadline: meter what was seen
        raise
    else:
        pool.release(conn)


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
