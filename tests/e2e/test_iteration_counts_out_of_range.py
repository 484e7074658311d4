"""An answer whose `usage.iterations` report token counts no request could have (2**62 each, from a broken or
hostile relay): the ledger must go on landing rows, this request's and everyone else's.

usage.py guards the top-level counts for exactly this ("past 2**63 SQLite cannot even store them: one such row
would stop the ledger"; counts of 2**53 and more are ignored like a missing one).  The iterations' counts are kept
raw, and the ledger's settlement sums them in SQL (ledger_write.iteration_tokens_sql, the token quota's
`billed_tokens`).  A real gateway (in process, real sockets, the SQLite ledger), a ScriptedChannel."""
from __future__ import annotations

from tests.support.scripted_channel import json_response
from tests.support.scripted_gateway import ask, post

HUGE = 2 ** 62


def _answer(usage: dict) -> bytes:
    return json_response(200, {"id": "msg_x", "type": "message", "role": "assistant",
                               "model": "claude-haiku-4-5-20251001", "content": [{"type": "text", "text": "hi"}],
                               "stop_reason": "end_turn", "stop_sequence": None, "usage": usage})


async def test_absurd_iteration_counts_do_not_stop_the_ledger(scripted):
    await scripted.start()
    advisor = {"type": "advisor_message", "model": "claude-opus-4-8", "input_tokens": HUGE, "output_tokens": 0}
    absurd = {"input_tokens": 10, "output_tokens": 5, "iterations": [advisor, advisor]}
    scripted.channel.queue([_answer(absurd)], [_answer({"input_tokens": 10, "output_tokens": 5})])
    first = await post(scripted, ask(stream=False))
    second = await post(scripted, ask(stream=False, text="an ordinary request"))
    assert (first.status, second.status) == (200, 200)
    rows = await scripted.usage_rows(2, timeout=5.0)
    assert len(rows) == 2, (
        f"{len(rows)} ledger rows after 5 s for 2 answered requests: the row with iteration counts of "
        f"2 x {HUGE} is not shipped, and every row spooled after it waits behind it")
