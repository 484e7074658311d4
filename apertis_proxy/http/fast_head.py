"""Strict parsers for the common, well-formed HTTP/1.1 head; h11 is the fallback and the oracle.

h11 costs ~200k instructions to parse a request head and ~150k a response
head: half of a small proxied request.  Nearly every head is regular, so these
parsers accept only that shape, in a few C-level regex passes, and give the
exact result h11 gives for it:

- CRLF line ends only; header names that are tokens with no space before the
  colon; values of visible ASCII, space and tab (no obs-fold, no NUL, no bare
  CR or LF); the optional whitespace around a value removed, names lower-cased;
- a request: a known method, an origin-form target of visible ASCII, HTTP/1.1
  or 1.0, one Host (at most one for 1.0), at most one Content-Length of digits, no
  Transfer-Encoding, Expect or Upgrade;
- a response: HTTP/1.1 or 1.0, a final status (200-599), framed by at most one
  Content-Length of digits, or `Transfer-Encoding: chunked` written exactly so,
  or neither (read to close), never both;
- the whole head in the bytes given, within the size limit h11 applies.

Everything else (None here) goes to h11 exactly as before, which answers every
error: the fast path only ever declines.  tests/test_fast_head_differential.py
holds the proof that whatever is accepted here, h11 accepts the same way.
"""
from __future__ import annotations

import re
from typing import Optional

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# A value: visible ASCII with inner spaces and tabs; the optional whitespace around it is not part of it.
_VALUE = rb"(?:[\x21-\x7e](?:[\x21-\x7e \t]*[\x21-\x7e])?)?"
_FIELD = rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*\r\n"
_FIELDS = rb"(?:" + _TOKEN + rb":[ \t]*" + _VALUE + rb"[ \t]*\r\n)*"
_FIELD_RE = re.compile(_FIELD)
_REQUEST_RE = re.compile(rb"(GET|POST|HEAD|DELETE|PUT|PATCH|OPTIONS) (/[\x21-\x7e]*) HTTP/(1\.[01])\r\n("
                         + _FIELDS + rb")\r\n")
_RESPONSE_RE = re.compile(rb"HTTP/(1\.[01]) ([2-5][0-9][0-9])(?: [\x21-\x7e \t]*)?\r\n(" + _FIELDS + rb")\r\n")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# The upstream client's h11 bounds an incomplete response head at its default, 16 KiB.
RESPONSE_HEAD_LIMIT = 16 * 1024


class FastRequest:
    """A request head as h11.Request gives it to the server: bytes, names lower-cased."""

    __slots__ = ("method", "target", "http_version", "headers", "end")

    def __init__(self, method: bytes, target: bytes, http_version: bytes, headers: list[tuple[bytes, bytes]],
                 end: int) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.end = end          # where the head ends in the bytes parsed: the body starts here


class FastResponse:
    """A final response head as h11.Response gives it: status, version, headers (names lower-cased)."""

    __slots__ = ("status_code", "http_version", "headers", "end")

    def __init__(self, status_code: int, http_version: bytes, headers: list[tuple[bytes, bytes]], end: int) -> None:
        self.status_code = status_code
        self.http_version = http_version
        self.headers = headers
        self.end = end


def _fields(data: bytes, start: int, stop: int) -> list[tuple[bytes, bytes]]:
    return [(name.lower(), value) for name, value in _FIELD_RE.findall(data, start, stop)]


def parse_request(data: bytes, limit: int) -> Optional[FastRequest]:
    """The request head at the start of `data` if it is of the common shape, complete
    and at most `limit` bytes long, else None."""
    m = _REQUEST_RE.match(data, 0, limit)
    if m is None:
        return None
    start, stop = m.span(4)
    # Each header line starts after a CRLF, and no value holds one: counting
    # "\r\nname:" in the lower-cased head counts that header (C-level, no loop).
    lowered = data[m.start(4) - 2:stop].lower()
    if (lowered.find(b"\r\ntransfer-encoding:") >= 0 or lowered.find(b"\r\nexpect:") >= 0
            or lowered.find(b"\r\nupgrade:") >= 0):
        return None
    version = m.group(3)
    hosts = lowered.count(b"\r\nhost:")
    if hosts > 1 or (not hosts and version == b"1.1"):      # h11 refuses both
        return None
    headers = _fields(data, start, stop)
    if not _length_ok(lowered, headers):
        return None
    return FastRequest(m.group(1), m.group(2), version, headers, m.end())


def parse_response(data: bytes, limit: int = RESPONSE_HEAD_LIMIT) -> Optional[FastResponse]:
    """The final response head at the start of `data` if it is of the common shape,
    complete and at most `limit` bytes long, else None."""
    m = _RESPONSE_RE.match(data, 0, limit)
    if m is None:
        return None
    start, stop = m.span(3)
    lowered = data[start - 2:stop].lower()
    headers = _fields(data, start, stop)
    chunked = lowered.count(b"\r\ntransfer-encoding:")
    if chunked:
        if chunked != 1 or lowered.find(b"\r\ncontent-length:") >= 0:
            return None
        for name, value in headers:
            if name == b"transfer-encoding":
                if value != b"chunked":
                    return None
                break
    elif not _length_ok(lowered, headers):
        return None
    return FastResponse(int(m.group(2)), m.group(1), headers, m.end())


def _length_ok(lowered: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """No Content-Length, or one of 1-18 digits (h11 folds repeats and lists, and caps the digits)."""
    count = lowered.count(b"\r\ncontent-length:")
    if not count:
        return True
    if count != 1:
        return False
    for name, value in headers:
        if name == b"content-length":
            return _DIGITS.fullmatch(value) is not None
    return False  # pragma: no cover - counted above


class HeadCounts:
    """Heads parsed in this process, by side and parser (the metrics show them)."""

    __slots__ = ("request_fast", "request_h11", "response_fast", "response_h11")

    def __init__(self) -> None:
        self.request_fast = self.request_h11 = self.response_fast = self.response_h11 = 0

    def series(self) -> list:
        """[[side, parser], count] for each, as a metrics snapshot lists them."""
        return [[["request", "fast"], self.request_fast], [["request", "h11"], self.request_h11],
                [["response", "fast"], self.response_fast], [["response", "h11"], self.response_h11]]


COUNTS = HeadCounts()
