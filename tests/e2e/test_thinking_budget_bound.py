"""`thinking.budget_tokens` as the API bounds it: at least 1024 and less than `max_tokens`. A model with 64k output
tokens (Haiku 4.5, Opus 4.5) takes a budget above 32k, as clients that raise their thinking budget send it (Claude
Code's MAX_THINKING_TOKENS, the SDKs' long streamed answers)."""
from __future__ import annotations

import anthropic

HAIKU = "claude-haiku-4-5-20251001"


async def test_a_thinking_budget_above_32k_below_max_tokens_reaches_upstream(gateway):
    thinking = {"type": "enabled", "budget_tokens": 40000}
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        async with client.messages.stream(model=HAIKU, max_tokens=64000, thinking=thinking,
                                          messages=[{"role": "user", "content": "think long"}]) as stream:
            reply = await stream.get_final_message()
    assert reply.stop_reason == "end_turn"
    assert gateway.mock.last_request.body["thinking"] == thinking
    [row] = await gateway.usage_rows(1)
    assert row["status"] == 200
