"""README, "Several hosts on PostgreSQL": "While the database cannot be reached, known keys keep being served from
the last configuration, and a key the gateway does not know gets 503 `api_error` with `retry-after` (it may have
been created meanwhile), never a 401."

A client whose body does not come with its head (a large prompt, or any client writing head and body apart) is
judged from its head first (`keys.check_head`): that answer is the same 503 with the same `retry-after`."""
from __future__ import annotations

import asyncio
import json
import re

import pytest

from apertis_proxy import cli
from tests.support.gateway_process import GatewayProcess
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.pg_server import PgServer, PgUnavailable, memory_folder
from tests.support.rawhttp import RawConnection, request_bytes

BODY = json.dumps({"model": "claude-haiku-4-5-20251001", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


def _cli(*argv: str) -> None:
    assert cli.main(list(argv)) == 0


async def _unknown_key(port: int, head_first: bool):
    raw = request_bytes("POST", "/v1/messages", {"x-api-key": "sk-apx-made-while-the-store-was-down",
                                                 "content-type": "application/json"}, BODY)
    head = raw[:len(raw) - len(BODY)]
    async with await RawConnection.open("127.0.0.1", port) as conn:
        await conn.send(head if head_first else raw)
        return await conn.read_response()


async def test_an_unknown_key_sent_head_first_while_the_store_is_down_gets_retry_after(pg_server, tmp_path,
                                                                                       capsys):
    try:
        server = await asyncio.to_thread(PgServer.start, False, memory_folder())
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    try:
        db = await asyncio.to_thread(server.create_database, "down")
        async with MockUpstream(api_key=MOCK_API_KEY) as mock:
            await asyncio.to_thread(_cli, "channels", "add", "main", "--base-url", mock.base_url, "--api-key",
                                    MOCK_API_KEY, "--db", db)
            capsys.readouterr()
            await asyncio.to_thread(_cli, "keys", "create", "alice", "--db", db)
            known = re.search(r"sk-apx-[A-Za-z0-9_-]+", capsys.readouterr().out).group(0)
            host = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "a")
            try:
                assert (await asyncio.to_thread(host.post_message, known))[0] == 200
                await asyncio.to_thread(server.stop, "immediate")
                whole = None
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10.0
                while loop.time() < deadline:      # until the watcher has noticed the lost connection
                    whole = await _unknown_key(host.port, head_first=False)
                    if whole.status == 503:
                        break
                    await asyncio.sleep(0.1)
                assert whole is not None and whole.status == 503, whole
                assert whole.header("retry-after") is not None, whole.headers

                split = await _unknown_key(host.port, head_first=True)
                assert split.status == 503, split.body
                assert split.json()["error"]["type"] == "api_error"
                assert split.header("retry-after") == whole.header("retry-after"), split.headers
            finally:
                await asyncio.to_thread(host.stop)
    finally:
        await asyncio.to_thread(server.close)
