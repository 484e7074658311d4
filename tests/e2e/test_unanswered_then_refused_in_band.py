"""A request the upstream may have read and never answered (given up at read_timeout on a channel failed over
from, or a first send on a reused connection that closed, sent again), whose last attempt is then a stream that
the upstream refuses in-band (a 200 head, then only `event: error`, before any usage).

docs/billing.md and the attempt log's `unanswered` entries: any attempt that sent the request and got no answer
makes a row without usage of unknown cost (NULL), which a key's USD quota counts at the request's reserved bound;
the in-band refusal is only the last channel's word that *it* did not serve the request.  A real gateway (in
process, real sockets, the SQLite ledger), ScriptedChannels."""
from __future__ import annotations

import json

from tests.support.gateway_env import NO_COOLDOWNS
from tests.support.scripted_channel import (CLOSE, HANG, HEAD_SSE, ScriptedChannel, chunk, event,
                                            full_stream, json_response)
from tests.support.scripted_gateway import ask, post

IN_BAND = [HEAD_SSE, chunk(event("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                      "message": "Overloaded"}})), b"0\r\n\r\n"]


def _tried(row: dict) -> list[tuple]:
    return [(a["channel"], a["outcome"], bool(a.get("unanswered"))) for a in json.loads(row["attempt_log"])]


async def test_a_timed_out_attempt_then_an_in_band_refusal_is_not_metered_as_free(gateway_env):
    """`slow` takes the request and never answers (timeout); `second` opens a stream and refuses it in-band.
    `slow` may still bill it: the row's cost is unknown, as it is when `second` answers 529."""
    async with ScriptedChannel() as slow, ScriptedChannel() as second:
        gateway_env.key = gateway_env.add_key("alice")
        gateway_env.add_channel("slow", slow.base_url, priority=10)
        gateway_env.add_channel("second", second.base_url, priority=1)
        await gateway_env.start(read_timeout=0.5, **NO_COOLDOWNS)
        slow.queue([HANG])
        second.queue(IN_BAND)
        response = await post(gateway_env, ask())
        assert response.status == 200 and response.sse_events()[-1][0] == "error"
        [row] = await gateway_env.usage_rows(1)
    assert len(slow.requests) == 1 and len(second.requests) == 1
    assert [(c, u) for c, _, u in _tried(row)] == [("slow", True), ("second", False)], _tried(row)
    assert row["cost"] is None, (
        f"cost={row['cost']!r} error_type={row['error_type']} attempts={_tried(row)}: the unanswered "
        f"attempt on `slow` is counted as free")


async def test_a_resent_request_then_an_in_band_refusal_is_not_metered_as_free(scripted):
    """The first send goes on a reused connection the upstream read it on and then closed (listed `resent`,
    `unanswered`); the second send's stream is refused in-band.  The first send may be billed."""
    await scripted.start()
    scripted.channel.queue(full_stream("first", 10, 4), [CLOSE], IN_BAND)
    assert (await post(scripted, ask())).status == 200
    response = await post(scripted, ask(text="second"))
    assert response.status == 200 and response.sse_events()[-1][0] == "error"
    rows = await scripted.usage_rows(2)
    received = [r for r in scripted.channel.requests if r.startswith(b"POST /v1/messages")]
    assert len(received) == 3
    row = rows[-1]
    assert _tried(row)[0] == ("main", "resent", True), _tried(row)
    assert row["cost"] is None, (
        f"cost={row['cost']!r} error_type={row['error_type']} attempts={_tried(row)}: the upstream read the "
        f"first send and nobody knows what it billed")


async def test_control_a_resent_request_then_a_529_has_an_unknown_cost(scripted):
    """Control: the same resend, the second send answered 529: the row's cost is unknown."""
    await scripted.start(**NO_COOLDOWNS)
    overloaded = json_response(529, {"type": "error", "error": {"type": "overloaded_error",
                                                                "message": "Overloaded"}}, b"Overloaded")
    scripted.channel.queue(full_stream("first", 10, 4), [CLOSE], [overloaded])
    assert (await post(scripted, ask())).status == 200
    response = await post(scripted, ask(text="second"))
    assert response.status == 529
    rows = await scripted.usage_rows(2)
    assert rows[-1]["cost"] is None, (rows[-1]["cost"], _tried(rows[-1]))
