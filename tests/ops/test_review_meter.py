"""Review of exactly-once metering and settled quotas: failing tests, one per defect found.

Each test says in its docstring what is wrong and what is right.  Real `apertis-proxy serve` processes, the mock
upstream on 127.0.0.1, real SQLite files and a throwaway PostgreSQL server (tests/support).
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import re
from pathlib import Path
from typing import Optional

from apertis_proxy import cli
from apertis_proxy.store import service
from tests.support.gateway_process import GatewayProcess
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream

HAIKU = "claude-haiku-4-5-20251001"


def setup_store(db: str, upstream: MockUpstream, *key_flags: str) -> str:
    """A channel to the mock and a key `alice` (with `key_flags`, e.g. --quota 0.001); the key."""
    assert cli.main(["channels", "add", "main", "--base-url", upstream.base_url, "--api-key", MOCK_API_KEY,
                     "--db", db]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["keys", "create", "alice", *key_flags, "--db", db]) == 0
    return re.search(r"sk-apx-[A-Za-z0-9_-]+", out.getvalue()).group(0)


def post(port: int, key: str, body: dict, scenario: Optional[str] = None,
         timeout: float = 10.0) -> tuple[int, str, bytes]:
    """(status, request id, body) of one POST /v1/messages; `scenario` goes to the mock as x-mock-scenario."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": key}
        if scenario:
            headers["x-mock-scenario"] = scenario
        conn.request("POST", "/v1/messages", body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("request-id") or "", response.read()
    finally:
        conn.close()


def message(**extra) -> dict:
    return {"model": HAIKU, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **extra}


def ledger_ids(db: str) -> set[str]:
    conn = service.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT request_id FROM usage")}
    finally:
        conn.close()


async def ledger_holds(db: str, wanted: set[str], timeout: float) -> set[str]:
    """The ledger's request ids once they include `wanted`, or as they are when `timeout` ran out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ids = await asyncio.to_thread(ledger_ids, db)
        if wanted <= ids or loop.time() > deadline:
            return ids
        await asyncio.sleep(0.1)


# -- 1. one row the ledger refuses stops a worker's shipping for good ------------------------------------------------

async def test_a_row_the_ledger_refuses_alone_in_its_segment_does_not_stop_the_rows_after_it(pg_url, tmp_path):
    """What is wrong: `write_ledger_rows` takes a batch in which every row was refused for itself as the database
    refusing ("Not one row taken"), and raises LedgerUnavailable; the meter then keeps that segment and retries it
    for ever, and since it ships segments oldest first and stops at the first failure, no later row of that worker
    ever reaches the ledger (its spool grows until the gateway answers 503 to everyone).  Under a light load a
    segment holds one row, so one row PostgreSQL cannot store is enough: here the upstream reports a
    `service_tier` holding a NUL character (a TEXT column cannot hold it; the gateway keeps any string of up to
    64 characters there).

    What is right: a row refused for itself is logged and left out whatever else its batch holds (as it is in a
    batch with good rows), so the requests after it are metered; only errors of the database itself keep rows
    spooled."""
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, pg_url, mock)
        host = await asyncio.to_thread(GatewayProcess.start, pg_url, tmp_path / "a", flush_interval=0.05)
        try:
            status, poisoned, _ = await asyncio.to_thread(
                post, host.port, key, message(), 'usage={"service_tier": "standard\\u0000"}')
            assert status == 200
            await asyncio.sleep(0.5)            # shipped (and refused) alone, in a segment of its own
            answered = []
            for _ in range(3):
                status, request_id, _ = await asyncio.to_thread(post, host.port, key, message())
                assert status == 200
                answered.append(request_id)
            ids = await ledger_holds(pg_url, set(answered), timeout=10.0)
            assert set(answered) <= ids, (f"{len(set(answered) - ids)} of 3 answered requests never reached the "
                                          f"ledger after the refused row {poisoned}:\n{host.log[-1500:]}")
        finally:
            await asyncio.to_thread(host.kill)


# -- 2. a gateway killed in the middle of a stream ------------------------------------------------------------------

# $0.20 of Haiku 4.5 input (200,000 tokens at $1 per million) in message_start, then a slow stream.
COSTLY_START = 'usage={"input_tokens": 200000}; event-delay=3'


def open_stream(port: int, key: str) -> tuple[http.client.HTTPConnection, str]:
    """A stream started through the gateway, read up to its message_start (whose usage reports the input the
    upstream bills); the connection, left open, and the request id."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("POST", "/v1/messages", body=json.dumps(message(stream=True)).encode(),
                 headers={"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": key,
                          "x-mock-scenario": COSTLY_START})
    response = conn.getresponse()
    assert response.status == 200
    while b"message_start" not in response.readline():
        pass
    return conn, response.getheader("request-id") or ""


async def killed_mid_stream(db: str, workdir: Path, key: str) -> tuple[str, GatewayProcess]:
    """A gateway (leases of 1 s) killed with -9 while a stream that reported $0.20 of input is open, and a gateway
    started again on the same database and spool, once the killed one's lease ran out; (request id, new gateway)."""
    limits = {"limits": {"lease_seconds": 1.0}}
    first = await asyncio.to_thread(GatewayProcess.start, db, workdir, tables=limits)
    conn, request_id = await asyncio.to_thread(open_stream, first.port, key)
    await asyncio.to_thread(first.kill)
    conn.close()
    again = await asyncio.to_thread(GatewayProcess.start, db, workdir, tables=limits)
    await asyncio.sleep(2.0)            # the killed gateway's lease ran out; its spool was adopted at start
    return request_id, again


async def test_a_stream_cut_by_kill9_after_message_start_still_gets_its_ledger_row(tmp_path):
    """What is wrong: a request's row exists only in memory until the request ends, so `kill -9` of the gateway
    while a stream runs loses the request for good: the upstream had billed its input (message_start said 200,000
    input tokens) and the client had its first events, but no ledger row is ever written, not after a restart on
    the same spool either.  The ledger then under-counts every request in flight at each crash.

    What is right: a request that reached the upstream is metered exactly once also when the gateway dies: what
    the upstream reported so far (message_start's input) is made durable once reported (spooled) and lands in the
    ledger after the restart, flagged interrupted."""
    db = str(tmp_path / "gw.db")
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        request_id, again = await killed_mid_stream(db, tmp_path / "gw", key)
        try:
            status, control, _ = await asyncio.to_thread(post, again.port, key, message())
            assert status == 200
            ids = await ledger_holds(db, {request_id, control}, timeout=5.0)
            assert control in ids                   # the gateway started again ships its own rows
            assert request_id in ids, "the stream cut by kill -9 has no ledger row"
        finally:
            await asyncio.to_thread(again.kill)


async def test_a_quota_counts_a_stream_cut_by_kill9_once_its_lease_ran_out(tmp_path):
    """What is wrong: the cost of a request in flight counts against its key's quota only as a reservation under
    its process's lease.  A gateway killed in the middle of a stream that had already reported $0.20 of input
    (message_start) leaves a live admission whose lease runs out: from then on the request counts nowhere (no
    ledger row, no ended admission), so a key with a $0.05 quota already $0.15 over it is admitted again.

    What is right: a key's quota counts each request's cost exactly once, never zero: the reported cost of a
    request cut by a crash keeps counting (as its ledger row, or as an ended admission), so the next request of
    that key gets 402."""
    db = str(tmp_path / "gw.db")
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock, "--quota", "0.05")
        _, again = await killed_mid_stream(db, tmp_path / "gw", key)
        try:
            status, _, body = await asyncio.to_thread(post, again.port, key, message())
            assert status == 402, f"a key $0.15 past its $0.05 quota was answered {status}: {body[:200]!r}"
        finally:
            await asyncio.to_thread(again.kill)
