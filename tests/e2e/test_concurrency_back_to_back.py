"""A key's concurrency slot is given back before the answer's last bytes: a client that sends its next request the
moment it has read the previous answer whole (the official SDK on one keep-alive connection, JSON and streams) is
never refused with `--concurrency 1`."""
from __future__ import annotations

import anthropic

from tests.support.gateway_requests import message


async def test_back_to_back_requests_of_a_key_with_one_slot_are_all_served(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice", concurrency=1, quota_cost=5.0)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        for n in range(20):
            if n % 2:
                async with client.messages.stream(**{k: v for k, v in message(f"stream {n}").items()
                                                     if k != "stream"}) as stream:
                    final = await stream.get_final_message()
            else:
                final = await client.messages.create(**message(f"json {n}"))
            assert final.stop_reason == "end_turn"
    assert len(mock_upstream.served) == 20
