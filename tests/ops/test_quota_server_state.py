"""A USD quota holds for requests that continue a server-held thread (a real gateway process on SQLite, the mock
upstream reporting the usage the API can report: the thread's history read from the cache): the key's spend is at
most its quota plus its largest single request (README "Limits").  Each continuation reserves a full context window
of input (tests/unit/test_reservation_server_state.py)."""
from __future__ import annotations

import asyncio
import json

from tests.support.gateway_process import GatewayProcess
from tests.support.limits_load import CountingUpstream, ledger_with, send, setup_store

SONNET = "claude-sonnet-5"
QUOTA_USD = 0.10
# Each continuation: 12 new input tokens, 150,000 of thread history read from the cache, 1,024 out (Sonnet 5:
# $2 / $10, cache read $0.20 per million) = $0.040264.
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
