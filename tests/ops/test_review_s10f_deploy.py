"""Review s10f: what an operator following "Deploy it" (docs/deploy/*) meets.

- compose.postgres.yaml builds APERTIS_DB as postgresql://apertis:$(cat password)@postgres:5432/apertis from a
  password file holding "any long random string". The usual generator (openssl rand -base64 32) writes `/` and
  `+` about every other time; such a password must still reach the server and must never be printed.
- A second `serve` started on a port a multi-worker gateway already listens on must fail like any taken port
  ("cannot listen on ... Address already in use"), not quietly take half of the connections (SO_REUSEPORT).
"""
from __future__ import annotations

import asyncio
import os
import re
import sys
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
    """A PostgreSQL server on 127.0.0.1:PORT (as the compose file's `postgres:5432`), initdb's trust rules."""
    from tests.support.pg_server import PgServer, PgUnavailable, SUPERUSER
    try:
        server = PgServer.start()
    except PgUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(str(exc))
    port = free_port()
    server.stop()
    server._run("pg_ctl", "-D", server.data, "-o",
                f"-k {server.socket_dir} -c listen_addresses='127.0.0.1' -p {port} -c fsync=off",
                "-l", os.path.join(server.root, "log"), "-w", "-t", "30", "start")
    try:
        yield server, port, SUPERUSER
    finally:
        server.close()


async def test_compose_postgres_url_with_a_base64_password_connects_and_never_shows_it(tmp_path, tcp_pg):
    server, port, user = tcp_pg
    recipe = COMPOSE_PG.read_text()
    # The recipe as shipped: the password pasted into the URL as it is in the file.
    assert 'postgresql://apertis:$$(cat /run/secrets/postgres_password)@postgres:5432/apertis' in recipe
    url = f"postgresql://{user}:{PASSWORD}@127.0.0.1:{port}/postgres"
    cli = CliRunner(tmp_path, None, clean_env(APERTIS_DB=url))
    code, out, err = await cli("channels", "add", "main", "--base-url", "http://127.0.0.1:9",
                               "--api-key", MOCK_API_KEY)
    pieces = [p for p in re.split(r"[/+=]", PASSWORD) if len(p) >= 2]
    shown = [p for p in pieces if p in out + err]
    assert not shown, (f"the CLI printed part of the database password ({shown}): {err.strip()!r}")
    assert code == 0, (
        f"a password with '/' (as `openssl rand -base64` writes) in the compose recipe's URL breaks the store:"
        f" exit {code}: {err.strip()!r}")


async def test_a_second_multi_worker_serve_on_a_taken_port_fails_instead_of_sharing_it(tmp_path, mock_upstream):
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
