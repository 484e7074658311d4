"""A `serve --workers N` process tree as Linux /proc shows it: the workers, their sockets, and a worker killed and
replaced."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Optional

from apertis_proxy import supervisor

from .processes import wait_for
from .served_gateway import DRAIN_TIMEOUT


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) ": state, ppid, ...
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"


def tcp_sockets() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every TCP socket in this network namespace."""
    result = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            result.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3], int(f[9])))
    return result


def sockets_of(pid: int, *, local_port: Optional[int] = None, remote_port: Optional[int] = None,
               state: str) -> int:
    mine = socket_inodes(pid)
    return sum(1 for lport, rport, st, inode in tcp_sockets()
               if inode in mine and st == state
               and (local_port is None or lport == local_port) and (remote_port is None or rport == remote_port))


async def listening_workers(server, n: int) -> list[int]:
    """The pids of the server's `n` workers, once each of them listens on the port."""
    workers: list[int] = []

    async def all_listening() -> bool:
        workers[:] = children_of(server.proc.pid)
        return len(workers) == n and all(sockets_of(w, local_port=server.port, state=TCP_LISTEN) == 1
                                         for w in workers)
    await wait_for(all_listening, DRAIN_TIMEOUT, f"{n} workers listening on the port")
    return workers


def age_of(pid: int) -> float:
    """Seconds since the process started (its start time in /proc, on the clock /proc counts from)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    started = int(stat[stat.rindex(")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")    # field 22: starttime
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started


async def crash_and_replace(server, victim: int) -> list[int]:
    """SIGKILL one worker once past start-up (a death then is a crash); the pids of the two workers listening
    after the parent replaced it."""
    # The parent times the grace from the fork: wait what is left of it, with a margin for the clock tick.
    await asyncio.sleep(max(0.0, supervisor.WORKER_START_GRACE - age_of(victim) + 0.1))
    os.kill(victim, signal.SIGKILL)

    async def reaped() -> bool:
        return victim not in children_of(server.proc.pid)
    await wait_for(reaped, DRAIN_TIMEOUT, "the killed worker to be reaped")
    workers = await listening_workers(server, 2)           # a new one in its place
    assert victim not in workers
    return workers
