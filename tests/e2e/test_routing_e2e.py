"""Plugin discovery and every routing rule, through the real gateway with several MockUpstreams as channels.

Which channel served a request is read from what each mock received (every request carries a unique
`x-test-seq` header, which the gateway forwards like any unknown header) and from the usage rows.
"""
from __future__ import annotations

import json

import asyncio
import logging
import subprocess
import sys
from importlib.metadata import EntryPoint

import anthropic
import pytest

from apertis_proxy import cli, plugin_host
from apertis_proxy.errors import GatewayError
from apertis_proxy.plugin_api import AUTH_GROUP, METER_GROUP, ROUTER_GROUP, Reject
from apertis_proxy.plugin_host import PluginLoadError
from apertis_plugins.channel_router import ChannelRouter
from apertis_plugins.keys_auth import KeysAuth
from apertis_plugins.sqlite_meter import SqliteMeter
from tests.support.mock_upstream import MOCK_API_KEY
from tests.support.gateway_requests import (HAIKU, SONNET, channels_list, closed_port_url, message, poll,
                                           receivers)
from tests.support.gateway_requests import post_tagged as post
from tests.support.rawhttp import RawConnection



# -- helpers -------------------------------------------------------------------------------------------------------

# -- discovery -----------------------------------------------------------------------------------------------------

async def test_default_settings_load_the_first_party_plugins_through_entry_points(gateway):
    for group, name, value in ((AUTH_GROUP, "keys", "apertis_plugins.keys_auth:KeysAuth"),
                               (ROUTER_GROUP, "channels", "apertis_plugins.channel_router:ChannelRouter"),
                               (METER_GROUP, "sqlite", "apertis_plugins.sqlite_meter:SqliteMeter")):
        assert plugin_host.discover(group)[name].value == value
    host = gateway.gateway.plugins
    assert [(n, type(p)) for n, p in host.auth] == [("keys", KeysAuth)]
    assert [(n, type(p)) for n, p in host.routers] == [("channels", ChannelRouter)]
    assert [(n, type(p)) for n, p in host.meters] == [("sqlite", SqliteMeter)]
    response, _ = await post(gateway, gateway.key, message())
    assert response.status == 200
    assert (await gateway.usage_rows(1))[0]["channel_name"] == "main"


async def test_a_config_naming_an_unknown_plugin_fails_at_start(gateway_env, mock_upstream):
    gateway_env.add_channel("main", mock_upstream)
    with pytest.raises(PluginLoadError) as err:
        await gateway_env.start(router_plugins=["channels", "no-such-router"])
    text = str(err.value)
    assert "no-such-router" in text and ROUTER_GROUP in text and "channels" in text


def test_serve_with_an_unknown_plugin_exits_with_a_clear_error(tmp_path):
    config = tmp_path / "apertis.toml"
    config.write_text('[plugins]\nmeter = ["sqlite", "no-such-meter"]\n')
    proc = subprocess.run([sys.executable, "-m", "apertis_proxy", "serve", "--config", str(config),
                           "--db", str(tmp_path / "a.db"), "--port", "0"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode != 0
    assert "no-such-meter" in proc.stderr and METER_GROUP in proc.stderr
    assert "Traceback" not in proc.stderr


class ExplodingAuth:
    """Defers to the next auth plugin, except that it crashes when asked to."""

    def __init__(self, ctx) -> None:
        pass

    async def authenticate(self, request):
        if request.headers.get("x-explode") == "auth":
            raise RuntimeError("bug in an auth plugin")
        return None


class ExplodingRouter:
    def __init__(self, ctx) -> None:
        pass

    async def route(self, request, caller):
        if request.headers.get("x-explode") == "router":
            raise RuntimeError("bug in a router plugin")
        return None


class BrokenMeter:
    def __init__(self, ctx) -> None:
        self.calls = 0

    async def record(self, record):
        self.calls += 1
        raise RuntimeError("bug in a meter plugin")


INLINE_PLUGINS = {
    AUTH_GROUP: EntryPoint("exploding_auth", f"{__name__}:ExplodingAuth", AUTH_GROUP),
    ROUTER_GROUP: EntryPoint("exploding_router", f"{__name__}:ExplodingRouter", ROUTER_GROUP),
    METER_GROUP: EntryPoint("broken_meter", f"{__name__}:BrokenMeter", METER_GROUP),
}


async def test_a_plugin_that_raises_is_contained(gateway_env, mock_upstream, monkeypatch, caplog):
    real_discover = plugin_host.discover
    monkeypatch.setattr(plugin_host, "discover",
                        lambda group: {**real_discover(group), INLINE_PLUGINS[group].name: INLINE_PLUGINS[group]})
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(auth_plugins=["exploding_auth", "keys"], router_plugins=["exploding_router", "channels"],
                            meter_plugins=["broken_meter", "sqlite"])
    broken = dict(gateway_env.gateway.plugins.meters)["broken_meter"]

    with caplog.at_level(logging.ERROR, logger="apertis_proxy.plugins"):
        for where in ("router", "auth"):
            response, _ = await post(gateway_env, key, message(), {"x-explode": where})
            assert response.status == 500
            body = response.json()
            assert body["type"] == "error" and body["error"]["type"] == "api_error"
            assert body["request_id"] == response.header("request-id")
            assert "bug in" not in body["error"]["message"]      # internals stay in the log
    assert "exploding_router" in caplog.text and "exploding_auth" in caplog.text
    assert mock_upstream.requests == []

    # The server is still up, and the sqlite meter records although the other meter raises every time.
    response, _ = await post(gateway_env, key, message("still alive"))
    assert response.status == 200 and "still alive" in response.json()["content"][0]["text"]
    rows = await gateway_env.usage_rows(2)
    assert [(r["status"], r["error_type"]) for r in rows] == [(500, "api_error"), (200, None)]
    assert rows[1]["output_tokens"] == mock_upstream.served[-1]["usage"]["output_tokens"]
    assert broken.calls == 2      # the request refused inside auth has no caller: nobody meters it


class UnstartableMeter:
    def __init__(self, ctx):
        pass

    async def start(self):
        raise RuntimeError("cannot reach the billing service")

    async def record(self, record):
        pass


def _broken_factory(ctx):
    raise ImportError("No module named 'billing_sdk'")


@pytest.mark.parametrize("entry,says", [
    (EntryPoint("unstartable", f"{__name__}:UnstartableMeter", METER_GROUP),
     "plugin 'unstartable' (apertis_proxy.meter) failed to start: RuntimeError: cannot reach the billing service"),
    (EntryPoint("unloadable", f"{__name__}:_broken_factory", METER_GROUP),
     "plugin 'unloadable' (apertis_proxy.meter) failed to load: ImportError: No module named 'billing_sdk'"),
], ids=["start", "load"])
async def test_a_plugin_that_cannot_load_or_start_stops_start_up_with_one_line(gateway_env, monkeypatch, entry,
                                                                                says):
    """Said in one line naming the plugin, the stage and the cause (it was a 40-line traceback with one worker,
    and nothing at all with several); the traceback is logged at DEBUG for the plugin's author."""
    real_discover = plugin_host.discover
    monkeypatch.setattr(plugin_host, "discover", lambda group: {**real_discover(group), entry.name: entry})
    with pytest.raises(PluginLoadError) as err:
        await gateway_env.start(meter_plugins=[entry.name, "sqlite"])
    assert says in str(err.value) and "\n" not in str(err.value)


# -- order and weights ---------------------------------------------------------------------------------------------

async def test_higher_priority_tier_serves_and_lower_tier_is_the_fallback(gateway_env, make_mock_upstream):
    high, low = await make_mock_upstream(), await make_mock_upstream()
    mocks = {"high": high, "low": low}
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("low", low, priority=0, weight=100)
    gateway_env.add_channel("high", high, priority=5, weight=1)
    await gateway_env.start()
    for _ in range(10):
        response, tag = await post(gateway_env, key, message())
        assert response.status == 200 and receivers(tag, mocks) == ["high"]
    high.fail_next(529)
    response, tag = await post(gateway_env, key, message())
    assert response.status == 200 and sorted(receivers(tag, mocks)) == ["high", "low"]
    rows = await gateway_env.usage_rows(11)
    assert [r["channel_name"] for r in rows] == ["high"] * 10 + ["low"]
    assert rows[-1]["attempts"] == 2


async def test_weights_share_a_tier(gateway_env, make_mock_upstream):
    heavy, light = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("heavy", heavy, weight=3)
    gateway_env.add_channel("light", light, weight=1)
    await gateway_env.start(plugin_options={"channels": {"seed": 20251101}})
    total = 160
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        for _ in range(total):      # one keep-alive connection, so the run stays fast
            response = await conn.request("POST", "/v1/messages", {"x-api-key": key}, json_body=message())
            assert response.status == 200
    assert len(heavy.served) + len(light.served) == total
    # Expected 120 / 40; the bounds are over 5 standard deviations wide.
    assert 95 <= len(heavy.served) <= 145, (len(heavy.served), len(light.served))


# -- failover ------------------------------------------------------------------------------------------------------

async def test_failover_on_connect_error_then_the_dead_channel_cools_down(gateway_env, make_mock_upstream):
    good = await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("dead", closed_port_url(), priority=1)
    gateway_env.add_channel("good", good, priority=0)
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        first = await client.messages.create(**message("first"))
        second = await client.messages.create(**message("second"))
    assert "first" in first.content[0].text and "second" in second.content[0].text
    assert len(good.served) == 2
    rows = await gateway_env.usage_rows(2)
    assert [(r["channel_name"], r["attempts"], r["status"]) for r in rows] == [("good", 2, 200), ("good", 1, 200)]


async def test_failover_on_timeout(gateway_env, make_mock_upstream):
    stuck, good = await make_mock_upstream(scenario="hang"), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("stuck", stuck, priority=1)
    gateway_env.add_channel("good", good, priority=0)
    await gateway_env.start(read_timeout=0.3)
    response, _ = await post(gateway_env, key, message("slow upstream", stream=True))
    assert response.status == 200
    assert [e for e, _ in response.sse_events()][-1] == "message_stop"
    await stuck.wait_until(lambda: stuck.disconnects == 1)      # the gateway gave up on it
    assert len(good.served) == 1 and good.served[0]["completed"]
    row = (await gateway_env.usage_rows(1))[0]
    assert (row["channel_name"], row["attempts"], row["status"]) == ("good", 2, 200)


async def test_timeout_on_the_only_channel_is_504(gateway_env, make_mock_upstream):
    stuck = await make_mock_upstream(scenario="hang")
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("stuck", stuck)
    await gateway_env.start(read_timeout=0.3)
    response, _ = await post(gateway_env, key, message())
    assert response.status == 504 and response.json()["error"]["type"] == "timeout_error"
    # The upstream took the request and may bill it: its cost is unknown, not $0.
    row = (await gateway_env.usage_rows(1))[0]
    assert (row["status"], row["error_type"], row["cost"]) == (504, "timeout_error", None)
    assert "usage unknown" in json.loads(row["prices"])["unpriced"]


async def test_an_upstream_answering_504_itself_costs_nothing(gateway_env, make_mock_upstream):
    """An error answer is the upstream's word that it did not serve the request: not billed, cost 0."""
    upstream = await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("only", upstream)
    await gateway_env.start()
    upstream.fail_next(504, error_type="timeout_error")
    response, _ = await post(gateway_env, key, message())
    assert response.status == 504
    row = (await gateway_env.usage_rows(1))[0]
    assert (row["status"], row["error_type"], row["cost"]) == (504, "timeout_error", 0.0)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 529])
async def test_failover_on_retryable_upstream_status(gateway_env, make_mock_upstream, status):
    first, second = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("first", first, priority=1)
    gateway_env.add_channel("second", second, priority=0)
    await gateway_env.start()
    first.fail_next(status)
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        reply = await client.messages.create(**message("fail over please"))
    assert "fail over please" in reply.content[0].text
    assert [r.status for r in first.requests] == [status]
    assert [r.status for r in second.requests] == [200]
    assert first.served == [] and len(second.served) == 1
    row = (await gateway_env.usage_rows(1))[0]
    assert (row["channel_name"], row["attempts"], row["status"], row["error_type"]) == ("second", 2, 200, None)


async def test_a_request_error_is_not_failed_over(gateway_env, make_mock_upstream):
    first, second = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("first", first, priority=1)
    gateway_env.add_channel("second", second, priority=0)
    await gateway_env.start()
    first.fail_next(400, message="messages.0: bad block")
    response, _ = await post(gateway_env, key, message())
    assert response.status == 400
    assert response.json()["error"] == {"type": "invalid_request_error", "message": "messages.0: bad block"}
    assert second.requests == []


async def test_when_every_channel_fails_the_client_gets_the_last_upstream_error(gateway_env, make_mock_upstream):
    first, second = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("first", first, priority=1)
    gateway_env.add_channel("second", second, priority=0)
    await gateway_env.start()
    first.fail_next(500)
    second.fail_next(529, retry_after=7)
    response, _ = await post(gateway_env, key, message())
    assert response.status == 529                      # 529 stays 529
    assert response.json()["error"]["type"] == "overloaded_error"
    assert response.header("retry-after") == "7"
    row = (await gateway_env.usage_rows(1))[0]
    assert (row["status"], row["error_type"], row["attempts"]) == (529, "overloaded_error", 2)


@pytest.mark.parametrize("failure, error_type", [("drop-after=5", "api_error"),
                                                 ("error-event-after=5", "overloaded_error")])
async def test_a_stream_that_fails_midway_is_not_retried(gateway_env, make_mock_upstream, failure, error_type):
    first, second = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("first", first, priority=1)
    gateway_env.add_channel("second", second, priority=0)
    await gateway_env.start()
    first.queue(failure)
    response, _ = await post(gateway_env, key, message("break midway", stream=True))
    assert response.status == 200                      # the head went out before the failure
    events = response.sse_events()
    assert [e for e, _ in events][:5] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta"]
    assert events[-1][0] == "error" and f'"{error_type}"' in events[-1][1]
    assert second.requests == []                       # in-band error, no second try
    row = (await gateway_env.usage_rows(1))[0]
    assert (row["channel_name"], row["status"], row["error_type"], row["attempts"]) == ("first", 200, error_type, 1)
    assert row["input_tokens"] == first.served[0]["usage"]["input_tokens"] > 0


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
async def test_retry_budget_limits_the_channels_tried(gateway_env, make_mock_upstream, max_attempts):
    mocks = [await make_mock_upstream(scenario="status=529") for _ in range(4)]
    key = gateway_env.add_key("alice")
    for i, mock in enumerate(mocks):
        gateway_env.add_channel(f"c{i}", mock, priority=10 - i)
    await gateway_env.start(plugin_options={"channels": {"max_attempts": max_attempts}})
    response, _ = await post(gateway_env, key, message())
    assert response.status == 529
    assert [len(m.requests) for m in mocks] == [1] * max_attempts + [0] * (4 - max_attempts)
    assert (await gateway_env.usage_rows(1))[0]["attempts"] == max_attempts


# -- cooldown and disabling ----------------------------------------------------------------------------------------

async def test_cooldown_honours_retry_after(gateway_env, make_mock_upstream):
    limited, spare = await make_mock_upstream(), await make_mock_upstream()
    mocks = {"limited": limited, "spare": spare}
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("limited", limited, priority=1)
    gateway_env.add_channel("spare", spare, priority=0)
    await gateway_env.start()        # the default cooldown after a 429 is 30 s: only retry-after can end it sooner
    limited.fail_next(429, retry_after=1)
    response, tag = await post(gateway_env, key, message())
    assert response.status == 200 and sorted(receivers(tag, mocks)) == ["limited", "spare"]
    for _ in range(3):               # cooling down: skipped, not tried first
        response, tag = await post(gateway_env, key, message())
        assert response.status == 200 and receivers(tag, mocks) == ["spare"]
    await asyncio.sleep(1.1)
    response, tag = await post(gateway_env, key, message())
    assert response.status == 200 and receivers(tag, mocks) == ["limited"]


async def test_overload_cools_down_but_never_disables(gateway_env, make_mock_upstream, capsys):
    busy, spare = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("busy", busy, priority=1)
    gateway_env.add_channel("spare", spare, priority=0)
    await gateway_env.start(plugin_options={"channels": {"cooldown_overloaded": 0.05}})
    for _ in range(4):
        busy.fail_next(529)
        response, _ = await post(gateway_env, key, message())
        assert response.status == 200
        await asyncio.sleep(0.06)
    assert [r.status for r in busy.requests] == [529] * 4 and len(spare.served) == 4
    response, _ = await post(gateway_env, key, message())
    assert response.status == 200 and busy.requests[-1].status == 200
    line = channels_list(gateway_env.db_path, capsys)["busy"]
    assert " yes " in line and "upstream" not in line
    assert gateway_env.query("SELECT enabled FROM channels WHERE name = 'busy'")[0][0] == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_auth_failure_disables_the_channel_with_its_reason(gateway_env, make_mock_upstream, capsys,
                                                                        status):
    revoked, good = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    if status == 401:       # the mock refuses a key it does not know, as upstream would
        gateway_env.add_channel("revoked", revoked, priority=1, api_key="sk-ant-revoked-secret")
    else:
        gateway_env.add_channel("revoked", revoked, priority=1)
        revoked.fail_next(403, error_type="permission_error", message="This organization has been disabled.")
    gateway_env.add_channel("good", good, priority=0)
    await gateway_env.start()
    response, _ = await post(gateway_env, key, message())
    assert response.status == 200 and len(good.served) == 1
    await poll(lambda: gateway_env.query("SELECT enabled FROM channels WHERE name = 'revoked'")[0][0] == 0)
    line = channels_list(gateway_env.db_path, capsys)["revoked"]
    assert " no " in line and f"upstream {status} " in line
    assert ("authentication_error" if status == 401 else "organization has been disabled") in line
    assert "sk-ant-revoked-secret" not in line
    for _ in range(3):
        response, _ = await post(gateway_env, key, message())
        assert response.status == 200
    assert len(revoked.requests) == 1


async def test_client_gets_a_non_auth_error_when_the_only_channel_key_is_refused(gateway_env, make_mock_upstream):
    revoked = await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("revoked", revoked, api_key="sk-ant-revoked-secret")
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as err:
            await client.messages.create(**message())
    assert err.value.status_code == 502 and not isinstance(err.value, anthropic.AuthenticationError)
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "api_error"
    assert "sk-ant-revoked-secret" not in str(err.value.body)
    assert [r.status for r in revoked.requests] == [401]


# -- affinity ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("session", ["header", "metadata"])
async def test_a_session_stays_on_its_channel_while_healthy_and_moves_when_it_fails(
        gateway_env, make_mock_upstream, session):
    mocks = {name: await make_mock_upstream() for name in ("a", "b", "c")}
    key = gateway_env.add_key("alice")
    for name, mock in mocks.items():
        gateway_env.add_channel(name, mock)
    await gateway_env.start(plugin_options={"channels": {"seed": 7}})

    def session_request(sid: str) -> tuple[dict, dict]:
        if session == "header":
            return message(), {"x-claude-code-session-id": sid}
        return message(metadata={"user_id": sid}), {}

    async def served_by(sid: str) -> str:
        body, headers = session_request(sid)
        response, tag = await post(gateway_env, key, body, headers)
        assert response.status == 200
        return [n for n in receivers(tag, mocks) if mocks[n].requests[-1].status == 200][0]

    pinned = {await served_by("session-1") for _ in range(10)}
    assert len(pinned) == 1               # 10 picks out of 3 equal channels by chance: p < 1e-4
    home = pinned.pop()
    others = {await served_by(f"other-{i}") for i in range(12)}
    assert len(others) > 1                # without a session, the weighted choice spreads requests

    mocks[home].fail_next(529)
    moved = await served_by("session-1")
    assert moved != home
    assert {await served_by("session-1") for _ in range(8)} == {moved}


# -- aliases and live edits ----------------------------------------------------------------------------------------

async def test_channel_aliases_are_per_channel(gateway_env, make_mock_upstream):
    first, second = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("first", first, priority=1, aliases={"team-fast": HAIKU})
    gateway_env.add_channel("second", second, priority=0, aliases={"team-fast": SONNET})
    await gateway_env.start(plugin_options={"channels": {"cooldown_overloaded": 0}})   # "first" stays first
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        reply = await client.messages.create(**message(model="team-fast"))
        assert reply.model == "team-fast"                      # the client sees the name it asked for
        assert first.requests[-1].body["model"] == HAIKU
        first.fail_next(529)
        reply = await client.messages.create(**message(model="team-fast"))
        assert reply.model == "team-fast"
        assert [r.body["model"] for r in first.requests] == [HAIKU, HAIKU]
        assert second.requests[-1].body["model"] == SONNET     # the failover channel's own alias
        reply = await client.messages.create(**message(model="claude-haiku-4.5"))   # a catalogue alias
        assert reply.model == "claude-haiku-4.5" and first.requests[-1].body["model"] == HAIKU
        assert len(first.requests) == 3 and len(second.requests) == 1
    rows = await gateway_env.usage_rows(3)
    assert [(r["requested_model"], r["upstream_model"], r["channel_name"]) for r in rows] == [
        ("team-fast", HAIKU, "first"), ("team-fast", SONNET, "second"), ("claude-haiku-4.5", HAIKU, "first")]


async def test_cli_edits_reach_the_running_gateway(gateway_env, make_mock_upstream, capsys):
    old, new = await make_mock_upstream(), await make_mock_upstream()
    mocks = {"old": old, "new": new}
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("old", old)
    await gateway_env.start()
    response, tag = await post(gateway_env, key, message())
    assert response.status == 200 and receivers(tag, mocks) == ["old"]

    db = gateway_env.db_path
    assert cli.main(["channels", "add", "new", "--base-url", new.base_url, "--api-key", MOCK_API_KEY,
                     "--db", db]) == 0
    assert cli.main(["channels", "disable", "old", "--db", db]) == 0
    assert MOCK_API_KEY not in capsys.readouterr().out
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while True:         # no restart: the gateway polls the store
        response, tag = await post(gateway_env, key, message())
        assert response.status == 200
        if receivers(tag, mocks) == ["new"]:
            break
        assert loop.time() < deadline, "the CLI edit did not reach the gateway"
        await asyncio.sleep(0.05)
    seen_by_old = len(old.requests)
    for _ in range(5):
        response, tag = await post(gateway_env, key, message())
        assert response.status == 200 and receivers(tag, mocks) == ["new"]
    assert len(old.requests) == seen_by_old


# -- plugin answers and plugin lifecycles the host must contain -------------------------------------------------

class _Plugin:
    def __init__(self, **methods):
        for name, fn in methods.items():
            setattr(self, name, fn)


async def _answer(value):
    return value


@pytest.mark.parametrize("answer", ["alice", 0, {"key_id": 1}], ids=["str", "int", "dict"])
async def test_an_auth_plugin_answering_junk_is_a_500_naming_the_plugin(answer, caplog):
    host = plugin_host.PluginHost([("junk-auth", _Plugin(authenticate=lambda request: _answer(answer)))], [], [])
    with pytest.raises(GatewayError) as err:
        await host.authenticate(None)
    assert err.value.status == 500 and "auth failed" in err.value.message
    assert "junk-auth" in caplog.text and "not a Caller" in caplog.text


@pytest.mark.parametrize("answer", ["main", ["main"], 5], ids=["str", "list-of-str", "int"])
async def test_a_router_answering_junk_is_a_500_naming_the_plugin(answer, caplog):
    host = plugin_host.PluginHost([], [("junk-router", _Plugin(route=lambda request, caller: _answer(answer)))], [])
    with pytest.raises(GatewayError) as err:
        await host.route(None, None)
    assert err.value.status == 500 and "junk-router" in caplog.text and "not a list of Channel" in caplog.text


def test_the_head_check_chain_defers_refuses_and_admits():
    """check_head: None defers to the next plugin, True admits, Reject refuses; a plugin without the hook may
    admit anything, so it admits; all deferring is a 401, as for authenticate()."""
    def refuse(request):
        raise Reject(401, "authentication_error", "not yours")
    defer, admit, no_hook = _Plugin(check_head=lambda r: None), _Plugin(check_head=lambda r: True), _Plugin()
    plugin_host.PluginHost([("a", defer), ("b", admit)], [], []).check_head(None)
    plugin_host.PluginHost([("a", defer), ("c", no_hook)], [], []).check_head(None)
    for chain, expected in ([("a", defer)], "invalid x-api-key"), ([("r", _Plugin(check_head=refuse))], "not yours"):
        with pytest.raises(GatewayError) as err:
            plugin_host.PluginHost(chain, [], []).check_head(None)
        assert (err.value.status, err.value.error_type, err.value.message) == (401, "authentication_error", expected)


async def test_a_reject_with_a_success_status_is_not_sent_as_one(caplog):
    async def authenticate(request):
        raise Reject(200, "invalid_request_error", "nope")
    host = plugin_host.PluginHost([("odd-auth", _Plugin(authenticate=authenticate))], [], [])
    with pytest.raises(GatewayError) as err:
        await host.authenticate(None)
    assert err.value.status == 500 and "400..599" in caplog.text


async def test_a_plugin_whose_close_hangs_does_not_keep_the_others_from_closing(caplog):
    closed = []

    async def hang():
        await asyncio.Event().wait()

    async def close_meter():
        closed.append("meter")
    host = plugin_host.PluginHost([("stuck", _Plugin(close=hang))], [],
                                  [("meter", _Plugin(close=close_meter, record=lambda r: _answer(None)))])
    await asyncio.wait_for(host.close(timeout=0.2), 5)
    assert closed == ["meter"] and "stuck did not close within 0.2s" in caplog.text


async def test_a_request_is_metered_even_when_its_auth_plugins_finish_hangs_until_shutdown(gateway):
    """The meter runs before the answer ends, finish() after it; an auth plugin hanging in finish() holds back
    neither the answer nor the usage row, and shutdown cancels the handler inside finish()."""
    [(_, keys)] = gateway.gateway.plugins.auth
    entered = asyncio.Event()

    async def hanging_finish(caller, record):
        entered.set()
        await asyncio.Event().wait()
    keys.finish = hanging_finish
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        response = await conn.request("POST", "/v1/messages", {"x-api-key": gateway.key},
                                      json_body={"model": "claude-haiku-4-5-20251001", "max_tokens": 16,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert response.status == 200
    await asyncio.wait_for(entered.wait(), 5)
    await gateway.gateway.shutdown(timeout=0.3)
    gateway.gateway = None
    [row] = gateway.query("SELECT status, input_tokens FROM usage")
    assert row["status"] == 200 and row["input_tokens"] > 0
