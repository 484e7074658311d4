"""GET /metrics after known traffic, read with prometheus_client's own parsers.

The traffic goes through the official Python SDK to a gateway with two channels on two mock upstreams: JSON and
streamed answers, a stream the client abandons after its first event, a failover (the first channel answers 529,
the second serves), an upstream 529 passed on, a wrong key and a model no channel serves. Each scrape must show
the counters moved by exactly that traffic, token and cost totals equal to the ledger's, and the in-flight gauges
back at 0. Clients outside `[metrics] allow` get 403.
"""
from __future__ import annotations

import re
from pathlib import Path

import anthropic
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from apertis_proxy.observe.app import client_ip
from apertis_proxy.observe.recorder import COST_UNIT
from apertis_proxy.plugin_host import NoObserver
from tests.support.rawhttp import RawConnection
from tests.support.metrics import Samples, parse, scrape, scrape_samples, total, value
from tests.support.processes import MODEL, sdk_client

def ledger_totals(env) -> dict[str, float]:
    rows = env.query("SELECT input_tokens, output_tokens, cache_read_input_tokens, cache_creation_input_tokens,"
                     " cost FROM usage")
    return {"input": sum(r[0] for r in rows), "output": sum(r[1] for r in rows),
            "cache_read": sum(r[2] for r in rows), "cache_write": sum(r[3] for r in rows),
            "cost": sum(round(r[4] / COST_UNIT) for r in rows) * COST_UNIT}


def assert_usage_matches_ledger(samples: Samples, env) -> None:
    ledger = ledger_totals(env)
    for kind in ("input", "output", "cache_read", "cache_write"):
        assert total(samples, "apertis_tokens_total", type=kind) == ledger[kind], kind
    assert ledger["input"] > 0 and ledger["output"] > 0
    assert total(samples, "apertis_cost_usd_total") == ledger["cost"] > 0


async def ask(client: anthropic.AsyncAnthropic, text: str, **kw) -> anthropic.types.Message:
    return await client.messages.create(model=kw.pop("model", MODEL), max_tokens=64,
                                        messages=[{"role": "user", "content": text}], **kw)


async def stream_all(client: anthropic.AsyncAnthropic, text: str) -> anthropic.types.Message:
    async with client.messages.stream(model=MODEL, max_tokens=64,
                                      messages=[{"role": "user", "content": text}]) as stream:
        return await stream.get_final_message()


async def abandon_stream(client: anthropic.AsyncAnthropic, text: str) -> None:
    async with client.messages.stream(model=MODEL, max_tokens=256, messages=[{"role": "user", "content": text}],
                                      extra_headers={"x-mock-scenario": "event-delay=0.2"}) as stream:
        async for _ in stream:
            break           # leaving the block closes the connection mid-stream


@pytest.fixture
async def two_channels(gateway_env, make_mock_upstream):
    """Channel `primary` (tried first) and `backup`; a channel that failed stays cooling for the whole test."""
    primary, backup = await make_mock_upstream(), await make_mock_upstream()
    gateway_env.add_channel("primary", primary, priority=1)
    gateway_env.add_channel("backup", backup, priority=0)
    gateway_env.key = gateway_env.add_key("alice")
    await gateway_env.start(plugin_options={"channels": {"cooldown_overloaded": 300}})
    gateway_env.primary, gateway_env.backup = primary, backup
    return gateway_env


async def test_counters_move_by_exactly_the_traffic_sent(two_channels):
    env = two_channels
    before = await scrape_samples(env.base_url)
    assert value(before, "apertis_build_info", version=__import__("apertis_proxy").__version__,
                 python=__import__("platform").python_version()) == 1
    assert value(before, "apertis_channel_up", channel="primary") == 1
    assert value(before, "apertis_channel_up", channel="backup") == 1

    async with sdk_client(env.base_url, env.key) as client:
        for i in range(2):
            assert f"json {i}" in (await ask(client, f"json {i}")).content[0].text
        assert "streamed" in (await stream_all(client, "streamed")).content[0].text
        await abandon_stream(client, "abandoned after the first event")
        await env.usage_rows(n=4)        # the abandoned stream is over and metered
        first = await scrape_samples(env.base_url)
        assert_usage_matches_ledger(first, env)

        env.primary.fail_next(529)       # primary 529 -> failover to backup
        assert "fail over" in (await ask(client, "fail over")).content[0].text
        with pytest.raises(anthropic.APIStatusError) as overloaded:   # backup 529, then primary 529: passed on
            await ask(client, "overloaded everywhere", extra_headers={"x-mock-scenario": "status=529"})
        assert overloaded.value.status_code == 529
        with pytest.raises(anthropic.NotFoundError):
            await ask(client, "no such model", model="gpt-nothing")
    async with sdk_client(env.base_url, "sk-apx-wrong") as stranger:
        with pytest.raises(anthropic.AuthenticationError):
            await ask(stranger, "who am I")
    await env.usage_rows(n=7)
    second = await scrape_samples(env.base_url)

    messages = {"endpoint": "/v1/messages", "model": MODEL}
    assert value(first, "apertis_requests_total", channel="primary", code="200", **messages) == 4
    assert value(first, "apertis_requests_total", endpoint="/metrics", model="none", channel="none", code="200") == 1
    # The abandoned stream is still read to its end upstream (so its usage is metered): an ok attempt.
    assert value(first, "apertis_upstream_attempts_total", channel="primary", outcome="ok") == 4
    assert value(first, "apertis_upstream_attempts_total", channel="primary", outcome="abandoned") == 0
    assert total(first, "apertis_upstream_attempts_total") == 4
    assert value(first, "apertis_request_duration_seconds_count", endpoint="/v1/messages", stream="true") == 2
    assert value(first, "apertis_request_duration_seconds_count", endpoint="/v1/messages", stream="false") == 2
    assert value(first, "apertis_time_to_first_byte_seconds_count", channel="primary") == 2
    assert value(first, "apertis_upstream_duration_seconds_count", channel="primary") == 4

    # Between the two scrapes: exactly the second batch of traffic.
    def moved(name: str, **labels: str) -> float:
        return value(second, name, **labels) - value(first, name, **labels)
    assert moved("apertis_requests_total", channel="backup", code="200", **messages) == 1
    assert moved("apertis_requests_total", channel="primary", code="529", **messages) == 1
    assert moved("apertis_requests_total", channel="primary", code="200", **messages) == 0
    assert moved("apertis_requests_total", endpoint="/v1/messages", model="other", channel="none", code="404") == 1
    assert moved("apertis_requests_total", endpoint="/v1/messages", model="none", channel="none", code="401") == 1
    assert moved("apertis_requests_total", endpoint="/metrics", model="none", channel="none", code="200") == 1
    assert total(second, "apertis_requests_total") - total(first, "apertis_requests_total") == 5
    assert moved("apertis_upstream_attempts_total", channel="primary", outcome="failover") == 1
    assert moved("apertis_upstream_attempts_total", channel="backup", outcome="ok") == 1
    assert moved("apertis_upstream_attempts_total", channel="backup", outcome="failover") == 1
    assert moved("apertis_upstream_attempts_total", channel="primary", outcome="status") == 1
    assert total(second, "apertis_upstream_attempts_total") - total(first, "apertis_upstream_attempts_total") == 4
    assert moved("apertis_request_duration_seconds_count", endpoint="/v1/messages", stream="false") == 4
    assert moved("apertis_upstream_duration_seconds_count", channel="primary") == 2
    assert moved("apertis_upstream_duration_seconds_count", channel="backup") == 2

    assert_usage_matches_ledger(second, env)
    assert value(second, "apertis_tokens_total", model="other", type="input") == 0     # refused before upstream
    assert value(second, "apertis_requests_in_flight") == 0
    assert value(second, "apertis_streams_open") == 0
    assert value(second, "apertis_ledger_pending_rows", meter="sqlite") == 0
    assert value(second, "apertis_ledger_rows_written_total", meter="sqlite") == 7
    # Both channels failed with 529 and cool down.
    assert value(second, "apertis_channel_up", channel="primary") == 0
    assert value(second, "apertis_channel_up", channel="backup") == 0


async def test_gauges_count_requests_while_they_run(gateway):
    async with sdk_client(gateway.base_url, gateway.key) as client:
        async with client.messages.stream(model=MODEL, max_tokens=64,
                                          messages=[{"role": "user", "content": "slow stream"}],
                                          extra_headers={"x-mock-scenario": "event-delay=0.1"}) as stream:
            async for _ in stream:
                break
            during = await scrape_samples(gateway.base_url)
            await stream.get_final_message()
    assert value(during, "apertis_requests_in_flight") == 1       # the stream, not the scrape
    assert value(during, "apertis_streams_open") == 1
    await gateway.usage_rows(n=1)
    after = await scrape_samples(gateway.base_url)
    assert value(after, "apertis_requests_in_flight") == 0
    assert value(after, "apertis_streams_open") == 0


async def test_openmetrics_when_asked_for(gateway):
    async with sdk_client(gateway.base_url, gateway.key) as client:
        await ask(client, "one")
    await gateway.usage_rows(n=1)
    status, content_type, text = await scrape(gateway.base_url, accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    samples = parse(text, parse_openmetrics)
    assert value(samples, "apertis_requests_total", endpoint="/v1/messages", model=MODEL, channel="main",
                 code="200") == 1
    assert_usage_matches_ledger(samples, gateway)
    status, content_type, _ = await scrape(gateway.base_url)
    assert content_type.startswith("text/plain")


async def test_per_key_labels_are_opt_in(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(metrics_per_key=True)
    async with sdk_client(gateway_env.base_url, key) as client:
        await ask(client, "per key")
    await gateway_env.usage_rows(n=1)
    samples = await scrape_samples(gateway_env.base_url)
    assert value(samples, "apertis_requests_total", endpoint="/v1/messages", model=MODEL, channel="main",
                 code="200", key="alice") == 1
    assert total(samples, "apertis_cost_usd_total", key="alice") == ledger_totals(gateway_env)["cost"]


async def test_scrapes_from_outside_the_allowed_networks_are_refused(gateway_env, mock_upstream):
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(metrics_allow=["10.0.0.0/8"])      # loopback, where the test connects from, is not in it
    status, _, text = await scrape(gateway_env.base_url)
    assert status == 403
    body = __import__("json").loads(text)
    assert body["type"] == "error" and body["error"]["type"] == "permission_error"
    assert body["request_id"].startswith("req_")
    host, port = gateway_env.gateway.host, gateway_env.gateway.port
    async with await RawConnection.open(host, port) as conn:       # the server is still up
        assert (await conn.request("GET", "/health")).status == 200


async def test_behind_a_trusted_proxy_the_forwarded_client_is_judged(gateway_env, mock_upstream):
    """A local reverse proxy forwards outside clients: /metrics sees them, not the proxy's loopback address."""
    gateway_env.add_channel("main", mock_upstream)
    gw = await gateway_env.start(trusted_proxies=["127.0.0.1/32"])
    async with await RawConnection.open(gw.host, gw.port) as conn:
        outside = await conn.request("GET", "/metrics", {"x-forwarded-for": "203.0.113.5"})
    assert outside.status == 403 and b"permission_error" in outside.body
    async with await RawConnection.open(gw.host, gw.port) as conn:
        local = await conn.request("GET", "/metrics", {"x-forwarded-for": "127.0.0.1"})
    assert local.status == 200


async def test_metrics_can_be_turned_off(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    gw = await gateway_env.start(metrics_enabled=False, access_log=False)
    assert isinstance(gw.plugins.observer, NoObserver)        # nothing follows the requests
    async with sdk_client(gateway_env.base_url, key) as client:
        await ask(client, "still served")
    status, _, text = await scrape(gateway_env.base_url)
    assert status == 404 and "not_found_error" in text
    async with await RawConnection.open(gw.host, gw.port) as conn:
        assert (await conn.request("GET", "/ready")).status == 200


def test_only_loopback_may_scrape_by_default(gateway_env):
    from apertis_proxy.observe.app import Observability
    observe = Observability(gateway_env.settings(), _NoPlugins(), None, None)
    assert observe.may_scrape("127.0.0.1:40000") and observe.may_scrape("[::1]:40000")
    assert observe.may_scrape("[::ffff:127.0.0.1]:40000")
    assert observe.may_scrape("::1") and observe.may_scrape("127.0.0.1")    # forwarded clients: no port
    assert not observe.may_scrape("192.0.2.7:40000") and not observe.may_scrape("unknown")
    assert not observe.may_scrape("10.1.2.3:40000") and not observe.may_scrape("[2001:db8::1]:40000")
    assert not observe.may_scrape("2001:db8::1:5")
    assert client_ip("not-an-address") is None


class _NoPlugins:
    meters: list = []
    routers: list = []

    def refusal(self) -> None:
        return None


README = Path(__file__).resolve().parents[2] / "README.md"
# Labels Prometheus itself gives every series it scrapes.
TARGET_LABELS = {"instance", "job"}


def readme_expressions() -> list[str]:
    """The README's PromQL: each query of its `promql` block and each alert rule's `expr`."""
    text = README.read_text()
    queries = [part for block in re.findall(r"```promql\n(.*?)```", text, re.S)
               for part in block.split("\n\n")]
    rules = [block for block in re.findall(r"```yaml\n(.*?)```", text, re.S) if "- alert:" in block]
    exprs = [re.search(r"expr:(.*?)(?:\n\s*for:|\Z)", rule, re.S).group(1)
             for block in rules for rule in block.split("- alert:")[1:]]
    return [" ".join(line.split("#")[0] for line in expr.splitlines()).strip().removeprefix(">").strip()
            for expr in queries + exprs]


def labels_used(expr: str) -> set[str]:
    grouped = {name.strip() for names in re.findall(r"\bby \(([^)]*)\)", expr) for name in names.split(",")}
    selected = {name for selector in re.findall(r"\{([^}]*)\}", expr)
                for name in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector)}
    return grouped | selected


async def test_the_readme_queries_and_alerts_name_what_the_gateway_exposes(gateway):
    """Every metric the README's queries and alerting rules name is in a scrape after a JSON request and a
    stream, and every label they group or select by is one those metrics carry (or Prometheus's own)."""
    async with sdk_client(gateway.base_url, gateway.key) as client:
        await ask(client, "one")
        await stream_all(client, "two")
    await gateway.usage_rows(n=2)
    samples = await scrape_samples(gateway.base_url)
    exprs = readme_expressions()
    assert len(exprs) >= 7                          # three queries and four rules
    for expr in exprs:
        names = set(re.findall(r"\b(apertis_\w+)", expr))
        carried = set(TARGET_LABELS)
        for name in names:
            series = [labels for sample, labels in samples if sample == name]
            assert series, f"{name} (in {expr!r}) is not in the scrape"
            carried |= {label for labels in series for label, _ in labels}
        assert names or "up{" in expr, expr
        assert labels_used(expr) <= carried, (expr, labels_used(expr) - carried)
