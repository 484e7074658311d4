"""Upstream response body framing, decoded by hand.

h11 parses and validates the response head; the body is then decoded here
because h11 yields one event per chunk (~3.7 us each, measured), and an SSE
stream is one chunk per event.  These decoders return everything a network
read completed as ONE bytes object, so the splice and the client write happen
once per read instead of once per event.
"""
from __future__ import annotations

import itertools
import re
from typing import Optional

_MAX_SIZE_LINE = 1024


class FramingError(Exception):
    pass


class BodyDecoder:
    """feed(data) -> body bytes now available; `done` once the body ended;
    `leftover` holds bytes past the end (a pipelined response: not reusable)."""

    done = False
    leftover = b""

    def feed(self, data: bytes) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def eof(self) -> None:
        """The connection closed: fine only for a close-delimited body."""
        if not self.done:
            raise FramingError("upstream closed the connection before the body ended")


class LengthDecoder(BodyDecoder):
    __slots__ = ("remaining", "done", "leftover")

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.done = length == 0
        self.leftover = b""

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.leftover += data
            return b""
        if len(data) < self.remaining:
            self.remaining -= len(data)
            return data
        body, self.leftover = data[:self.remaining], data[self.remaining:]
        self.remaining = 0
        self.done = True
        return body


class CloseDecoder(BodyDecoder):
    """No length and not chunked: the body runs until the connection closes."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes) -> bytes:
        return data

    def eof(self) -> None:
        self.done = True


class ChunkedDecoder(BodyDecoder):
    __slots__ = ("_buf", "_remaining", "_crlf", "_trailers", "done", "leftover")

    def __init__(self) -> None:
        self._buf = b""
        self._remaining = 0      # bytes of chunk data still expected
        self._crlf = False       # the CRLF after a chunk's data is expected next
        self._trailers = False   # after the last chunk: trailer lines until an empty one
        self.done = False
        self.leftover = b""

    def one_chunk(self, data: bytes) -> int:
        """Where the chunk data starts when `data` is exactly one whole chunk, not
        the last, its size in lowercase hex, read at a chunk boundary (the common read of
        a paced stream); 0 otherwise.  Such a read is decoded by this test alone:
        its piece of the body is data[start:-2] and the state stays as it is.
        Never raises: anything irregular is left to feed(), which says what is wrong."""
        # (After the last chunk _trailers stays set: it covers `done` too.)
        if self._buf or self._remaining or self._crlf or self._trailers:
            return 0
        # partition(): one argument to parse where find() has three, and the line comes with it.
        line, _, _ = data.partition(b"\r\n")
        size = len(data) - len(line) - 4
        # Only the size as it is usually written (lowercase hex, no leading zero, no
        # extension) is read here: strict by construction, and one format is cheaper
        # than validating the digits and int().  Any other is left to feed().
        if size > 0 and line == b"%x" % size and data[-2:] == b"\r\n":
            return len(line) + 2
        return 0

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.leftover += data
            return b""
        start = self.one_chunk(data)
        if start:
            # The common read of a paced stream: exactly one whole chunk.
            return data[start:-2]
        return self.feed_irregular(data)

    def feed_irregular(self, data: bytes) -> bytes:
        """feed() of a read that one_chunk() declined (not tried again)."""
        if self.done:
            self.leftover += data
            return b""
        buf = self._buf + data if self._buf else data
        self._buf = b""
        end = len(buf)
        pos = 0
        out: list[bytes] = []
        append = out.append
        # The end of a chunk an earlier read began.
        if self._remaining:
            take = min(self._remaining, end)
            append(buf[:take])
            pos = take
            self._remaining -= take
            if self._remaining:
                return out[0]
            self._crlf = True
        if self._crlf:
            if end - pos < 2:
                self._buf = buf[pos:]
                return b"".join(out)
            if buf[pos:pos + 2] != b"\r\n":
                raise FramingError("malformed chunked body: missing CRLF after chunk data")
            pos += 2
            self._crlf = False
        # A large read of many small chunks (a stream sent in bulk): decode
        # them in a few C-level passes instead of a Python step per chunk.
        if end - pos >= _BULK and not self._trailers:
            bulk = _split_chunks(buf, pos)
            if bulk is not None:
                datas, pos = bulk
                out += datas
        # Whole chunks, the common case (an SSE stream is one chunk per event):
        # one find, one int() and one slice each.
        find = buf.find
        while pos < end:
            nl = find(b"\r\n", pos)
            if nl < 0:
                if end - pos > _MAX_SIZE_LINE:
                    raise FramingError("malformed chunked body: size line too long")
                break
            if self._trailers:
                # Trailer lines after the last chunk, ended by an empty line.
                empty = nl == pos
                pos = nl + 2
                if empty:
                    self.done = True
                    self.leftover = buf[pos:]
                    pos = end
                    break
                continue
            size = _chunk_size(buf[pos:nl])
            start = nl + 2
            if size == 0:
                self._trailers = True
                pos = start
                continue
            stop = start + size
            if stop + 2 <= end:
                if buf[stop:stop + 2] != b"\r\n":
                    raise FramingError("malformed chunked body: missing CRLF after chunk data")
                append(buf[start:stop])
                pos = stop + 2
                continue
            # A chunk this read does not complete.
            if stop <= end:
                append(buf[start:stop])
                self._crlf = True
                pos = stop
            else:
                append(buf[start:])
                self._remaining = stop - end
                pos = end
            break
        if pos < end:
            self._buf = buf[pos:]
        if len(out) == 1:
            return out[0]
        return b"".join(out)


_BULK = 4096                            # bytes left in a read that make the bulk path worth a try
_X = (b"x", b"X")
_HEX_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]*")


def _chunk_size(line: bytes) -> int:
    """The size on a chunk's size line, strictly: hex digits, an optional extension."""
    # A bare size (what every chunk carries in practice) is checked without a
    # regex: measured, the match cost more than the rest of the decoding loop.
    # int() alone would also take "0x1f", "+5", "1_0" or padding.
    if line.isalnum() and len(line) <= 16 and line[1:2] not in _X:
        try:
            return int(line, 16)
        except ValueError:
            raise FramingError(f"malformed chunk size {line[:20]!r}") from None
    token = line.split(b";", 1)[0].strip(b" \t")
    if not _HEX_SIZE.fullmatch(token):
        raise FramingError(f"malformed chunk size {line[:20]!r}")
    return int(token, 16)


def _split_chunks(buf: bytes, pos: int) -> Optional[tuple[list[bytes], int]]:
    """The data of the complete, non-final chunks at buf[pos:] and the position
    after them, from one split on CRLF and checks over whole lists.  None when
    the bytes do not fit that shape (chunk data holding a CRLF, extensions):
    the per-chunk loop then decodes them, strictly."""
    region = buf[pos:] if pos else buf
    parts = region.split(b"\r\n")
    pairs = (len(parts) - 1) // 2       # (size, data) pairs with the data's CRLF seen
    if pairs < 2:
        return None
    sizes = parts[0:2 * pairs:2]
    datas = parts[1:2 * pairs:2]
    # Hex digits only (int() alone would take "0x1f", "+5" or "1_0"); an empty
    # size fails int(), and one too long to be real fails the length check.
    if not _HEX_DIGITS.fullmatch(b"".join(sizes)):
        return None
    try:
        lengths = list(map(int, sizes, itertools.repeat(16)))
    except ValueError:
        return None
    taken = pairs
    if 0 in lengths:                        # the last chunk: leave it to the loop
        taken = lengths.index(0)
        datas, lengths = datas[:taken], lengths[:taken]
    if not taken or list(map(len, datas)) != lengths:
        return None
    # The split's pieces rejoin to the region, so what follows the taken chunks
    # is the rejoined rest (short: the tail of the read), not a sum over them.
    return datas, pos + len(region) - len(b"\r\n".join(parts[2 * taken:]))


def decoder_for(status: int, headers: list[tuple[bytes, bytes]]) -> BodyDecoder:
    """The body framing of a response to a POST (RFC 9112 section 6.3)."""
    if status < 200 or status in (204, 304):
        return LengthDecoder(0)
    length: Optional[int] = None
    for name, value in headers:
        if name == b"transfer-encoding":
            if value.lower().split(b",")[-1].strip() == b"chunked":
                return ChunkedDecoder()
            return CloseDecoder()
        if name == b"content-length":
            length = int(value)     # h11 already validated it
    return framed_decoder(status, False, length)


def framed_decoder(status: int, chunked: bool, length: Optional[int]) -> BodyDecoder:
    """decoder_for() of a head whose framing is known: chunked, or a Content-Length, or neither."""
    if status < 200 or status in (204, 304):
        return LengthDecoder(0)
    if chunked:
        return ChunkedDecoder()
    if length is not None:
        return LengthDecoder(length)
    return CloseDecoder()
