"""The row of a request that shutdown's deadline cut after it went upstream: like the row of one cut by kill -9
(ledger_spool: error_type gateway_stopped, the serving attempt listed with outcome gateway_stopped), it names the
attempt that was running and says the gateway stopped it.

README ("Operating it"): every ledger row lists the channels it tried in `attempt_log`; docs/billing.md: a request
cut before the upstream reported usage because "shutdown's deadline came" is `gateway_stopped`, and "an attempt
the gateway died during (gateway_stopped) is not a failure of its channel".  A real gateway (in process, real
sockets, the SQLite ledger) in front of a ScriptedChannel that never finishes its answer."""
from __future__ import annotations

import json

import pytest

from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.scripted_channel import HANG, HEAD_SSE, chunk, event, message_start
from tests.support.scripted_gateway import ask, stream_until

PING = event("ping", {"type": "ping"})
CASES = {
    "stream-before-message-start": (True, [HEAD_SSE, chunk(PING), HANG], b"ping"),
    "stream-after-message-start": (True, [HEAD_SSE, chunk(message_start(12)), HANG], b"message_start"),
    "json-waiting": (False, [HANG], None),
}


async def _cut_by_shutdown(env, stream: bool, marker) -> list[dict]:
    if marker is not None:
        conn, _ = await stream_until(env, marker, ask(stream))
    else:
        conn = await RawConnection.open(env.gateway.host, env.gateway.port)
    try:
        if marker is None:
            await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": env.key}, json_body=ask(stream)))
            await env.channel.wait_finished(1)          # the upstream has the request
        await env.gateway.shutdown(timeout=0.3)         # the deadline cuts it; the meter ships at close
        env.gateway = None
    finally:
        conn.abort()
    return [dict(r) for r in env.query("SELECT * FROM usage")]


@pytest.mark.parametrize("case", list(CASES))
async def test_a_request_cut_by_shutdowns_deadline_lists_its_attempt(scripted, case):
    stream, script, marker = CASES[case]
    await scripted.start()
    scripted.channel.queue(script)
    [row] = await _cut_by_shutdown(scripted, stream, marker)
    assert row["interrupted"] == 1 and row["attempts"] == 1
    tried = [(a["channel"], a["outcome"]) for a in json.loads(row["attempt_log"])]
    assert tried == [("main", "gateway_stopped")], (tried, row["error_type"])


@pytest.mark.parametrize("case", ["stream-before-message-start", "json-waiting"])
async def test_a_request_cut_by_shutdown_before_any_usage_is_gateway_stopped(scripted, case):
    stream, script, marker = CASES[case]
    await scripted.start()
    scripted.channel.queue(script)
    [row] = await _cut_by_shutdown(scripted, stream, marker)
    assert row["cost"] is None
    assert row["error_type"] == "gateway_stopped", (row["status"], row["error_type"])
