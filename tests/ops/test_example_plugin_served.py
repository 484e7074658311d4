"""docs/plugins.md, "A worked example": `pip install ./docs/example-plugin`, then

    [plugins]
    router = ["header-route", "channels"]

"Then `curl -H 'x-apertis-channel: eu' ...` goes to channel `eu`, everything else through `channels`."

Followed literally as an operator would: the distribution pip-installed (into a folder of its own on PYTHONPATH),
`apertis-proxy serve` with that table, the official SDK as the client.  A channel disabled with the CLI stops being
reachable by header too, and an unknown name is a 400 `invalid_request_error`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anthropic
import pytest

from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.processes import EDIT_TIMEOUT, MODEL, CliRunner, ServeProcess, clean_env, sdk_client, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "example-plugin"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("example-served")
    source = work / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "--target", str(work / "site"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work / "site"


async def _ask(base_url: str, key: str, text: str, channel=None) -> str:
    headers = {"x-apertis-channel": channel} if channel else {}
    async with sdk_client(base_url, key) as client:
        reply = await client.messages.create(model=MODEL, max_tokens=32, extra_headers=headers,
                                             messages=[{"role": "user", "content": text}])
    return reply.content[0].text


async def test_the_installed_example_routes_by_header_in_a_served_gateway(tmp_path, example_site):
    env = clean_env(PYTHONPATH=os.pathsep.join([str(example_site), os.environ.get("PYTHONPATH", "")]))
    async with MockUpstream(api_key=MOCK_API_KEY) as eu, MockUpstream(api_key=MOCK_API_KEY) as main:
        db = str(tmp_path / "gateway.db")
        cli = CliRunner(tmp_path, db, env=env)
        await cli.add_channel("main", main.base_url, MOCK_API_KEY, "--priority", "10")
        await cli.add_channel("eu", eu.base_url)
        key = await cli.create_key("alice")
        (tmp_path / "apertis.toml").write_text('[plugins]\nrouter = ["header-route", "channels"]\n')
        async with ServeProcess(tmp_path, db, "--config", str(tmp_path / "apertis.toml"), env=env) as server:
            assert "by header" in await _ask(server.base_url, key, "by header", channel="eu")
            assert len(eu.requests) == 1 and len(main.requests) == 0
            assert "no header" in await _ask(server.base_url, key, "no header")
            assert len(eu.requests) == 1 and len(main.requests) == 1

            with pytest.raises(anthropic.BadRequestError) as refused:
                await _ask(server.base_url, key, "nowhere", channel="nowhere")
            assert refused.value.body["error"]["type"] == "invalid_request_error"

            await cli.ok("channels", "disable", "eu")

            async def eu_refused() -> bool:
                try:
                    await _ask(server.base_url, key, "after disable", channel="eu")
                except anthropic.BadRequestError:
                    return True
                return False
            await wait_for(eu_refused, EDIT_TIMEOUT, "the disabled channel to leave the example's table")
            seen = len(eu.requests)
            assert await eu_refused() and len(eu.requests) == seen
            assert await server.stop() == 0
