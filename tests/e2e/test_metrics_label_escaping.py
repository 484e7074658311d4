"""Label values with a quote, a backslash and a newline (a key and a channel named so) survive both exposition
formats and the access log: prometheus_client's parsers read back exactly the names, the OpenMetrics page ends in
`# EOF`, and the request's access-log line is one line that parses."""
from __future__ import annotations

import json

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from tests.support.metrics import parse, scrape, value
from tests.support.processes import MODEL, sdk_client

KEY_NAME = 'ann "the admin" \\ ops\nteam'
CHANNEL_NAME = 'eu "main" \\ pool\n2'


@pytest.mark.parametrize("accept", [None, "application/openmetrics-text; version=1.0.0"], ids=["text", "openmetrics"])
async def test_odd_key_and_channel_names_round_trip(gateway_env, mock_upstream, capsys, accept):
    gateway_env.add_channel(CHANNEL_NAME, mock_upstream)
    key = gateway_env.add_key(KEY_NAME)
    gateway = await gateway_env.start(metrics_per_key=True, log_format="json")
    async with sdk_client(gateway_env.base_url, key) as client:
        await client.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    await gateway_env.usage_rows(1)
    status, content_type, text = await scrape(gateway_env.base_url, accept=accept)
    assert status == 200
    if accept:
        assert content_type.startswith("application/openmetrics-text") and text.endswith("# EOF\n")
    samples = parse(text, parse_openmetrics) if accept else parse(text)
    assert value(samples, "apertis_requests_total", endpoint="/v1/messages", model=MODEL, channel=CHANNEL_NAME,
                 code="200", key=KEY_NAME) == 1
    assert value(samples, "apertis_channel_up", channel=CHANNEL_NAME) == 1

    gateway.observe.access_log.flush()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    access = [json.loads(line) for line in lines if '"apertis_proxy.access"' in line]
    served = [a for a in access if a["path"] == "/v1/messages"]
    assert [(a["key_name"], a["channel_name"]) for a in served] == [(KEY_NAME, CHANNEL_NAME)]
