"""Requests cut after they went upstream and before the upstream reported any usage: their cost is unknown (NULL),
whichever way they were cut (kill -9, shutdown's deadline, a client that left), and they are not a priced model's
"unpriced requests"; the batch endpoints note and bill their upstream calls through kill -9 as well.

Real `apertis-proxy serve` processes killed with -9, the mock upstream on 127.0.0.1, real SQLite files and a
throwaway PostgreSQL server (tests/support; helpers from test_ledger_faults.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import time
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from apertis_proxy import cli
from apertis_proxy.store import service
from tests.ops.test_ledger_faults import ledger_ids, message, post, setup_store
from tests.support.gateway_process import GatewayProcess
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.processes import wait_for

BATCHES = "/v1/messages/batches"
LEASE = {"limits": {"lease_seconds": 1.0}}      # a killed gateway's admissions run out quickly


def cli_json(*argv: str):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main([*argv]) == 0
    return json.loads(out.getvalue())


async def rows_appear(db: str, timeout: float = 10.0) -> set[str]:
    """The ledger's request ids once it holds any, or none when `timeout` ran out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ids = await asyncio.to_thread(ledger_ids, db)
        if ids or loop.time() > deadline:
            return ids
        await asyncio.sleep(0.1)


async def killed_while_held(host: GatewayProcess, upstream_has: Awaitable, request: Callable[[], object]) -> None:
    """`request()` sent through `host`, which is killed with -9 once `upstream_has` says the held upstream has it."""
    call = asyncio.ensure_future(asyncio.to_thread(request))
    try:
        await asyncio.wait_for(upstream_has, 10.0)
    finally:
        await asyncio.to_thread(host.kill)
        with contextlib.suppress(OSError, http.client.HTTPException):
            await call


async def upstream_has_a_request(mock: MockUpstream) -> None:
    while not mock.requests:
        await asyncio.sleep(0.02)


async def killed_before_answer(db: str, workdir: Path, mock: MockUpstream, key: str, body: dict) -> GatewayProcess:
    """A gateway killed with -9 while the mock holds back the JSON answer of `body` (the upstream has the request
    and may bill it), and a gateway started again on the same database and spool once the killed one's leases ran
    out and its gateway_stopped row was shipped; the new gateway."""
    first = await asyncio.to_thread(GatewayProcess.start, db, workdir, tables=LEASE)
    await killed_while_held(first, upstream_has_a_request(mock),
                            lambda: post(first.port, key, body, "first-byte-delay=5"))
    killed = time.monotonic()
    again = await asyncio.to_thread(GatewayProcess.start, db, workdir, tables=LEASE)
    assert len(await rows_appear(db)) == 1, "the gateway_stopped row was not shipped"
    # The killed gateway's lease, renewed at the latest when it was killed, ran out.
    await asyncio.sleep(max(0.0, killed + 2 * LEASE["limits"]["lease_seconds"] - time.monotonic()))
    return again


# -- a row without usage downstream ----------------------------------------------------------------------------------

async def test_usage_does_not_count_the_attempt_a_gateway_died_during_as_a_channel_failure(tmp_path):
    """The gateway_stopped row of a request cut by kill -9 lists its attempt with the outcome gateway_stopped: the
    gateway died, the channel did not fail, so `usage --by channel` counts the request and no failed attempt."""
    db = str(tmp_path / "gw.db")
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        again = await killed_before_answer(db, tmp_path / "gw", mock, key, message())
        await asyncio.to_thread(again.kill)
    (main,) = cli_json("usage", "--by", "channel", "--json", "--db", db)["by"]
    assert (main["channel"], main["requests"], main["failed_attempts"], main["failures"]) == ("main", 1, 0, {})

async def test_prices_list_does_not_call_a_priced_model_unpriced_for_a_gateway_stopped_row(tmp_path):
    """`prices list` counts a model's requests that hold usage and no cost (the model had no price); a
    gateway_stopped row of Haiku 4.5 (no usage: cut before the answer) is not one of them."""
    db = str(tmp_path / "gw.db")
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        again = await killed_before_answer(db, tmp_path / "gw", mock, key, message())
        try:
            listed = await asyncio.to_thread(cli_json, "prices", "list", "--json", "--db", db)
            haiku = next(e for e in listed if e["id"] == "claude-haiku-4-5-20251001")
            assert haiku["input"] is not None                   # priced
            assert haiku["unpriced_requests"] == 0, "a priced model is reported with unpriced requests"
        finally:
            await asyncio.to_thread(again.kill)


# -- the batch endpoints through kill -9 -----------------------------------------------------------------------------

def batch_body() -> dict:
    return {"requests": [{"custom_id": "a", "params": message()}]}


@contextlib.asynccontextmanager
async def mock_holds(mock: MockUpstream, handler: str):
    """The mock's batches `handler` (_create, _get, ...) holds its answer until the block ends; yields an Event
    set once a request reached it."""
    reached, released = asyncio.Event(), asyncio.Event()
    original = getattr(mock.batches, handler)

    async def held(conn, request, version) -> None:
        reached.set()
        await released.wait()
        with contextlib.suppress(Exception):       # its client, a killed gateway, is gone
            await original(conn, request, version)

    setattr(mock.batches, handler, held)
    try:
        yield reached
    finally:
        setattr(mock.batches, handler, original)
        released.set()


def batch_usage(db: str) -> tuple[int, int]:
    """(rows, input tokens) of the ledger's batch endpoint rows."""
    conn = service.connect(db)
    try:
        n, tokens = conn.execute("SELECT COUNT(*), COALESCE(SUM(input_tokens), 0) FROM usage WHERE endpoint = ?",
                                 (BATCHES,)).fetchone()
        return int(n), int(tokens)
    finally:
        conn.close()


async def test_a_batch_create_cut_by_kill9_after_the_upstream_took_it_still_gets_a_ledger_row(tmp_path):
    """A batch create the upstream took (the batch exists upstream and will be processed) when the gateway was
    killed with -9 gets a ledger row after the restart: the create is noted as sent before it goes out, like a
    Messages request (a gateway_stopped row with the batches endpoint)."""
    db = str(tmp_path / "gw.db")
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        first = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        async with mock_holds(mock, "_create") as reached:
            await killed_while_held(first, reached.wait(), lambda: first.request("POST", BATCHES, key, batch_body()))
        again = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        try:
            status, _, _ = await asyncio.to_thread(post, again.port, key, message())
            assert status == 200
            await rows_appear(db)
            await asyncio.sleep(0.5)            # the adopted spool is shipped at start, before the control row
            rows, _ = await asyncio.to_thread(batch_usage, db)
            assert rows == 1, "a batch create the upstream took before kill -9 has no ledger row"
        finally:
            await asyncio.to_thread(again.kill)


async def test_batch_results_fetched_while_the_gateway_is_killed_are_still_billed_once(tmp_path):
    """A batch's results are billed once, at the fetch that marks the batch settled.  Everything that waits on
    the upstream (the batch's created_at, for the prices of that moment) happens before the mark, and the billed
    row is spooled right after it: a gateway killed while the lookup is pending leaves the batch unsettled, and
    the next fetch bills the results, once."""
    db = str(tmp_path / "gw.db")
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        first = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        status, _, raw = await asyncio.to_thread(first.request, "POST", BATCHES, key, batch_body())
        assert status == 200, raw[:300]
        batch_id = json.loads(raw)["id"]
        await asyncio.sleep(0.5)                # its owner recorded in the store
        async with mock_holds(mock, "_get") as reached:
            await killed_while_held(first, reached.wait(),
                                    lambda: first.request("GET", f"{BATCHES}/{batch_id}/results", key))
        again = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        try:
            status, _, raw = await asyncio.to_thread(again.request, "GET", f"{BATCHES}/{batch_id}/results", key)
            assert status == 200 and b"succeeded" in raw
            async def billed() -> bool:
                return (await asyncio.to_thread(batch_usage, db))[1] > 0
            await wait_for(billed, 10.0, "the batch's succeeded results to be billed (shipped)")
        finally:
            await asyncio.to_thread(again.kill)


# -- the same cut on a graceful stop, or by the client ---------------------------------------------------------------

def row_of(db: str, request_id: str) -> dict:
    conn = service.connect(db)
    try:
        cur = conn.execute("SELECT status, error_type, interrupted, input_tokens, cost FROM usage WHERE request_id = ?",
                           (request_id,))
        return dict(zip([c[0] for c in cur.description], cur.fetchone()))
    finally:
        conn.close()


async def test_a_request_cut_by_the_shutdown_deadline_before_its_answer_is_not_billed_zero(tmp_path):
    """A request the upstream holds when shutdown's deadline cuts it, before any usage was known, has its cost
    unknown (NULL) and error_type gateway_stopped, as the same cut by kill -9 has; not $0 and not
    client_closed_request (its client never left)."""
    db = str(tmp_path / "gw.db")
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        host = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        try:
            slow = asyncio.ensure_future(asyncio.to_thread(post, host.port, key, message(), "first-byte-delay=8",
                                                           15.0))
            await asyncio.wait_for(upstream_has_a_request(mock), 10.0)
            await asyncio.to_thread(host.stop)          # SIGTERM: the request outlives shutdown_timeout
            with contextlib.suppress(OSError, http.client.HTTPException):
                await slow
        finally:
            await asyncio.to_thread(host.kill)
        (request_id,) = await asyncio.to_thread(ledger_ids, db)
        row = await asyncio.to_thread(row_of, db, request_id)
        assert row["interrupted"] and row["input_tokens"] == 0
        assert (row["cost"], row["error_type"]) == (None, "gateway_stopped"), f"metered as {row}"


async def test_a_stream_its_client_left_before_the_upstream_answered_is_not_billed_zero(tmp_path):
    """A stream the upstream had taken whose client left before its head came back (the upstream request is
    cancelled) has its cost unknown (NULL): the upstream may bill it, as for the same cut by a dying gateway."""
    db = str(tmp_path / "gw.db")
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        host = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", host.port, timeout=10)
            conn.request("POST", "/v1/messages", body=json.dumps(message(stream=True)).encode(),
                         headers={"content-type": "application/json", "anthropic-version": "2023-06-01",
                                  "x-api-key": key, "x-mock-scenario": "first-byte-delay=5"})
            await asyncio.wait_for(upstream_has_a_request(mock), 10.0)
            conn.close()                                # the client leaves
            (request_id,) = await rows_appear(db)
            row = await asyncio.to_thread(row_of, db, request_id)
            assert row["interrupted"] and row["input_tokens"] == 0
            assert row["cost"] is None, f"metered as {row}"
        finally:
            await asyncio.to_thread(host.kill)


# -- what such a request counts against a quota -----------------------------------------------------------------------

# Haiku 4.5's output is $5 per million tokens: 32,000 of them reserve at least $0.16, more than the $0.10 quota
# (admitted alone: nothing else of the key is in flight).
COSTLY_BOUND = {"max_tokens": 32_000}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "gw.db")
    return request.getfixturevalue("pg_url")


async def status_once_released(port: int, key: str) -> int:
    """The status of a small request of `key`, asked again while it is 429 (the request before still in
    flight: the gateway is yet to see its client leave), as the SDKs retry it."""
    for _ in range(50):
        status, _, _ = await asyncio.to_thread(post, port, key, message())
        if status != 429:
            return status
        await asyncio.sleep(0.1)
    return status


async def test_a_quota_counts_a_request_its_client_left_before_any_usage_at_its_reserved_bound(store_url, tmp_path):
    """A stream the upstream had taken (it may bill it) whose client left before any usage was reported has
    its cost unknown; the key's quota counts its reserved bound ($0.16 of a $0.10 quota), not $0, also once
    its ledger row landed: the key's next request gets 402."""
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, store_url, mock, "--quota", "0.10")
        host = await asyncio.to_thread(GatewayProcess.start, store_url, tmp_path / "gw")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", host.port, timeout=10)
            conn.request("POST", "/v1/messages", body=json.dumps(message(stream=True, **COSTLY_BOUND)).encode(),
                         headers={"content-type": "application/json", "anthropic-version": "2023-06-01",
                                  "x-api-key": key, "x-mock-scenario": "first-byte-delay=5"})
            await asyncio.wait_for(upstream_has_a_request(mock), 10.0)
            conn.close()                        # the client leaves before the stream's head came
            status = await status_once_released(host.port, key)
            assert status == 402, f"a key past its quota by an unknown-cost request was answered {status}"
            assert await rows_appear(store_url), "the cut request has no ledger row"
            await asyncio.sleep(1.0)            # shipped and settled: the bound is the key's spend now
            status, _, body = await asyncio.to_thread(post, host.port, key, message())
            assert status == 402, f"once the ledger row landed the key was answered {status}: {body[:200]!r}"
            assert b"billing_error" in body
        finally:
            await asyncio.to_thread(host.kill)


async def test_a_quota_counts_a_request_cut_by_kill9_before_any_usage_at_its_reserved_bound(store_url, tmp_path):
    """The same request cut by kill -9 (its admission never released): the adopted gateway_stopped row settles
    the admission's reserved bound into the key's spend, so the key's next request gets 402 once the killed
    process's lease ran out, instead of the request counting $0."""
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, store_url, mock, "--quota", "0.10")
        again = await killed_before_answer(store_url, tmp_path / "gw", mock, key, message(**COSTLY_BOUND))
        try:
            status, _, body = await asyncio.to_thread(post, again.port, key, message())
            assert status == 402, f"a key past its quota by an unknown-cost request was answered {status}"
        finally:
            await asyncio.to_thread(again.kill)
