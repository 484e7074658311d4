"""A stream the upstream opens with a 200 head and then answers only with `event: error` (overloaded_error, as the
API does when it is overloaded), before any message_start: the upstream's own error answer, its word that it did
not serve the request.

docs/billing.md: "An upstream's own error answer (a 504 included) is its word that it did not serve the request:
cost 0."  A row of unknown cost (NULL) instead counts the request's reserved bound, the most it could have cost,
against the key's USD quota.  A real gateway (in process, real sockets, the SQLite ledger), a ScriptedChannel."""
from __future__ import annotations

import pytest

from tests.support.gateway_requests import post as post_as
from tests.support.scripted_channel import HEAD_SSE, ScriptedChannel, chunk, event, message_start
from tests.support.scripted_gateway import ask, post

OVERLOADED = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
PING = event("ping", {"type": "ping"})


@pytest.mark.parametrize("opening", [[], [PING]], ids=["error-first", "after-a-ping"])
async def test_an_in_band_error_before_message_start_costs_nothing(scripted, opening):
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in opening), chunk(OVERLOADED), b"0\r\n\r\n"])
    response = await post(scripted, ask())
    assert response.status == 200 and response.sse_events()[-1][0] == "error"
    [row] = await scripted.usage_rows(1)
    assert (row["status"], row["error_type"]) == (200, "overloaded_error")
    assert row["cost"] == 0.0, f"cost={row['cost']!r} prices={row['prices']}"


async def test_control_an_in_band_error_after_message_start_bills_the_reported_input(scripted):
    """Control (passes): after message_start the input it reported is billed."""
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, chunk(message_start(12)), chunk(OVERLOADED), b"0\r\n\r\n"])
    assert (await post(scripted, ask())).status == 200
    [row] = await scripted.usage_rows(1)
    assert (row["error_type"], row["input_tokens"]) == ("overloaded_error", 12)
    assert row["cost"] == pytest.approx((12 * 1 + 1 * 5) / 1e6, abs=1e-12)


async def test_a_quota_key_is_not_charged_for_an_in_band_error_before_message_start(gateway_env):
    """A key with a $5 quota: the request the upstream refused in-band leaves its settled spend at 0, not at the
    request's reserved bound."""
    async with ScriptedChannel() as channel:
        key = gateway_env.add_key("capped", quota_cost=5.0)
        gateway_env.add_channel("main", channel.base_url)
        await gateway_env.start()
        channel.queue([HEAD_SSE, chunk(OVERLOADED), b"0\r\n\r\n"])
        assert (await post_as(gateway_env, key, ask())).status == 200
        [row] = await gateway_env.usage_rows(1)
    spent = [tuple(r) for r in gateway_env.query("SELECT cost, tokens FROM key_spend")]
    assert all(cost == 0 for cost, _ in spent), f"settled spend {spent} for row cost {row['cost']!r}"
