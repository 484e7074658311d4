"""Budgets through the real gateway (mock upstream, real SQLite): quotas that reset per UTC period, requests the
gateway refused counted per key and reason, and the ledger exported as CSV.

A period rolls over in the test by moving the stored period start back in time (spend per period is keyed by the
period's first day), so nothing waits for midnight.  The budget webhook is in test_budget_webhook_e2e.py.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json

import pytest

from apertis_proxy import cli
from apertis_proxy.budgets.periods import period_end, period_start
from apertis_proxy.store.budgets import UNKNOWN_KEY
from tests.support.rawhttp import RawConnection
from tests.support.gateway_requests import SONNET, assert_error, message, poll, post


def run_cli(capsys, db: str, *args: str) -> str:
    assert cli.main([*args, "--db", db]) == 0
    return capsys.readouterr().out


async def test_a_daily_quota_refuses_once_spent_and_admits_after_the_day_rolls(gateway_env, mock_upstream, capsys):
    env = gateway_env
    env.add_channel("main", mock_upstream)
    key = env.add_key("daily", quota_cost=0.000001, quota_period="day")     # any one request spends more
    await env.start()

    ok = await post(env, key, message("first of the day"))
    assert ok.status == 200, ok.body
    refused = await post(env, key, message("one too many"))
    body = assert_error(refused, 402, "billing_error")
    assert "quota for this day" in body["error"]["message"]
    rows = await env.usage_rows(n=1)
    start = period_start("day", rows[0]["ts"])
    await poll(lambda: [tuple(r) for r in env.query("SELECT period, start, cost FROM key_period_spend")]
               == [("day", start, rows[0]["cost"])])
    assert f"resets on {period_end('day', start)}" in body["error"]["message"]

    # What the CLI reports for the current period.
    listed = json.loads(run_cli(capsys, env.db_path, "keys", "list", "--json"))[0]
    assert (listed["quota_period"], listed["period_start"]) == ("day", start)
    assert listed["period_spent_cost"] == pytest.approx(rows[0]["cost"])
    assert listed["spent_cost"] == listed["period_spent_cost"]
    shown = json.loads(run_cli(capsys, env.db_path, "keys", "show", "daily", "--json"))
    assert shown["periods"] == [{"start": start, "cost": rows[0]["cost"], "tokens": listed["period_spent_tokens"]}]

    # The day rolls over: yesterday's spend no longer counts against the quota, the lifetime spend stays.
    env.conn.execute("UPDATE key_period_spend SET start = date(start, '-1 day')")

    for _ in range(100):
        if (await post(env, key, message("a new day"))).status == 200:
            break
        await asyncio.sleep(0.05)       # the plugin re-reads spend every 0.1 s here
    else:
        pytest.fail("the key was not admitted again after its quota period rolled over")
    assert len(await env.usage_rows(n=2)) == 2
    assert_error(await post(env, key, message("and spent again")), 402, "billing_error")
    await poll(lambda: len(env.query("SELECT 1 FROM key_period_spend")) == 2)
    listed = json.loads(run_cli(capsys, env.db_path, "keys", "list", "--json"))[0]
    lifetime = sum(r["cost"] for r in await env.usage_rows(n=2))
    assert listed["spent_cost"] == pytest.approx(lifetime)
    assert listed["period_spent_cost"] == pytest.approx(lifetime - rows[0]["cost"])


async def _raw(env, headers: dict, body: dict):
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("POST", "/v1/messages", headers, json_body=body)


async def test_refused_requests_are_counted_per_key_and_reason(gateway_env, mock_upstream, capsys):
    env = gateway_env
    env.add_channel("main", mock_upstream)
    alice = env.add_key("alice", rpm=1)
    narrow = env.add_key("narrow", models=["claude-haiku-4-5-20251001"])
    off = env.add_key("off")
    broke = env.add_key("broke", quota_tokens=1)
    payer = env.add_key("payer", quota_cost=100.0)
    env.conn.execute("UPDATE keys SET enabled = 0 WHERE name = 'off'")
    await env.start(allow_unpriced=True)      # unpriced models are served, except to keys with a USD quota

    wrong_secret = "sk-apx-not-a-real-key-" + "x" * 20
    sent = {
        (UNKNOWN_KEY, "invalid_key", 401): [({"x-api-key": wrong_secret}, message())] * 3,
        (UNKNOWN_KEY, "missing_key", 401): [({}, message())] * 2,
        ("off", "disabled", 401): [({"x-api-key": off}, message())] * 2,
        ("narrow", "model_not_allowed", 403): [({"x-api-key": narrow}, message(model=SONNET))],
    }
    for (_, _, status), requests in sent.items():
        for headers, body in requests:
            assert (await _raw(env, headers, body)).status == status
    assert (await post(env, alice, message())).status == 200
    for _ in range(2):
        assert (await post(env, alice, message())).status == 429
    assert (await post(env, broke, message())).status == 200
    for _ in range(4):
        assert (await post(env, broke, message())).status == 402
    expected = {(k, reason, status): len(requests) for (k, reason, status), requests in sent.items()}
    expected[("alice", "rpm", 429)] = 2
    expected[("broke", "quota", 402)] = 4
    # Refused after the key check, before any channel: a ledger row (an unpriced model for a USD quota).
    for _ in range(2):
        assert_error(await post(env, payer, message(model="claude-unpriced-9")), 402, "billing_error")

    def counted() -> dict:
        return {(r["key_name"], r["reason"], r["status"]): r["count"]
                for r in env.query("SELECT key_name, reason, status, SUM(count) AS count FROM refusals"
                                   " GROUP BY key_name, reason")}
    await poll(lambda: counted() == expected)
    assert len(await env.usage_rows(n=4)) == 4      # alice's and broke's answers, payer's two refusals
    assert not env.query("SELECT 1 FROM refusals WHERE key_name LIKE '%' || ? || '%'", wrong_secret[8:])

    report = json.loads(run_cli(capsys, env.db_path, "usage", "--refused", "--json"))
    assert report["refused"] == sum(expected.values()) + 2
    assert {(r["key_name"], r["reason"], r["status"]): r["count"] for r in report["by"]
            if r["source"] == "auth"} == expected
    assert [(r["key_name"], r["reason"], r["status"], r["count"]) for r in report["by"]
            if r["source"] == "ledger"] == [("payer", "billing_error", 402, 2)]
    assert json.loads(run_cli(capsys, env.db_path, "usage", "--json"))["refused"] == sum(expected.values())
    text = run_cli(capsys, env.db_path, "usage", "--refused", "--key", "broke")
    assert "quota" in text and "rpm" not in text
    assert "4 x quota (402)" in run_cli(capsys, env.db_path, "keys", "show", "broke")


async def test_usage_csv_matches_the_ledger_and_json_carries_errors(gateway_env, mock_upstream, capsys):
    env = gateway_env
    env.add_channel("main", mock_upstream)
    key = env.add_key("alice")
    await env.start()
    for i in range(3):
        assert (await post(env, key, message(f"row {i}, with \"quotes\""))).status == 200
    failed = await post(env, key, message("fails"), {"x-mock-scenario": "status=400; error-type=invalid_request_error"})
    assert failed.status == 400
    rows = await env.usage_rows(n=4)
    assert len(rows) == 4

    out = run_cli(capsys, env.db_path, "usage", "--csv")
    assert out.count("\r\n") == 5                      # RFC 4180 line ends, a header and four rows
    parsed = list(csv.reader(io.StringIO(out, newline="")))
    assert parsed[0] == list(rows[0])
    assert [dict(zip(parsed[0], r)) for r in parsed[1:]] == [
        {k: "" if v is None else str(v) for k, v in row.items()} for row in rows]
    assert any('"' in r["prices"] and "," in r["prices"] for r in rows if r["prices"])   # quoting was needed

    summary = json.loads(run_cli(capsys, env.db_path, "usage", "--json", "--by", "key"))
    assert (summary["requests"], summary["errors"], summary["interrupted"]) == (4, 1, 0)
    assert summary["by"][0]["errors"] == 1 and summary["by"][0]["key"] == "alice"
    month = json.loads(run_cli(capsys, env.db_path, "usage", "--json", "--by", "month"))["by"]
    assert [(m["month"], m["requests"]) for m in month] == [(period_start("month", rows[0]["ts"]), 4)]
