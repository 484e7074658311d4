"""The client-address headers a CDN or reverse proxy in front of the gateway writes besides X-Forwarded-For
(Cloudflare's CF-Connecting-IP and True-Client-IP, X-Client-IP, Via, Traefik's X-Forwarded-Port and
-Server) name the organisation's clients and hosts: like X-Forwarded-For and X-Real-IP, which headers.py keeps at
the gateway ("clients' addresses are the organisation's business, not the provider's"), they are not sent
upstream with the channel's key."""
from __future__ import annotations

import pytest

from tests.support.gateway_requests import message
from tests.support.gateway_requests import post_tagged as post

WRITTEN_IN_FRONT = {
    "cf-connecting-ip": "10.1.2.3",
    "true-client-ip": "10.1.2.3",
    "x-client-ip": "10.1.2.3",
    "via": "1.1 gw-edge.intranet.example",
    "x-forwarded-port": "443",
    "x-forwarded-server": "gw-edge.intranet.example",
}


@pytest.mark.parametrize("name", sorted(WRITTEN_IN_FRONT))
async def test_a_client_address_header_stays_at_the_gateway(gateway_env, mock_upstream, name):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    response, tag = await post(gateway_env, key, message(), {name: WRITTEN_IN_FRONT[name]})
    assert response.status == 200, response.body
    [received] = [r for r in mock_upstream.requests if r.headers.get("x-test-seq") == tag]
    assert received.headers.get(name) is None
    await gateway_env.stop()
