"""GET /ready once no enabled channel's upstream key can be opened by the running server.

A server runs with APERTIS_SECRET_KEY=K1. An operator rotates the secret key with `db reencrypt` under a new key
K2 (README: "re-encrypted under a new key") before the server's environment has it. Within a second the server
re-reads its channels and leaves the one channel out of routing, as it cannot open its key (it logs "channel main
left out"): every Messages request is refused and `apertis_channel_up{channel="main"}` says 0. Readiness is
"whether this instance should be sent traffic" (observe/readiness.py), so it must say 503 too; it says 200, as the
store still has the channel enabled, and a load balancer keeps sending every request to an instance that refuses
them all.
"""
from __future__ import annotations

import anthropic
import pytest

from apertis_proxy.cli import main
from apertis_proxy.store import key_encryption
from tests.support.metrics import scrape_samples, value
from tests.support.mock_upstream import MOCK_API_KEY
from tests.support.processes import MODEL
from tests.support.rawhttp import RawConnection

K1 = "eV4EzYjLrBqP8u0zXfHn2l5hC7vS2m9QdUu3kT6wA1g="
K2 = "Q2w8lV0cN5rT1yH6sK3pJ9xF4bG7mZ2aD8eR0uI5oLc="


async def ready_status(gateway) -> tuple[int, bytes]:
    async with await RawConnection.open(gateway.host, gateway.port) as conn:
        response = await conn.request("GET", "/ready")
    return response.status, response.body


async def ask(base_url: str, key: str) -> anthropic.types.Message:
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0) as client:
        return await client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])


async def test_ready_is_503_when_no_enabled_channel_can_be_opened(gateway_env, mock_upstream, monkeypatch,
                                                                  capsys):
    monkeypatch.delenv(key_encryption.ENV_KEY_FILE, raising=False)
    monkeypatch.setenv(key_encryption.ENV_KEY, K1)
    gateway_env.add_channel("main", mock_upstream)          # sealed under K1
    [(stored,)] = gateway_env.query("SELECT api_key FROM channels WHERE name = 'main'")
    assert stored.startswith("enc:v1:") and MOCK_API_KEY not in stored
    key = gateway_env.add_key("alice")
    gateway = await gateway_env.start()
    assert (await ask(gateway_env.base_url, key)).content
    assert (await ready_status(gateway))[0] == 200

    monkeypatch.setenv(key_encryption.ENV_KEY, f"{K2}, {K1}")   # the operator's shell: the new key first
    assert main(["db", "reencrypt", "--db", gateway_env.db_path]) == 0
    capsys.readouterr()
    monkeypatch.setenv(key_encryption.ENV_KEY, K1)              # the running server still has only K1
    [(_, router)] = gateway.plugins.routers
    await router.refresh()                                   # what its poll does within 0.1 s

    with pytest.raises(anthropic.APIStatusError) as refused:
        await ask(gateway_env.base_url, key)
    assert refused.value.status_code in (404, 503)          # nothing this instance can route to
    samples = await scrape_samples(gateway_env.base_url)
    assert value(samples, "apertis_channel_up", channel="main") == 0
    status, body = await ready_status(gateway)
    assert status == 503, f"/ready said {status} {body!r} while every request is refused"
