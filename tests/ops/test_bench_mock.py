"""The benchmark's tools tell the truth: the mock upstream (bench/mock_upstream.py)
speaks the Messages API well enough for the official SDK (a benchmark against a
mock that a real client could not read would measure nothing), and the stream
load generator (bench/loadgen.py) counts streams, events and failures right.
Real subprocesses, real sockets, real SDK; no speed is asserted here (that is
bench/'s job)."""
from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MOCK = BENCH / "mock_upstream.py"
KEY = "sk-bench-test-key"


@pytest.fixture(scope="module")
def mock_url():
    proc = subprocess.Popen([sys.executable, str(MOCK), "--port", "0", "--api-key", KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("listening "), (line, proc.poll())
        yield "http://" + line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


def client(url: str, key: str = KEY, scenario: str = "") -> anthropic.Anthropic:
    headers = {"x-mock": scenario} if scenario else None
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, default_headers=headers)


def test_paced_events_arrive_spread_out(mock_url):
    """Paced streams: nothing for ttfb_ms, then one delta per gap_ms (lower bounds
    only, which hold however slow the machine)."""
    with client(mock_url, scenario="events=4&ttfb_ms=150&gap_ms=60") as c:
        started = time.monotonic()
        arrivals = []
        with c.messages.stream(**ASK) as stream:
            for event in stream:
                if event.type == "text":
                    arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 4
    # Event i leaves the mock at ttfb + i * gap (tick-rounded), so it cannot arrive earlier. Only these lower
    # bounds hold on a busy machine: a late reader sees events bunched, so the gaps between two arrivals do not.
    for i, arrived in enumerate(arrivals):
        assert arrived >= 0.14 + i * 0.055, arrivals


ASK = {"model": "claude-sonnet-5-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


def test_json_answer_is_a_message_with_usage(mock_url):
    with client(mock_url) as c:
        msg = c.messages.create(**ASK)
    assert msg.type == "message" and msg.role == "assistant" and msg.stop_reason == "end_turn"
    assert msg.content[0].type == "text" and msg.content[0].text
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (25, 7)


def test_realistic_head_is_read_by_the_sdk(mock_url):
    """real_head=1: the same message under a head as the API sends it (request id, rate limits, Cloudflare's)."""
    with client(mock_url, scenario="real_head=1") as c:
        raw = c.messages.with_raw_response.create(**ASK)
    msg = raw.parse()
    assert msg.type == "message" and (msg.usage.input_tokens, msg.usage.output_tokens) == (25, 7)
    assert len(raw.headers.raw) == 25
    for name in ("request-id", "cf-ray", "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-tokens-reset"):
        assert raw.headers.get(name), name


@pytest.mark.parametrize("scenario,deltas", [("events=12", 12), ("events=3&ttfb_ms=150&gap_ms=20", 3)],
                         ids=["bulk", "paced"])
def test_streams_carry_every_event_type_and_final_usage(mock_url, scenario, deltas):
    with client(mock_url, scenario=scenario) as c, c.messages.stream(**ASK) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert types[:2] == ["message_start", "content_block_start"]
    assert types.count("text") == deltas
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.stop_reason == "end_turn" and final.content[0].text == "lorem ipsum " * deltas
    assert (final.usage.input_tokens, final.usage.output_tokens) == (25, deltas * 2)


def test_wrong_key_is_an_anthropic_authentication_error(mock_url):
    with client(mock_url, key="sk-wrong") as c, pytest.raises(anthropic.AuthenticationError) as err:
        c.messages.create(**ASK)
    assert err.value.status_code == 401
    assert err.value.body["error"]["type"] == "authentication_error"


def loadgen(url: str, tmp_path: Path, *args: str, key: str = KEY) -> dict:
    body = tmp_path / "stream.json"
    body.write_bytes(json.dumps({**ASK, "stream": True}).encode())
    res = subprocess.run([sys.executable, str(BENCH / "loadgen.py"), "--url", url, "--body-file", str(body),
                          "-H", f"x-api-key: {key}", "--timeout", "20", "--max-time", "20", *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


@pytest.mark.parametrize("procs", ["1", "2"])
def test_loadgen_counts_every_stream_and_event(mock_url, tmp_path, procs):
    # 5 deltas + 6 fixed events (message_start, content_block_start, ping, stop, delta, message_stop).
    out = loadgen(f"{mock_url}/v1/messages?events=5&ttfb_ms=100&gap_ms=10", tmp_path, "--connections", "30",
                  "--requests", "2", "--expect-events", "11", "--procs", procs)
    assert (out["ok"], out["error_total"], out["statuses"]) == (60, 0, {"200": 60})
    assert out["events"] == 60 * 11
    assert out["ttfb_ms"]["p50"] >= 95 and out["latency_ms"]["p50"] >= out["ttfb_ms"]["p50"]


def test_loadgen_reports_incomplete_streams_and_refusals(mock_url, tmp_path):
    short = loadgen(f"{mock_url}/v1/messages?events=5", tmp_path, "--connections", "4", "--expect-events", "12")
    assert (short["ok"], short["errors"], short["statuses"]) == (0, {"incomplete_stream": 4}, {"200": 4})
    assert short["first_error"] == "incomplete_stream: 11 events of 12"
    refused = loadgen(f"{mock_url}/v1/messages?events=5", tmp_path, "--connections", "3", key="sk-wrong")
    assert (refused["ok"], refused["errors"], refused["statuses"]) == (0, {"status": 3}, {"401": 3})
