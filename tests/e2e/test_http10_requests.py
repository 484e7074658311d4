"""HTTP/1.0 requests, with the fast head path on and off. RFC 9112 section 6.1: a server that receives an HTTP/1.0
message with Transfer-Encoding MUST treat its framing as faulty (an HTTP/1.0 front end does not know chunked and
frames the body otherwise): refused with a 400 and closed, nothing upstream, like the other framing vectors of
test_smuggling.py. An HTTP/1.0 request with a Content-Length is served and its connection closed, with or without
`Connection: keep-alive`, with or without Host; two Hosts are refused."""
from __future__ import annotations

import pytest

from tests.support.rawhttp import RawConnection
from tests.support.smuggling_vectors import BODY, CHUNKED_BODY, SMUGGLED

BOTH_PATHS = pytest.mark.parametrize("gateway", [{}, {"fast_heads": False}], ids=["fast-heads", "h11-only"],
                                     indirect=True)


def head(key: str, *lines: bytes) -> bytes:
    return (b"POST /v1/messages HTTP/1.0\r\nx-api-key: %s\r\ncontent-type: application/json\r\n" % key.encode()
            + b"".join(line + b"\r\n" for line in lines) + b"\r\n")


@BOTH_PATHS
@pytest.mark.parametrize("lines", [(b"transfer-encoding: chunked",), (b"host: x", b"transfer-encoding: chunked")],
                         ids=["no-host", "host"])
async def test_http10_request_with_transfer_encoding_is_refused(gateway, lines):
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        await conn.send(head(gateway.key, *lines) + CHUNKED_BODY + SMUGGLED)
        response = await conn.read_response()
        assert response.status == 400, (response.status, response.body[:200])
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.header("connection") == "close"
        assert await conn.wait_closed_by_peer(timeout=5)
    assert gateway.mock.requests == []


@BOTH_PATHS
@pytest.mark.parametrize("lines", [(), (b"host: x",), (b"connection: keep-alive",), (b"Connection: Keep-Alive",)],
                         ids=["plain", "host", "keep-alive", "keep-alive-capitalised"])
async def test_http10_request_with_content_length_is_served_then_closed(gateway, lines):
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        await conn.send(head(gateway.key, *lines, b"content-length: %d" % len(BODY)) + BODY
                        + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        response = await conn.read_response()
        assert response.status == 200 and response.json()["type"] == "message"
        assert response.header("connection") == "close"
        assert await conn.wait_closed_by_peer(timeout=5)
    assert len(gateway.mock.requests) == 1


@BOTH_PATHS
async def test_http10_request_with_two_hosts_is_refused(gateway):
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        await conn.send(head(gateway.key, b"host: a", b"host: b", b"content-length: %d" % len(BODY)) + BODY)
        response = await conn.read_response()
        assert response.status == 400 and response.header("connection") == "close"
    assert gateway.mock.requests == []
