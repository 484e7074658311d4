"""`@anthropic-ai/sdk` in a browser (`dangerouslyAllowBrowser: true`) sends `anthropic-dangerous-direct-browser-access:
true` with its custom headers, so the browser first sends a CORS preflight (OPTIONS) and then reads the answer only
when it names the page's origin in `access-control-allow-origin`, as api.anthropic.com does for such requests."""
from __future__ import annotations

import json

from tests.support.rawhttp import RawConnection

HAIKU = "claude-haiku-4-5-20251001"
ORIGIN = "http://localhost:5173"
SDK_HEADERS = ("anthropic-dangerous-direct-browser-access,anthropic-version,content-type,x-api-key,"
               "x-stainless-arch,x-stainless-lang,x-stainless-os,x-stainless-package-version,"
               "x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout")


async def send(env, method: str, headers: dict, body: bytes = b""):
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request(method, "/v1/messages", headers, body)


async def test_a_browser_preflight_for_the_messages_endpoint_is_allowed(gateway):
    response = await send(gateway, "OPTIONS", {"origin": ORIGIN, "access-control-request-method": "POST",
                                               "access-control-request-headers": SDK_HEADERS})
    assert 200 <= response.status < 300, (response.status, response.body)
    assert response.header("access-control-allow-origin") in (ORIGIN, "*")
    allowed = {h.strip().lower() for h in (response.header("access-control-allow-headers") or "").split(",")}
    assert "*" in allowed or set(SDK_HEADERS.split(",")) <= allowed
    assert gateway.mock.requests == []


async def test_a_browser_request_gets_its_answer_with_the_cors_header(gateway):
    body = json.dumps({"model": HAIKU, "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"origin": ORIGIN, "x-api-key": gateway.key, "content-type": "application/json",
               "anthropic-dangerous-direct-browser-access": "true"}
    response = await send(gateway, "POST", headers, body)
    assert response.status == 200, response.body
    assert response.header("access-control-allow-origin") in (ORIGIN, "*")
