"""Odd methods and request targets a client may try to reach an account-wide API or the gateway's own endpoints
with: each gets an Anthropic-shaped 4xx, nothing goes upstream, and the server keeps serving."""
from __future__ import annotations

from tests.support.gateway_requests import message
from tests.support.rawhttp import RawConnection

HEADS = [
    b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nhost: api.anthropic.com:443\r\nx-api-key: %s\r\n\r\n",
    b"TRACE /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\n\r\n",
    b"GET /v1/messages/../../metrics HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\n\r\n",
    b"GET //v1/models HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\n\r\n",
    b"GET /v1/files/..%%2F..%%2Fv1%%2Forganizations%%2Fme HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\n\r\n",
    b"GET /v1/organizations/../files HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\n\r\n",
    b"GET /v1/files/../organizations/api_keys HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\n\r\n",
    b"DELETE /v1/files/../../v1/organizations/x HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\n\r\n",
    b"GET /v1/messages/batches/../../organizations/usage_report HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\n\r\n",
]


async def test_odd_methods_and_dot_segment_targets_never_reach_upstream(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    for head in HEADS:
        async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
            await conn.send(head % key.encode())
            response = await conn.read_response(timeout=3)
        line = head.split(b"\r\n")[0]
        assert 400 <= response.status < 500, (line, response.status)
        assert response.json()["type"] == "error" and response.json()["error"]["type"], (line, response.body)
    assert mock_upstream.requests == [], [(r.method, r.target) for r in mock_upstream.requests]
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        response = await conn.request("POST", "/v1/messages", {"x-api-key": key}, json_body=message())
    assert response.status == 200, response.body
