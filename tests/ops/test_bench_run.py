"""The one benchmark command (bench/run.py) runs end to end: it starts the mock,
the proxy with and without metering, drives paced streams through each with the
load generator and writes the table and the raw rows.  The quick paced-stream
scenario needs neither wrk nor nginx, so this runs wherever the suite does.
Figures are checked for consistency only (counts, the mock's pacing, a ledger
row per stream); no speed is asserted (that is bench/'s job)."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3

import pytest

from tests.support.bench_runs import kept_run

STREAMS = 64
EVENTS = 10 + 6      # the quick d-64: 10 deltas plus the six fixed events


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    if len(os.sched_getaffinity(0)) > 1 and shutil.which("taskset") is None:
        pytest.skip("bench/run.py pins its processes with taskset (util-linux), which is missing")
    out = tmp_path_factory.mktemp("bench")
    with kept_run("run.py", ["--quick", "--scenarios", "d-64", "--targets",
                             "direct,proxy,proxy-w2,proxy-nometer,proxy-noobserve", "--retries", "0",
                             "--output", str(out / "RESULTS.md"), "--json", str(out / "rows.json")], 240) as run:
        yield (run[0], out, run[1])


def test_every_target_streams_through(bench_run):
    proc, out, _ = bench_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["target"]: r for r in json.loads((out / "rows.json").read_text())["rows"]}
    assert set(rows) == {"direct", "proxy", "proxy-w2", "proxy-nometer", "proxy-noobserve"}
    for target, row in rows.items():
        assert row["status"] == "ok", (target, row)
        assert row["errors"] == {} and row["ok"] == STREAMS, (target, row)
        assert row["events"] == STREAMS * EVENTS, (target, row)
        # The mock holds the first byte back 300 ms; through the proxy as well.
        assert row["ttfb50"] >= 295, (target, row)
    for target in ("proxy", "proxy-w2", "proxy-nometer", "proxy-noobserve"):
        assert rows[target]["cpu_us_req"] > 0 and rows[target]["peak_rss_kb"] > 0, rows[target]
    assert rows["direct"]["cpu_us_req"] is None      # nothing under test there


def test_report_has_the_rows_side_by_side(bench_run):
    proc, out, _ = bench_run
    text = (out / "RESULTS.md").read_text()
    assert "python" in text and "run.py --quick --scenarios d-64" in text      # the command, for reruns
    for label in ("direct to mock", "apertis (all plugins)", "apertis (all plugins, --workers 2)",
                  "apertis (no metering)", "apertis (no metrics, no access log)"):
        assert f"| d-64: paced SSE, 64 streams | {label} |" in text, label
    assert "## Cost of metering" in text
    assert "## Cost of metrics and the access log" in text
    assert "| d-64: paced SSE, 64 streams | " in text.split("## Cost of metrics and the access log")[1]
    assert "idle resident memory under 60 MB" in text
    assert text in proc.stdout          # printed as well as written


def test_metered_proxy_wrote_a_ledger_row_per_stream(bench_run):
    _, _, workdir = bench_run
    assert workdir is not None and (workdir / "apertis-bench.db").exists()
    with sqlite3.connect(workdir / "apertis-bench.db") as db:
        rows = db.execute("SELECT count(*), sum(stream), sum(output_tokens > 0), max(status)"
                          " FROM usage WHERE key_name = 'bench' AND requested_model IS NOT NULL").fetchone()
    # The three metered starts (all plugins, on one worker and on two; metrics and access log off) each also
    # answer a preflight stream and a request for their idle memory reading; the unmetered one writes nothing.
    count, streams, with_tokens, status = rows
    assert 3 * STREAMS <= count <= 3 * (STREAMS + 4), rows
    assert streams >= 3 * STREAMS and with_tokens == count and status == 200, rows
