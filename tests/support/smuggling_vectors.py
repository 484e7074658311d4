"""Request-smuggling vectors as raw bytes: requests whose framing a front end and the gateway could read
differently, each followed by the request it would smuggle.  Shared by the gateway's end-to-end table
(tests/e2e/test_smuggling.py) and the fast head parser's differential tests."""
from __future__ import annotations

BODY = b'{"model":"claude-haiku-4-5-20251001","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
CHUNKED_BODY = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)


def head(*lines: bytes) -> bytes:
    return b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: KEY\r\n" + b"".join(
        line + b"\r\n" for line in lines) + b"\r\n"


VECTORS = {
    # Both framings: whichever one a front end picks, the other hides a request.
    "cl0-and-te": head(b"content-length: 0", b"transfer-encoding: chunked") + CHUNKED_BODY + SMUGGLED,
    "te-and-cl0": head(b"transfer-encoding: chunked", b"content-length: 0") + CHUNKED_BODY + SMUGGLED,
    "cl-and-te": head(b"content-length: %d" % len(CHUNKED_BODY), b"transfer-encoding: chunked")
    + CHUNKED_BODY + SMUGGLED,
    # Transfer-Encoding written in a way some parser reads differently.
    "te-value-capitalised": head(b"transfer-encoding: Chunked") + CHUNKED_BODY + SMUGGLED,
    "te-value-upper-case": head(b"Transfer-Encoding: CHUNKED") + CHUNKED_BODY + SMUGGLED,
    "te-obs-fold": head(b"transfer-encoding:", b" chunked") + CHUNKED_BODY + SMUGGLED,
    "te-obs-fold-tab": head(b"transfer-encoding:", b"\tchunked") + CHUNKED_BODY + SMUGGLED,
    "te-hidden-in-a-fold": head(b"x-note: a", b" transfer-encoding: chunked") + CHUNKED_BODY + SMUGGLED,
    "obs-fold-anywhere": head(b"content-length: %d" % len(BODY), b"x-note: a", b" b") + BODY + SMUGGLED,
    "te-identity-chunked": head(b"transfer-encoding: identity, chunked") + CHUNKED_BODY + SMUGGLED,
    "te-chunked-twice": head(b"transfer-encoding: chunked", b"transfer-encoding: chunked") + CHUNKED_BODY,
    "te-xchunked": head(b"transfer-encoding: xchunked") + CHUNKED_BODY + SMUGGLED,
    "te-space-before-colon": head(b"transfer-encoding : chunked") + CHUNKED_BODY + SMUGGLED,
    "te-gzip": head(b"transfer-encoding: gzip") + BODY + SMUGGLED,
    # Content-Length that is not one plain number.
    "cl-twice-differing": head(b"content-length: %d" % len(BODY), b"content-length: 5") + BODY + SMUGGLED,
    "cl-list": head(b"content-length: %d, 5" % len(BODY)) + BODY + SMUGGLED,
    "cl-plus-sign": head(b"content-length: +%d" % len(BODY)) + BODY + SMUGGLED,
    "cl-hex": head(b"content-length: 0x%x" % len(BODY)) + BODY + SMUGGLED,
    "cl-negative": head(b"content-length: -1") + BODY + SMUGGLED,
    # Chunk framing a front end may read otherwise.
    "chunk-size-hex-prefix": head(b"transfer-encoding: chunked") + b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY),
    "chunk-size-overflow": head(b"transfer-encoding: chunked") + b"f" * 40 + b"\r\n" + BODY + b"\r\n0\r\n\r\n",
    "chunk-missing-crlf": head(b"transfer-encoding: chunked") + b"%x\r\n%sXX0\r\n\r\n" % (len(BODY), BODY),
    # Heads that are not plain HTTP/1.1.
    "nul-in-header": head(b"x-note: a\x00b", b"content-length: 0") + SMUGGLED,
    "bare-cr-in-header": head(b"x-note: a\rb", b"content-length: 0") + SMUGGLED,
    "space-in-header-name": head(b"x note: a", b"content-length: 0") + SMUGGLED,
    "http-2-version": b"POST /v1/messages HTTP/2.0\r\nhost: x\r\ncontent-length: 0\r\n\r\n" + SMUGGLED,
    "no-host": b"POST /v1/messages HTTP/1.1\r\nx-api-key: KEY\r\ncontent-length: 0\r\n\r\n" + SMUGGLED,
    "two-hosts": head(b"host: other", b"content-length: 0") + SMUGGLED,
}
