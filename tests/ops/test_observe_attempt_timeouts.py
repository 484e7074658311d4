"""apertis_upstream_attempts_total's `timeout` outcome, through a real `serve` process against the mock upstream
with the official SDK as client: a read that ran out of time is a timeout wherever it happened.
"""
from __future__ import annotations

import signal

import anthropic

from tests.support.metrics import parse, scrape, value
from tests.support.processes import MODEL, sdk_client, wait_for
from tests.support.served_gateway import DRAIN_TIMEOUT, configured_server, usage_rows


async def rows_settled(db: str, n: int) -> list[dict]:
    async def landed() -> bool:
        return len(usage_rows(db)) >= n
    await wait_for(landed, DRAIN_TIMEOUT, f"{n} usage rows")
    return usage_rows(db)


async def test_a_stream_that_goes_quiet_mid_body_is_counted_as_a_timeout(tmp_path, mock_upstream):
    """README, apertis_upstream_attempts_total: outcomes ok, failover, timeout, refused, status ("an error answer
    passed on"), abandoned.  With [upstream] read_timeout = 0.5 and an upstream that answers 200, sends its first
    events, then stays quiet 2 s between events, the gateway gives up on a read timeout (the ledger row says
    error_type timeout_error): the attempt is counted `timeout`, once, as the same timeout before the head is, so
    that a dashboard or alert on timeouts per channel sees the streams that stall once started."""
    server, db, key = configured_server(tmp_path, mock_upstream.base_url, "[upstream]\nread_timeout = 0.5\n")
    async with server:
        async with sdk_client(server.base_url, key) as client:
            try:
                async with client.messages.stream(model=MODEL, max_tokens=64,
                                                  messages=[{"role": "user", "content": "quiet " * 10}],
                                                  extra_headers={"x-mock-scenario": "event-delay=2"}) as s:
                    await s.get_final_message()
            except anthropic.APIError:
                pass            # the stream ends in an error event
        rows = await rows_settled(db, 1)
        status, _, text = await scrape(server.base_url)
        assert status == 200
        assert await server.stop(signal.SIGTERM) == 0
    assert [(r["status"], r["error_type"]) for r in rows] == [(200, "timeout_error")]
    samples = parse(text)
    attempts = {dict(k[1])["outcome"]: v for k, v in samples.items() if k[0] == "apertis_upstream_attempts_total"}
    assert attempts == {"timeout": 1}, f"attempts by outcome: {attempts}; ledger: {rows[0]['error_type']}"
    assert value(samples, "apertis_requests_in_flight") == 0 and value(samples, "apertis_streams_open") == 0
