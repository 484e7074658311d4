"""A raw HTTP/1.1 client for tests that need exact bytes on the wire: pipelining, malformed requests, half-sent
bodies, a client that disconnects mid-stream. No HTTP library in between, so nothing gets fixed up.

    async with await RawConnection.open(host, port) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key}, json_body={...}))
        response = await conn.read_response()          # status, headers, body (de-chunked), chunks, raw
        response.json(); response.sse_events()

        await conn.send(...)                            # streaming, read as it comes:
        head = await conn.read_head()
        async for chunk in conn.iter_chunks(head): ...  # chunk payloads as they arrive; break to stop reading
        conn.abort()                                    # RST (or conn.close(): FIN)

`read_response(method="HEAD")` knows that HEAD answers have no body; a 1xx, 204 or 304 has none either.
Every read takes a `timeout` (default 10 s) and raises asyncio.TimeoutError instead of hanging a test.
"""
from __future__ import annotations

import asyncio
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

DEFAULT_TIMEOUT = 10.0
HeaderList = Union[dict[str, str], list[tuple[str, str]]]


def request_bytes(method: str, target: str, headers: Optional[HeaderList] = None, body: bytes = b"", *,
                  json_body: Any = None, host: str = "127.0.0.1", content_length: bool = True) -> bytes:
    """An HTTP/1.1 request, byte for byte: headers exactly as given (a list keeps duplicates and order), plus
    ``host`` and ``content-length`` unless present or `content_length` is False (e.g. for chunked bodies)."""
    if json_body is not None:
        body = json.dumps(json_body).encode()
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {name.lower() for name, _ in pairs}
    if "host" not in names:
        pairs.insert(0, ("host", host))
    if json_body is not None and "content-type" not in names:
        pairs.append(("content-type", "application/json"))
    if content_length and "content-length" not in names and "transfer-encoding" not in names:
        pairs.append(("content-length", str(len(body))))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs) + "\r\n"
    return head.encode("latin-1") + body


def chunked(*pieces: bytes) -> bytes:
    """A chunked body made of `pieces`, with the terminating zero chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]       # in order, names lower-cased
    body: bytes = b""                    # de-chunked
    chunks: Optional[list[bytes]] = None  # chunk payloads when the body was chunked
    raw: bytes = b""                     # the bytes as received (head and body)
    http_version: str = "1.1"

    def header(self, name: str) -> Optional[str]:
        values = self.header_values(name)
        return ", ".join(values) if values else None

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    @property
    def is_chunked(self) -> bool:
        return "chunked" in (self.header("transfer-encoding") or "").lower()

    def json(self) -> Any:
        return json.loads(self.body)

    def sse_events(self) -> list[tuple[Optional[str], str]]:
        return parse_sse(self.body)


def parse_sse(data: bytes) -> list[tuple[Optional[str], str]]:
    """(event name, data) per complete event, split on a blank line (LF, CRLF or CR line ends); a trailing event
    with no blank line after it is not complete and is left out, as SDKs do. Comment lines are skipped."""
    text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    events: list[tuple[Optional[str], str]] = []
    *complete, _rest = text.split("\n\n")
    for block in complete:
        name, lines = None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                lines.append(value)
        if name is not None or lines:
            events.append((name, "\n".join(lines)))
    return events


class RawConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self._received = bytearray()   # everything read for the response in progress (for RawResponse.raw)

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> "RawConnection":
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def __aenter__(self) -> "RawConnection":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    # -- sending --------------------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, method: str, target: str, headers: Optional[HeaderList] = None, body: bytes = b"", *,
                      json_body: Any = None, timeout: float = DEFAULT_TIMEOUT) -> RawResponse:
        """Send one request and read its whole response."""
        await self.send(request_bytes(method, target, headers, body, json_body=json_body))
        return await self.read_response(method=method, timeout=timeout)

    def close(self) -> None:
        """Close our side (FIN)."""
        if not self.writer.is_closing():
            self.writer.close()

    def abort(self) -> None:
        """Reset the connection (RST): the harshest way for a client to go away."""
        sock = self.writer.transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: close() sends RST even when nothing is left unread.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    # -- reading --------------------------------------------------------------------------------------------

    async def _read_line(self, timeout: float) -> bytes:
        line = await asyncio.wait_for(self.reader.readuntil(b"\n"), timeout)
        self._received += line
        return line

    async def _read_exact(self, n: int, timeout: float) -> bytes:
        data = await asyncio.wait_for(self.reader.readexactly(n), timeout)
        self._received += data
        return data

    async def read_head(self, timeout: float = DEFAULT_TIMEOUT) -> RawResponse:
        """Read a status line and headers; raises asyncio.IncompleteReadError if the peer closed first."""
        self._received = bytearray()
        status_line = (await self._read_line(timeout)).decode("latin-1").rstrip("\r\n")
        version, status, *reason = status_line.split(" ", 2)
        headers: list[tuple[str, str]] = []
        while (line := (await self._read_line(timeout)).decode("latin-1").rstrip("\r\n")):
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        return RawResponse(status=int(status), reason=reason[0] if reason else "", headers=headers,
                           http_version=version.removeprefix("HTTP/"))

    async def iter_chunks(self, head: RawResponse, timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[bytes]:
        """Yield the body's chunk payloads (or, without chunking, whatever arrives) as they come in."""
        if head.is_chunked:
            while True:
                size_line = (await self._read_line(timeout)).decode("latin-1")
                size = int(size_line.split(";")[0].strip(), 16)
                if size == 0:
                    while (await self._read_line(timeout)) not in (b"\r\n", b"\n"):
                        pass  # trailers
                    return
                data = await self._read_exact(size, timeout)
                await self._read_exact(2, timeout)  # CRLF after the payload
                yield data
        elif head.header("content-length") is not None:
            remaining = int(head.header("content-length"))
            while remaining:
                data = await asyncio.wait_for(self.reader.read(remaining), timeout)
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                self._received += data
                remaining -= len(data)
                yield data
        else:  # close-delimited
            while data := await asyncio.wait_for(self.reader.read(65536), timeout):
                self._received += data
                yield data

    async def read_response(self, *, method: str = "POST", timeout: float = DEFAULT_TIMEOUT) -> RawResponse:
        """Read one whole response (interim 1xx responses are skipped)."""
        while True:
            response = await self.read_head(timeout)
            if not 100 <= response.status < 200 or response.status == 101:
                break
        if method != "HEAD" and response.status not in (204, 304):
            pieces = [piece async for piece in self.iter_chunks(response, timeout)]
            response.body = b"".join(pieces)
            response.chunks = pieces if response.is_chunked else None
        response.raw = bytes(self._received)
        return response

    async def read_until_eof(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Everything until the peer closes."""
        data = await asyncio.wait_for(self.reader.read(), timeout)
        self._received += data
        return data

    async def wait_closed_by_peer(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """True when the peer closes (EOF or reset) within `timeout` without sending more; False when data came
        or the time ran out."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except asyncio.TimeoutError:  # before OSError: in 3.11 TimeoutError is one
            return False
        except (ConnectionError, OSError):
            return True
        return data == b""
