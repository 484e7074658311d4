"""A catalogue file's prices are finite numbers: `prices import` refuses `Infinity` (which Python's json module
reads, as it reads `NaN`) as it refuses a negative price, and never leaves a model whose requests go unmetered.

`read_catalog_file` checks each price with `isinstance(v, (int, float))` and `v < 0`: float('inf') passes both.
Pricing a request at an infinite rate raises decimal.InvalidOperation (quantizing to 1e-10) in the `finally` that
meters the request, so a request for the model is answered and leaves no ledger row at all: served for free.
"""
from __future__ import annotations

import asyncio

from apertis_proxy import cli
from tests.support.gateway_requests import post

INFINITE_INPUT = ('{"version": "2099-01-01", "models": [{"id": "claude-opus-6", "display_name": "Claude Opus 6",'
                  ' "created_at": "2026-12-07T00:00:00Z", "prices": [{"from": null, "input": Infinity, "output": 30,'
                  ' "cache_write_5m": 7.5, "cache_write_1h": 12, "cache_read": 0.6}]}]}')


async def test_an_infinite_price_is_refused_and_never_serves_requests_unmetered(gateway, tmp_path, capsys):
    path = tmp_path / "opus6.json"
    path.write_text(INFINITE_INPUT)
    rc = cli.main(["prices", "import", str(path), "--db", gateway.db_path])
    capsys.readouterr()
    if rc != 0:
        return
    served = []
    for _ in range(25):       # until the running gateway has read the import (about a second)
        response = await post(gateway, gateway.key, {"model": "claude-opus-6", "max_tokens": 16,
                                                     "messages": [{"role": "user", "content": "free?"}]})
        if response.status == 200:
            served.append(response.header("request-id"))
            break
        await asyncio.sleep(0.2)
    assert served, "the import was taken (rc 0) but claude-opus-6 was never served"
    await post(gateway, gateway.key, {"model": "claude-opus-5", "max_tokens": 16,
                                      "messages": [{"role": "user", "content": "after"}]})
    rows = await gateway.usage_rows(len(gateway.mock.requests))
    ids = {r["request_id"] for r in rows}
    assert served[0] in ids, (
        f"`prices import` took input=Infinity (rc 0); request {served[0]} for claude-opus-6 was answered 200 and "
        f"left no ledger row (rows: {[(r['requested_model'], r['status'], r['cost']) for r in rows]})")
