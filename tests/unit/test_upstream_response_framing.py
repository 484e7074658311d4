"""Upstream response heads whose framing is irregular, read by UpstreamConnection with the fast head path on and off
(the fast parser declines all of these but the last table: h11 reads them). A head with both Content-Length and
Transfer-Encoding may be a response-splitting attempt (RFC 9112 section 6.3: "ought to be handled as an error"): its
body is read by the chunked framing, and the connection is never reused, as after any answer whose end is in doubt.
Transfer codings other than plain chunked, chunked twice, Transfer-Encoding in an HTTP/1.0 answer (RFC 9112 section
6.1) and an unasked-for 101 are upstream errors; a 204 or 304 carrying a body, and HTTP/1.0 answers, end the
connection's reuse."""
from __future__ import annotations

import pytest

from apertis_proxy.upstream.connection import UpstreamConnection, UpstreamError
from tests.support.scripted_upstream import BODY, OK, ScriptedUpstream, connect, exchange

CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
PARSERS = pytest.mark.parametrize("fast", [True, False], ids=["fast-heads", "h11-only"])


def head(status: bytes, *lines: bytes) -> bytes:
    return status + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


@PARSERS
@pytest.mark.parametrize("answer", [
    head(b"HTTP/1.1 200 OK", b"content-length: 5", b"transfer-encoding: chunked") + CHUNKED,
    head(b"HTTP/1.1 200 OK", b"transfer-encoding: chunked", b"content-length: %d" % len(CHUNKED)) + CHUNKED,
], ids=["length-then-chunked", "chunked-then-length"])
async def test_answer_with_both_framings_is_read_chunked_and_never_reused(monkeypatch, fast, answer):
    monkeypatch.setattr(UpstreamConnection, "fast_heads", fast)
    async with ScriptedUpstream([[answer]]) as upstream:
        conn = await connect(upstream.port)
        assert await exchange(conn) == (200, BODY)
        reused = conn.recycle()
        conn.close()
    assert not reused


@PARSERS
@pytest.mark.parametrize("answer", [
    head(b"HTTP/1.1 200 OK", b"transfer-encoding: gzip, chunked") + CHUNKED,
    head(b"HTTP/1.1 200 OK", b"transfer-encoding: chunked", b"transfer-encoding: chunked") + CHUNKED,
    head(b"HTTP/1.1 200 OK", b"transfer-encoding: chunked, chunked") + CHUNKED,
    head(b"HTTP/1.1 101 Switching Protocols", b"upgrade: websocket", b"connection: upgrade"),
    head(b"HTTP/1.1 200 OK", b"content-length: +%d" % len(BODY)) + BODY,
    head(b"HTTP/1.1 200 OK", b"content-length: %d, 5" % len(BODY)) + BODY,
    head(b"HTTP/1.0 200 OK", b"transfer-encoding: chunked") + CHUNKED,
], ids=["gzip-chunked", "chunked-twice", "chunked-listed-twice", "101", "length-signed", "lengths-differing",
        "http-1.0-chunked"])
async def test_irregular_framing_is_an_upstream_error(monkeypatch, fast, answer):
    monkeypatch.setattr(UpstreamConnection, "fast_heads", fast)
    async with ScriptedUpstream([[answer]]) as upstream:
        conn = await connect(upstream.port)
        with pytest.raises(UpstreamError):
            await exchange(conn)
        conn.close()


@PARSERS
@pytest.mark.parametrize("answer,expected", [
    (head(b"HTTP/1.1 204 No Content", b"content-length: 5") + b"hello", (204, b"")),
    (head(b"HTTP/1.1 304 Not Modified", b"transfer-encoding: chunked") + b"0\r\n\r\n", (304, b"")),
    (head(b"HTTP/1.0 200 OK", b"content-length: %d" % len(BODY)) + BODY, (200, BODY)),
    (head(b"HTTP/1.0 200 OK", b"connection: keep-alive", b"content-length: %d" % len(BODY)) + BODY, (200, BODY)),
    (head(b"HTTP/1.1 200 OK", b"Connection: keep-alive, Close", b"content-length: %d" % len(BODY)) + BODY,
     (200, BODY)),
], ids=["204-with-body", "304-with-body", "http-1.0", "http-1.0-keep-alive", "close-in-a-list"])
async def test_answers_that_end_reuse(monkeypatch, fast, answer, expected):
    monkeypatch.setattr(UpstreamConnection, "fast_heads", fast)
    async with ScriptedUpstream([[answer]]) as upstream:
        conn = await connect(upstream.port)
        assert await exchange(conn) == expected
        reused = conn.recycle()
        conn.close()
    assert not reused


@PARSERS
@pytest.mark.parametrize("answer", [
    head(b"HTTP/1.1 200 OK", b"Content-Length: 0%d" % len(BODY)) + BODY,
    head(b"HTTP/1.1 200 OK", b"CONTENT-LENGTH:   %d  " % len(BODY)) + BODY,
    head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: Chunked") + CHUNKED,
    head(b"HTTP/1.1 200", b"content-length: %d" % len(BODY)) + BODY,
], ids=["length-leading-zero", "length-upper-case-spaced", "chunked-capitalised", "no-reason"])
async def test_regular_variants_are_read_and_reused(monkeypatch, fast, answer):
    monkeypatch.setattr(UpstreamConnection, "fast_heads", fast)
    async with ScriptedUpstream([[answer], [OK]]) as upstream:
        conn = await connect(upstream.port)
        assert await exchange(conn) == (200, BODY)
        assert conn.recycle()
        assert await exchange(conn) == (200, BODY)
        conn.close()
