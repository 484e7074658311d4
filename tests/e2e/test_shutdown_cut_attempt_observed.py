"""A stream cut by shutdown's deadline while its client was still reading: the attempt the ledger lists as
`gateway_stopped` (no failure of its channel, and not the client's doing) is not counted as one the client
abandoned.

README: `apertis_upstream_attempts_total` outcome `abandoned` is "the client left meanwhile"; the dashboards'
queries exclude it as the client's choice.  A real gateway (in process, real sockets, the SQLite ledger), a
ScriptedChannel that never finishes its stream; the metrics as /metrics last showed them."""
from __future__ import annotations

import json

from apertis_proxy.observe import exposition
from tests.support.metrics import parse, total
from tests.support.scripted_channel import HANG, HEAD_SSE, chunk, message_start
from tests.support.scripted_gateway import stream_until


async def test_a_stream_cut_by_shutdown_is_not_an_attempt_its_client_abandoned(scripted):
    gateway = await scripted.start()
    scripted.channel.queue([HEAD_SSE, chunk(message_start(12)), HANG])
    conn, _ = await stream_until(scripted, b"message_start")
    try:
        await gateway.shutdown(timeout=0.3)             # the client still reads; the deadline cuts the stream
        scripted.gateway = None
    finally:
        conn.abort()
    [row] = [dict(r) for r in scripted.query("SELECT * FROM usage")]
    assert [a["outcome"] for a in json.loads(row["attempt_log"])] == ["gateway_stopped"]
    page, _ = exposition.render([(await gateway.observe.snapshot(), True)], "")
    abandoned = total(parse(page.decode()), "apertis_upstream_attempts_total", channel="main", outcome="abandoned")
    assert abandoned == 0, (
        f"apertis_upstream_attempts_total{{outcome=\"abandoned\"}} = {abandoned:g} for an attempt the ledger "
        f"lists as gateway_stopped, its client still reading")
