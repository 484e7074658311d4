"""The worked example of docs/plugins.md, installed for real and found through
its entry point, as the gateway's plugin loader finds any third-party plugin."""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apertis_proxy.plugin_api import ROUTER_GROUP, Caller, PluginContext, Reject, RequestInfo
from apertis_proxy.store import schema
from apertis_proxy.store.channels import add_channel
from apertis_proxy.store.service import open_store

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "example-plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example distribution pip-installed into a directory of its own."""
    work = tmp_path_factory.mktemp("example-plugin")
    source = work / "src"
    # Built from a copy: a build leaves build/ and *.egg-info/ next to the sources.
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def test_installed_example_is_discovered_through_its_entry_point(site):
    script = ("import importlib.metadata as md, json; "
              f"print(json.dumps({{ep.name: ep.value for ep in md.entry_points(group={ROUTER_GROUP!r})}}))")
    path = [str(site), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["header-route"] == "apertis_header_route:HeaderRoute"
    # The first-party router is registered the same way, side by side.
    assert found["channels"] == "apertis_plugins.channel_router:ChannelRouter"


def _request(headers: dict, model: str = "claude-sonnet-4.5") -> RequestInfo:
    return RequestInfo(method="POST", path="/v1/messages", query="", headers=headers,
                       body={"model": model, "max_tokens": 8, "messages": []}, model=model,
                       stream=False, client="127.0.0.1:1", request_id="req_example")


async def test_installed_example_routes_by_header(site, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    (ep,) = [ep for ep in importlib.metadata.entry_points(group=ROUTER_GROUP) if ep.name == "header-route"]
    factory = ep.load()
    assert Path(sys.modules[factory.__module__].__file__).parent == site

    db = str(tmp_path / "gateway.db")
    conn = schema.connect(db)
    add_channel(conn, "eu", "http://127.0.0.1:9/eu", "sk-up-eu")
    add_channel(conn, "haiku-only", "http://127.0.0.1:9/h", "sk-up-h", models=["claude-haiku-4-5-20251001"])
    store = await open_store(db)
    watcher = store.watcher(0.05)
    await watcher.start()
    ctx = PluginContext(name="header-route", options={}, db_path=db,
                        log=logging.getLogger("test.header-route"), store=store)
    router = factory(ctx)
    anyone = Caller(key_id=None, key_name="anyone")
    await router.start()
    try:
        assert await router.route(_request({}), anyone) is None       # defer to the next router
        (channel,) = await router.route(_request({"x-apertis-channel": "eu"}), anyone)
        assert channel.name == "eu"
        assert channel.upstream_model("claude-sonnet-4.5") == "claude-sonnet-4-5-20250929"
        with pytest.raises(Reject) as err:
            await router.route(_request({"x-apertis-channel": "nowhere"}), anyone)
        assert (err.value.status, err.value.error_type) == (400, "invalid_request_error")
        assert "nowhere" in err.value.message
        with pytest.raises(Reject) as err:
            await router.route(_request({"x-apertis-channel": "haiku-only"}), anyone)
        assert "does not serve" in err.value.message
        sonnet_only = Caller(key_id=1, key_name="k", models=frozenset({"claude-sonnet-4-5-20250929"}))
        with pytest.raises(Reject) as err:
            await router.route(_request({"x-apertis-channel": "eu"}, "claude-opus-4.5"), sonnet_only)
        assert err.value.status == 403
        # A channel added from the CLI is picked up without a restart.
        add_channel(conn, "us", "http://127.0.0.1:9/us", "sk-up-us")
        await watcher.refresh()     # what the watcher does on its own within poll_interval
        (channel,) = await router.route(_request({"x-apertis-channel": "us"}), anyone)
        assert channel.name == "us"
    finally:
        await router.close()
        await store.close()
        conn.close()
