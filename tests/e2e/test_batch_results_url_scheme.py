"""A batch's `results_url`, rewritten to the gateway, must be one the SDK can fetch: `messages.batches.results()`
GETs that absolute URL, so on a TLS listener it has to say https."""
from __future__ import annotations

from tests.ops.test_deploy import install_cert, needs_openssl, pki, sdk_client  # noqa: F401 (a fixture)
from tests.support.rawhttp import RawConnection

HAIKU = "claude-haiku-4-5-20251001"


@needs_openssl
async def test_batch_results_can_be_fetched_through_a_tls_listener(gateway_env, mock_upstream, pki,  # noqa: F811
                                                                   tmp_path):
    cert, key_file = install_cert(pki, tmp_path, "a")
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    gw = await gateway_env.start(tls_cert=cert, tls_key=key_file)
    assert gw.base_url.startswith("https://")
    async with sdk_client(gw.base_url, key, pki) as client:
        batch = await client.messages.batches.create(requests=[{"custom_id": "one", "params": {
            "model": HAIKU, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}}])
        assert batch.processing_status == "ended"
        assert batch.results_url is not None
        assert batch.results_url.startswith("https://"), batch.results_url
        results = [item async for item in await client.messages.batches.results(batch.id)]
    assert [(r.custom_id, r.result.type) for r in results] == [("one", "succeeded")]


async def test_batch_results_url_uses_the_public_url_when_set(gateway_env, mock_upstream):
    """Behind a proxy that ends TLS, `[server] public_url` is the address the SDK must fetch the results from."""
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(public_url="https://llm.example.com/")
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        created = await conn.request("POST", "/v1/messages/batches", {"x-api-key": key}, json_body={"requests": [
            {"custom_id": "one", "params": {"model": HAIKU, "max_tokens": 64,
                                            "messages": [{"role": "user", "content": "hi"}]}}]})
    assert created.status == 200, created.body
    batch = created.json()
    assert batch["results_url"] == f"https://llm.example.com/v1/messages/batches/{batch['id']}/results"
