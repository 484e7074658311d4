"""README, "Configuration": "Changes made with the CLI (keys, channels, prices) reach a running server within about
a second, no restart: on SQLite the store keeps a revision counter that each worker polls."

A key's whole life, edited with the CLI while `serve --workers 2` runs (`[server] config_poll_interval = 0.25`):
after each edit, once a poll interval and a margin have passed, every one of many fresh connections (spread over
both workers by SO_REUSEPORT) gets the new answer: a rotation without grace, a disable, a delete and a new key of the
same name.  A disabled, rotated-out or deleted secret is never served again."""
from __future__ import annotations

import asyncio

import anthropic

from tests.support.processes import MODEL, CliRunner, ServeProcess, sdk_client

POLL = 0.25
SETTLE = 1.0          # "within about a second": the poll interval, the snapshot's reload, and a margin
PROBES = 6            # fresh connections per check: both workers take some


async def _status(base_url: str, key: str) -> int:
    async with sdk_client(base_url, key) as client:     # a client of its own: a new connection
        try:
            await client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            return 200
        except anthropic.APIStatusError as exc:
            return exc.status_code


async def _every_worker_answers(base_url: str, expected: dict[str, int], what: str) -> None:
    await asyncio.sleep(SETTLE)      # the documented bound, not an assertion: then every answer must be the new one
    for key, status in expected.items():
        statuses = [await _status(base_url, key) for _ in range(PROBES)]
        assert statuses == [status] * PROBES, f"{what}: {statuses}"


async def test_key_edits_reach_both_workers_and_old_secrets_stay_refused(tmp_path, mock_upstream):
    db = str(tmp_path / "gateway.db")
    cli = CliRunner(tmp_path, db)
    await cli.add_channel("main", mock_upstream.base_url)
    first = await cli.create_key("alice")
    (tmp_path / "apertis.toml").write_text(f"[server]\nconfig_poll_interval = {POLL}\n")
    async with ServeProcess(tmp_path, db, "--workers", "2", "--config", str(tmp_path / "apertis.toml")) as server:
        url = server.base_url
        assert await _status(url, first) == 200

        second = (await cli.ok("keys", "rotate", "alice")).strip().splitlines()[-1]
        await _every_worker_answers(url, {first: 401, second: 200}, "rotated without grace")

        await cli.ok("keys", "disable", "alice")
        await _every_worker_answers(url, {second: 401}, "a disabled key")

        await cli.ok("keys", "delete", "alice", "--yes")
        third = await cli.create_key("alice")
        await _every_worker_answers(url, {third: 200, second: 401, first: 401},
                                    "deleted, then a new key under the same name")
        assert await server.stop() == 0
