"""The usage ledger through the real gateway: what the meter writes per request, compared with what the mock
upstream reported (`mock.served`), the catalogue's prices, the CLI's totals, the shutdown flush, and a
reconciliation run of a few hundred mixed requests.

A row is matched to what a mock served by the upstream request id the gateway keeps in the row.
"""
from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any, Optional

import anthropic
import pytest

from apertis_proxy import cli
from tests.support.mock_upstream import MockUpstream
from tests.support.rawhttp import RawConnection, RawResponse, request_bytes

HAIKU = "claude-haiku-4-5-20251001"
COUNTS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}


def message(text: str = "meter me", *, stream: bool = False, model: str = HAIKU, **extra: Any) -> dict:
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}],
            "stream": stream, **extra}


def cached_system(tag: str) -> list[dict]:
    """A system prompt with a 1-hour and a 5-minute cache breakpoint (1h ones must come first)."""
    one_hour, five_minutes = {"type": "ephemeral", "ttl": "1h"}, {"type": "ephemeral"}
    return [{"type": "text", "text": f"Stable instructions {tag}. " * 10, "cache_control": one_hour},
            {"type": "text", "text": f"Project notes {tag}. " * 6, "cache_control": five_minutes}]


async def post(env, key: str, body: dict, headers: Optional[dict] = None) -> RawResponse:
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("POST", "/v1/messages", {"x-api-key": key, **(headers or {})}, json_body=body)


async def read_then_abort(env, key: str, body: dict, *, events: int = 1, after: Optional[bytes] = None,
                          reset: bool = False, headers: Optional[dict] = None) -> None:
    """Stream `body`, read `events` complete SSE events (or up to the end of the first event named `after`),
    then go away: close (FIN, as an HTTP library does) or, with `reset`, reset the connection (RST)."""
    conn = await RawConnection.open(env.gateway.host, env.gateway.port)
    try:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, **(headers or {})},
                                      json_body=body))
        head = await conn.read_head()
        assert head.status == 200
        seen = b""

        def enough() -> bool:
            if after is None:
                return seen.count(b"\n\n") >= events
            start = seen.find(b"event: " + after + b"\n")
            return start >= 0 and seen.find(b"\n\n", start) >= 0

        async for chunk in conn.iter_chunks(head):
            seen += chunk
            if enough():
                break
        assert enough() and b"message_stop" not in seen, "the stream ended before the client meant to abort"
    finally:
        if reset:   # closing with SO_LINGER 0 sends RST instead of FIN
            conn.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                            struct.pack("ii", 1, 0))
        conn.abort()


def served_by_id(*mocks: MockUpstream) -> dict[str, dict]:
    return {s["request_id"]: s for mock in mocks for s in mock.served}


def expected_cost(row: dict, prices: dict) -> float:
    five = row["cache_creation_5m_input_tokens"]
    hour = row["cache_creation_1h_input_tokens"] or 0
    if five is None:
        five = row["cache_creation_input_tokens"] - hour
    return (row["input_tokens"] * prices["input"] + row["output_tokens"] * prices["output"]
            + row["cache_read_input_tokens"] * prices["cache_read"]
            + five * prices["cache_write_5m"] + hour * prices["cache_write_1h"]) / 1_000_000


def catalogue_prices(env, model_id: str) -> dict:
    row = env.query("SELECT input, output, cache_write_5m, cache_write_1h, cache_read FROM model_prices"
                    " WHERE model_id = ? ORDER BY effective_from DESC LIMIT 1", model_id)[0]
    return dict(row)


def usage_json(db: str, capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli.main(["usage", "--json", "--db", db, *args]) == 0
    return json.loads(capsys.readouterr().out)


# -- usage per request ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_usage_with_cache_writes_split_by_ttl_then_cache_reads(gateway, stream):
    system = cached_system("ledger")
    for text in ("first turn", "second turn"):
        response = await post(gateway, gateway.key, message(text, stream=stream, system=system))
        assert response.status == 200
    rows = await gateway.usage_rows(2)
    served = served_by_id(gateway.mock)
    write, read = rows
    reported = served[write["upstream_request_id"]]["usage"]
    assert reported["cache_creation_input_tokens"] > 0
    for row in rows:
        usage = served[row["upstream_request_id"]]["usage"]
        assert {f: row[f] for f in COUNTS} == {f: usage[f] for f in COUNTS}
        assert row["stream"] == int(stream) and row["status"] == 200 and row["interrupted"] == 0
    split = reported["cache_creation"]
    assert split["ephemeral_1h_input_tokens"] > 0 and split["ephemeral_5m_input_tokens"] > 0
    assert (write["cache_creation_5m_input_tokens"], write["cache_creation_1h_input_tokens"]) == (
        split["ephemeral_5m_input_tokens"], split["ephemeral_1h_input_tokens"])
    assert read["cache_read_input_tokens"] == write["cache_creation_input_tokens"]
    assert read["cache_creation_input_tokens"] == 0

    # Cost from the catalogue, and the prices used are kept in the row.
    prices = catalogue_prices(gateway, HAIKU)
    for row in rows:
        charged = json.loads(row["prices"])
        assert {k: charged[k] for k in ("model", *prices)} == {"model": HAIKU, **prices}
        assert row["cost"] == pytest.approx(expected_cost(row, prices), rel=1e-9, abs=1e-12)
    assert write["cost"] > read["cost"] > 0      # writing the cache costs more than reading it


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_server_tool_use_is_recorded(gateway, stream):
    response = await post(gateway, gateway.key, message("please search the web", stream=stream, tools=[WEB_SEARCH]))
    assert response.status == 200
    row = (await gateway.usage_rows(1))[0]
    assert json.loads(row["server_tool_use"]) == {"web_search_requests": 1}
    assert gateway.mock.served[0]["usage"]["server_tool_use"] == {"web_search_requests": 1}


async def test_cumulative_message_deltas_last_value_wins(gateway):
    response = await post(gateway, gateway.key, message("count once, not thrice", stream=True),
                          {"x-mock-scenario": "message-deltas=3"})
    deltas = [json.loads(data)["usage"]["output_tokens"] for name, data in response.sse_events()
              if name == "message_delta"]
    assert len(deltas) == 3 and deltas[-1] == max(deltas) and sum(deltas) > deltas[-1]
    row = (await gateway.usage_rows(1))[0]
    assert row["output_tokens"] == deltas[-1] == gateway.mock.served[0]["full_usage"]["output_tokens"]


@pytest.mark.parametrize("client", ["fin-early", "rst-early", "fin-after-a-delta", "rst-after-a-delta", "sdk"])
async def test_an_interrupted_stream_records_what_the_upstream_generated(gateway, client):
    # Paced, so the client leaves while the mock is still sending; the gateway reads the rest for its usage.
    paced = {"x-mock-scenario": "event-delay=0.03; message-deltas=3"}
    body = message("a long answer the client walks away from", stream=True, system=cached_system("abort"))
    if client == "sdk":
        async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as sdk:
            params = {k: v for k, v in body.items() if k != "stream"}
            async with sdk.messages.stream(**params, extra_headers=paced) as stream:
                async for _ in stream.text_stream:
                    break                             # leaving the block closes the response
    else:
        how, _, when = client.partition("-")
        await read_then_abort(gateway, gateway.key, body, reset=how == "rst", headers=paced,
                              **({"events": 4} if when == "early" else {"after": b"message_delta"}))
    row = (await gateway.usage_rows(1))[0]
    served = gateway.mock.served[0]
    assert row["interrupted"] == 1 and row["status"] == 200
    assert {f: row[f] for f in COUNTS} == {f: served["usage"][f] for f in COUNTS}
    assert row["input_tokens"] > 0 and row["cache_creation_input_tokens"] > 0
    # Read to its end after the client left: the final cumulative count, not the placeholder.
    assert served["completed"] and gateway.mock.disconnects == 0
    assert row["output_tokens"] == served["full_usage"]["output_tokens"] > 1
    assert row["cost"] > 0


async def test_upstream_errors_are_rows_with_status_and_error_type(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    # No cooldown: every request below reaches the one channel (a resting one would refuse them with 503).
    await gateway_env.start(plugin_options={"channels": {"cooldown_overloaded": 0}})
    mock_upstream.fail_next(529)
    assert (await post(gateway_env, key, message())).status == 529
    mock_upstream.fail_next(400, message="messages.0.content: bad")
    assert (await post(gateway_env, key, message())).status == 400
    mock_upstream.queue("error-event-after=4")
    response = await post(gateway_env, key, message(stream=True))
    assert response.status == 200 and response.sse_events()[-1][0] == "error"
    rows = await gateway_env.usage_rows(3)
    upstream_ids = [r.request_id for r in mock_upstream.requests]
    assert [(r["status"], r["error_type"], r["upstream_request_id"]) for r in rows] == [
        (529, "overloaded_error", upstream_ids[0]), (400, "invalid_request_error", upstream_ids[1]),
        (200, "overloaded_error", upstream_ids[2])]
    assert [(r["input_tokens"], r["output_tokens"], r["cost"]) for r in rows[:2]] == [(0, 0, 0.0), (0, 0, 0.0)]
    assert rows[2]["input_tokens"] == mock_upstream.served[0]["usage"]["input_tokens"] > 0
    assert all(r["key_name"] == "alice" and r["channel_name"] == "main" for r in rows)


async def test_prices_set_changes_the_cost_of_later_requests(gateway, capsys):
    assert (await post(gateway, gateway.key, message("before"))).status == 200
    before = (await gateway.usage_rows(1))[0]
    assert cli.main(["prices", "set", "claude-haiku-4.5", "--input", "100", "--output", "200",
                     "--db", gateway.db_path]) == 0
    new_prices = catalogue_prices(gateway, HAIKU)
    assert (new_prices["input"], new_prices["output"]) == (100.0, 200.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while True:     # the gateway picks the new catalogue up by polling the store
        assert (await post(gateway, gateway.key, message("after"))).status == 200
        rows = await gateway.usage_rows(len(gateway.mock.served))
        if json.loads(rows[-1]["prices"])["input"] == 100.0:
            break
        assert loop.time() < deadline, "the new prices never reached the gateway"
        await asyncio.sleep(0.05)
    after = rows[-1]
    assert after["cost"] == pytest.approx(expected_cost(after, new_prices), rel=1e-9)
    assert after["cost"] > 50 * before["cost"]
    assert gateway.query("SELECT cost FROM usage WHERE id = ?", before["id"])[0][0] == before["cost"]


async def test_usage_json_totals_match_the_ledger_and_the_upstream(gateway_env, make_mock_upstream, capsys):
    one, two = await make_mock_upstream(), await make_mock_upstream()
    alice, bob = gateway_env.add_key("alice"), gateway_env.add_key("bob")
    gateway_env.add_channel("one", one, priority=1)
    gateway_env.add_channel("two", two, priority=0)
    await gateway_env.start()
    one.fail_next(500)
    sent = 0
    for n in range(6):
        for key in (alice, bob):
            body = message(f"totals {n}", stream=n % 2 == 0, system=cached_system(str(n % 2)))
            assert (await post(gateway_env, key, body)).status == 200
            sent += 1
    rows = await gateway_env.usage_rows(sent)
    totals = usage_json(gateway_env.db_path, capsys)
    served = [s["usage"] for s in one.served + two.served]
    assert totals["requests"] == sent == len(rows) == len(served)
    for field in COUNTS:
        assert totals[field] == sum(r[field] for r in rows) == sum(u[field] for u in served)
    assert totals["cost"] == pytest.approx(sum(r["cost"] for r in rows), rel=1e-9)
    by_key = usage_json(gateway_env.db_path, capsys, "--by", "key")
    assert sorted((g["key"], g["requests"]) for g in by_key["by"]) == [("alice", sent // 2), ("bob", sent // 2)]
    assert usage_json(gateway_env.db_path, capsys, "--key", "bob")["output_tokens"] == sum(
        r["output_tokens"] for r in rows if r["key_name"] == "bob")


async def test_shutdown_flushes_every_row(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    # The meter would wait a minute before its first write: only the shutdown flush can write these rows.
    await gateway_env.start(plugin_options={"sqlite": {"flush_interval": 60, "batch_size": 100_000}})
    for n in range(20):
        assert (await post(gateway_env, key, message(f"row {n}", stream=n % 2 == 0))).status == 200
    conn = await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port)
    await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, "x-mock-scenario": "event-delay=0.02"},
                                  json_body=message("still streaming at shutdown", stream=True)))
    head = await conn.read_head()
    reader = asyncio.create_task(conn.read_until_eof())
    assert gateway_env.query("SELECT COUNT(*) FROM usage")[0][0] == 0
    await gateway_env.stop()
    tail = await reader
    conn.close()
    assert head.status == 200 and b"message_stop" in tail      # the stream in flight was let finish
    rows = [dict(r) for r in gateway_env.query("SELECT * FROM usage ORDER BY id")]
    assert len(rows) == 21
    served = served_by_id(mock_upstream)
    for row in rows:
        assert {f: row[f] for f in COUNTS} == {f: served[row["upstream_request_id"]]["usage"][f] for f in COUNTS}


# -- reconciliation ------------------------------------------------------------------------------------------------

async def test_reconciliation_of_a_few_hundred_mixed_requests(gateway_env, make_mock_upstream):
    """Mixed traffic, run concurrently: the ledger's totals equal exactly what the upstreams reported."""
    total, concurrency = 300, 24
    flaky, steady = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("flaky", flaky, priority=1)
    gateway_env.add_channel("steady", steady, priority=0)
    # No cooldowns, so the flaky channel stays first and every failure it is told to produce fails over.
    await gateway_env.start(plugin_options={"channels": {
        "cooldown_overloaded": 0, "cooldown_server_error": 0, "cooldown_rate_limited": 0}})
    failures = [529, 500, 503, 429] * 8
    for status in failures:           # every 7th request the flaky channel sees fails before any byte
        flaky.fail_next(status)
        for _ in range(6):
            flaky.queue(None)

    aborted = 0
    gate = asyncio.Semaphore(concurrency)
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as sdk:

        async def one(n: int) -> None:
            nonlocal aborted
            kind = n % 6
            text = f"request {n}: " + "words " * (n % 11)
            async with gate:
                if kind == 0:
                    reply = await sdk.messages.create(**{k: v for k, v in message(text).items() if k != "stream"})
                    assert reply.usage.output_tokens > 0
                elif kind == 1:
                    response = await post(gateway_env, key, message(text, stream=True))
                    assert response.sse_events()[-1][0] == "message_stop"
                elif kind == 2:      # the client walks away from a paced stream: early, or after a usage delta
                    await read_then_abort(gateway_env, key, message(text, stream=True), events=1 + n % 6,
                                          after=b"message_delta" if n % 3 == 0 else None, reset=n % 4 == 0,
                                          headers={"x-mock-scenario": "event-delay=0.02; message-deltas=3"})
                    aborted += 1
                elif kind == 3:
                    response = await post(gateway_env, key, message(text, system=cached_system(str(n % 5))))
                    assert response.status == 200
                elif kind == 4:
                    response = await post(gateway_env, key, message(text, stream=True, system=cached_system(
                        str(n % 3))), {"x-mock-scenario": "message-deltas=3"})
                    assert response.sse_events()[-1][0] == "message_stop"
                else:
                    response = await post(gateway_env, key, message(text, stream=n % 4 == 1))
                    assert response.status == 200

        await asyncio.gather(*(one(n) for n in range(total)))

    rows = await gateway_env.usage_rows(total, timeout=10.0)
    served = served_by_id(flaky, steady)
    assert len(rows) == total == len(served)
    assert sum(r["interrupted"] for r in rows) == aborted
    assert sum(r["attempts"] == 2 for r in rows) == len(failures)      # every failure failed over, once
    assert all(r["status"] == 200 and r["error_type"] is None for r in rows)
    for field in COUNTS:
        assert sum(r[field] for r in rows) == sum(s["usage"][field] for s in served.values()), field
    # Row by row too: each row carries exactly what its upstream reported.
    for row in rows:
        usage = served[row["upstream_request_id"]]["usage"]
        assert {f: row[f] for f in COUNTS} == {f: usage[f] for f in COUNTS}, row
