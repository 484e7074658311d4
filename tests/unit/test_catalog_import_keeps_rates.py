"""`prices import FILE` with a file that lists only the models it adds keeps the gateway's other billing rates.

`read_catalog_file` requires `version` and `models` only; `web_search_per_request` and `service_tiers` (batch 0.5)
are optional in a catalogue file.  An operator adding one model their own way (a file of the shipped shape holding
just that model) must not change how every other request is billed.

Opus 5 at 5 / 25 USD per million tokens: 1,000 input and 100 output tokens are (5000 + 2500)/1e6 = 0.0075 at list
price; a batch result is half that, 0.00375; two web searches add 2 x $0.01.
"""
from __future__ import annotations

import json
import time
from decimal import Decimal

from apertis_proxy import cli
from apertis_proxy.gateway.pricing import price
from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import catalog as catalog_store
from apertis_proxy.store import schema

ONE_MODEL = {"version": "2026-12-07", "models": [{
    "id": "claude-opus-6", "display_name": "Claude Opus 6", "created_at": "2026-12-07T00:00:00Z",
    "prices": [{"from": None, "input": 6, "output": 30, "cache_write_5m": 7.5, "cache_write_1h": 12,
                "cache_read": 0.6, "source": "operator's contract"}]}]}


def priced(catalog, **usage) -> UsageRecord:
    record = UsageRecord(request_id="r", started_at=time.time(), endpoint="/v1/messages",
                         upstream_model="claude-opus-5", input_tokens=1_000, output_tokens=100, **usage)
    price(record, catalog)
    return record


def test_importing_a_file_of_new_models_keeps_the_batch_and_web_search_rates(tmp_path, capsys):
    db = str(tmp_path / "store.db")
    schema.connect(db).close()
    path = tmp_path / "opus6.json"
    path.write_text(json.dumps(ONE_MODEL))
    assert cli.main(["prices", "import", str(path), "--db", db]) == 0
    capsys.readouterr()
    conn = schema.connect(db)
    try:
        catalog = catalog_store.load_catalog(conn)
    finally:
        conn.close()
    assert catalog.lookup("claude-opus-6") is not None
    batch = priced(catalog, service_tier="batch")
    searched = priced(catalog, web_search_requests=2, server_tool_use={"web_search_requests": 2})
    seen = {"batch": batch.cost, "two web searches": searched.cost}
    assert seen == {"batch": 0.00375, "two web searches": 0.0275}, (
        f"after importing a file that adds one model, an Opus 5 batch result costs ${seen['batch']} "
        f"(multipliers {batch.prices.get('multipliers')}) and a request with two web searches "
        f"${seen['two web searches']} ({searched.prices.get('unpriced')!r}); billing rates now "
        f"{catalog.rates}")
    assert Decimal(batch.prices["cost"]) == Decimal("0.00375")
