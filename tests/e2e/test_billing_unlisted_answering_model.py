"""An answer naming a model the catalogue has no entry for (the upstream served the request with another model
than the one sent, as a fallback does): the row records that model, and is billed at its price or not at all.

docs/billing.md: a request is billed "of the model that answered (the answer's `model`, recorded as
`upstream_model`)", and usage without a price that only the answer shows (an iteration at a model without one,
a service tier without a multiplier) leaves the row unpriced (cost NULL, a USD quota counts the reserved bound):
never another model's list price.  A real gateway (in process, real sockets, the SQLite ledger), a
ScriptedChannel writing the answer byte for byte."""
from __future__ import annotations

import json

from tests.support.scripted_channel import json_response
from tests.support.scripted_gateway import ask, post

ANSWERED = "claude-opus-9"          # in no catalogue
USAGE = {"input_tokens": 1_000, "output_tokens": 100, "cache_read_input_tokens": 0,
         "cache_creation_input_tokens": 0}


async def test_an_answer_from_a_model_without_a_price_is_not_billed_at_the_model_sent(scripted):
    await scripted.start()
    answer = {"id": "msg_x", "type": "message", "role": "assistant", "model": ANSWERED,
              "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn", "stop_sequence": None,
              "usage": USAGE}
    scripted.channel.queue([json_response(200, answer)])
    response = await post(scripted, ask(stream=False))
    assert response.status == 200
    [row] = await scripted.usage_rows(1)
    assert row["upstream_model"] == ANSWERED
    prices = json.loads(row["prices"])
    assert row["cost"] is None, (
        f"the answer names {ANSWERED}, which has no price; the row is billed ${row['cost']} at "
        f"{prices.get('model')}'s rates (input {prices.get('input')}, output {prices.get('output')})")
