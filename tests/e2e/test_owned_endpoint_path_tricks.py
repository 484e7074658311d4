"""Path tricks on the owned endpoints from a key holding one file of its own: dot segments, encoded slashes and dots,
doubled slashes and query characters around a file id never reach another key's file or another endpoint
upstream: each is refused at the gateway (404) or goes upstream as the caller's own file."""
from __future__ import annotations

import anthropic
import pytest

from tests.support.rawhttp import RawConnection


def tricks(mine: str, theirs: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v1/files/{mine}/../{theirs}"),
        ("GET", f"/v1/files/{mine}/..%2F{theirs}"),
        ("GET", f"/v1/files/{mine}%2F..%2F{theirs}"),
        ("GET", f"/v1/files/{mine}/%2e%2e/{theirs}/content"),
        ("GET", f"/v1/files/{mine}/content/../../{theirs}/content"),
        ("GET", f"/v1/files//{theirs}"),
        ("GET", f"/v1/files/{theirs}%3Fx=1"),
        ("GET", f"/v1/files/{theirs}#/../{mine}"),
        ("DELETE", f"/v1/files/{mine}/../{theirs}"),
        ("POST", f"/v1/files/{mine}/../../messages"),
        ("GET", "/v1/files/../messages/batches"),
    ]


async def test_path_tricks_never_reach_another_keys_file(gateway_env, mock_upstream):
    keys = {"alice": gateway_env.add_key("alice"), "bob": gateway_env.add_key("bob")}
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    uploaded = {}
    for name, key in keys.items():
        async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
            uploaded[name] = (await client.beta.files.upload(file=(f"{name}.txt", name.encode(), "text/plain"))).id
    for method, target in tricks(uploaded["bob"], uploaded["alice"]):
        sent_before = len(mock_upstream.requests)
        async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
            response = await conn.request(method, target, {"x-api-key": keys["bob"],
                                                           "anthropic-version": "2023-06-01"})
        assert response.status in (400, 404, 405), (method, target, response.status, response.body)
        forwarded = mock_upstream.requests[sent_before:]
        assert all(uploaded["alice"] not in r.target for r in forwarded), (target, [r.target for r in forwarded])
    await gateway_env.stop()


@pytest.mark.parametrize("headers", [
    {"x-api-key": ["KEY", "KEY"]},
    {"x-api-key": "KEY", "authorization": "Bearer sk-ant-api03-someone-elses"},
])
async def test_a_key_sent_twice_or_beside_another_credential_never_goes_upstream(gateway_env, mock_upstream, headers):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    sent = [(name, key if value == "KEY" else value) for name, values in headers.items()
            for value in (values if isinstance(values, list) else [values])]
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        response = await conn.request("POST", "/v1/messages", sent, json_body={
            "model": "claude-haiku-4-5-20251001", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status in (200, 401), response.body
    for r in mock_upstream.requests:
        assert key not in str(r.headers) and "someone-elses" not in str(r.headers)
    await gateway_env.stop()
