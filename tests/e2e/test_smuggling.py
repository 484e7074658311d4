"""Request-smuggling vectors, as a table: each is a request whose framing a front end and the gateway could read
differently. Every one is refused with an Anthropic-shaped error, its connection closed (the bytes after it are
never read as a request), nothing reaches the upstream, and the server stays up. The canonical shapes are
accepted (the last table)."""
from __future__ import annotations

import pytest

from tests.support.rawhttp import RawConnection
from tests.support.smuggling_vectors import BODY, CHUNKED_BODY, VECTORS, head
from tests.support.gateway_requests import REQUEST_ID

# Both head parsers: the fast one declines each of these, and h11 alone must refuse them either way.
BOTH_PATHS = pytest.mark.parametrize("gateway", [{}, {"fast_heads": False}], ids=["fast-heads", "h11-only"],
                                     indirect=True)


@BOTH_PATHS
@pytest.mark.parametrize("vector", list(VECTORS.values()), ids=list(VECTORS))
async def test_smuggling_vector_is_refused_and_its_connection_closed(gateway, vector):
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        await conn.send(vector.replace(b"KEY", gateway.key.encode()))
        response = await conn.read_response()
        assert 400 <= response.status < 600 and response.status != 502, response.body
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] in ("invalid_request_error", "request_too_large")
        assert REQUEST_ID.fullmatch(body["request_id"] or "")
        assert response.header("connection") == "close"
        assert await conn.wait_closed_by_peer(timeout=5)
        assert b"smuggled" not in response.raw
    assert gateway.mock.requests == []
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        assert (await conn.request("GET", "/health")).status == 200


ACCEPTED = {
    "content-length": head(b"content-length: %d" % len(BODY)) + BODY,
    "chunked": head(b"transfer-encoding: chunked") + CHUNKED_BODY,
    "chunked-name-in-any-case": head(b"Transfer-Encoding: chunked") + CHUNKED_BODY,
}


@BOTH_PATHS
@pytest.mark.parametrize("request_", list(ACCEPTED.values()), ids=list(ACCEPTED))
async def test_canonical_framing_is_served_and_kept_alive(gateway, request_):
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        await conn.send(request_.replace(b"KEY", gateway.key.encode()))
        response = await conn.read_response()
        assert response.status == 200 and response.header("connection") is None
        assert (await conn.request("GET", "/health")).status == 200
    assert len(gateway.mock.requests) == 1
