"""Review s10d: quotas overshot end to end (a real gateway process on SQLite, the mock upstream reporting usage the
API can report for the very request sent; see tests/unit/test_review_s10d_bounds.py for the bound against the price).

The promise (README "Limits"): a quota is overshot by at most one request.  Checked here on the ledger: the key's
spend is at most its quota plus its largest single request.

- A USD quota, concurrent `thread: {"type": "continue"}` requests: each reserves its body's bytes while the thread's
  server-held history is billed (reported here as cache reads, the cheapest way the API can bill it).
- A token quota, requests with an advisor tool: the advisor's `usage.iterations` tokens (billed by the API, priced
  by pricing.py) are never counted against the token quota (release() counts record.total_tokens, the top level).
"""
from __future__ import annotations

import asyncio
import json

from tests.support.gateway_process import GatewayProcess
from tests.support.limits_load import (CountingUpstream, create_key, key_spend, ledger_with, row_tokens, send,
                                       setup_store)

SONNET = "claude-sonnet-5"
QUOTA_USD = 0.10
# Each continuation: 12 new input tokens, 150,000 of thread history read from the cache, 1,024 out (Sonnet 5:
# $2 / $10, cache read $0.20 per million) = $0.040264; its reserved bound is about $0.0121.
THREAD_USAGE = {"input_tokens": 12, "cache_read_input_tokens": 150_000, "cache_creation_input_tokens": 0,
                "output_tokens": 1024}
CONTINUATIONS = 8


def continuation(anchor: str, n: int) -> dict:
    return {"model": SONNET, "max_tokens": 1024, "thread": {"type": "continue", "previous_message_id": anchor},
            "messages": [{"role": "user", "content": f"next step {n}"}]}


async def test_a_usd_quota_holds_under_concurrent_thread_continuations(tmp_path):
    db = str(tmp_path / "gateway.db")
    async with CountingUpstream() as mock:
        key = await asyncio.to_thread(setup_store, db, mock, "alice", "--quota", str(QUOTA_USD))
        host = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw",
                                       tables={"limits": {"lease_seconds": 3}})
        try:
            first = await send(host.port, key, {"model": SONNET, "max_tokens": 16, "thread": {"type": "create"},
                                                "messages": [{"role": "user", "content": "start"}]},
                               {"x-mock-scenario": 'usage={"input_tokens": 10, "output_tokens": 16}'})
            assert first.status == 200, first
            anchor = json.loads(first.body)["id"]
            slow = {"x-mock-scenario": f"usage={json.dumps(THREAD_USAGE)}; first-byte-delay=0.5"}
            answers = await asyncio.gather(*(send(host.port, key, continuation(anchor, n), slow)
                                             for n in range(CONTINUATIONS)))
            ok = [a for a in answers if a.status == 200]
            rows = await ledger_with(db, "alice", 1 + len(ok))
        finally:
            await asyncio.to_thread(host.stop)
    costs = [r["cost"] for r in rows if r["cost"] is not None]
    spent = sum(costs)
    limit = QUOTA_USD + max(costs)
    assert spent <= limit, (
        f"USD quota ${QUOTA_USD} overshot: {len(ok)} of {CONTINUATIONS} concurrent thread continuations admitted "
        f"together, ledger spend ${spent:.4f} > quota + largest request ${limit:.4f} "
        f"(statuses {[a.status for a in answers]})")


# The advisor (anthropic SDK 2.17 BetaAdvisorTool20260301Param) reads the conversation on its own model: its
# iteration's tokens are billed apart from the top-level counts (usage.iterations, type advisor_message).
ADVISOR_USAGE = {"input_tokens": 100, "output_tokens": 100,
                 "iterations": [{"type": "message", "input_tokens": 100, "output_tokens": 100},
                                {"type": "advisor_message", "model": "claude-opus-4-8", "input_tokens": 40_000,
                                 "output_tokens": 2_000, "cache_read_input_tokens": 0,
                                 "cache_creation_input_tokens": 0}]}
ADVISOR_TOKENS = 100 + 100 + 40_000 + 2_000
TOKEN_QUOTA = 100_000


async def test_a_token_quota_counts_the_tokens_of_advisor_iterations(tmp_path):
    db = str(tmp_path / "gateway.db")
    body = {"model": SONNET, "max_tokens": 1024,
            "tools": [{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-8", "max_uses": 1}],
            "messages": [{"role": "user", "content": "plan the refactor"}]}
    headers = {"x-mock-scenario": f"usage={json.dumps(ADVISOR_USAGE)}"}
    async with CountingUpstream() as mock:
        await asyncio.to_thread(setup_store, db, mock, "alice")
        key = await asyncio.to_thread(create_key, db, "bob", "--quota", f"{TOKEN_QUOTA}tokens")
        host = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw",
                                       tables={"limits": {"lease_seconds": 3}})
        try:
            statuses = []
            for _ in range(6):              # one at a time: each runs alone, as the promise allows near the end
                answer = await send(host.port, key, body, headers)
                statuses.append(answer.status)
                if answer.status != 200:
                    break
            assert statuses[0] == 200, statuses
            rows = await ledger_with(db, "bob", statuses.count(200))
            counted = (await asyncio.to_thread(key_spend, db, "bob"))[1]
        finally:
            await asyncio.to_thread(host.stop)
    consumed = statuses.count(200) * ADVISOR_TOKENS
    assert consumed <= TOKEN_QUOTA + ADVISOR_TOKENS, (
        f"token quota {TOKEN_QUOTA}: {statuses.count(200)} requests admitted one by one, the API billed "
        f"{consumed} tokens (advisor iterations included) but the key counted {counted} "
        f"(ledger rows' top-level tokens {sum(map(row_tokens, rows))}); statuses {statuses}")
