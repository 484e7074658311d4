"""README, "Several hosts on PostgreSQL": "Every command works unchanged against either backend"; on SQLite a number
past what the store holds is a one-line error (tests/ops/test_cli.py), and a number SQLite holds (3,000,000,000 as
`--rpm`, `--concurrency`, `--priority` or `--weight`) is taken.

On PostgreSQL the same commands must end the same way: taken, or refused with one line and a non-zero exit, never
a Python traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.processes import clean_env

BIG = "3000000000"      # past a 32-bit integer, well within SQLite's 64-bit one


def _cli(db: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apertis_proxy", *args, "--db", db], capture_output=True, text=True,
                          env=clean_env(), timeout=60)


@pytest.mark.parametrize("args", [
    ("keys", "create", "bob", "--rpm", BIG),
    ("keys", "create", "bob", "--concurrency", BIG),
    ("channels", "add", "main", "--base-url", "http://127.0.0.1:9", "--api-key", "sk-ant-large-numbers",
     "--priority", BIG),
    ("channels", "add", "main", "--base-url", "http://127.0.0.1:9", "--api-key", "sk-ant-large-numbers",
     "--weight", BIG),
], ids=["rpm", "concurrency", "priority", "weight"])
def test_a_large_number_is_taken_or_one_line_on_postgres_too(pg_url, tmp_path, args):
    on_sqlite = _cli(str(tmp_path / "g.db"), *args)
    assert on_sqlite.returncode == 0, on_sqlite.stderr            # SQLite takes it
    proc = _cli(pg_url, *args)
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-1500:]
