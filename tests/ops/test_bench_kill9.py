"""bench/kill9.py end to end, briefly: a gateway killed with -9 under load from 8 clients, started again on the same
spool; every response a client received whole has its ledger row, and the ledger holds a row for every request that
reached the mock upstream (those in flight at the kill with their usage unknown).  Counts only: no speed asserted."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.support.bench_runs import BENCH

CLIENTS = 8


def test_a_kill_under_load_leaves_a_row_for_every_request_that_reached_the_upstream():
    proc = subprocess.run([sys.executable, str(BENCH / "kill9.py"), "--clients", str(CLIENTS), "--seconds", "1.5",
                           "--runs", "1"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    found = re.search(r"run 1: (\d+) responses received whole .*, (\d+) without a ledger row after a restart .*"
                      r"the mock received (\d+) requests, the ledger holds (\d+) rows of requests that reached it "
                      r"\((\d+) of them in flight", proc.stdout)
    assert found, proc.stdout
    received, lost, upstream, rows, in_flight = map(int, found.groups())
    assert received > 0 and lost == 0
    # A request is noted before its bytes go out: a kill in between leaves a row the mock never saw (one per
    # client at most); never fewer rows than requests the mock received.
    assert upstream <= rows <= upstream + CLIENTS
    # Each row is a response received whole, one cut by the kill before any usage, or one whose answer was on
    # its way (its row written before the answer's last bytes) when the kill came.
    assert received + in_flight <= rows <= received + in_flight + CLIENTS
