"""A key's limits edited (`keys update`) while one of its requests is between its key check and its admission.

The keys plugin admits a limited key's request once the gateway has checked and routed it (`admit()`), against the
key's limits as they are then; `release()` gives back what that admission holds.  A router that awaits something
(a third-party router doing I/O, as docs/plugins.md allows) leaves room for a configuration reload in between.

Here a key with only `rpm` gets `concurrency = 1` while its request waits in such a router.  The request is admitted
with the new limits (a concurrency slot); once it has been answered the slot must be free again: the key's next
request, with nothing of the key in flight, is served.  With metering off (`meter = []`, as the README allows) no
ledger row tidies up after the release; with the sqlite meter its row lands only at the next shipment.
"""
from __future__ import annotations

import asyncio
import sys

import pytest

from apertis_proxy.store.keys import delete_key, set_key_enabled, update_key
from tests.support.gateway_requests import message, post
from tests.support.plugin_dist import plugin_site

HOLD_MODULE = '''
import asyncio

arrived = asyncio.Event()
go = asyncio.Event()


class Hold:
    """A router that, for a request carrying x-hold, waits (as for a lookup) and then defers to the next router."""

    def __init__(self, ctx):
        self.name = ctx.name

    async def route(self, request, caller):
        if request.headers.get("x-hold"):
            arrived.set()
            await go.wait()
        return None
'''


@pytest.fixture(scope="module")
def hold_site(tmp_path_factory):
    return plugin_site(tmp_path_factory.mktemp("hold-router"), "hold_router_admission", HOLD_MODULE,
                       {"apertis_proxy.router": {"hold": "hold_router_admission:Hold"}})


def _keys_plugin(gateway):
    (plugin,) = [p for name, p in gateway.plugins.auth if name == "keys"]
    return plugin


async def _until(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("meters", ["off", "sqlite"])
async def test_a_concurrency_limit_added_while_a_request_is_routed_is_released_after_it(
        gateway_env, mock_upstream, hold_site, monkeypatch, meters):
    """`meters`: metering off, or the sqlite ledger shipping its rows every 5 s (its own default is 0.5 s): the
    slot is needed free the moment the answer is complete, not once the ledger row lands."""
    monkeypatch.syspath_prepend(str(hold_site))
    gateway_env.add_channel("main", mock_upstream)
    key = gateway_env.add_key("alice", rpm=100)
    (key_id,) = [row["id"] for row in gateway_env.query("SELECT id FROM keys WHERE name = 'alice'")]
    if meters == "off":
        gw = await gateway_env.start(router_plugins=["hold", "channels"], meter_plugins=[])
    else:
        gw = await gateway_env.start(router_plugins=["hold", "channels"],
                                     plugin_options={"sqlite": {"flush_interval": 5.0}})
    hold = sys.modules["hold_router_admission"]
    hold.arrived, hold.go = asyncio.Event(), asyncio.Event()     # this test's loop
    keys = _keys_plugin(gw)

    held = asyncio.create_task(post(gateway_env, key, message("held in routing"), {"x-hold": "1"}))
    await asyncio.wait_for(hold.arrived.wait(), 5.0)
    update_key(gateway_env.conn, "alice", concurrency=1)       # `apertis keys update alice --concurrency 1`
    await _until(lambda: keys.by_id[key_id].concurrency == 1)  # the running gateway has reloaded the key
    hold.go.set()
    first = await asyncio.wait_for(held, 10.0)
    assert first.status == 200, (first.status, first.body[:300])

    # Nothing of the key is in flight now: its one slot is free.
    live = gateway_env.query("SELECT COUNT(*) FROM admissions WHERE key_id = ? AND live = 1", key_id)[0][0]
    following = await post(gateway_env, key, message("the next one"))
    assert following.status == 200, (following.status, following.header("retry-after"), following.body[:300],
                                     f"live admissions of the key after its only request ended: {live}")


@pytest.mark.parametrize("edit", ["delete", "disable"])
async def test_a_key_revoked_while_its_request_is_routed_is_refused_at_admission(
        gateway_env, mock_upstream, hold_site, monkeypatch, edit):
    """The session's rule: "a key deleted between its check and its admission is refused 401 rather than sent
    upstream". A key disabled in that window (`keys disable`, the operator's revocation that keeps the key's
    history) is no more usable than a deleted one: 401 at its admission, nothing sent upstream."""
    monkeypatch.syspath_prepend(str(hold_site))
    gateway_env.add_channel("main", mock_upstream)
    key = gateway_env.add_key("alice", rpm=100)
    (key_id,) = [row["id"] for row in gateway_env.query("SELECT id FROM keys WHERE name = 'alice'")]
    gw = await gateway_env.start(router_plugins=["hold", "channels"])
    hold = sys.modules["hold_router_admission"]
    hold.arrived, hold.go = asyncio.Event(), asyncio.Event()     # this test's loop
    keys = _keys_plugin(gw)

    held = asyncio.create_task(post(gateway_env, key, message("held in routing"), {"x-hold": "1"}))
    await asyncio.wait_for(hold.arrived.wait(), 5.0)
    if edit == "delete":
        delete_key(gateway_env.conn, "alice")
        await _until(lambda: key_id not in keys.by_id)
    else:
        set_key_enabled(gateway_env.conn, "alice", False)
        await _until(lambda: not keys.by_id[key_id].enabled)
    hold.go.set()
    answer = await asyncio.wait_for(held, 10.0)
    assert answer.status == 401, (answer.status, answer.body[:300])
    assert answer.json()["error"]["type"] == "authentication_error"
    assert not mock_upstream.requests
