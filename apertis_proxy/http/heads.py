"""HTTP/1.1 message heads: h11's header lists read fast, keep-alive, and
response heads written from bytes."""
from __future__ import annotations

from http import HTTPStatus
from typing import Iterable, Optional


def header_list(headers) -> list[tuple[bytes, bytes]]:
    """h11's Headers as a plain list of (lower-case name, value).

    Iterating h11's Headers goes through the Sequence ABC, a Python call per
    item; this reads its item list once (with a public fallback)."""
    items = getattr(headers, "_full_items", None)
    if items is None:
        return list(headers)
    return [(name, value) for _, name, value in items]


_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_REASONS[529] = b"Overloaded"
_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))
        _STATUS_LINES[status] = line
    return line


def keeps_alive(http_version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a message (request or response) lets its connection carry another:
    HTTP/1.1 without `connection: close`."""
    if http_version != b"1.1":
        return False
    for name, value in headers:
        if name == b"connection" and value.lower().find(b"close") >= 0:
            return False
    return True


def checked(value: bytes) -> bytes:
    """Header injection guard for values we did not parse ourselves (upstream,
    plugins, channel settings)."""
    # find(), not `in`: on CPython 3.11 `bytes in bytes` first tries the
    # operand as an int and raises and clears a TypeError (measured, callgrind).
    if value.find(b"\r") >= 0 or value.find(b"\n") >= 0:
        raise ValueError("header value contains a line break")
    return value


def build_head(status: int, headers: Iterable[tuple[bytes, bytes]], *, content_length: Optional[int],
               keep_alive: bool, chunked: bool = True) -> bytes:
    """Serialize a response head.  Without a content_length the body is chunked,
    or (chunked=False, HTTP/1.0) delimited by closing the connection."""
    if not isinstance(headers, list):
        headers = list(headers)
    parts = [status_line(status)]
    if headers:
        # The header lines joined in C (no Python step per header), and every value
        # checked at once: the block holds exactly the line breaks put between its
        # lines unless a name or a value has one, and then each value is checked as
        # checked() does (a name with one is not refused, as before).
        block = b"\r\n".join(map(b": ".join, headers))
        breaks = len(headers) - 1
        if block.count(b"\r") != breaks or block.count(b"\n") != breaks:
            for _, value in headers:
                checked(value)
        parts.append(block)
        parts.append(b"\r\n")
    if content_length is None:
        if chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
    else:
        parts.append(b"content-length: %d\r\n" % content_length)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
