"""A key's model allow-list covers every model a request is billed at: an advisor tool's `model` and each of
`fallbacks`' models run turns billed at that model's rates (docs/billing.md), so a key allowed only a cheap model
must not reach a dear one through them, on /v1/messages nor in a batch's params (nor through `fallbacks:
"default"`, where the API picks the model)."""
from __future__ import annotations

import pytest

from tests.support.rawhttp import RawConnection

CHEAP = "claude-haiku-5-5"
DEAR = "claude-opus-5-5"      # priced, served by the channel: only the key's allow-list stands in the way

EXTRAS = {
    "advisor": {"tools": [{"type": "advisor_20260301", "name": "advisor", "model": DEAR}]},
    "fallbacks": {"fallbacks": [{"model": DEAR}]},
    # The API picks the fallback model (the quota reserves a turn at the dearest priced one): not a listed model.
    "default_fallbacks": {"fallbacks": "default"},
}


def params(**extra) -> dict:
    return {"model": CHEAP, "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}], **extra}


async def send(env, key: str, path: str, payload: dict):
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("POST", path, {"x-api-key": key, "anthropic-version": "2023-06-01"},
                                  json_body=payload)


@pytest.mark.parametrize("extra", list(EXTRAS))
async def test_a_model_named_by_a_tool_or_a_fallback_is_held_to_the_allow_list(gateway_env, mock_upstream, extra):
    key = gateway_env.add_key("cheap-only", models=[CHEAP])
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    plain = await send(gateway_env, key, "/v1/messages", params(model=DEAR))
    assert plain.status == 403 and plain.json()["error"]["type"] == "permission_error"     # the list holds here
    sent_before = len(mock_upstream.requests)
    response = await send(gateway_env, key, "/v1/messages", params(**EXTRAS[extra]))
    assert (response.status, response.json().get("error", {}).get("type")) == (403, "permission_error"), \
        response.body
    assert len(mock_upstream.requests) == sent_before       # never sent with the channel's key
    await gateway_env.stop()


@pytest.mark.parametrize("extra", list(EXTRAS))
async def test_a_batch_request_naming_a_model_by_a_tool_or_fallback_is_held_to_the_allow_list(
        gateway_env, mock_upstream, extra):
    key = gateway_env.add_key("cheap-only", models=[CHEAP])
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    batch = {"requests": [{"custom_id": "r0", "params": params(**EXTRAS[extra])}]}
    response = await send(gateway_env, key, "/v1/messages/batches", batch)
    assert (response.status, response.json().get("error", {}).get("type")) == (403, "permission_error"), \
        response.body
    assert mock_upstream.requests == []
    await gateway_env.stop()
