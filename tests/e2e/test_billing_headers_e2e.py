"""Who pays is the operator's choice: clients' workspace and user-profile headers never reach upstream (a channel
may set its own), a body billing someone else is refused, and secrets a body carries never reach the logs."""
from __future__ import annotations

import asyncio
import logging

from apertis_proxy import cli
from tests.support.gateway_requests import channels_list, message, poll
from tests.support.gateway_requests import post_tagged as post

BILLING_HEADERS = {"anthropic-workspace-id": "wrkspc_client_choice", "anthropic-user-profile-id": "uprof_client"}


async def test_clients_workspace_and_user_profile_headers_are_not_forwarded(sdk, gateway):
    result = await sdk.run("plain", gateway.base_url, gateway.key, headers=BILLING_HEADERS)
    assert "error" not in result, result
    received = gateway.mock.last_request.headers
    assert "anthropic-workspace-id" not in received and "anthropic-user-profile-id" not in received


async def test_a_channel_sends_the_operators_workspace_and_profile(gateway_env, mock_upstream, capsys):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream.base_url)
    assert cli.main(["channels", "set", "main", "--db", gateway_env.db_path, "--workspace-id", "wrkspc_ops",
                     "--user-profile-id", "uprof_ops"]) == 0
    assert "workspace=wrkspc_ops" in channels_list(gateway_env.db_path, capsys)["main"]
    await gateway_env.start()
    response, _ = await post(gateway_env, key, message(), BILLING_HEADERS)
    assert response.status == 200
    received = mock_upstream.last_request
    assert received.header_values("anthropic-workspace-id") == ["wrkspc_ops"]
    assert received.header_values("anthropic-user-profile-id") == ["uprof_ops"]


async def test_a_body_billing_someone_else_is_refused(gateway):
    response, _ = await post(gateway, gateway.key, message(
        billing_policy={"type": "billing_policy", "bill_to": "user_profile"}))
    assert response.status == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("billing_policy.bill_to: ")
    assert gateway.mock.requests == []
    response, _ = await post(gateway, gateway.key, message(billing_policy={"type": "billing_policy",
                                                                           "bill_to": "self"}))
    assert response.status == 200
    assert gateway.mock.last_request.body["billing_policy"] == {"type": "billing_policy", "bill_to": "self"}


async def test_an_mcp_token_quoted_by_the_upstream_reaches_no_log_nor_listing(gateway_env, mock_upstream, caplog,
                                                                             capsys):
    token = "mcp-secret-token-5b1f0c9e7d"
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    # No cooldown after the 500: the second request must reach the channel (a resting one would get a 503).
    await gateway_env.start(plugin_options={"channels": {"cooldown_server_error": 0}})
    body = message(mcp_servers=[{"type": "url", "url": "https://mcp.example/sse", "name": "tools",
                                 "authorization_token": token}])
    mock_upstream.fail_next(500, message=f"MCP server refused token {token}")
    mock_upstream.fail_next(401, message=f"MCP server refused token {token}")
    with caplog.at_level(logging.DEBUG):
        first, _ = await post(gateway_env, key, body)
        second, _ = await post(gateway_env, key, body)
        await poll(lambda: gateway_env.query("SELECT enabled FROM channels")[0][0] == 0)
        await asyncio.sleep(0.05)
    assert first.status == 500 and token.encode() not in first.body and b"[redacted]" in first.body
    assert token.encode() not in second.body
    assert token not in caplog.text and token not in channels_list(gateway_env.db_path, capsys)["main"]
