"""`kill -9` of a real `apertis-proxy serve` with requests in every state (answered, streams past message_start,
a JSON answer the upstream is still working on), then two restarts on the same database and spool: each request
that reached the upstream has exactly one ledger row, its tokens are what the mock upstream had put on the wire
(input as message_start reported it for the cut streams), and a further restart adds nothing.

Real processes, the mock upstream on 127.0.0.1, a real SQLite file."""
from __future__ import annotations

import asyncio
import contextlib
import http.client

from tests.ops.test_ledger_faults import message, open_stream, post, setup_store
from tests.support.gateway_process import GatewayProcess
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.served_gateway import usage_rows


async def _rows_once(db: str, n: int, timeout: float = 10.0) -> list[dict]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        rows = await asyncio.to_thread(usage_rows, db)
        if len(rows) >= n or loop.time() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_kill9_with_requests_in_every_state_meters_each_once(tmp_path):
    db = str(tmp_path / "gw.db")
    workdir = tmp_path / "gw"
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        first = await asyncio.to_thread(GatewayProcess.start, db, workdir)
        streams = []
        try:
            answered = []
            for stream in (False, True):
                status, request_id, _ = await asyncio.to_thread(post, first.port, key, message(stream=stream))
                assert status == 200
                answered.append(request_id)
            for _ in range(2):
                streams.append(await asyncio.to_thread(open_stream, first.port, key))   # past message_start
            waiting = asyncio.ensure_future(asyncio.to_thread(post, first.port, key, message(),
                                                              "first-byte-delay=5"))
            await mock.wait_until(lambda: len(mock.requests) == 5, timeout=5)
        finally:
            await asyncio.to_thread(first.kill)
        for conn, _ in streams:
            conn.close()
        with contextlib.suppress(OSError, http.client.HTTPException):
            await waiting
        upstream_usage = {s["request_id"]: s["usage"] for s in mock.served}
        for attempt in range(2):
            again = await asyncio.to_thread(GatewayProcess.start, db, workdir)
            try:
                rows = await _rows_once(db, 5)
                await asyncio.sleep(0.5 if attempt else 0.0)
                rows = await asyncio.to_thread(usage_rows, db)
            finally:
                await asyncio.to_thread(again.kill)
            ids = [r["request_id"] for r in rows]
            assert len(ids) == len(set(ids)) == 5, ids
            by_id = {r["request_id"]: r for r in rows}
            for request_id in answered:
                row = by_id[request_id]
                usage = upstream_usage[row["upstream_request_id"]]
                assert (row["input_tokens"], row["output_tokens"]) == (usage["input_tokens"],
                                                                      usage["output_tokens"])
            for _, request_id in streams:
                row = by_id[request_id]
                assert row["interrupted"] == 1
                assert row["input_tokens"] == upstream_usage[row["upstream_request_id"]]["input_tokens"] > 0
                assert row["cost"] > 0
            [cut] = [r for r in rows if r["request_id"] not in {*answered, *(i for _, i in streams)}]
            assert (cut["error_type"], cut["cost"], cut["interrupted"]) == ("gateway_stopped", None, 1)
