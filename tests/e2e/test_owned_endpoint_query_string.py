"""Batch and file calls keep their query string on the way upstream, as Messages calls do: the 1.x SDKs and
Claude Code mark beta calls with `?beta=true`, and the protocol notes say to keep the query when forwarding."""
from __future__ import annotations

import json

from tests.support.rawhttp import RawConnection

HAIKU = "claude-haiku-4-5-20251001"
BATCH = {"requests": [{"custom_id": "one", "params": {"model": HAIKU, "max_tokens": 16,
                                                      "messages": [{"role": "user", "content": "hi"}]}}]}


async def call(env, method: str, target: str, body: bytes = b""):
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request(method, target, {"x-api-key": env.key, "content-type": "application/json",
                                                   "anthropic-beta": "message-batches-2024-09-24"}, body)


async def test_beta_true_reaches_upstream_on_batch_calls(gateway):
    created = await call(gateway, "POST", "/v1/messages/batches?beta=true", json.dumps(BATCH).encode())
    assert created.status == 200, created.body
    assert gateway.mock.last_request.target == "/v1/messages/batches?beta=true"
    batch_id = created.json()["id"]
    fetched = await call(gateway, "GET", f"/v1/messages/batches/{batch_id}?beta=true")
    assert fetched.status == 200, fetched.body
    assert gateway.mock.last_request.target == f"/v1/messages/batches/{batch_id}?beta=true"
