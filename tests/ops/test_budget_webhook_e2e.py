"""The budget webhook: `serve --workers 2` and a receiver on 127.0.0.1 that fails its first POST get exactly one
delivered alert per threshold (the failed attempt is retried, never duplicated by the other worker); a dead webhook
never costs a request anything."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest

from apertis_proxy.budgets.periods import period_start
from apertis_proxy.store import keys as key_store
from apertis_proxy.store import schema
from tests.support.gateway_requests import assert_error, message, poll, post
from tests.support.processes import wait_for
from tests.support.served_gateway import configured_server, usage_rows
from tests.support.rawhttp import RawConnection

QUOTA = 60                  # tokens a day; each mock reply here spends 15 (8 in, 7 out)
THRESHOLDS = [50, 100]
SETTLE = 1.5                # seconds: many ticks (0.1 s) of both workers after the last alert


class Receiver:
    """A webhook on 127.0.0.1: answers its first `fail_first` POSTs 500, then 200; records every POST."""

    def __init__(self, fail_first: int = 1) -> None:
        self.fail_first = fail_first
        self.posts: list[tuple[int, dict]] = []       # (status answered, JSON body)
        self.server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hooks/budget"

    async def start(self) -> "Receiver":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == "POST /hooks/budget HTTP/1.1", lines[0]
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        body = json.loads(await reader.readexactly(int(headers["content-length"])))
        assert headers["content-type"] == "application/json"
        status = 500 if len(self.posts) < self.fail_first else 200
        self.posts.append((status, body))
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".encode())
        await writer.drain()
        writer.close()

    def accepted(self) -> list[dict]:
        return [body for status, body in self.posts if status == 200]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_two_workers_deliver_one_alert_per_threshold(tmp_path, mock_upstream):
    receiver = await Receiver(fail_first=1).start()
    config = (f"[server]\nconfig_poll_interval = 0.1\n"
              f"[budgets]\nwebhook_url = \"{receiver.url}\"\nthresholds = {THRESHOLDS}\nwebhook_backoff = 0.1\n")
    server, db, key = configured_server(tmp_path, mock_upstream.base_url, config, "--workers", "2")
    conn = schema.connect(db)
    key_store.update_key(conn, "alice", quota_tokens=QUOTA, quota_period="day")
    conn.close()
    await server.start()
    try:
        answered = []
        for i in range(20):
            async with await RawConnection.open("127.0.0.1", server.port) as c:     # new connections: both workers
                reply = await c.request("POST", "/v1/messages", {"x-api-key": key, "connection": "close"},
                                        json_body=message(f"spend {i}"))
            answered.append(reply.status)
            if reply.status == 402:
                break
            await asyncio.sleep(0.15)       # let the spend settle, so the next request sees it
        assert answered[-1] == 402 and set(answered[:-1]) == {200}, answered

        async def both_delivered() -> bool:
            return len(receiver.accepted()) >= len(THRESHOLDS)
        await wait_for(both_delivered, 15, "both budget alerts to be delivered")
        await asyncio.sleep(SETTLE)         # any duplicate from the other worker would arrive by now
    finally:
        assert await server.stop() == 0, server.stderr
        await receiver.close()

    rows = usage_rows(db)
    day = period_start("day", rows[0]["ts"])
    accepted = receiver.accepted()
    assert sorted(a["threshold"] for a in accepted) == THRESHOLDS
    assert len(receiver.posts) == len(THRESHOLDS) + 1          # one failed attempt, retried once
    failed = receiver.posts[0][1]
    assert any(a["threshold"] == failed["threshold"] for a in accepted)
    for alert in accepted:
        assert (alert["type"], alert["key"], alert["period"], alert["period_start"], alert["unit"], alert["quota"]) \
            == ("budget_alert", "alice", "day", day, "tokens", QUOTA)
        assert alert["spend"] >= QUOTA * alert["threshold"] / 100 and alert["percent"] >= alert["threshold"]
    conn = schema.connect(db)
    try:
        recorded = [dict(r) for r in conn.execute(
            "SELECT threshold, attempts, sent_at IS NOT NULL AS sent FROM budget_alerts ORDER BY threshold")]
    finally:
        conn.close()
    assert [(r["threshold"], r["sent"]) for r in recorded] == [(50, 1), (100, 1)]
    assert sum(r["attempts"] for r in recorded) == len(THRESHOLDS) + 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_dead_webhook_costs_requests_nothing(gateway_env, mock_upstream):
    env = gateway_env
    env.add_channel("main", mock_upstream)
    key = env.add_key("alice", quota_tokens=1)       # one request reaches both thresholds at once
    await env.start(budget_webhook_url=f"http://127.0.0.1:{_closed_port()}/hook", budget_webhook_attempts=2,
                    budget_webhook_backoff=0.05)
    assert (await post(env, key, message("spend it all"))).status == 200

    def given_up() -> bool:
        return [tuple(r) for r in env.query("SELECT threshold, attempts, sent_at FROM budget_alerts"
                                            " ORDER BY threshold")] == [(80, 2, None), (100, 2, None)]
    await poll(given_up)
    assert_error(await post(env, key, message("over")), 402, "billing_error")
    errors = [r[0] for r in env.query("SELECT last_error FROM budget_alerts")]
    assert all("ConnectionRefusedError" in e for e in errors), errors


@pytest.mark.parametrize("thresholds", [[], [0], ["80"], [80.5]])
def test_bad_thresholds_are_refused_at_start(tmp_path, thresholds):
    from apertis_proxy import settings
    path = tmp_path / "c.toml"
    path.write_text(f"[budgets]\nwebhook_url = \"http://127.0.0.1:9/x\"\nthresholds = {json.dumps(thresholds)}\n")
    with pytest.raises(ValueError, match="thresholds"):
        settings.load(str(path))


def test_budgets_settings_reach_the_keys_plugin(tmp_path):
    from apertis_proxy import settings
    from apertis_proxy.plugin_host import budget_options
    path = tmp_path / "c.toml"
    path.write_text("[budgets]\nwebhook_url = \"https://hooks.example.com/x?token=1\"\nthresholds = [50, 90, 100]\n"
                    "webhook_attempts = 3\nwebhook_backoff = 0.5\n")
    loaded = settings.load(str(path))
    assert budget_options(loaded) == {"budget_webhook_url": "https://hooks.example.com/x?token=1",
                                      "budget_thresholds": [50, 90, 100], "budget_webhook_attempts": 3,
                                      "budget_webhook_backoff": 0.5}
    assert budget_options(settings.load(None)) == {}        # no webhook: no alerts
    path.write_text("[budgets]\nwebhook_url = \"ftp://example.com\"\n")
    with pytest.raises(ValueError, match="webhook_url"):
        settings.load(str(path))
