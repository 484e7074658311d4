"""`retry-after` on an rpm refusal says when the key may send again: when enough of the minute's admissions have
left it for one more to fit. With as many admissions in the minute as the limit, that is when the oldest leaves; with
more (the limit was lowered by `keys set --rpm` while the minute held them), it is when the one that brings the count
under the limit leaves, not the oldest.

Here three admissions, the first ~4 s before the other two; `--rpm 1`: no request fits until the newest has left,
about 60 s after it. A client told to come back when the oldest leaves (~4 s earlier) gets another 429.
"""
from __future__ import annotations

import asyncio
import math
import time

from apertis_proxy.store import keys as key_store
from tests.support.gateway_requests import assert_error, message, post

GAP = 4.0


async def test_retry_after_counts_from_the_admission_that_frees_a_slot(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice", rpm=3)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    assert (await post(gateway_env, key, message("first"))).status == 200
    await asyncio.sleep(GAP)        # spaces the minute's admissions: not an assertion
    assert [(await post(gateway_env, key, message(f"next {n}"))).status for n in range(2)] == [200, 200]
    newest = max(row[0] for row in gateway_env.query("SELECT at FROM admission_times"))

    key_store.update_key(gateway_env.conn, "alice", rpm=1)
    for _ in range(100):          # the plugin reloads the key within ~0.1 s; until then the limit of 3 refuses
        refusal = await post(gateway_env, key, message("refused"))
        assert refusal.status == 429, refusal.body
        if b"limit of 1 requests" in refusal.body:
            break
        await asyncio.sleep(0.05)
    assert_error(refusal, 429, "rate_limit_error")
    retry_after = int(refusal.header("retry-after"))
    # The earliest moment one more admission fits: the newest of the three leaves the minute.
    frees_in = newest + 60 - time.time()
    assert retry_after >= math.floor(frees_in), (retry_after, round(frees_in, 2))
    assert len(mock_upstream.requests) == 3
