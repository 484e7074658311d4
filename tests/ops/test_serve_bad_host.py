"""README, "Configuration": `serve` checks its settings before it starts and a bad one "stops it with one line naming
the setting"; a port in use "fails at once with a clear error" naming the address.  A listen address that is no
address of this machine nor a resolvable name (`--host` or `[server] host`, a typo) is the same kind of mistake: the
one line says which host it could not listen on, so the operator knows what to fix."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.processes import clean_env, free_port

BAD_HOST = "gateway-host.invalid"       # RFC 6761: never resolves


def _serve(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apertis_proxy", "serve", "--db", str(tmp_path / "g.db"),
                           "--port", str(free_port()), *args], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("where", ["flag", "file"])
def test_an_unresolvable_listen_host_is_one_line_naming_it(tmp_path, where):
    if where == "flag":
        proc = _serve(tmp_path, "--host", BAD_HOST)
    else:
        (tmp_path / "apertis.toml").write_text(f'[server]\nhost = "{BAD_HOST}"\n')
        proc = _serve(tmp_path, "--config", str(tmp_path / "apertis.toml"))
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert BAD_HOST in errors[0], errors[0]
