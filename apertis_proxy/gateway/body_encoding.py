"""Compressed request bodies (`Content-Encoding`), decoded within the body limit.

`gzip` (also `x-gzip`) and `deflate` (zlib-wrapped, or raw as some clients send
it) are decoded; the result may not exceed the same limit as an uncompressed
body, and decoding stops as soon as it would, so a small bomb costs no more
memory than an honest body.  Errors carry the API's own codes:
413 `request_body_too_large_after_decoding`, 400 `request_body_encoding_invalid`
and `request_body_encoding_unsupported`.
"""
from __future__ import annotations

import zlib
from typing import Optional

from ..errors import GatewayError

_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
_STEP = 64 * 1024


def content_encodings(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The codings applied to the body, in the order they were applied (identity left out)."""
    out: list[bytes] = []
    for name, value in headers:
        if name == b"content-encoding":
            out += [c.strip().lower() for c in value.split(b",") if c.strip()]
    return [c for c in out if c != b"identity"]


def decode_body(body: bytes, headers: list[tuple[bytes, bytes]], limit: int) -> Optional[bytes]:
    """The decoded body, or None when it was not encoded; GatewayError when it cannot be."""
    codings = content_encodings(headers)
    if not codings:
        return None
    for coding in reversed(codings):
        wbits = _WBITS.get(coding)
        if wbits is None:
            raise GatewayError(400, f"content-encoding: {coding.decode('latin-1')} is not supported; "
                                    f"send gzip, deflate or an uncompressed body",
                               error_code="request_body_encoding_unsupported")
        body = _inflate(body, wbits, limit, coding)
    return body


def _inflate(data: bytes, wbits: int, limit: int, coding: bytes) -> bytes:
    try:
        return _inflate_with(data, wbits, limit)
    except zlib.error:
        if coding == b"deflate":
            try:
                return _inflate_with(data, -zlib.MAX_WBITS, limit)     # raw deflate, no zlib header
            except zlib.error:
                pass
    raise GatewayError(400, f"content-encoding: the body is not valid {coding.decode('latin-1')} data",
                       error_code="request_body_encoding_invalid")


def _inflate_with(data: bytes, wbits: int, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = bytearray()
    pending = data
    while pending:
        out += inflater.decompress(pending, _STEP)
        if len(out) > limit:
            raise GatewayError(413, f"request body exceeds {limit} bytes once decoded",
                               "request_too_large", error_code="request_body_too_large_after_decoding")
        pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    if not inflater.eof:
        raise zlib.error("truncated")
    return bytes(out)
