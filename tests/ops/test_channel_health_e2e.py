"""Channel health an operator can see: `serve --workers 2` and the CLI as real processes, MockUpstreams as channels,
the official SDK as the client.

A channel answering 529, 500 or 401 shows as cooling down (with the cause) or disabled in `channels list --json`
within a second or two; a failed-over request's single ledger row lists every attempt; `usage` counts the failures
of a channel that never answered; when every channel serving a model rests, the client gets a 503 it retries.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.support.mock_upstream import MOCK_API_KEY
from tests.support.processes import CliRunner, ServeProcess, sdk_client, wait_for
from tests.support.served_gateway import usage_rows

MODEL = "claude-haiku-4-5-20251001"
REVOKED_KEY = "sk-ant-revoked-key-0123456789abcdef"
CONFIG = """
[plugins.options.channels]
poll_interval = 0.1
max_attempts = 4
cooldown_overloaded = 300
cooldown_server_error = 300

[plugins.options.sqlite]
flush_interval = 0.05
"""


def serve(tmp_path: Path, db: str) -> ServeProcess:
    config = tmp_path / "apertis.toml"
    config.write_text(CONFIG)
    return ServeProcess(tmp_path, db, "--config", str(config), "--workers", "2")


async def channels_by_name(cli: CliRunner) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in json.loads(await cli.ok("channels", "list", "--json"))}


async def ask(client: anthropic.AsyncAnthropic, text: str, model: str = MODEL) -> anthropic.types.Message:
    return await client.messages.create(model=model, max_tokens=32, messages=[{"role": "user", "content": text}])


async def test_failures_show_in_channels_list_the_ledger_and_usage(tmp_path, make_mock_upstream):
    busy = await make_mock_upstream(scenario="status=529")
    broken = await make_mock_upstream(scenario="status=500")
    revoked = await make_mock_upstream()
    good = await make_mock_upstream()
    db = str(tmp_path / "gateway.db")
    cli = CliRunner(tmp_path, db)
    await cli.add_channel("busy", busy.base_url, MOCK_API_KEY, "--priority", "4")
    await cli.add_channel("broken", broken.base_url, MOCK_API_KEY, "--priority", "3")
    await cli.add_channel("revoked", revoked.base_url, REVOKED_KEY, "--priority", "2")
    await cli.add_channel("good", good.base_url, MOCK_API_KEY, "--priority", "1")
    key = await cli.create_key("alice")
    before = await channels_by_name(cli)
    assert {n: c["state"] for n, c in before.items()} == dict.fromkeys(before, "serving")

    async with serve(tmp_path, db) as server:
        async with sdk_client(server.base_url, key) as client:
            reply = await ask(client, "fail over three times")
        assert reply.content[0].text

        async def settled() -> bool:
            states = {n: c["state"] for n, c in (await channels_by_name(cli)).items()}
            return states == {"busy": "cooling", "broken": "cooling", "revoked": "disabled", "good": "serving"}
        await wait_for(settled, 5.0, "channels list to show the failures", interval=0.2)
        listed = await channels_by_name(cli)
        assert listed["busy"]["cooling_cause"] == "overloaded"
        assert listed["busy"]["recent_failures"] == {"overloaded": 1}
        assert listed["busy"]["last_error"].startswith("529 overloaded_error")
        assert listed["broken"]["cooling_cause"] == "server_error"
        assert listed["broken"]["recent_failures"] == {"server_error": 1}
        assert listed["broken"]["cooling_until"] > listed["broken"]["last_error_at"] + 200
        assert listed["revoked"]["disabled_reason"].startswith("upstream 401 authentication_error")
        assert listed["revoked"]["recent_failures"] == {"credential": 1}
        assert listed["good"]["recent_failures"] == {} and listed["good"]["last_error"] is None

        async def one_row() -> bool:
            return len(usage_rows(db)) == 1
        await wait_for(one_row, 5.0, "the ledger row")
        (row,) = usage_rows(db)
        assert listed["busy"]["last_error_request_id"] == row["request_id"]
        attempts = json.loads(row["attempt_log"])
        assert [(a["channel"], a["outcome"], a["status"]) for a in attempts] == [
            ("busy", "overloaded", 529), ("broken", "server_error", 500), ("revoked", "credential", 401),
            ("good", "ok", 200)]
        assert row["attempts"] == 4 and row["channel_name"] == "good" and row["status"] == 200

        by_channel = {g["channel"]: g for g in json.loads(await cli.ok("usage", "--by", "channel", "--json"))["by"]}
        assert by_channel["good"]["requests"] == 1 and by_channel["good"]["failed_attempts"] == 0
        assert by_channel["busy"]["requests"] == 0               # it never answered, yet it is counted
        assert by_channel["busy"]["failures"] == {"overloaded": 1}
        assert by_channel["revoked"]["failures"] == {"credential": 1}
        dead = json.loads(await cli.ok("usage", "--channel", "broken", "--json"))
        assert (dead["requests"], dead["failed_attempts"], dead["failures"]) == (0, 1, {"server_error": 1})
        text = await cli.ok("channels", "list")
        assert "cooling until" in text and "(overloaded" in text and "server_error 1" in text
        assert "FAILED ATTEMPTS" in await cli.ok("usage", "--by", "channel")

        stderr = server.stderr
        assert f"channel busy cools down for 300.0s after overloaded (529 overloaded_error) on request " \
               f"{row['request_id']}" in stderr
    for output in (stderr, json.dumps(listed), text):
        assert REVOKED_KEY not in output and MOCK_API_KEY not in output
    conn = sqlite3.connect(db)
    try:
        stored = json.dumps([list(r) for r in conn.execute("SELECT * FROM channel_health")])
    finally:
        conn.close()
    assert REVOKED_KEY not in stored and MOCK_API_KEY not in stored


async def test_every_channel_down_is_a_503_the_sdk_retries(tmp_path, make_mock_upstream):
    busy = await make_mock_upstream(scenario="status=529")
    revoked = await make_mock_upstream()
    db = str(tmp_path / "gateway.db")
    cli = CliRunner(tmp_path, db)
    await cli.add_channel("busy", busy.base_url, MOCK_API_KEY, "--models", MODEL)
    await cli.add_channel("revoked", revoked.base_url, REVOKED_KEY, "--models", "claude-sonnet-5-5")
    key = await cli.create_key("alice")
    async with serve(tmp_path, db) as server:
        async with sdk_client(server.base_url, key) as client:
            with pytest.raises(anthropic.APIStatusError) as first:      # the upstream's own 529, passed on
                await ask(client, "overloaded")
            assert first.value.status_code == 529
            assert (await wait_cooling(cli, "busy"))["state"] == "cooling"
            for _ in range(3):      # each worker rests the channel after its own first 529
                with pytest.raises(anthropic.APIStatusError) as resting:
                    await ask(client, "still resting")
                if resting.value.status_code != 529:
                    break
            error = resting.value
            assert error.status_code == 503
            assert error.response.json()["error"]["type"] == "overloaded_error"
            assert 1 <= int(error.response.headers["retry-after"]) <= 300
            assert "cooling down" in error.response.json()["error"]["message"]

            with pytest.raises(anthropic.APIStatusError) as refused:    # the channel's key is refused: 502
                await ask(client, "revoked", model="claude-sonnet-5-5")
            assert refused.value.status_code == 502
            await wait_for(lambda: _state_is(cli, "revoked", "disabled"), 5.0, "revoked to be disabled")
            with pytest.raises(anthropic.APIStatusError) as outage:     # every channel for it disabled: 503
                await ask(client, "revoked again", model="claude-sonnet-5-5")
            assert outage.value.status_code == 503
            assert outage.value.response.json()["error"]["type"] == "api_error"
            assert "disabled" in outage.value.response.json()["error"]["message"]

            with pytest.raises(anthropic.NotFoundError):                 # a model no channel serves: still 404
                await ask(client, "nobody", model="claude-opus-5-5")

        # The SDK's default retries: the 503 is retried (its retry-after honoured up to the SDK's cap), then given.
        retrying = anthropic.AsyncAnthropic(base_url=server.base_url, api_key=key, max_retries=1, timeout=30.0)
        async with retrying:
            raw = retrying.messages.with_raw_response
            with pytest.raises(anthropic.APIStatusError) as retried:
                await raw.create(model="claude-sonnet-5-5", max_tokens=8,
                                 messages=[{"role": "user", "content": "retried"}])
        assert retried.value.status_code == 503
        assert retried.value.response.request.headers.get("x-stainless-retry-count") == "1"


async def wait_cooling(cli: CliRunner, name: str) -> dict[str, Any]:
    await wait_for(lambda: _state_is(cli, name, "cooling"), 5.0, f"{name} to cool down")
    return (await channels_by_name(cli))[name]


async def _state_is(cli: CliRunner, name: str, state: str) -> bool:
    return (await channels_by_name(cli))[name]["state"] == state
