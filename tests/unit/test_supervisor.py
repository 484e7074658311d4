"""The worker supervisor (supervisor.py) in a process of its own: forks, signals, exit codes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# Workers whose SIGTERM disposition is ON_TERM; by default none is installed:
# like a worker still starting when the stop comes, the signal ends it outright.
_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from apertis_proxy.supervisor import supervise
    ready = sys.argv[1]
    def worker(index):
        signal.signal(signal.SIGTERM, ON_TERM)
        open(os.path.join(ready, str(index)), "w").close()
        time.sleep(60)
        return 3
    sys.exit(supervise(2, worker, lambda pid: None))
""")


def _start(tmp_path: Path, on_term: str = "signal.SIG_DFL") -> subprocess.Popen:
    script = _SCRIPT.replace("ON_TERM", on_term)
    return subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stderr=subprocess.PIPE)


def _wait_for_workers(tmp_path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while len(os.listdir(tmp_path)) < 2:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.02)


def test_a_stop_that_ends_workers_before_their_handlers_exit_cleanly(tmp_path):
    proc = _start(tmp_path)
    try:
        _wait_for_workers(tmp_path, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_that_fails_its_stop_sets_the_exit_code(tmp_path):
    proc = _start(tmp_path, on_term="lambda *a: os._exit(3)")
    try:
        _wait_for_workers(tmp_path, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 3
    finally:
        proc.kill()
        proc.wait()
