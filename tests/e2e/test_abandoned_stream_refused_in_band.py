"""A stream the upstream refuses in-band (a 200 head, a ping, then only `event: error`, before any usage) whose
client left after the ping: the drain reads the refusal, and the row says what it says with the client reading.

docs/billing.md: "An upstream's own error answer (a 504 included, and a stream's in-band `event: error` before any
usage) is its word that it did not serve the request: cost 0", where a row of unknown cost (NULL) counts the
request's reserved bound against a USD quota.  relay.py's drain: how the upstream ended a stream "counts as if the
client had stayed".  A real gateway (in process, real sockets, the SQLite ledger), a ScriptedChannel."""
from __future__ import annotations

import json

from tests.support.scripted_channel import HEAD_SSE, chunk, event
from tests.support.scripted_gateway import ask, post, stream_until

OVERLOADED = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
PING = event("ping", {"type": "ping"})
SCRIPT = [HEAD_SSE, chunk(PING), 0.4, chunk(OVERLOADED), b"0\r\n\r\n"]


async def test_an_in_band_refusal_after_the_client_left_costs_nothing(scripted):
    await scripted.start()
    scripted.channel.queue(SCRIPT)
    conn, _ = await stream_until(scripted, b"event: ping")
    conn.abort()
    await scripted.channel.wait_finished(1)
    [row] = await scripted.usage_rows(1)
    log = json.loads(row["attempt_log"])
    assert (row["error_type"], row["interrupted"]) == ("overloaded_error", 1), (row["error_type"], log)
    assert row["cost"] == 0.0, (
        f"cost={row['cost']!r} prices={row['prices']} attempts={log}: the upstream refused the stream in-band "
        f"before any usage, as it would with the client reading (cost 0)")


async def test_control_the_same_refusal_with_the_client_reading_costs_nothing(scripted):
    await scripted.start()
    scripted.channel.queue(SCRIPT)
    response = await post(scripted, ask())
    assert response.status == 200 and response.sse_events()[-1][0] == "error"
    [row] = await scripted.usage_rows(1)
    assert (row["error_type"], row["cost"]) == ("overloaded_error", 0.0)
