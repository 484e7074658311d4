"""docs/plugins.md: an auth plugin's `check_head(request)` may "raise `Reject` to refuse", and a `Reject(status,
error_type, message, headers=None)` answers the client "plus the extra headers (for example `retry-after`)".

A third-party auth plugin, installed as a distribution with its entry point, refuses a flagged request with a 429
and `retry-after: 7`, from `check_head` and from `authenticate` alike.  Whether the client sends its head and body
in one write (the body is whole with its head: only `authenticate` runs) or the head first (the gateway asks
`check_head` before reading the body), the refusal is the same answer: the official SDKs and Claude Code pace their
retries by that `retry-after`."""
from __future__ import annotations

import json

import pytest

from tests.support.plugin_dist import plugin_site
from tests.support.rawhttp import RawConnection, request_bytes

GATE_MODULE = '''
from apertis_proxy.plugin_api import Reject


def _refusal():
    return Reject(429, "rate_limit_error", "slow down", {"retry-after": "7"})


class Gate:
    def __init__(self, ctx):
        pass

    def check_head(self, request):
        if request.headers.get("x-slow-down"):
            raise _refusal()
        return None

    async def authenticate(self, request):
        if request.headers.get("x-slow-down"):
            raise _refusal()
        return None
'''

BODY = json.dumps({"model": "claude-haiku-4-5-20251001", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def gate_site(tmp_path_factory):
    return plugin_site(tmp_path_factory.mktemp("gate-plugin"), "head_gate", GATE_MODULE,
                       {"apertis_proxy.auth": {"gate": "head_gate:Gate"}})


async def _refused(port: int, key: str, head_first: bool):
    raw = request_bytes("POST", "/v1/messages", {"x-api-key": key, "x-slow-down": "1",
                                                 "content-type": "application/json"}, BODY)
    head, body = raw[:len(raw) - len(BODY)], BODY
    async with await RawConnection.open("127.0.0.1", port) as conn:
        if head_first:
            await conn.send(head)        # the body follows later: the gateway judges the head alone first
            response = await conn.read_response()
        else:
            await conn.send(head + body)
            response = await conn.read_response()
    return response


async def test_a_reject_from_check_head_keeps_its_headers(gateway_env, mock_upstream, gate_site, monkeypatch):
    monkeypatch.syspath_prepend(str(gate_site))
    gateway_env.add_channel("main", mock_upstream)
    key = gateway_env.add_key("alice")
    gw = await gateway_env.start(auth_plugins=["gate", "keys"])
    port = int(gw.base_url.rsplit(":", 1)[1])

    whole = await _refused(port, key, head_first=False)
    assert whole.status == 429, whole.body
    assert whole.json()["error"]["type"] == "rate_limit_error"
    assert whole.header("retry-after") == "7"

    split = await _refused(port, key, head_first=True)
    assert split.status == 429, split.body
    assert split.json()["error"]["type"] == "rate_limit_error"
    # The same plugin, the same Reject: the client is told when to come back either way.
    assert split.header("retry-after") == "7", split.headers
