"""How a handler answers one request: `Responder`, bound to one server connection."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable, Optional

from ..flow_control import SMALL_WRITE
from .heads import build_head

if TYPE_CHECKING:
    from .protocol import HttpConnection

# What an error answer's body is made of: (status, message, error type or None,
# request id) -> (content type, body).  The application supplies it (the HTTP
# layer does not know the API's error shape).
ErrorRenderer = Callable[[int, str, Optional[str], str], tuple[bytes, bytes]]


class ClientGone(Exception):
    """The client closed the connection while a response was being written."""


class Responder:
    """How a handler answers one request.  Either `send()` once, or
    `start()` + `write()`* + `end()` for a streamed (chunked) response.
    To a HEAD request `send()` and `start()` write the head only (no route
    streams to HEAD: only POST endpoints stream)."""

    __slots__ = ("_conn", "request_id", "started", "finished", "status", "keep_alive", "_chunked",
                 "abandon_on_disconnect", "_task", "head_only", "_left", "_held", "extra_headers")

    def __init__(self, conn: "HttpConnection", request_id: str, keep_alive: bool,
                 head_only: bool = False) -> None:
        self._conn = conn
        self.request_id = request_id
        # A HEAD request: its answer is the head the same GET would get, without
        # the body (a body here would be read as the start of the next response).
        self.head_only = head_only
        self.started = False
        self.finished = False
        self.status = 0
        self.keep_alive = keep_alive
        self._chunked = False
        # Set by a handler whose work is worthless once the client left, even
        # before the response starts (a stream nobody will read).
        self.abandon_on_disconnect = False
        self._task: Optional[asyncio.Task] = None   # the handler's, set by the connection
        self._left = False      # the handler was cancelled because the client went away
        # While a list: the response's end is kept back here until release()
        # (the usage row is made durable first; see hold_end()).
        self._held: Optional[list] = None
        # Headers every answer to this request carries, whichever part of the handler sends it (the CORS
        # headers of a browser page's request); set before answering.
        self.extra_headers: Optional[list[tuple[bytes, bytes]]] = None

    @property
    def client_gone(self) -> bool:
        """The client went away: closed, or (for work abandoned on disconnect) half-closed.
        A handler cancelled while this is false was cancelled by shutdown."""
        return self._left or self._conn.closed

    def client_left(self) -> None:
        """Cancel the handler, once, because its client went away: it can still
        finish its own bookkeeping (client_gone tells it why it was cancelled)."""
        if not self._left and not self.finished and self._task is not None:
            self._left = True
            self._task.cancel()

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], length: Optional[int]) -> bytes:
        if self._conn.state.draining:
            self.keep_alive = False
        if self.extra_headers is not None:
            headers += self.extra_headers
        headers.append((b"request-id", self.request_id.encode()))
        if length == 0 and status == 204:   # sent whole; RFC 9110: a 204 has no Content-Length
            return build_head(status, headers, content_length=None, keep_alive=self.keep_alive, chunked=False)
        return build_head(status, headers, content_length=length, keep_alive=self.keep_alive,
                          chunked=length is None and self._conn.http11)

    def hold_end(self) -> None:
        """Keep the response's last bytes back until `release()`: a whole `send()`,
        or a stream's final piece and end.  The handler meters the request in
        between, so a client never holds a complete answer whose usage row is
        not yet durable."""
        self._held = []

    @property
    def ended(self) -> bool:
        """The response's end was written, or is kept back by `hold_end()`."""
        return self.finished or bool(self._held)

    def release(self) -> None:
        """Send what `hold_end()` kept back, if anything; stop holding."""
        held, self._held = self._held, None
        if held:
            kind, head, data = held
            if kind == "send":
                self._send_now(head, data)
            else:
                self._finish(head, data)

    def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A complete response with a content-length."""
        assert not self.started
        self.started = True
        self.status = status
        head = self._head(status, headers, len(body))
        if self.head_only:
            body = b""
        if self._held is not None:
            self._held[:] = ("send", head, body)
            return
        self._send_now(head, body)

    def _send_now(self, head: bytes, body: bytes) -> None:
        if len(body) < SMALL_WRITE:
            self._conn.write(head + body)
        else:
            self._conn.write(head, body)
        self.finished = True
        self._conn.response_done(self)

    def send_error(self, status: int, message: str, error_type: Optional[str] = None,
                   headers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
        ctype, body = self._conn.state.render_error(status, message, error_type, self.request_id)
        self.send(status, [(b"content-type", ctype)] + list(headers or ()), body)

    def start(self, status: int, headers: list[tuple[bytes, bytes]], first: bytes = b"", *,
              complete: bool = False) -> None:
        """Start a streamed response: chunked, or close-delimited for HTTP/1.0 clients.
        `first`, the body's first piece if already at hand, goes out in the same
        write as the head (one socket call less); with `complete` it is the whole
        body, and the response ends in that write too."""
        assert not self.started
        self.started = True
        self.status = status
        self._chunked = self._conn.http11
        if not self._chunked:
            self.keep_alive = False
        head = self._head(status, headers, None)
        if complete or self.head_only:
            self._finish(head, b"" if self.head_only else first)
            return
        if first:
            head += self._piece(first)
        self._conn.write(head)

    async def write(self, data: bytes) -> None:
        """Send one piece of a streamed body; waits while the client is slow."""
        if not data:
            return
        conn = self._conn
        if conn.closed:
            raise ClientGone()
        self._frame(data)
        if conn.flow.write_paused:
            await conn.drain()

    def write_nowait(self, data: bytes) -> bool:
        """Send one piece without waiting (for callbacks); False once the client
        is behind: stop producing and use `when_writable`."""
        conn = self._conn
        if conn.closed:
            return True     # nothing to pace: the handler is being cancelled
        self._frame(data)
        return not conn.flow.write_paused

    @property
    def chunked(self) -> bool:
        """The streamed body goes out in chunks (an HTTP/1.1 client): what
        `write_chunk_nowait` takes."""
        return self._chunked

    def write_chunk_nowait(self, chunk: bytes) -> bool:
        """`write_nowait` of a piece already framed as one chunk (a chunked body only)."""
        conn = self._conn
        if conn.closed:
            return True
        conn.transport.write(chunk)
        return not conn.flow.write_paused

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the client has drained below the high-water mark."""
        flow = self._conn.flow
        if flow.write_paused:
            flow.on_writable = callback
        else:
            callback()

    def _piece(self, data: bytes) -> bytes:
        """One piece of the body as it goes on the wire (a chunk, or as is for HTTP/1.0)."""
        return b"%x\r\n" % len(data) + data + b"\r\n" if self._chunked else data

    def _frame(self, data: bytes) -> None:
        """Write one piece; the caller has checked that the connection is open."""
        transport = self._conn.transport
        if not self._chunked or len(data) < SMALL_WRITE:
            transport.write(self._piece(data))
        else:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))

    def end(self, last: bytes = b"") -> None:
        """End a streamed response.  `last`, the body's final piece if any, goes
        out in the same write as the end of the chunked body (one socket call,
        and one wake-up of the client, less per stream)."""
        if not self.finished:
            self._finish(b"", last)

    def _finish(self, head: bytes, last: bytes) -> None:
        if self._held is not None:
            self._held[:] = ("end", head, last)
            return
        self.finished = True
        if not self._conn.closed:
            end = b"0\r\n\r\n" if self._chunked and not self.head_only else b""
            if len(last) >= SMALL_WRITE and self._chunked:
                self._conn.write(head + b"%x\r\n" % len(last), last, b"\r\n" + end)
            elif head or last or end:
                self._conn.write(head + (self._piece(last) if last else b"") + end)
        self._conn.response_done(self)
