"""`serve --workers 2`: a worker SIGKILLed while one of its streams is open, then replaced.

Before the kill a scrape shows the stream (apertis_streams_open 1, apertis_requests_in_flight 1 besides the
scrape itself). After it, whichever worker answers, the dead worker's gauges no longer count (both back to 0,
not stuck at its last shared values), and no counter a scrape already showed goes down or counts twice.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.metrics import parse, total, value
from tests.support.processes import MODEL, wait_for
from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.served_gateway import DRAIN_TIMEOUT, configured_server
from tests.support.workers import TCP_ESTABLISHED, crash_and_replace, listening_workers, sockets_of


def worker_of(conn: RawConnection, port: int, workers: list[int]) -> int:
    local_port = conn.writer.get_extra_info("sockname")[1]
    owners = [w for w in workers if sockets_of(w, local_port=port, remote_port=local_port, state=TCP_ESTABLISHED)]
    assert len(owners) == 1, owners
    return owners[0]


async def scrapes_by_worker(port: int, workers: list[int]) -> dict[int, dict]:
    """One scrape answered by each worker: {worker: samples}."""
    seen: dict[int, dict] = {}

    async def each() -> bool:
        async with await RawConnection.open("127.0.0.1", port) as conn:
            reply = await conn.request("GET", "/metrics")
            assert reply.status == 200
            seen.setdefault(worker_of(conn, port, workers), parse(reply.body.decode()))
        return len(seen) == len(workers)
    await wait_for(each, DRAIN_TIMEOUT, "a scrape answered by each worker")
    return seen


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the workers in Linux /proc")
async def test_a_worker_killed_mid_stream_leaves_no_gauge_behind(tmp_path, mock_upstream):
    server, _, key = configured_server(tmp_path, mock_upstream.base_url, "[metrics]\nflush_interval = 0.1\n",
                                       "--workers", "2")
    async with server:
        workers = await listening_workers(server, 2)
        async with await RawConnection.open("127.0.0.1", server.port) as conn:      # one answer counted first
            reply = await conn.request("POST", "/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01"},
                                       json_body={"model": MODEL, "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": "first"}]})
            assert reply.status == 200
        stream = await RawConnection.open("127.0.0.1", server.port)
        await stream.send(request_bytes(
            "POST", "/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01",
                                     "x-mock-scenario": "event-delay=1"},
            json_body={"model": MODEL, "max_tokens": 256, "stream": True,
                       "messages": [{"role": "user", "content": "a long stream " * 20}]}))
        assert (await stream.read_head()).status == 200
        victim = worker_of(stream, server.port, workers)

        before = await scrapes_by_worker(server.port, workers)
        for samples in before.values():
            assert value(samples, "apertis_streams_open") == 1
            assert value(samples, "apertis_requests_in_flight") == 1
        counted = max(total(s, "apertis_requests_total", endpoint="/v1/messages") for s in before.values())
        assert counted == 1

        survivors = await crash_and_replace(server, victim)
        stream.abort()
        after = await scrapes_by_worker(server.port, survivors)
        for samples in after.values():
            assert value(samples, "apertis_streams_open") == 0
            assert value(samples, "apertis_requests_in_flight") == 0
            assert total(samples, "apertis_requests_total", endpoint="/v1/messages") == counted
        assert await server.stop(signal.SIGTERM) == 0
