"""A request whose first channel took it and never answered (given up at `read_timeout`) and which then failed
over: the first upstream may bill it, so the request's row must not say it cost nothing.

docs/billing.md: a request the gateway gave up waiting for at read_timeout has its cost unknown (NULL), which a
key's USD quota counts at the request's reserved bound; an upstream's own error answer is its word that it did
not serve the request (cost 0).  A real gateway (in process, real sockets, the SQLite ledger), ScriptedChannels."""
from __future__ import annotations

import json

from tests.support.gateway_env import NO_COOLDOWNS
from tests.support.gateway_requests import closed_port_url
from tests.support.scripted_channel import HANG, ScriptedChannel, full_stream, json_response
from tests.support.scripted_gateway import ask, post

OVERLOADED = json_response(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                           b"Overloaded")


async def _two_channels(env, first: ScriptedChannel, second_url: str):
    env.key = env.add_key("alice")
    env.add_channel("slow", first.base_url, priority=10)
    env.add_channel("second", second_url, priority=1)
    await env.start(read_timeout=0.5, **NO_COOLDOWNS)


async def test_a_timed_out_attempt_then_a_refused_one_is_not_metered_as_free(gateway_env):
    """`slow` receives the request and never answers (timeout); `second` refuses the connection.  Only `slow`
    had the request, and the gateway gave up on it: the row's cost is unknown, as for a single channel."""
    async with ScriptedChannel() as slow:
        await _two_channels(gateway_env, slow, closed_port_url())
        slow.queue([HANG])
        response = await post(gateway_env, ask(stream=False))
        assert response.status in (502, 504)
        [row] = await gateway_env.usage_rows(1)
    assert len(slow.requests) == 1
    tried = [(a["channel"], a["outcome"]) for a in json.loads(row["attempt_log"])]
    assert [c for c, _ in tried] == ["slow", "second"], tried
    assert row["cost"] is None, (
        f"cost={row['cost']!r} status={row['status']} error_type={row['error_type']} attempts={tried}")


async def test_a_timed_out_attempt_then_an_overloaded_answer_is_not_metered_as_free(gateway_env):
    """`slow` takes the request and never answers (timeout); `second` answers 529 (its word that it did not
    serve it).  `slow` may still bill it: the row's cost is unknown, not 0."""
    async with ScriptedChannel() as slow, ScriptedChannel() as second:
        await _two_channels(gateway_env, slow, second.base_url)
        slow.queue([HANG])
        second.queue([OVERLOADED])
        response = await post(gateway_env, ask(stream=False))
        assert response.status == 529
        [row] = await gateway_env.usage_rows(1)
    assert len(slow.requests) == 1 and len(second.requests) == 1
    assert row["cost"] is None, f"cost={row['cost']!r} status={row['status']} error_type={row['error_type']}"


async def test_control_a_single_channel_timeout_has_an_unknown_cost(gateway_env):
    """Control (passes): one channel, given up at read_timeout: cost NULL."""
    async with ScriptedChannel() as slow:
        gateway_env.key = gateway_env.add_key("alice")
        gateway_env.add_channel("slow", slow.base_url)
        await gateway_env.start(read_timeout=0.5)
        slow.queue([HANG])
        response = await post(gateway_env, ask(stream=False))
        assert response.status == 504
        [row] = await gateway_env.usage_rows(1)
    assert row["cost"] is None


async def test_control_a_timed_out_attempt_then_a_served_one_bills_the_served_usage(gateway_env):
    """Control: `slow` times out, `second` serves the stream: the row holds what `second` reported."""
    async with ScriptedChannel() as slow, ScriptedChannel() as second:
        await _two_channels(gateway_env, slow, second.base_url)
        slow.queue([HANG])
        second.queue(full_stream(input_tokens=12, output_tokens=5))
        response = await post(gateway_env, ask())
        assert response.status == 200
        [row] = await gateway_env.usage_rows(1)
    assert (row["channel_name"], row["input_tokens"], row["output_tokens"]) == ("second", 12, 5)
