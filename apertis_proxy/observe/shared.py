"""With --workers N: each worker's figures in a file of the server's run directory.

`serve` makes the directory before forking (empty, its own, never another
server's) and names it in the workers' environment; it removes it at exit.
Every worker rewrites `worker-PID.json` with its whole snapshot every
`metrics_flush_interval` seconds (atomically: a temporary file, then rename),
and once more when it stops.

A scrape, whichever worker takes it, covers the whole server: the worker
writes its own file with the figures it answers with, asks every other live
worker to write theirs now (a datagram to its `ask-PID.sock`, answered once
the file is written) and waits up to FRESH_TIMEOUT for them, then reads the
files.  So a request one scrape counted is in every later one, whoever
answers it, also after the worker that counted it died.

A file holds a process's totals since it started, never increments: a file
written twice counts once, and a replaced worker starts a file of its own.
When a worker ends, `mark_dead` renames its file to `dead-PID-NS.json`: its
counters and histograms stay in every later total (nothing resets), its gauges
no longer count.  A worker killed with SIGKILL loses what it counted since its
last write (a scrape's or the interval's); the ledger does not (its spool), so
after a kill the metrics' totals may stand below the ledger's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable, Optional

import orjson

log = logging.getLogger("apertis_proxy.metrics")

RUN_DIR_ENV = "APERTIS_METRICS_DIR"
# How long a scrape waits for the other workers to write their figures (one that has not by then is read as it
# last wrote them).
FRESH_TIMEOUT = 1.0
_ASK, _DONE = b"ask", b"done"


def create_run_dir() -> str:
    return tempfile.mkdtemp(prefix="apertis-proxy-metrics-")


def remove_run_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _file(run_dir: str, state: str, pid: int) -> Path:
    return Path(run_dir) / f"{state}-{pid}.json"


def _ask_path(run_dir: str, pid: int) -> str:
    return str(Path(run_dir) / f"ask-{pid}.sock")


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


def _parse_name(path: Path) -> tuple[str, Optional[int]]:
    """("worker" or "dead", PID) of a figures file; PID None for any other file."""
    state, _, rest = path.stem.partition("-")
    pid_text = rest.partition("-")[0]
    return state, int(pid_text) if pid_text.isdigit() else None


def read_others(run_dir: str, own_pid: int) -> list[tuple[dict, bool]]:
    """[(snapshot, live)] of every other worker, past ones included.  A worker's file renamed
    while the directory is read (the worker just ended) is read under its new name."""
    found: list[tuple[dict, bool]] = []
    listed = list(Path(run_dir).glob("*.json"))
    vanished: set[int] = set()
    for path in listed:
        state, pid = _parse_name(path)
        if pid is None or (state == "worker" and pid == own_pid):
            continue
        try:
            snapshot = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            vanished.add(pid)
            continue
        except (OSError, orjson.JSONDecodeError):
            continue        # not ours
        found.append((snapshot, state == "worker" and _alive(pid)))
    if vanished:
        for path in set(Path(run_dir).glob("dead-*.json")) - set(listed):
            if _parse_name(path)[1] in vanished:
                try:
                    found.append((orjson.loads(path.read_bytes()), False))
                except (OSError, orjson.JSONDecodeError):
                    continue
    return found


class WorkerShare:
    """Writes this worker's snapshot to the run directory: every `interval` seconds, when another
    worker asks (it is answering a scrape), and at close."""

    def __init__(self, run_dir: str, take_snapshot: Callable[[], Awaitable[dict]], interval: float) -> None:
        self.run_dir = run_dir
        self.pid = os.getpid()
        self._take_snapshot = take_snapshot
        self.interval = interval
        self._task: Optional[asyncio.Task] = None
        self._stopping = False
        self._socket: Optional[socket.socket] = None
        self._answers: set[asyncio.Task] = set()
        self._round = 0
        self._waiting: dict[int, set[str]] = {}     # ask round -> the workers' sockets yet to answer
        self._answered: dict[int, asyncio.Event] = {}

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        path = _ask_path(self.run_dir, self.pid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)             # a socket left by a killed worker of the same PID
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.bind(path)
        except OSError as exc:          # e.g. a path past AF_UNIX's 107 bytes (a long TMPDIR)
            sock.close()
            log.warning("scrapes answered by other workers will read this worker's figures as last written "
                        "(every %s s): cannot listen on %s: %s", self.interval, path, exc)
            return
        self._socket = sock
        loop.add_reader(sock.fileno(), self._on_datagram)

    async def _run(self) -> None:
        # The flag, not only the cancellation, ends the loop: Python 3.11's wait_for (the readiness check
        # inside a snapshot) can swallow a cancellation that arrives as its inner call completes.
        while not self._stopping:
            await asyncio.sleep(self.interval)
            if not self._stopping:
                await self.write()

    async def write(self) -> None:
        self.publish(await self._take_snapshot())

    def publish(self, snapshot: dict) -> None:
        """Write `snapshot` (a fresh one, or the figures a scrape answers with) as this worker's file."""
        try:
            write(self.run_dir, self.pid, snapshot)
        except OSError:
            log.exception("could not share this worker's metrics in %s", self.run_dir)

    # -- asking the other workers ----------------------------------------------
    async def fresh_others(self, timeout: float = FRESH_TIMEOUT) -> list[tuple[dict, bool]]:
        """The other workers' figures, after asking each live one to write them now."""
        sock = self._socket
        if sock is not None:
            self._round += 1
            ask = self._round
            message = _ASK + b" %d" % ask
            waiting = set()
            own = _ask_path(self.run_dir, self.pid)
            for path in Path(self.run_dir).glob("ask-*.sock"):
                if str(path) == own:
                    continue
                try:
                    sock.sendto(message, str(path))
                except OSError:
                    continue        # nobody listens there (a worker that died), or it is swamped
                waiting.add(str(path))
            if waiting:
                answered = self._answered[ask] = asyncio.Event()
                self._waiting[ask] = waiting
                try:
                    await asyncio.wait_for(answered.wait(), timeout)
                except asyncio.TimeoutError:
                    pass            # read as last written
                finally:
                    del self._answered[ask], self._waiting[ask]
        return read_others(self.run_dir, self.pid)

    def _on_datagram(self) -> None:
        sock = self._socket
        while sock is not None:
            try:
                data, sender = sock.recvfrom(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            kind, _, number = data.partition(b" ")
            if kind == _ASK and sender and not self._stopping:
                task = asyncio.get_running_loop().create_task(self._answer(sender, number))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)
            elif kind == _DONE and number.isdigit():
                waiting = self._waiting.get(int(number))
                if waiting is not None:
                    waiting.discard(sender)
                    if not waiting:
                        self._answered[int(number)].set()

    async def _answer(self, asker: str, number: bytes) -> None:
        await self.write()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):      # the asker is gone, or gave up
                sock.sendto(_DONE + b" " + number, asker)

    async def close(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            if not self._task.cancelled() and self._task.exception() is not None:
                log.error("sharing this worker's metrics failed: %r", self._task.exception())
            self._task = None
        if self._answers:
            await asyncio.wait(set(self._answers))
        if self._socket is not None:
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
            with contextlib.suppress(OSError):
                os.unlink(_ask_path(self.run_dir, self.pid))
        await self.write()
        mark_dead(self.run_dir, self.pid)
