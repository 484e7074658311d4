"""With --workers N: each worker's figures in a file of the server's run directory.

`serve` makes the directory before forking (empty, its own, never another
server's) and names it in the workers' environment; it removes it at exit.
Every worker rewrites `worker-PID.json` with its whole snapshot every
`metrics_flush_interval` seconds (atomically: a temporary file, then rename),
and once more when it stops.  A scrape, whichever worker takes it, reads its
own figures live and the others' files.

A file holds a process's totals since it started, never increments: a file
written twice counts once, and a replaced worker starts a file of its own.
When a worker ends, `mark_dead` renames its file to `dead-PID-NS.json`: its
counters and histograms stay in every later total (nothing resets), its gauges
no longer count.  A worker killed with SIGKILL loses what it counted since its
last write, as the ledger loses the rows its meter had not written yet.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable, Optional

import orjson

log = logging.getLogger("apertis_proxy.metrics")

RUN_DIR_ENV = "APERTIS_METRICS_DIR"


def create_run_dir() -> str:
    return tempfile.mkdtemp(prefix="apertis-proxy-metrics-")


def remove_run_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _file(run_dir: str, state: str, pid: int) -> Path:
    return Path(run_dir) / f"{state}-{pid}.json"


def write(run_dir: str, pid: int, snapshot: dict) -> None:
    final = _file(run_dir, "worker", pid)
    temporary = final.with_suffix(".tmp")
    temporary.write_bytes(orjson.dumps(snapshot))
    os.replace(temporary, final)


def mark_dead(run_dir: str, pid: int) -> None:
    """A worker ended: keep its counts, drop its gauges.  The dead file's name is its own
    (`dead-PID-NS.json`): a later worker given the same PID, once dead too, adds a file."""
    try:
        os.replace(_file(run_dir, "worker", pid), Path(run_dir) / f"dead-{pid}-{time.time_ns()}.json")
    except FileNotFoundError:
        pass        # it died before its first write


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def read_others(run_dir: str, own_pid: int) -> list[tuple[dict, bool]]:
    """[(snapshot, live)] of every other worker, past ones included."""
    found = []
    for path in Path(run_dir).glob("*.json"):
        state, _, rest = path.stem.partition("-")
        pid_text = rest.partition("-")[0]
        if not pid_text.isdigit() or (state == "worker" and int(pid_text) == own_pid):
            continue
        try:
            snapshot = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue        # renamed meanwhile (read again next scrape), or not ours
        found.append((snapshot, state == "worker" and _alive(int(pid_text))))
    return found


class WorkerShare:
    """Writes this worker's snapshot to the run directory, every `interval` seconds and at close."""

    def __init__(self, run_dir: str, take_snapshot: Callable[[], Awaitable[dict]], interval: float) -> None:
        self.run_dir = run_dir
        self.pid = os.getpid()
        self._take_snapshot = take_snapshot
        self.interval = interval
        self._task: Optional[asyncio.Task] = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # The flag, not only the cancellation, ends the loop: Python 3.11's wait_for (the readiness check
        # inside a snapshot) can swallow a cancellation that arrives as its inner call completes.
        while not self._stopping:
            await asyncio.sleep(self.interval)
            if not self._stopping:
                await self.write()

    async def write(self) -> None:
        try:
            write(self.run_dir, self.pid, await self._take_snapshot())
        except OSError:
            log.exception("could not share this worker's metrics in %s", self.run_dir)

    def others(self) -> list[tuple[dict, bool]]:
        return read_others(self.run_dir, self.pid)

    async def close(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            if not self._task.cancelled() and self._task.exception() is not None:
                log.error("sharing this worker's metrics failed: %r", self._task.exception())
            self._task = None
        await self.write()
        mark_dead(self.run_dir, self.pid)
