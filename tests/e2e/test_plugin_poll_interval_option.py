"""docs/plugins.md: a plugin's `options` are "its `[plugins.options.NAME]` table merged over the gateway settings
plugins act on, the table's own keys winning: `poll_interval` (`[server] config_poll_interval`)"; the `keys` plugin's
options: "`poll_interval` (1.0)"; and "The worker's one change watcher notices (on SQLite by reading that integer
every `poll_interval` seconds, option, default 1.0) ... so a CLI edit takes effect within about a second".

An operator who wants key edits to bite faster than the rest of the configuration sets
`[plugins.options.keys] poll_interval = 0.2` beside a slow `[server] config_poll_interval = 10`: a key disabled with
the CLI must then be refused within a few of the keys plugin's polls, not after the server-wide interval."""
from __future__ import annotations

import asyncio

from apertis_proxy.store import keys as key_store
from tests.support.rawhttp import RawConnection

BODY = {"model": "claude-haiku-4-5-20251001", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
KEYS_POLL = 0.2
SERVER_POLL = 10.0


async def _status(port: int, key: str) -> int:
    async with await RawConnection.open("127.0.0.1", port) as conn:
        return (await conn.request("POST", "/v1/messages", {"x-api-key": key}, json_body=BODY)).status


async def test_the_keys_plugins_own_poll_interval_wins_over_the_servers(gateway_env, mock_upstream):
    gateway_env.add_channel("main", mock_upstream)
    key = gateway_env.add_key("alice")
    gw = await gateway_env.start(config_poll_interval=SERVER_POLL,
                                 plugin_options={"keys": {"poll_interval": KEYS_POLL}})
    port = int(gw.base_url.rsplit(":", 1)[1])
    assert await _status(port, key) == 200

    key_store.set_key_enabled(gateway_env.conn, "alice", False)    # what `keys disable alice` does
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10 * KEYS_POLL                      # ten of the keys plugin's polls
    statuses = []
    while loop.time() < deadline:
        statuses.append(await _status(port, key))
        if statuses[-1] == 401:
            break
        await asyncio.sleep(KEYS_POLL / 2)
    assert statuses[-1] == 401, (f"a key disabled {10 * KEYS_POLL:g}s ago (keys poll_interval {KEYS_POLL}) "
                                 f"was still served: {statuses}")
