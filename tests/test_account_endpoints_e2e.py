"""The API's other endpoints through the real gateway: what acts for the whole upstream account is refused with a 404
in Anthropic's shape and never forwarded with a channel's key; batches and files are scoped to the key that made
them."""
from __future__ import annotations

import anthropic
import pytest

from rawhttp import RawConnection


async def request(env, key: str, method: str, target: str, **kw):
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request(method, target, {"x-api-key": key, **kw.pop("headers", {})}, **kw)


@pytest.mark.parametrize("method, target", [
    ("GET", "/v1/organizations/api_keys"), ("POST", "/v1/organizations/invites"),
    ("GET", "/v1/organizations/usage_report/messages?starting_at=2026-12-01T00:00:00Z"),
    ("GET", "/v1/user_profiles"), ("GET", "/v1/compliance/activities"), ("POST", "/v1/agents"),
    ("POST", "/v1/sessions"), ("GET", "/v1/environments"), ("GET", "/v1/skills"), ("GET", "/v1/vaults"),
])
async def test_account_wide_paths_are_refused_and_never_forwarded(gateway, method, target):
    response = await request(gateway, gateway.key, method, target, json_body={} if method == "POST" else None)
    assert response.status == 404
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "not available through this gateway" in body["error"]["message"]
    assert body["request_id"] == response.header("request-id")
    assert gateway.mock.requests == []


async def test_the_current_sdk_gets_a_not_found_error_for_an_account_wide_api(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        with pytest.raises(anthropic.NotFoundError) as err:
            await client.beta.skills.list()
    assert err.value.body["error"]["type"] == "not_found_error"
    assert gateway.mock.requests == []
