"""Answers under /v1/ name the page's origin only for requests that carry an allowed one, so every answer there
varies by `Origin` and says so (the Fetch standard, "CORS protocol and HTTP caches"): a shared cache in front of
the gateway must not hand a browser page a copy stored for a request without `Origin`, or for another origin."""
from __future__ import annotations

import pytest

from tests.support.rawhttp import RawConnection


async def get(env, headers: dict, path: str = "/v1/models"):
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("GET", path, {"x-api-key": env.key, **headers})


def varies_by_origin(response) -> bool:
    return "origin" in {v.strip().lower() for v in (response.header("vary") or "").split(",")}


async def test_an_answer_to_a_request_without_origin_varies_by_origin(gateway):
    response = await get(gateway, {})
    assert response.status == 200
    assert response.header("access-control-allow-origin") is None
    assert varies_by_origin(response), response.headers


@pytest.mark.parametrize("gateway", [{"cors_origins": ["https://app.example.com"]}], indirect=True)
async def test_an_answer_to_an_origin_not_listed_varies_by_origin(gateway):
    response = await get(gateway, {"origin": "https://other.example.com"})
    assert response.status == 200
    assert response.header("access-control-allow-origin") is None
    assert varies_by_origin(response), response.headers
