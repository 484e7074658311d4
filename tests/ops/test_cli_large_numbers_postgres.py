"""README, "Several hosts on PostgreSQL": "Every command works unchanged against either backend".  A number past
what the store holds is a one-line error (tests/ops/test_cli.py) on both backends alike: PostgreSQL's INTEGER
columns (`--rpm`, `--concurrency`, `--priority`, `--weight`) are 32-bit, so the CLI bounds those options to
2**31-1 on either backend, rather than take on SQLite what a PostgreSQL deployment of the same commands refuses.
A number past even a 64-bit column (a token quota) is refused by the store itself: one line too, never a Python
traceback, whichever driver refused it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.processes import clean_env

BIG = "3000000000"      # past a 32-bit integer, well within SQLite's 64-bit one
CHANNEL = ("channels", "add", "main", "--base-url", "http://127.0.0.1:9", "--api-key", "sk-ant-large-numbers")


def _cli(db: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apertis_proxy", *args, "--db", db], capture_output=True, text=True,
                          env=clean_env(), timeout=60)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-1500:]
    return lines[0]


@pytest.mark.parametrize("args", [
    ("keys", "create", "bob", "--rpm", BIG),
    ("keys", "create", "bob", "--concurrency", BIG),
    (*CHANNEL, "--priority", BIG),
    (*CHANNEL, "--priority", f"-{BIG}"),
    (*CHANNEL, "--weight", BIG),
], ids=["rpm", "concurrency", "priority", "negative-priority", "weight"])
def test_a_number_past_32_bits_is_one_line_on_both_backends(pg_url, tmp_path, args):
    on_sqlite = _one_error_line(_cli(str(tmp_path / "g.db"), *args))
    on_postgres = _one_error_line(_cli(pg_url, *args))
    assert on_sqlite == on_postgres and BIG in on_sqlite, (on_sqlite, on_postgres)


def test_the_largest_32_bit_number_is_taken_on_both_backends(pg_url, tmp_path):
    for db in (str(tmp_path / "g.db"), pg_url):
        proc = _cli(db, "keys", "create", "bob", "--rpm", "2147483647")
        assert proc.returncode == 0, proc.stderr[-1500:]


def test_a_number_past_64_bits_is_one_line_from_either_driver(pg_url, tmp_path):
    args = ("keys", "create", "bob", "--quota", "99999999999999999999tokens")
    for db in (str(tmp_path / "g.db"), pg_url):
        _one_error_line(_cli(db, *args))
