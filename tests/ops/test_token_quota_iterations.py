"""A token quota counts the tokens of the `usage.iterations[]` entries billed apart from the top-level counts
(advisor, compaction and fallback iterations), as well as the top-level counts.

A real gateway process, the mock upstream reporting an advisor iteration on every request (anthropic SDK 2.17
BetaAdvisorTool20260301Param: the advisor reads the conversation on its own model, billed in `usage.iterations`
as an `advisor_message`).  Requests sent one at a time under a 100,000-token quota, each of 42,200 billed tokens:
the first three are admitted (0, 42,200 and 84,400 tokens spent before them), the fourth is refused with 402, and
the key's settled tokens are the three requests' billed tokens, iterations included.  On SQLite and PostgreSQL
with the ledger settling the spend (ledger_write.py, pg_ledger.py), and without a ledger meter (the keys plugin's
release settles it).  And while the store is away (`on_store_down = "share"`): requests admitted alone, priced or
not, count their billed tokens once, from the keys plugin's finish() to their ledger rows.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from apertis_proxy.store import admissions as sqlite_admissions
from apertis_proxy.store import service
from tests.ops.test_admissions_store import stored_spend
from tests.ops.test_limits_share_mode import admitted_alone, end, keys_plugin, new_key, record_of
from tests.unit.test_plugins_unit import running
from tests.support.gateway_process import GatewayProcess
from tests.support.limits_load import (Answer, CountingUpstream, create_key, key_spend, ledger_with, send,
                                       setup_store)

SONNET = "claude-sonnet-5"
ADVISOR_USAGE = {"input_tokens": 100, "output_tokens": 100,
                 "iterations": [{"type": "message", "input_tokens": 100, "output_tokens": 100},
                                {"type": "advisor_message", "model": "claude-opus-4-8", "input_tokens": 40_000,
                                 "output_tokens": 2_000, "cache_read_input_tokens": 0,
                                 "cache_creation_input_tokens": 0}]}
# The top level (the "message" iteration is inside it) plus the advisor's iteration.
ADVISOR_TOKENS = 100 + 100 + 40_000 + 2_000
TOKEN_QUOTA = 100_000
ADMITTED = 3                # 3 * 42,200 = 126,600: the quota is used up after the third request


async def send_retrying(port: int, key: str, body: dict, headers: dict) -> Answer:
    """The answer to `body`, sent again after a 429 (as the SDKs do): the previous request's reservation may
    still be held for a moment after its answer (released right after it)."""
    for _ in range(50):
        answer = await send(port, key, body, headers)
        if answer.status != 429:
            return answer
        await asyncio.sleep(0.1)
    return answer


@pytest.mark.parametrize("backend, meters", [("sqlite", ["sqlite"]), ("postgresql", ["sqlite"]),
                                             ("sqlite", [])],
                         ids=["sqlite-ledger", "pg-ledger", "no-ledger"])
async def test_a_token_quota_counts_the_tokens_of_advisor_iterations(request, backend, meters, tmp_path):
    db = request.getfixturevalue("pg_url") if backend == "postgresql" else str(tmp_path / "gateway.db")
    body = {"model": SONNET, "max_tokens": 1024,
            "tools": [{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-8", "max_uses": 1}],
            "messages": [{"role": "user", "content": "plan the refactor"}]}
    headers = {"x-mock-scenario": f"usage={json.dumps(ADVISOR_USAGE)}"}
    async with CountingUpstream() as mock:
        await asyncio.to_thread(setup_store, db, mock, "alice")
        key = await asyncio.to_thread(create_key, db, "bob", "--quota", f"{TOKEN_QUOTA}tokens")
        host = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw",
                                       tables={"limits": {"lease_seconds": 3}, "plugins": {"meter": meters}})
        try:
            statuses = []
            for _ in range(ADMITTED + 3):       # one at a time: each runs alone, as near the end of a quota
                answer = await send_retrying(host.port, key, body, headers)
                statuses.append(answer.status)
                if answer.status != 200:
                    break
            if meters:
                await ledger_with(db, "bob", statuses.count(200))
        finally:
            await asyncio.to_thread(host.stop)
    counted = (await asyncio.to_thread(key_spend, db, "bob"))[1]
    assert statuses == [200] * ADMITTED + [402], (
        f"token quota {TOKEN_QUOTA}, {ADVISOR_TOKENS} billed tokens a request: statuses {statuses}, "
        f"the key counted {counted} tokens")
    assert counted == ADMITTED * ADVISOR_TOKENS


async def test_share_mode_counts_the_tokens_of_advisor_iterations_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_admissions, "LOCK_WAIT", 0.3)       # the store counts as away after 0.3 s
    url = str(tmp_path / "gw.db")
    service.connect(url).close()
    key_id, plain = new_key(url, "alone", quota_cost=10.0, quota_tokens=1_000_000)
    async with running(keys_plugin(url, limits_on_store_down="share")) as auth:
        admitted = await admitted_alone(auth, url, plain, 2)
        # Priced, and unpriced (the advisor's model without a price here): tokens known either way.
        records = [record_of(req, caller, reached_upstream=True, input_tokens=100, output_tokens=100,
                             iterations=ADVISOR_USAGE["iterations"], raw_usage=ADVISOR_USAGE, cost=cost,
                             attempt_log=[{"channel": "main", "channel_id": 1, "outcome": "ok", "status": 200}])
                   for (req, caller), cost in zip(admitted, (0.01, None))]
        for (_, caller), rec in zip(admitted, records):
            await end(auth, caller, rec)
        assert auth.by_id[key_id].spent_tokens == 2 * ADVISOR_TOKENS
        assert await auth.store.write_ledger([dataclasses.asdict(rec) for rec in records]) == 2
        await auth.refresh()
        assert stored_spend(url, key_id)[1] == 2 * ADVISOR_TOKENS
        assert auth.by_id[key_id].pending_tokens == 0
