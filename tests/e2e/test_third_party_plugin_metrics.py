"""docs/plugins.md: "A meter that has the integer attributes `pending` (rows waiting) and `written` (rows written since
start) is shown in the metrics as `apertis_ledger_pending_rows` and `apertis_ledger_rows_written_total` (label
`meter`).  A router whose `channels` list and `is_cooling(channel)` method tell which channels it would use now feeds
`apertis_channel_up`"; and a router's `models(caller)` answers `GET /v1/models` and `GET /v1/models/{id}`, "the
union (first occurrence of an id wins)".

Third-party plugins installed with their entry points, beside the first-party ones."""
from __future__ import annotations

import pytest

from tests.support.metrics import scrape_samples, value
from tests.support.plugin_dist import plugin_site
from tests.support.rawhttp import RawConnection

MODULE = '''
from apertis_proxy.plugin_api import ModelInfo


class Counter:
    """A meter counting the records it got: `written` goes up by one per record, `pending` stays at 2."""

    def __init__(self, ctx):
        self.written = 0
        self.pending = 2

    async def record(self, record):
        self.written += 1


class Picky:
    """A router that defers every request, cools down the channel named "main", and lists a model of its own."""

    def __init__(self, ctx):
        self.store = ctx.store
        self.channels = []

    async def start(self):
        self.store.watcher().subscribe(self.reload)

    def reload(self, snapshot):
        self.channels = list(snapshot.channels)

    def is_cooling(self, channel):
        return channel.name == "main"

    async def route(self, request, caller):
        return None

    def models(self, caller):
        return [ModelInfo(id="house-model", display_name="House model", created_at="2026-01-01T00:00:00Z")]
'''

BODY = {"model": "claude-haiku-4-5-20251001", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return plugin_site(tmp_path_factory.mktemp("metrics-plugins"), "house_plugins", MODULE,
                       {"apertis_proxy.meter": {"counter": "house_plugins:Counter"},
                        "apertis_proxy.router": {"picky": "house_plugins:Picky"}})


async def test_third_party_meter_and_router_feed_the_metrics_and_model_list(gateway_env, mock_upstream, site,
                                                                            monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    gateway_env.add_channel("main", mock_upstream)
    gateway_env.add_channel("spare", mock_upstream)
    key = gateway_env.add_key("alice")
    gw = await gateway_env.start(router_plugins=["picky", "channels"], meter_plugins=["sqlite", "counter"])
    port = int(gw.base_url.rsplit(":", 1)[1])
    async with await RawConnection.open("127.0.0.1", port) as conn:
        for _ in range(3):
            assert (await conn.request("POST", "/v1/messages", {"x-api-key": key}, json_body=BODY)).status == 200
        listing = await conn.request("GET", "/v1/models", {"x-api-key": key})
        one = await conn.request("GET", "/v1/models/house-model", {"x-api-key": key})
    assert listing.status == 200 and "house-model" in [m["id"] for m in listing.json()["data"]], listing.body
    assert one.status == 200 and one.json()["id"] == "house-model", one.body

    samples = await scrape_samples(gw.base_url)
    assert value(samples, "apertis_ledger_rows_written_total", meter="counter") == 3, samples
    assert value(samples, "apertis_ledger_pending_rows", meter="counter") == 2
    assert value(samples, "apertis_channel_up", channel="main") == 0      # the first router that tells decides
    assert value(samples, "apertis_channel_up", channel="spare") == 1
