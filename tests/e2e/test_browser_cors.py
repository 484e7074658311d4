"""`@anthropic-ai/sdk` in a browser (`dangerouslyAllowBrowser: true`) sends `anthropic-dangerous-direct-browser-access:
true` with its custom headers, so the browser first sends a CORS preflight (OPTIONS) and then reads the answer only
when it names the page's origin in `access-control-allow-origin`, as api.anthropic.com does for such requests."""
from __future__ import annotations

import json

import pytest

from tests.support.rawhttp import RawConnection

HAIKU = "claude-haiku-4-5-20251001"
ORIGIN = "http://localhost:5173"
SDK_HEADERS = ("anthropic-dangerous-direct-browser-access,anthropic-version,content-type,x-api-key,"
               "x-stainless-arch,x-stainless-lang,x-stainless-os,x-stainless-package-version,"
               "x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout")


async def send(env, method: str, headers: dict, body: bytes = b"", path: str = "/v1/messages"):
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request(method, path, headers, body)


def preflight(origin: str = ORIGIN, headers: str = SDK_HEADERS, method: str = "POST") -> dict:
    return {"origin": origin, "access-control-request-method": method, "access-control-request-headers": headers}


def message(env, **headers) -> tuple[dict, bytes]:
    body = json.dumps({"model": HAIKU, "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}).encode()
    return {"x-api-key": env.key, "content-type": "application/json", **headers}, body


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


async def test_a_preflight_names_the_methods_its_path_serves_and_is_cached_ten_minutes(gateway):
    for path, methods in (("/v1/messages", "POST"), ("/v1/messages/count_tokens", "POST"), ("/v1/models", "GET"),
                          ("/v1/models/claude-haiku-4-5", "GET"), ("/v1/messages/batches", "GET, POST, DELETE"),
                          ("/v1/files/file_x/content", "GET, POST, DELETE")):
        response = await send(gateway, "OPTIONS", preflight(method="GET"), path=path)
        assert response.status == 204 and response.body == b"", (path, response.status, response.body)
        assert response.header("content-length") is None and response.header("transfer-encoding") is None
        assert (response.header("access-control-allow-origin"), response.header("access-control-allow-methods"),
                response.header("access-control-allow-headers"), response.header("access-control-max-age"),
                response.header("vary")) == (ORIGIN, methods, SDK_HEADERS, "600", "origin"), path
    assert gateway.mock.requests == []


async def test_a_preflight_asking_for_headers_that_are_not_names_is_allowed_the_sdk_headers(gateway):
    response = await send(gateway, "OPTIONS", preflight(headers="x-api-key, not a name"))
    allowed = response.header("access-control-allow-headers").split(", ")
    assert response.status == 204 and "not a name" not in allowed
    assert {"x-api-key", "anthropic-version", "anthropic-dangerous-direct-browser-access"} <= set(allowed)


async def test_a_preflight_to_a_path_nothing_serves_is_not_answered(gateway):
    response = await send(gateway, "OPTIONS", preflight(), path="/v1/organizations/users")
    assert response.status == 404 and response.header("access-control-allow-origin") == ORIGIN


async def test_every_answer_to_a_page_names_its_origin_and_exposes_the_ids_and_retry_advice(gateway):
    headers, body = message(gateway, origin=ORIGIN)
    answers = [await send(gateway, "POST", headers, body),
               await send(gateway, "POST", {**headers, "x-api-key": "sk-apx-wrong"}, body),
               await send(gateway, "POST", headers, b"{", path="/v1/messages/count_tokens"),
               await send(gateway, "GET", {"origin": ORIGIN}),
               await send(gateway, "GET", {"origin": ORIGIN, "x-api-key": gateway.key}, path="/v1/models"),
               await send(gateway, "GET", {"origin": ORIGIN, "x-api-key": gateway.key}, path="/v1/files")]
    assert [a.status for a in answers] == [200, 401, 400, 405, 200, 200]
    for answer in answers:
        assert (answer.header("access-control-allow-origin"), answer.header("vary")) == (ORIGIN, "origin")
        exposed = answer.header("access-control-expose-headers").split(", ")
        assert {"request-id", "upstream-request-id", "retry-after", "retry-after-ms", "x-should-retry"} <= set(exposed)


async def test_a_request_without_an_origin_or_with_a_malformed_one_gets_no_cors_headers(gateway):
    headers, body = message(gateway)
    for origin in (None, "localhost:5173", "http://a.example, http://b.example"):
        response = await send(gateway, "POST", headers if origin is None else {**headers, "origin": origin}, body)
        assert response.status == 200
        assert not [name for name, _ in response.headers if name.startswith("access-control-") or name == "vary"]


@pytest.mark.parametrize("gateway", [{"cors_origins": ["https://App.example.com"]}], indirect=True)
async def test_only_the_listed_origins_are_allowed(gateway):
    headers, body = message(gateway)
    listed = await send(gateway, "POST", {**headers, "origin": "https://app.example.com"}, body)
    other = await send(gateway, "POST", {**headers, "origin": ORIGIN}, body)
    assert (listed.status, listed.header("access-control-allow-origin")) == (200, "https://app.example.com")
    assert (other.status, other.header("access-control-allow-origin")) == (200, None)
    assert (await send(gateway, "OPTIONS", preflight())).status == 405


@pytest.mark.parametrize("gateway", [{"cors_origins": []}], indirect=True)
async def test_an_empty_origin_list_turns_cors_off(gateway):
    response = await send(gateway, "OPTIONS", preflight())
    assert (response.status, response.header("allow"), response.header("access-control-allow-origin")) == (
        405, "POST", None)
    headers, body = message(gateway, origin=ORIGIN)
    response = await send(gateway, "POST", headers, body)
    assert (response.status, response.header("access-control-allow-origin"), response.header("vary")) == (
        200, None, None)
