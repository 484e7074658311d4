"""Every Messages POST the upstream received is accounted for in the ledger: the attempts a row lists match the
requests the channel got, also when a reused keep-alive connection closes after the upstream had read the whole
request and the gateway sends it again on a fresh connection.

A POST is not idempotent: an upstream that read it may be generating (and billing) it when the connection drops;
sent twice, it may be billed twice.  A real gateway (in process, real sockets, the SQLite ledger), a
ScriptedChannel."""
from __future__ import annotations

import json

from tests.support.scripted_channel import CLOSE, full_stream
from tests.support.scripted_gateway import ask, post


async def test_a_request_read_by_the_upstream_on_a_reused_connection_is_not_resent_unaccounted(scripted):
    await scripted.start()
    # 1: answered, the connection kept; 2: read whole on that connection, which then closes; 3: a fresh one.
    scripted.channel.queue(full_stream("first", 10, 4), [CLOSE], full_stream("again", 10, 4))
    assert (await post(scripted, ask())).status == 200
    second = await post(scripted, ask(text="second"))
    rows = await scripted.usage_rows(2)
    received = [r for r in scripted.channel.requests if r.startswith(b"POST /v1/messages")]
    attempts = [json.loads(r["attempt_log"]) for r in rows]
    accounted = sum(len(a) for a in attempts)
    assert [[e["outcome"] for e in a] for a in attempts] == [["ok"], ["resent", "ok"]]
    assert [r["attempts"] for r in rows] == [1, 1]          # one channel tried each time
    assert all(r["cost"] is not None for r in rows)         # the second send's usage is known
    assert accounted == len(received), (
        f"the upstream received {len(received)} Messages POSTs; the ledger accounts for {accounted} "
        f"(rows' attempts {[r['attempts'] for r in rows]}, second answer {second.status}, "
        f"second row {rows[-1]['input_tokens']}/{rows[-1]['output_tokens']} tokens)")
