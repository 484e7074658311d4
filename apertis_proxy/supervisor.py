"""Forked workers and the parent that looks after them (`serve --workers N`).

The parent forks N workers sharing the listening port (SO_REUSEPORT; the
caller first makes sure no other server holds the port, see
listener.ensure_port_free), forwards signals to them and reaps them: a worker that ends while starting
stops the whole server (exit 1), since it would fail again; one that dies
later is logged and replaced.  Workers end with the parent, even when it is
killed (PR_SET_PDEATHSIG on Linux).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable

log = logging.getLogger("apertis_proxy.server")

# A worker that ends sooner than this after its fork failed to start (it would
# fail again); a later death is replaced.
WORKER_START_GRACE = 5.0


def supervise(workers: int, run_worker: Callable[[int], int], reaped: Callable[[int], None]) -> int:
    """Run `run_worker(index)` in `workers` forked processes until SIGTERM or
    SIGINT; `reaped(pid)` after each one ends.  The server's exit code."""
    children: dict[int, tuple[int, float]] = {}     # pid -> (worker index, started at)
    stopping = False
    stop_signal = 0
    parent = os.getpid()

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(_child(run_worker, index, parent))
        children[pid] = (index, time.monotonic())

    def forward(signum: int, _frame: Any = None) -> None:
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stop(signum: int, _frame: Any = None) -> None:
        nonlocal stopping, stop_signal
        stopping = True
        stop_signal = stop_signal or signum
        forward(signum)

    for index in range(workers):
        spawn(index)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, forward)       # workers reload their TLS certificate
    status = 0
    while children:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index, started = children.pop(pid)
        reaped(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            # A worker still starting when the stop came has no handler yet: the
            # forwarded signal ends it outright, which is the stop asked for.
            if code != -stop_signal:
                status = status or code
            continue
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if time.monotonic() - started < WORKER_START_GRACE:
            log.error("worker %d stopped while starting (%s); stopping the server", index, how)
            status = 1
            stop(signal.SIGTERM)
            continue
        log.error("worker %d (pid %d) ended unexpectedly (%s); starting a new one", index, pid, how)
        spawn(index)
    return status


def _terminate_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM) where the platform has it (Linux)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)      # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):               # not Linux: the parent's death goes unnoticed
        pass


def _child(run_worker: Callable[[int], int], index: int, parent: int) -> int:
    """A forked worker: its exit code."""
    # Orphaned workers would go on serving with nobody to stop them: the kernel
    # sends SIGTERM (a graceful shutdown) when the parent dies, even by SIGKILL.
    _terminate_with_parent()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)    # not the parent's forwarder: the loop takes it over
    if os.getppid() != parent:
        return 0        # the parent died before that was in place
    return run_worker(index)
