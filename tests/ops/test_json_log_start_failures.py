"""With `[logging] format = "json"`, a `serve` that cannot start says why in a JSON line too.

README: "With `[logging] format = "json"` every line the process writes is one JSON object with `time` (UTC),
`level`, `logger` and `message`". The settings were read (the format is known), so the line that explains why the
service will not come up (the port taken by another program, with one worker and with several) must parse as
JSON like the others: a log shipper doing `parse_json!` (the README's Vector recipe) drops, or fails on, the
one line the operator needs while the unit restarts in a loop.
"""
from __future__ import annotations

import asyncio
import json
import socket
import sys

import pytest

from tests.support.processes import EXIT_TIMEOUT, clean_env
from tests.support.served_gateway import prepare_db


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_port_in_use_is_reported_in_a_json_line(tmp_path, mock_upstream, workers):
    db = str(tmp_path / "gateway.db")
    prepare_db(db, mock_upstream.base_url)
    config = tmp_path / "apertis.toml"
    config.write_text('[logging]\nformat = "json"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "apertis_proxy", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--db", db, "--config", str(config), "--workers", workers, cwd=tmp_path, env=clean_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), EXIT_TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode != 0
    lines = [line for line in (out + err).decode().splitlines() if line.strip()]
    assert lines, "serve exited without a word"
    not_json = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            not_json.append(line)
            continue
        assert {"time", "level", "logger", "message"} <= set(entry), line
    assert not not_json, f"lines that are not JSON: {not_json}"
    assert any(str(port) in line for line in lines)
