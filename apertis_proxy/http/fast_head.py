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
  Content-Length of digits, or `Transfer-Encoding: chunked` written exactly so
  (HTTP/1.1 only), or neither (read to close), never both;
- the whole head in the bytes given, within the size limit h11 applies.

Everything else (None here) goes to h11 exactly as before, which answers every
error: the fast path only ever declines.  tests/unit/test_fast_head_differential.py
holds the proof that whatever is accepted here, h11 accepts the same way.
"""
from __future__ import annotations

import re
from typing import Optional

from .heads import keeps_alive

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# A value: visible ASCII with inner spaces and tabs; the optional whitespace around it is not part of it.
_VALUE = rb"(?:[\x21-\x7e](?:[\x21-\x7e \t]*[\x21-\x7e])?)?"
# One header line, from the start of a line (the lookbehind) to its CRLF: findall() over the header block
# yields as many as the block has lines only if every line is of this shape.
_FIELD_RE = re.compile(rb"(?<=\n)(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*\r\n")
# The same lines split with single-byte stops only (the regex engine skips to a byte it is told, instead of
# testing a class per byte): the name up to the first colon, the value up to the CR.  What the classes
# checked is then checked on all names and all values at once (bytes.translate): see _split_fields.
_LOOSE_FIELD_RE = re.compile(rb"(?<=\n)([^:]+):[ \t]*([^\r]*)(?<![ \t])\r\n")
_TOKEN_BYTES = b"-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VALUE_BYTES = bytes(range(0x21, 0x7f)) + b" \t"
_REQUEST_LINE_RE = re.compile(rb"(GET|POST|HEAD|DELETE|PUT|PATCH|OPTIONS) (/[\x21-\x7e]*) HTTP/(1\.[01])")
_STATUS_LINE_RE = re.compile(rb"HTTP/(1\.[01]) ([2-5][0-9][0-9])(?: [\x21-\x7e \t]*)?")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# The upstream client's h11 bounds an incomplete response head at its default, 16 KiB.
RESPONSE_HEAD_LIMIT = 16 * 1024


class FastRequest:
    """A request head as h11.Request gives it to the server: bytes, names lower-cased."""

    __slots__ = ("method", "target", "http_version", "headers", "end", "length", "keep_alive")

    def __init__(self, method: bytes, target: bytes, http_version: bytes, headers: list[tuple[bytes, bytes]],
                 end: int, length: int, keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.end = end          # where the head ends in the bytes parsed: the body starts here
        self.length = length    # the body's Content-Length (0 without one)
        self.keep_alive = keep_alive    # heads.keeps_alive() of the version and headers


class FastResponse:
    """A final response head as h11.Response gives it: status, version, headers (names lower-cased)."""

    __slots__ = ("status_code", "http_version", "headers", "end", "keep_alive", "chunked", "length")

    def __init__(self, status_code: int, http_version: bytes, headers: list[tuple[bytes, bytes]], end: int,
                 keep_alive: bool = True, chunked: bool = False, length: Optional[int] = None) -> None:
        self.status_code = status_code
        self.http_version = http_version
        self.headers = headers
        self.end = end
        self.keep_alive = keep_alive    # heads.keeps_alive() of the version and headers
        self.chunked = chunked          # framed by `Transfer-Encoding: chunked`
        self.length = length            # else by this Content-Length; neither: read to close


def _fields(data: bytes, start: int, stop: int) -> Optional[tuple[list[tuple[bytes, bytes]], list[bytes]]]:
    """The header lines in data[start:stop] (each ended by CRLF) as (lower-case name, value), and the
    lower-case names alone (to count them in C); None if a line is not of the strict shape."""
    lines = data.count(b"\n", start, stop)
    if not lines:
        return [], []
    split = _split_fields(_LOOSE_FIELD_RE.findall(data, start, stop), lines)
    if split is not None:
        return split
    # Anything unusual (trailing whitespace in a value, or a line that is not of the strict shape): the
    # strict pattern decides, as it would on every head.  A bare LF would start a line the count of CRLFs
    # does not see.
    pairs = _FIELD_RE.findall(data, start, stop)
    if len(pairs) != lines or data.count(b"\r\n", start, stop) != lines:
        return None
    names, values = zip(*pairs)
    lowered = b"\n".join(names).lower().split(b"\n")
    return list(zip(lowered, values)), lowered


def _split_fields(pairs: list[tuple[bytes, bytes]], lines: int) -> Optional[tuple[list[tuple[bytes, bytes]],
                                                                                  list[bytes]]]:
    """What _FIELD_RE would give, from _LOOSE_FIELD_RE's matches, when there is one match per LF, every name
    is a token and every value of visible ASCII, spaces and tabs; else None.

    A match starts after an LF and ends with its line's CRLF, so one per LF means each line is one match
    (no bare LF anywhere).  A name cannot hold the CR a match across lines would put in it; a value stops at
    the first CR (a bare CR leaves its line unmatched).  The whitespace around a value is not in the group:
    [ \t]* takes all before it, and the lookbehind refuses a value ending with it (left to _FIELD_RE)."""
    if len(pairs) != lines:
        return None
    names, values = zip(*pairs)
    joined = b"\n".join(names)
    if (len(joined.translate(None, _TOKEN_BYTES)) != lines - 1            # the separators alone are left
            or b"".join(values).translate(None, _VALUE_BYTES)):
        return None
    lowered = joined.lower()
    if lowered == joined:
        # Every name lower-case already (as most APIs write them): the matches are the pairs.
        return pairs, list(names)
    names = lowered.split(b"\n")
    return list(zip(names, values)), names


def parse_request(data: bytes, limit: int) -> Optional[FastRequest]:
    """The request head at the start of `data` if it is of the common shape, complete
    and at most `limit` bytes long, else None."""
    end = data.find(b"\r\n\r\n", 0, limit) + 2
    line = data.find(b"\r\n", 0, end)
    m = _REQUEST_LINE_RE.fullmatch(data, 0, line) if end > 1 else None
    if m is None:
        return None
    fields = _fields(data, line + 2, end)
    if fields is None:
        return None
    headers, names = fields
    if b"transfer-encoding" in names or b"expect" in names or b"upgrade" in names:
        return None
    version = m.group(3)
    hosts = names.count(b"host")
    if hosts > 1 or (not hosts and version == b"1.1"):      # h11 refuses both
        return None
    # The find above kept the head (its bytes to the blank line, as the server measures it) within the limit;
    # this leaves heads near it, by a byte per header, to h11's path, which decides.
    if end + len(headers) > limit:
        return None
    length = _content_length(names, headers)
    if length < 0:
        return None
    return FastRequest(m.group(1), m.group(2), version, headers, end + 2, length,
                       _keeps_alive(version, names, headers))


def parse_response(data: bytes, limit: int = RESPONSE_HEAD_LIMIT) -> Optional[FastResponse]:
    """The final response head at the start of `data` if it is of the common shape,
    complete and at most `limit` bytes long, else None."""
    end = data.find(b"\r\n\r\n", 0, limit) + 2
    line = data.find(b"\r\n", 0, end)
    m = _STATUS_LINE_RE.fullmatch(data, 0, line) if end > 1 else None
    if m is None:
        return None
    fields = _fields(data, line + 2, end)
    if fields is None:
        return None
    headers, names = fields
    version = m.group(1)
    chunked = names.count(b"transfer-encoding")
    length: Optional[int] = None
    if chunked:
        # (An HTTP/1.0 answer with Transfer-Encoding is invalid: h11's path refuses it.)
        if chunked != 1 or b"content-length" in names or version != b"1.1":
            return None
        if headers[names.index(b"transfer-encoding")][1] != b"chunked":
            return None
    else:
        length = _content_length(names, headers)
        if length < 0:
            return None
        if not length and b"content-length" not in names:
            length = None
    return FastResponse(int(m.group(2)), version, headers, end + 2, _keeps_alive(version, names, headers),
                        chunked == 1, length)


def _keeps_alive(version: bytes, names: list[bytes], headers: list[tuple[bytes, bytes]]) -> bool:
    """heads.keeps_alive() of a parsed head, with the Connection header found by its name in C."""
    if version != b"1.1":
        return False
    count = names.count(b"connection")
    if not count:
        return True
    if count == 1:
        return headers[names.index(b"connection")][1].lower().find(b"close") < 0
    return keeps_alive(version, headers)


def _content_length(names: list[bytes], headers: list[tuple[bytes, bytes]]) -> int:
    """The one Content-Length, of 1-18 digits; 0 without one; -1 for anything else (h11 folds repeats and
    lists, and caps the digits: left to it)."""
    count = names.count(b"content-length")
    if not count:
        return 0
    if count != 1:
        return -1
    value = headers[names.index(b"content-length")][1]
    return int(value) if _DIGITS.fullmatch(value) is not None else -1


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
