"""Usage rows for the ledger tests: `record(i, key_id)` builds a deterministic UsageRecord (request id and start time
from `i`) as the meter, the spool and the store's `write_ledger` take it, and `COUNTS` names the token counts a ledger
row shares with the upstream's `usage`, by which the tests compare the ledger with what the mock upstream reported."""
from __future__ import annotations

from apertis_proxy.plugin_api import UsageRecord

from .gateway_requests import HAIKU

COUNTS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def record(i: int, key_id: int, *, cost: float = 0.25) -> UsageRecord:
    return UsageRecord(request_id=f"req_{i:024x}", started_at=1_760_000_000.0 + i, endpoint="/v1/messages",
                       key_id=key_id, key_name=f"key{key_id}", requested_model=HAIKU, upstream_model=HAIKU,
                       status=200, input_tokens=100 + i, output_tokens=10, cache_read_input_tokens=5,
                       cost=cost, prices={"cost": str(cost)}, server_tool_use={"web_search_requests": 1})
