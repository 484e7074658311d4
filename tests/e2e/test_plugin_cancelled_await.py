"""docs/plugins.md, "Errors are contained": "An `asyncio.CancelledError` a plugin raises while its request is not
being cancelled (something it awaited was cancelled) counts as its failure like any other exception", and "an auth
or router failure answers that request 500 `api_error`" while the server stays up.

A third-party auth plugin and a third-party router, installed with their entry points, each await something that
was cancelled (a shared lookup another task gave up on) when the request carries `x-cancelled-in`.  The client gets
a 500 `api_error` with the gateway's request id, like for any other exception the plugin raises, and the gateway
goes on serving."""
from __future__ import annotations

import pytest

from tests.support.plugin_dist import plugin_site
from tests.support.rawhttp import RawConnection

FLAKY_MODULE = '''
import asyncio


async def _cancelled_lookup():
    """A lookup shared with another task, which gave up on it: awaiting it raises CancelledError."""
    future = asyncio.get_running_loop().create_future()
    future.cancel()
    await future


class Flaky:
    def __init__(self, ctx):
        self.name = ctx.name

    async def authenticate(self, request):
        if request.headers.get("x-cancelled-in") == "auth":
            await _cancelled_lookup()
        return None

    async def route(self, request, caller):
        if request.headers.get("x-cancelled-in") == "router":
            await _cancelled_lookup()
        return None
'''

BODY = {"model": "claude-haiku-4-5-20251001", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def flaky_site(tmp_path_factory):
    return plugin_site(tmp_path_factory.mktemp("flaky-plugin"), "flaky_lookup", FLAKY_MODULE,
                       {"apertis_proxy.auth": {"flaky": "flaky_lookup:Flaky"},
                        "apertis_proxy.router": {"flaky": "flaky_lookup:Flaky"}})


@pytest.mark.parametrize("where", ["auth", "router"])
async def test_a_cancelled_await_inside_a_plugin_is_a_500_not_a_dropped_request(gateway_env, mock_upstream,
                                                                                flaky_site, monkeypatch, where):
    monkeypatch.syspath_prepend(str(flaky_site))
    gateway_env.add_channel("main", mock_upstream)
    key = gateway_env.add_key("alice")
    gw = await gateway_env.start(auth_plugins=["flaky", "keys"], router_plugins=["flaky", "channels"])
    port = int(gw.base_url.rsplit(":", 1)[1])
    headers = {"x-api-key": key, "x-cancelled-in": where}

    async with await RawConnection.open("127.0.0.1", port) as conn:
        try:
            failed = await conn.request("POST", "/v1/messages", headers, json_body=BODY)
        except (ConnectionError, EOFError) as exc:       # IncompleteReadError is an EOFError
            raise AssertionError(f"a plugin failure in {where} dropped the connection: {exc!r}") from None
    assert failed.status == 500, (failed.status, failed.body)
    assert failed.json()["type"] == "error" and failed.json()["error"]["type"] == "api_error", failed.body
    assert failed.header("request-id") and failed.json()["request_id"] == failed.header("request-id")

    # The gateway goes on serving.
    async with await RawConnection.open("127.0.0.1", port) as conn:
        ok = await conn.request("POST", "/v1/messages", {"x-api-key": key}, json_body=BODY)
    assert ok.status == 200, ok.body
    if where == "router":
        # The caller was known: the failed request is in the ledger as the 500 the client got.
        rows = await gateway_env.usage_rows(n=2)
        assert [(r["status"], r["error_type"]) for r in rows] == [(500, "api_error"), (200, None)], rows
