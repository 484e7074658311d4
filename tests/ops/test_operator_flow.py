"""The service as an operator runs it: the CLI and `serve` as real subprocesses, the official SDK as the client.

    channels add ... --db X  ->  keys create NAME  ->  serve --db X  ->  SDK streams a reply through it

plus CLI edits reaching the running server without a restart, secrets never printed, the first-start bootstrap
from ANTHROPIC_API_KEY, a start with no channel at all, and APERTIS_DB. The MockUpstream runs in the test's event
loop, so every subprocess is driven through asyncio (a blocking wait would freeze the upstream).

"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

import anthropic

from tests.support.mock_upstream import MOCK_API_KEY
from tests.support.processes import (CLI_TIMEOUT, EDIT_TIMEOUT, MODEL, CliRunner, ServeProcess, ask, clean_env,
                                     sdk_client, usage_with, wait_for)

async def test_readme_flow_streams_a_reply_through_the_sdk(tmp_path, mock_upstream):
    db = str(tmp_path / "gateway.db")
    cli = CliRunner(tmp_path, db)
    await cli.add_channel("main", mock_upstream.base_url)
    key = await cli.create_key("alice")
    assert key.startswith("sk-") and " " not in key

    async with ServeProcess(tmp_path, db) as server:
        pieces: list[str] = []
        async with sdk_client(server.base_url, key) as client:
            async with client.messages.stream(model=MODEL, max_tokens=128,
                                              messages=[{"role": "user", "content": "README flow"}]) as stream:
                async for piece in stream.text_stream:
                    pieces.append(piece)
                final = await stream.get_final_message()
        assert len(pieces) > 1                                # it arrived as a stream, piece by piece
        assert final.content[0].text == "".join(pieces)
        assert "README flow" in final.content[0].text and final.stop_reason == "end_turn"

        upstream = mock_upstream.requests[-1]
        assert upstream.headers["x-api-key"] == MOCK_API_KEY    # the channel's key, never the user's
        assert key not in json.dumps(upstream.headers)
        assert upstream.body["stream"] is True and upstream.body["model"] == MODEL

        served = mock_upstream.served[-1]
        usage = await usage_with(cli, 1)
        assert usage["requests"] == 1
        assert usage["input_tokens"] == served["full_usage"]["input_tokens"] == final.usage.input_tokens
        assert usage["output_tokens"] == served["full_usage"]["output_tokens"] == final.usage.output_tokens

        # Listings while the server runs: names yes, secrets never.
        keys_out = await cli.ok("keys", "list")
        channels_out = await cli.ok("channels", "list")
        assert "alice" in keys_out and "main" in channels_out and mock_upstream.base_url in channels_out
        for listing in (keys_out, channels_out):
            assert key not in listing and key[-16:] not in listing
            assert MOCK_API_KEY not in listing
        assert await server.stop() == 0
    assert key not in server.stdout + server.stderr and MOCK_API_KEY not in server.stdout + server.stderr


async def test_cli_edits_reach_the_running_server(tmp_path, make_mock_upstream):
    first = await make_mock_upstream(api_key=MOCK_API_KEY)
    second = await make_mock_upstream(api_key="sk-ant-second")
    db = str(tmp_path / "gateway.db")
    cli = CliRunner(tmp_path, db)
    await cli.add_channel("main", first.base_url)
    key = await cli.create_key("alice")

    async with ServeProcess(tmp_path, db) as server:
        assert "Echo: before" in (await ask(server.base_url, key, "before")).content[0].text

        # Disabling the key locks its owner out, no restart.
        await cli.ok("keys", "disable", "alice")
        refusal: dict[str, Any] = {}

        async def refused() -> bool:
            try:
                await ask(server.base_url, key)
            except anthropic.AuthenticationError as exc:
                refusal.update(status=exc.status_code, body=exc.body)
                return True
            return False
        await wait_for(refused, EDIT_TIMEOUT, "the disabled key to get 401", interval=0.2)
        assert refusal["status"] == 401
        assert refusal["body"]["type"] == "error" and refusal["body"]["error"]["type"] == "authentication_error"
        assert refusal["body"]["request_id"].startswith("req_")
        requests_before = len(first.requests)

        await cli.ok("keys", "enable", "alice")

        async def accepted() -> bool:
            try:
                await ask(server.base_url, key)
            except anthropic.AuthenticationError:
                return False
            return True
        await wait_for(accepted, EDIT_TIMEOUT, "the re-enabled key to work", interval=0.2)
        assert len(first.requests) == requests_before + 1   # refused requests never reached upstream

        # Disable the only channel: requests stop reaching it.
        await cli.ok("channels", "disable", "main")

        async def unrouted() -> bool:
            try:
                await ask(server.base_url, key)
            except anthropic.APIStatusError:
                return True
            return False
        await wait_for(unrouted, EDIT_TIMEOUT, "the disabled channel to stop serving", interval=0.2)

        # A channel added now takes the traffic.
        await cli.add_channel("backup", second.base_url, "sk-ant-second")

        async def rerouted() -> bool:
            try:
                return "Echo: after" in (await ask(server.base_url, key, "after")).content[0].text
            except anthropic.APIStatusError:
                return False
        await wait_for(rerouted, EDIT_TIMEOUT, "the new channel to serve", interval=0.2)
        served_by_first = len(first.requests)
        assert "Echo: again" in (await ask(server.base_url, key, "again")).content[0].text
        assert len(first.requests) == served_by_first
        assert second.requests[-1].headers["x-api-key"] == "sk-ant-second"

        # The ledger shows the requests of both channels (and the unrouted ones, without a channel).
        by_channel: dict[Optional[str], int] = {}

        async def metered() -> bool:
            usage = json.loads(await cli.ok("usage", "--json", "--by", "channel"))
            by_channel.update({row["channel"]: row["requests"] for row in usage["by"]})
            return by_channel.get("backup", 0) >= 2
        await wait_for(metered, EDIT_TIMEOUT, "usage rows of the new channel", interval=0.2)
        assert by_channel.get("main", 0) >= 2 and by_channel.get(None, 0) >= 1
        assert await server.stop() == 0


# -- installation and defaults --------------------------------------------------------------------------------------

async def test_console_script_runs_the_same_cli(tmp_path):
    """`pip install` puts `apertis-proxy` next to the interpreter; it is the CLI the README uses."""
    import apertis_proxy
    script = Path(sys.executable).parent / "apertis-proxy"
    assert script.exists(), f"console script missing: {script} (is the package installed with pip?)"
    proc = await asyncio.create_subprocess_exec(str(script), "--version", cwd=tmp_path, env=clean_env(),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == f"apertis-proxy {apertis_proxy.__version__}"


async def test_default_db_is_apertis_db_in_the_working_directory(tmp_path):
    cli = CliRunner(tmp_path, None)             # neither --db nor APERTIS_DB
    await cli.create_key("bob")
    assert (tmp_path / "apertis.db").is_file()
    assert "bob" in await cli.ok("keys", "list")
    assert "bob" in await CliRunner(tmp_path, str(tmp_path / "apertis.db")).ok("keys", "list")


# -- first start ----------------------------------------------------------------------------------------------------

async def test_first_start_with_anthropic_api_key_creates_the_default_channel(tmp_path):
    db = str(tmp_path / "gateway.db")
    secret = "sk-ant-api03-bootstrap-" + "x" * 24
    env = clean_env(ANTHROPIC_API_KEY=secret)
    async with ServeProcess(tmp_path, db, env=env) as server:   # no request is ever sent to it
        channels_out = await CliRunner(tmp_path, db).ok("channels", "list")
        assert await server.stop() == 0
    assert "created channel 'anthropic'" in server.stdout
    line = next(line for line in channels_out.splitlines() if line.startswith("anthropic "))
    assert "https://api.anthropic.com" in line and " yes " in line
    for text in (channels_out, server.stdout, server.stderr):
        assert secret not in text

    # Only a first start does that: a restart with another key leaves the channel alone.
    async with ServeProcess(tmp_path, db, env=clean_env(ANTHROPIC_API_KEY="sk-ant-other")) as server:
        assert await server.stop() == 0
    assert "created channel" not in server.stdout
    listed = await CliRunner(tmp_path, db).ok("channels", "list")
    assert len([line for line in listed.splitlines() if line.startswith("anthropic ")]) == 1


async def test_start_without_channels_explains_and_honours_apertis_db(tmp_path, mock_upstream):
    db = str(tmp_path / "elsewhere" / "gateway.db")
    os.makedirs(os.path.dirname(db))
    env = clean_env(APERTIS_DB=db)
    cli = CliRunner(tmp_path, None, env)            # no --db anywhere: APERTIS_DB must be used
    key = await cli.create_key("alice")

    async with ServeProcess(tmp_path, None, env=env) as server:
        assert "apertis-proxy channels add" in server.stdout and db in server.stdout

        # Running but unrouted: an Anthropic-shaped error, not a crash.
        try:
            await ask(server.base_url, key)
            raise AssertionError("a request without any channel succeeded")
        except anthropic.APIStatusError as exc:
            assert exc.body["type"] == "error" and exc.body["error"]["type"] == "not_found_error"

        # Following the printed advice works without a restart.
        await cli.add_channel("main", mock_upstream.base_url)

        async def served() -> bool:
            try:
                return "Echo: now" in (await ask(server.base_url, key, "now")).content[0].text
            except anthropic.APIStatusError:
                return False
        await wait_for(served, EDIT_TIMEOUT, "the added channel to serve", interval=0.2)
        assert (await usage_with(cli, 2))["requests"] >= 2
        assert await server.stop() == 0
    assert not (tmp_path / "apertis.db").exists()    # the ./apertis.db default was never touched


async def test_a_port_in_use_fails_at_once_with_a_clear_error(tmp_path, mock_upstream):
    """The listening socket is bound before plugins and the watcher start their threads, so `serve` on a taken port
    exits with an error naming the port instead of hanging with nothing listening."""
    db = str(tmp_path / "gateway.db")
    cli = CliRunner(tmp_path, db, clean_env())
    await cli.add_channel("main", mock_upstream.base_url)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        code, _, err = await cli("serve", "--host", "127.0.0.1", "--port", str(port))   # fails if it hangs
    finally:
        taken.close()
    assert code != 0
    assert f"cannot listen on 127.0.0.1 port {port}: Address already in use" in err
