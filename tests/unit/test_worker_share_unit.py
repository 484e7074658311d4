"""A worker's shared metrics file (observe/shared.py) stops being written when the worker closes, also when the
snapshot it is taking swallows the cancellation (as Python 3.11's wait_for can, around the readiness check)."""
from __future__ import annotations

import asyncio

from apertis_proxy.observe import shared


async def test_close_ends_the_writer_even_if_a_snapshot_swallows_its_cancellation(tmp_path):
    started = asyncio.Event()
    taken = 0

    async def snapshot() -> dict:
        nonlocal taken
        taken += 1
        started.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass                        # swallowed: the loop must still end
        return {"taken": taken}

    share = shared.WorkerShare(str(tmp_path), snapshot, 0.001)
    share.start()
    await started.wait()
    await asyncio.wait_for(share.close(), 5)    # hung forever when only the cancellation ended the loop
    final = taken
    await asyncio.sleep(0.05)
    assert taken == final                       # nothing writes after close
    assert shared.read_others(str(tmp_path), 0)  # the last snapshot is there for the other workers
