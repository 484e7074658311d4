"""README, "Logs": "With `[logging] format = "json"` every line the process writes is one JSON object with `time`
(UTC), `level`, `logger` and `message`" (the Vector recipe beside it runs `parse_json!` on every line).

`serve` with that setting that cannot start, for a reason found once the file was read (a plugin name no
distribution registers, the port taken by another process), exits 1 with one line saying why: that line, the one an
operator most needs in the log pipeline, is JSON like every other."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.support.processes import clean_env, free_port


def _not_json(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not (isinstance(obj, dict) and {"time", "level", "logger", "message"} <= obj.keys()):
            bad.append(line)
    return bad


@pytest.mark.parametrize("why", ["unknown plugin", "port in use"])
def test_the_line_saying_why_serve_stopped_is_json_too(tmp_path, why):
    config = '[logging]\nformat = "json"\n'
    taken = None
    port = free_port()
    if why == "unknown plugin":
        config += '[plugins]\nrouter = ["no-such-router"]\n'
    else:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
    (tmp_path / "apertis.toml").write_text(config)
    try:
        proc = subprocess.run([sys.executable, "-m", "apertis_proxy", "serve", "--db", str(tmp_path / "g.db"),
                               "--host", "127.0.0.1", "--port", str(port), "--config", "apertis.toml"],
                              cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    finally:
        if taken is not None:
            taken.close()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    bad = _not_json(proc.stdout) + _not_json(proc.stderr)
    assert not bad, f"format = \"json\", yet these lines are not JSON log objects: {bad}"
    levels = [json.loads(line)["level"] for line in proc.stderr.splitlines() if line.strip()]
    assert "ERROR" in levels, proc.stderr        # the reason, as an error
