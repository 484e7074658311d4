"""A USD quota reached exactly, as an operator runs the gateway: `serve --workers 2` on SQLite, and a gateway on
PostgreSQL. Ten requests of $0.10 each (100,000 input tokens at Haiku 4.5's $1 per million) against `--quota 1`:
the ledger holds $1.00, so the next request is 402 billing_error (README "Budgets": "Once the spend settled ...
reaches the quota, requests get 402")."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.support.limits_load import CountingUpstream, Hosts, key_spend, ledger_with, send, setup_store

TENTH = {"x-mock-scenario": "usage=" + json.dumps({"input_tokens": 100_000, "output_tokens": 0})}


def body(n: int) -> dict:
    return {"model": "claude-haiku-4-5-20251001", "max_tokens": 16,
            "messages": [{"role": "user", "content": f"tenth {n}"}]}


@pytest.mark.parametrize("kind", ["workers", "hosts"])
async def test_a_quota_spent_to_the_cent_is_402_across_processes(kind, request, tmp_path):
    db = request.getfixturevalue("pg_url") if kind == "hosts" else str(tmp_path / "gateway.db")
    async with CountingUpstream() as mock:
        key = await asyncio.to_thread(setup_store, db, mock, "alice", "--quota", "1")
        hosts = await (Hosts.postgres(db, tmp_path, count=1) if kind == "hosts" else Hosts.workers(db, tmp_path))
        async with hosts:
            for n in range(10):
                answer = await send(hosts.port(n), key, body(n), TENTH)
                assert answer.status == 200, answer
                rows = await ledger_with(db, "alice", n + 1)        # settled one by one, as a client paces them
            assert all(r["cost"] == pytest.approx(0.1, abs=1e-12) for r in rows)
            assert round(sum(float(r["cost"]) for r in rows), 9) == 1.0

            spent = (await asyncio.to_thread(key_spend, db, "alice"))[0]        # what the store holds now
            eleventh = await send(hosts.port(10), key, body(10), TENTH)
            assert eleventh.status == 402, (eleventh.status, f"settled spend {spent!r}", len(mock.served))
            assert len(mock.served) == 10
