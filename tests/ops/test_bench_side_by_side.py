"""bench/side_by_side.py runs two configurations of the gateway at once on one core, each under its own wrk:
both serve every request, each with its own configuration (the access log only on the side that has it; the
limits pair's key admitted through the store on one side only), and the table has one row per round.  No speed
is asserted (that is bench/'s job)."""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest

from tests.support.bench_runs import kept_run

ROUNDS = 2


def _needs_the_tools() -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("wrk is required in CI (.ci/run installs it)")
        pytest.skip("wrk is missing (Debian: apt-get install wrk)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("bench/side_by_side.py needs two CPUs")
    if shutil.which("taskset") is None:
        pytest.skip("the bench pins its processes with taskset (util-linux), which is missing")


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    _needs_the_tools()
    out = tmp_path_factory.mktemp("side") / "side.md"
    with kept_run("side_by_side.py", ["--pair", "observe", "--rounds", str(ROUNDS), "--seconds", "1",
                                      "--output", str(out)], 300) as run:
        yield (run[0], out, run[1])


def test_both_sides_serve_every_round(side_by_side):
    proc, out, _ = side_by_side
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = re.findall(r"^\| (\d+) \| ([\d,]+) / ([\d,]+) \| [-+][\d.]+% \| (\d+) / (\d+) \|", out.read_text(), re.M)
    assert [int(r[0]) for r in rows] == list(range(1, ROUNDS + 1)), out.read_text()
    for _, rps_with, rps_without, cpu_with, cpu_without in rows:
        assert int(rps_with.replace(",", "")) > 0 and int(rps_without.replace(",", "")) > 0
        assert int(cpu_with) > 0 and int(cpu_without) > 0
    assert "errors {} / {}" not in proc.stdout and proc.stdout.count("errors 0 / 0") == ROUNDS, proc.stdout
    assert "Median throughput cost" in out.read_text()


def test_each_side_runs_its_own_configuration(side_by_side):
    _, _, workdir = side_by_side
    assert workdir is not None
    with_log = (workdir / "with" / "with.log").read_text()
    without_log = (workdir / "without" / "without.log").read_text()
    assert "apertis_proxy.access" in with_log and "POST /v1/messages 200" in with_log
    assert "apertis_proxy.access" not in without_log
    assert "enabled = false" in (workdir / "without" / "without.toml").read_text()
    assert "enabled = false" not in (workdir / "with" / "with.toml").read_text()


def test_the_limits_pair_admits_one_side_through_the_store(tmp_path):
    _needs_the_tools()
    out = tmp_path / "limits.md"
    with kept_run("side_by_side.py", ["--pair", "limits", "--rounds", "1", "--seconds", "1",
                                      "--output", str(out)], 300) as (proc, workdir):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert workdir is not None and "a key with limits, --workers 2" in out.read_text()
        counts = {}
        for side in ("with", "without"):
            with sqlite3.connect(workdir / side / "apertis-bench.db") as db:
                admitted = db.execute("SELECT COUNT(*) FROM admission_times").fetchone()[0]
                served, metered = db.execute("SELECT COUNT(*) FILTER (WHERE status = 200), COUNT(*) FROM usage"
                                             " WHERE key_name = 'bench'").fetchone()
            counts[side] = (admitted, served, metered)
    # The minute's admissions are all still there (a renewal deletes only those that left it): one per request of
    # the limited key (the warm-up's and the preflight's too; wrk's last requests may be cut by its end, still
    # metered); none on the other side.
    admitted, served, metered = counts["with"]
    assert 0 < served <= admitted <= metered, counts
    assert counts["without"][0] == 0 and counts["without"][1] > 0, counts


def test_the_interpreter_pair_needs_the_other_python_and_names_both():
    _needs_the_tools()
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
    proc = subprocess.run([sys.executable, os.path.join(bench, "side_by_side.py"), "--pair", "interpreter"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--other-python" in proc.stderr
    probe = f"import sys; sys.path.insert(0, {bench!r}); from side_by_side import python_label; " \
            "print(python_label(sys.executable))"
    label = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout.strip()
    version = ".".join(map(str, sys.version_info[:3]))
    assert label == f"Python {version} at {sys.executable}"
