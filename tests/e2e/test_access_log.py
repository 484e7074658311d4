"""The access log of `apertis-proxy serve`: one line per request, JSON with `[logging] format = "json"`.

Every line the process writes to stderr must then parse as JSON, its own messages included (one parser for a log
shipper); each request has exactly one access line whose fields agree with the ledger row of the same request id;
no secret (the user's key, the channel's upstream key) appears anywhere.
"""
from __future__ import annotations

import json
import signal

import anthropic
import pytest

from tests.support.mock_upstream import MOCK_API_KEY
from tests.support.rawhttp import RawConnection
from tests.support.processes import MODEL, ServeProcess, sdk_client, wait_for
from tests.support.served_gateway import DRAIN_TIMEOUT, configured_server, usage_rows

ACCESS_FIELDS = {"time", "level", "logger", "message", "request_id", "key_name", "client", "method", "path",
                 "requested_model", "upstream_model", "channel_name", "attempts", "status", "error_type", "stream",
                 "ttfb_ms", "duration_ms", "input_tokens", "output_tokens", "cache_read_input_tokens",
                 "cache_creation_input_tokens", "cost"}


async def traffic(server: ServeProcess, key: str) -> None:
    """A JSON answer, a stream, an upstream 529, a wrong key and a health probe."""
    async with sdk_client(server.base_url, key) as client:
        await client.messages.create(model=MODEL, max_tokens=32, messages=[{"role": "user", "content": "json"}])
        async with client.messages.stream(model=MODEL, max_tokens=32,
                                          messages=[{"role": "user", "content": "stream"}]) as stream:
            await stream.get_final_message()
        with pytest.raises(anthropic.APIStatusError):
            await client.messages.create(model=MODEL, max_tokens=32, messages=[{"role": "user", "content": "x"}],
                                         extra_headers={"x-mock-scenario": "status=529"})
    async with sdk_client(server.base_url, "sk-apx-not-a-key") as stranger:
        with pytest.raises(anthropic.AuthenticationError):
            await stranger.messages.create(model=MODEL, max_tokens=32,
                                           messages=[{"role": "user", "content": "x"}])
    async with await RawConnection.open("127.0.0.1", server.port) as conn:
        assert (await conn.request("GET", "/health")).status == 200


async def serve_and_log(tmp_path, mock_upstream, config: str) -> tuple[str, str, list[dict]]:
    """(stderr of a server that got `traffic()` and stopped, the user's key, the ledger rows)."""
    server, db, key = configured_server(tmp_path, mock_upstream.base_url, config)
    async with server:
        await traffic(server, key)

        async def metered() -> bool:
            return len(usage_rows(db)) == 3
        await wait_for(metered, DRAIN_TIMEOUT, "the usage rows")
        assert await server.stop(signal.SIGTERM) == 0
    return server.stderr, key, usage_rows(db)


@pytest.mark.parametrize("metrics", ["", "[metrics]\nenabled = false\n"], ids=["metrics-on", "metrics-off"])
async def test_json_access_log_has_one_line_per_request_and_no_secrets(tmp_path, mock_upstream, metrics):
    stderr, key, rows = await serve_and_log(tmp_path, mock_upstream, '[logging]\nformat = "json"\n' + metrics)
    lines = [json.loads(line) for line in stderr.splitlines()]      # every line, not only the access log
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"] == "apertis_proxy.server" and "listening on" in line["message"] for line in lines)
    access = [line for line in lines if line["logger"] == "apertis_proxy.access"]
    assert all(set(line) == ACCESS_FIELDS for line in access)
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("POST", "/v1/messages", 200), ("POST", "/v1/messages", 200), ("POST", "/v1/messages", 529),
        ("POST", "/v1/messages", 401), ("GET", "/health", 200)]
    assert len({a["request_id"] for a in access}) == len(access)

    by_id = {a["request_id"]: a for a in access}
    for row in rows:                                # the three metered requests agree with the ledger
        line = by_id[row["request_id"]]
        assert (line["key_name"], line["requested_model"], line["upstream_model"], line["channel_name"]) == (
            "alice", row["requested_model"], row["upstream_model"], "main")
        assert (line["status"], line["error_type"], line["stream"], line["attempts"]) == (
            row["status"], row["error_type"], bool(row["stream"]), row["attempts"])
        for name in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
            assert line[name] == row[name], name
        assert line["cost"] == row["cost"]
        assert line["ttfb_ms"] == row["ttfb_ms"] and line["duration_ms"] > 0
        assert line["client"].startswith("127.0.0.1:")
    assert [a["stream"] for a in access[:2]] == [False, True]
    assert access[2]["error_type"] == "overloaded_error"
    assert (access[3]["key_name"], access[3]["error_type"]) == (None, "authentication_error")
    assert access[0]["input_tokens"] > 0 and access[0]["cost"] > 0

    assert key not in stderr and "sk-apx-not-a-key" not in stderr and MOCK_API_KEY not in stderr


async def test_text_access_log_is_the_default(tmp_path, mock_upstream):
    stderr, key, rows = await serve_and_log(tmp_path, mock_upstream, "")
    access = [line for line in stderr.splitlines() if " apertis_proxy.access: " in line]
    assert len(access) == 5
    first = access[0]
    assert '"POST /v1/messages 200"' in first
    for pair in (f"request_id={rows[0]['request_id']}", "key_name=alice", f"requested_model={MODEL}",
                 "channel_name=main", "status=200", "stream=false", f"input_tokens={rows[0]['input_tokens']}"):
        assert pair in first.split(), pair
    assert key not in stderr and MOCK_API_KEY not in stderr


async def test_access_log_can_be_turned_off(tmp_path, mock_upstream):
    stderr, _, rows = await serve_and_log(tmp_path, mock_upstream, "[logging]\naccess_log = false\n")
    assert len(rows) == 3
    assert "apertis_proxy.access" not in stderr and "listening on" in stderr


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_line_quotes_what_a_client_chose_and_writes_a_missing_price_as_null(fmt):
    """Lines are assembled from pieces remembered per kind of request: a client's model name or path with quotes,
    spaces or `%` must still come out quoted (text) or escaped (JSON), and an unpriced request's cost as null."""
    from apertis_proxy.observe.access_log import AccessLog
    from apertis_proxy.plugin_api import UsageRecord

    record = UsageRecord(request_id="req_1", started_at=0.0, endpoint="/v1/messages", key_name="alice",
                         requested_model='odd "model" %s 1', cost=None, ttfb_ms=12.5, stream=True,
                         input_tokens=5000, output_tokens=7, status=200)
    entries = [(0.0, 0.0123456, 200, "POST", "/v1/messages", "[::1]:5", "req_1", record),
               (0.0, 1.5, 404, "GET", "/x%d y", "127.0.0.1:6", "req_2", None)]
    log = AccessLog(fmt)
    first, second = log.lines([log.entry(*e) for e in entries * 2]).decode().splitlines()[:2]
    if fmt == "json":
        a, b = json.loads(first), json.loads(second)
        assert (a["requested_model"], a["cost"], a["ttfb_ms"], a["duration_ms"]) == (
            'odd "model" %s 1', None, 12.5, 12.345)
        assert (a["input_tokens"], a["output_tokens"], a["stream"], a["client"]) == (5000, 7, True, "[::1]:5")
        assert (b["path"], b["status"], b["error_type"], b["cost"], b["ttfb_ms"]) == (
            "/x%d y", 404, "not_found_error", 0.0, None)
    else:
        assert 'requested_model="odd \\"model\\" %s 1"' in first and " cost=null" in first
        assert " input_tokens=5000 output_tokens=7 " in first and " duration_ms=12.345 " in first
        assert ' path="/x%d y" ' in second and " error_type=not_found_error " in second
