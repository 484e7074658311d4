"""What an operator following "Deploy it" (docs/deploy/*) meets: database URLs and the listening port.

- A PostgreSQL password as `openssl rand -base64` writes it (`/`, `+`, `=`) reaches the server, whether pasted
  into the URL as it is or put in compose.postgres.yaml's password file (its entrypoint builds the URL), and no
  part of it is ever printed.
- A second `serve --workers 2` on the port a multi-worker gateway already listens on exits with "cannot listen on
  ... Address already in use", as with one worker, instead of sharing the port through SO_REUSEPORT.
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.processes import CliRunner, ServeProcess, clean_env, free_port, wait_for
from tests.support.mock_upstream import MOCK_API_KEY

REPO = Path(__file__).resolve().parents[2]
COMPOSE_PG = REPO / "docs" / "deploy" / "compose.postgres.yaml"

# What `openssl rand -base64 12` can print: the base64 alphabet includes '/' and '+'.
PASSWORD = "Zx9/Qw+Er7=="


@pytest.fixture
def tcp_pg():
    """A PostgreSQL server on 127.0.0.1:PORT (as the compose file's `postgres:5432`) whose user `apertis` has
    the password PASSWORD, asked for (scram-sha-256) on TCP: a password that arrives altered is refused."""
    from tests.support.pg_server import PgServer, PgUnavailable, SUPERUSER
    try:
        server = PgServer.start()
    except PgUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(str(exc))
    try:
        assert "'" not in PASSWORD
        server._psql(f"ALTER USER {SUPERUSER} PASSWORD '{PASSWORD}'")
        server._psql("CREATE DATABASE apertis")
        port = free_port()
        server.stop()
        with open(os.path.join(server.data, "pg_hba.conf"), "w") as hba:
            hba.write("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        server._run("pg_ctl", "-D", server.data, "-o",
                    f"-k {server.socket_dir} -c listen_addresses='127.0.0.1' -p {port} -c fsync=off",
                    "-l", os.path.join(server.root, "log"), "-w", "-t", "30", "start")
        yield server, port, SUPERUSER
    finally:
        server.close()


def compose_entrypoint_script() -> str:
    """The shell script compose.postgres.yaml's apertis-proxy service starts with (`/bin/sh -c SCRIPT`)."""
    recipe = COMPOSE_PG.read_text()
    found = re.search(r"\n    entrypoint:\n      - /bin/sh\n      - -c\n      - \|\n((?:        .*\n)+)", recipe)
    assert found, "compose.postgres.yaml: no `entrypoint: [/bin/sh, -c, |script]` for apertis-proxy"
    return textwrap.dedent(found.group(1)).replace("$$", "$")    # compose's escape of `$`


def run_here(script: str, port: int, secret_file: Path, *command: str) -> str:
    """The compose script made to run on this machine: the secret from `secret_file`, `postgres:5432` at
    127.0.0.1:`port`, this interpreter for `python`, and `command` (apertis-proxy's arguments) for `serve`."""
    replacements = [
        ("/run/secrets/postgres_password", shlex.quote(str(secret_file))),
        ("@postgres:5432/", f"@127.0.0.1:{port}/"),
        ("python -c", f"{shlex.quote(sys.executable)} -c"),
        ("apertis-proxy serve --host 0.0.0.0 --port 8080",
         " ".join(shlex.quote(w) for w in (sys.executable, "-m", "apertis_proxy", *command))),
    ]
    for old, new in replacements:
        assert old in script, f"compose.postgres.yaml's entrypoint has no {old!r}:\n{script}"
        script = script.replace(old, new)
    return script


@pytest.mark.parametrize("how", ["pasted into the URL as is", "through the compose entrypoint"])
async def test_a_base64_password_reaches_postgresql_and_is_never_shown(tmp_path, tcp_pg, how):
    """A password with `/`, `+` and `=` connects (the server checks it) whether the operator pastes it into the
    URL or compose.postgres.yaml builds the URL from its password file, and nothing printed holds any part of
    it. The recipe suggests a password that needs no encoding."""
    server, port, user = tcp_pg
    command = ("channels", "add", "main", "--base-url", "http://127.0.0.1:9", "--api-key", MOCK_API_KEY)
    if how == "pasted into the URL as is":
        url = f"postgresql://{user}:{PASSWORD}@127.0.0.1:{port}/apertis"
        code, out, err = await CliRunner(tmp_path, None, clean_env(APERTIS_DB=url))(*command)
    else:
        assert "openssl rand -hex" in COMPOSE_PG.read_text()
        secret = tmp_path / "postgres-password"
        secret.write_text(PASSWORD + "\n")                 # as `openssl rand -base64 12 > file` writes it
        script = run_here(compose_entrypoint_script(), port, secret, *command)
        result = await asyncio.to_thread(subprocess.run, ["/bin/sh", "-c", script], cwd=tmp_path,
                                         env=clean_env(), capture_output=True, text=True, timeout=60)
        code, out, err = result.returncode, result.stdout, result.stderr
    pieces = [p for p in re.split(r"[/+=]", PASSWORD) if len(p) >= 2]
    shown = [p for p in pieces if p in out + err]
    assert not shown, f"the CLI printed part of the database password ({shown}): {err.strip()!r}"
    assert code == 0, f"a password with '/' (as `openssl rand -base64` writes) breaks the store: exit {code}: {err!r}"
    # And it really is that database: a second command sees the channel.
    url = f"postgresql://{user}:{PASSWORD}@127.0.0.1:{port}/apertis"
    listed = await CliRunner(tmp_path, None, clean_env(APERTIS_DB=url)).ok("channels", "list")
    assert "main" in listed


def test_a_wrong_password_fails_in_one_line_that_shows_none_of_it(tcp_pg, tmp_path):
    """The server refusing the password: the error names the URL redacted and no part of the password."""
    server, port, user = tcp_pg
    wrong = "Ab3/Cd4+Ef5=="
    url = f"postgresql://{user}:{wrong}@127.0.0.1:{port}/apertis"
    result = subprocess.run([sys.executable, "-m", "apertis_proxy", "channels", "list"], cwd=tmp_path,
                            env=clean_env(APERTIS_DB=url), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"postgresql://{user}:***@127.0.0.1:{port}/apertis" in result.stderr, result.stderr
    assert not [p for p in re.split(r"[/+=]", wrong) if p and p in result.stdout + result.stderr], result.stderr


async def test_a_second_multi_worker_serve_on_a_taken_port_fails_instead_of_sharing_it(tmp_path, mock_upstream):
    """`serve --workers 2` on the port another `serve --workers 2` (another database) listens on exits with
    "Address already in use" instead of starting beside it (SO_REUSEPORT would let the kernel split clients
    between the two)."""
    first_dir, second_dir = tmp_path / "prod", tmp_path / "other"
    first_dir.mkdir()
    second_dir.mkdir()
    for d in (first_dir, second_dir):
        await CliRunner(d, str(d / "gateway.db")).add_channel("main", mock_upstream.base_url)
    port = free_port()
    async with ServeProcess(first_dir, str(first_dir / "gateway.db"), "--workers", "2", port=port):
        # The operator forgets the running one (an upgrade without stopping it, a second copy by hand).
        second = ServeProcess(second_dir, str(second_dir / "gateway.db"), "--workers", "2", port=port)
        try:
            # start() would see the first gateway accept: watch the second process itself.
            with open(second._out_path, "wb") as out, open(second._err_path, "wb") as err:
                second.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "apertis_proxy", *second.argv, cwd=second.workdir, env=second.env,
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err)

            async def settled() -> bool:
                return second.proc.returncode is not None or "listening on" in second.stderr
            await wait_for(settled, 10.0, "the second serve to exit or listen")
            assert second.proc.returncode is not None, (
                f"a second gateway (another database) started on port {port} while one served there: the"
                " kernel now splits clients between two databases (SO_REUSEPORT); expected 'cannot listen on"
                f" 127.0.0.1 port {port}: Address already in use'. Its log:\n{second.stderr}")
            assert "Address already in use" in second.stderr, second.stderr
        finally:
            await second.kill()
