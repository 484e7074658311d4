"""GET /metrics of `serve --workers 2`: one scrape, whichever worker takes it, covers the whole server.

Requests on new connections spread over both workers; the scraped counters must sum them exactly and equal the
ledger. Then one worker is killed with SIGKILL and replaced: the counters neither reset nor count twice, and the
requests after the replacement add exactly their number.
"""
from __future__ import annotations

import asyncio
import signal
import tempfile
from pathlib import Path

import pytest

from apertis_proxy.observe.recorder import COST_UNIT
from tests.support.metrics import Samples, parse, scrape, total, value
from tests.support.processes import MODEL, ServeProcess, sdk_client, wait_for
from tests.support.served_gateway import DRAIN_TIMEOUT, configured_server, usage_rows
from tests.support.workers import crash_and_replace, listening_workers

FLUSH_INTERVAL = 0.1
SETTLE = 10 * FLUSH_INTERVAL        # long enough for every worker to have shared its figures several times


async def send(server: ServeProcess, key: str, n: int, tag: str) -> None:
    async with sdk_client(server.base_url, key) as client:
        for i in range(n):
            reply = await client.messages.create(
                model=MODEL, max_tokens=32, messages=[{"role": "user", "content": f"{tag} {i}"}],
                extra_headers={"connection": "close"})     # a new connection each: both workers serve
            assert f"{tag} {i}" in reply.content[0].text


async def scrape_when(server: ServeProcess, requests: int) -> Samples:
    """A scrape once it counts `requests` answered messages and ledger rows (each worker shares its figures
    every 0.1 s)."""
    seen: dict = {}

    async def counted() -> bool:
        status, _, text = await scrape(server.base_url)
        assert status == 200, text
        seen["samples"] = parse(text)
        # The ledger's row count moves when a worker ships its spool, after the answer: wait for both.
        return (total(seen["samples"], "apertis_requests_total", endpoint="/v1/messages") >= requests
                and total(seen["samples"], "apertis_ledger_rows_written_total") >= requests)
    await wait_for(counted, DRAIN_TIMEOUT, f"a scrape counting {requests} requests")
    return seen["samples"]


def assert_whole_server(samples: Samples, db: str, requests: int) -> None:
    assert value(samples, "apertis_requests_total", endpoint="/v1/messages", model=MODEL, channel="main",
                 code="200") == requests
    assert total(samples, "apertis_upstream_attempts_total", channel="main", outcome="ok") == requests
    assert value(samples, "apertis_request_duration_seconds_count", endpoint="/v1/messages",
                 stream="false") == requests
    rows = usage_rows(db)
    assert len(rows) == requests
    assert total(samples, "apertis_tokens_total", type="input") == sum(r["input_tokens"] for r in rows) > 0
    assert total(samples, "apertis_tokens_total", type="output") == sum(r["output_tokens"] for r in rows) > 0
    assert total(samples, "apertis_cost_usd_total") == sum(round(r["cost"] / COST_UNIT) for r in rows) * COST_UNIT
    assert value(samples, "apertis_ledger_rows_written_total", meter="sqlite") == requests
    assert value(samples, "apertis_requests_in_flight") == 0
    assert value(samples, "apertis_streams_open") == 0
    assert value(samples, "apertis_channel_up", channel="main") == 1


async def run_dir_of(workers: list[int]) -> Path:
    """The metrics run directory of the server these are the workers of: the temporary directory where each of
    them shares its figures."""
    found: list[Path] = []

    async def shared() -> bool:
        pattern = f"apertis-proxy-metrics-*/worker-{workers[0]}.json"
        found[:] = [p.parent for p in Path(tempfile.gettempdir()).glob(pattern)]
        return len(found) == 1 and (found[0] / f"worker-{workers[1]}.json").exists()
    await wait_for(shared, DRAIN_TIMEOUT, "both workers to share their figures")
    return found[0]


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the workers in Linux /proc")
async def test_one_scrape_covers_every_worker_and_survives_a_replaced_one(tmp_path, mock_upstream):
    server, db, key = configured_server(tmp_path, mock_upstream.base_url,
                                        f"[metrics]\nflush_interval = {FLUSH_INTERVAL}\n", "--workers", "2")
    async with server:
        workers = await listening_workers(server, 2)
        run_dir = await run_dir_of(workers)
        await send(server, key, 12, "before")
        await wait_for(lambda: rows_are(db, 12), DRAIN_TIMEOUT, "a usage row per request from both workers")
        assert_whole_server(await scrape_when(server, 12), db, 12)
        assert {p.name for p in run_dir.glob("*.json")} == {f"worker-{w}.json" for w in workers}

        victim = workers[0]
        await crash_and_replace(server, victim)
        assert len(list(run_dir.glob(f"dead-{victim}-*.json"))) == 1

        await asyncio.sleep(SETTLE)
        assert_whole_server(await scrape_when(server, 12), db, 12)     # nothing reset, nothing counted twice

        await send(server, key, 6, "after")
        await wait_for(lambda: rows_are(db, 18), DRAIN_TIMEOUT, "the new requests' usage rows")
        assert_whole_server(await scrape_when(server, 18), db, 18)
        await asyncio.sleep(SETTLE)
        assert_whole_server(await scrape_when(server, 18), db, 18)     # and it stays there
        assert await server.stop(signal.SIGTERM) == 0
    assert not run_dir.exists()                                         # serve removed its run directory


async def rows_are(db: str, n: int) -> bool:
    return len(usage_rows(db)) == n
