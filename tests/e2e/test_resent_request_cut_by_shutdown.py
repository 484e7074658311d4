"""A request sent again after its reused keep-alive connection closed (the upstream had read the first send),
whose second send is still waiting for an answer when shutdown's deadline cuts it: the row lists both sends.

The attempt log lists such a first send as outcome `resent` (the upstream may bill it; README and
test_resent_request_accounting.py), and a request cut by shutdown lists its running attempt as
`gateway_stopped`: the upstream received two POSTs of this request, the row should account for both.  A real
gateway (in process, real sockets, the SQLite ledger), a ScriptedChannel."""
from __future__ import annotations

import asyncio
import json

from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.scripted_channel import CLOSE, HANG, full_stream
from tests.support.scripted_gateway import ask, post


async def test_a_resent_request_cut_by_shutdown_lists_both_sends(scripted):
    gateway = await scripted.start()
    # 1: answered, its connection kept; 2: read on that connection, which then closes; 3: the resend, unanswered.
    scripted.channel.queue(full_stream("first", 10, 4), [CLOSE], [HANG])
    assert (await post(scripted, ask())).status == 200
    conn = await RawConnection.open(gateway.host, gateway.port)
    try:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": scripted.key},
                                      json_body=ask(stream=False, text="second")))
        async with asyncio.timeout(5):
            while len(scripted.channel.requests) < 3:
                await asyncio.sleep(0.01)
        await gateway.shutdown(timeout=0.3)
        scripted.gateway = None
    finally:
        conn.abort()
    rows = [dict(r) for r in scripted.query("SELECT * FROM usage ORDER BY id")]
    assert len(rows) == 2
    received = [r for r in scripted.channel.requests if r.startswith(b"POST /v1/messages")]
    tried = [a["outcome"] for a in json.loads(rows[-1]["attempt_log"])]
    assert rows[-1]["cost"] is None
    assert tried == ["resent", "gateway_stopped"], (
        f"the upstream received {len(received)} POSTs (2 of this request); its row lists {tried}")
