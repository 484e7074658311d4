"""A running gateway keeps reading the store's configuration after `prices import` of a file with a prompt-size
band that lacks some rates (see tests/unit/test_catalog_file_bands.py: the import takes it, rc 0).

Every configuration read goes through `load_catalog`, which raises KeyError on such a band; the gateway then keeps
the configuration it read last, for keys and channels too.  Here the operator disables a key after the import: a
disabled key is refused (401) within about a second without the import (README: "Changes made with the CLI (keys,
channels, prices) reach a running server within about a second").
"""
from __future__ import annotations

import asyncio
import json
import time

from apertis_proxy import cli
from tests.support.gateway_requests import post

BAND_WITHOUT_CACHE_RATES = {"version": "2099-01-01", "models": [{
    "id": "claude-opus-6", "display_name": "Claude Opus 6", "created_at": "2026-12-07T00:00:00Z",
    "prices": [{"from": None, "input": 6, "output": 30, "cache_write_5m": 7.5, "cache_write_1h": 12, "cache_read": 0.6,
                "bands": [{"above_prompt_tokens": 200_000, "input": 12, "output": 45}]}]}]}
BODY = {"model": "claude-opus-5", "max_tokens": 16, "messages": [{"role": "user", "content": "still mine?"}]}


async def test_a_key_disabled_after_an_import_with_a_partial_band_is_refused(gateway, tmp_path, capsys):
    path = tmp_path / "opus6.json"
    path.write_text(json.dumps(BAND_WITHOUT_CACHE_RATES))
    cli.main(["prices", "import", str(path), "--db", gateway.db_path])
    assert cli.main(["keys", "disable", "alice", "--db", gateway.db_path]) == 0
    capsys.readouterr()
    deadline = time.monotonic() + 5
    statuses = []
    while time.monotonic() < deadline:
        statuses.append((await post(gateway, gateway.key, BODY)).status)
        if statuses[-1] == 401:
            break
        await asyncio.sleep(0.2)
    assert statuses[-1] == 401, (
        f"key alice, disabled after the import, was still served for 5 s ({len(statuses)} requests, last "
        f"status {statuses[-1]}): the gateway stopped reading its configuration")
