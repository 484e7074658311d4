"""What the harness reads from /proc: CPU time and memory of a process tree, core load, machine facts."""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import threading
import time
from typing import Optional

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as fh:
                    out.extend(int(c) for c in fh.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """pid and all its descendants (a server may fork workers; nginx always does)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(_children(p))
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole tree, in seconds (resolution: one clock tick)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15 of stat)
    return total / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb(pid: int) -> int:
    return sum(_status_kb(p, "VmRSS:") for p in tree(pid))


def hwm_kb(pid: int) -> int:
    return sum(_status_kb(p, "VmHWM:") for p in tree(pid))


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs; needs ownership or root)."""
    ok = True
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            ok = False
    return ok


class RssSampler:
    """Samples the tree's RSS in a thread: the peak, also where VmHWM cannot be reset."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            self._stop.wait(self.interval)


def own_cpu_seconds() -> float:
    """CPU of this process and its waited-for children (the load generators), in seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def core_times() -> dict[int, tuple[int, int]]:
    """cpu number -> (busy, total) jiffies, from /proc/stat."""
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                nums = [int(v) for v in vals]
                idle = nums[3] + (nums[4] if len(nums) > 4 else 0)
                out[int(name[3:])] = (sum(nums) - idle, sum(nums))
    return out


def core_busy(before: dict, after: dict, cpu: Optional[int]) -> Optional[float]:
    """Percent busy of one core between two core_times() readings."""
    if cpu is None or cpu not in before or cpu not in after:
        return None
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return 100.0 * busy / total if total > 0 else None


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_facts(python: str) -> dict[str, str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = _meminfo_gb()
    return {
        "CPU": model,
        "cores": str(os.cpu_count()),
        "memory": f"{mem:.1f} GiB" if mem else "unknown",
        "kernel": platform.release(),
        "OS": _os_name(),
        "Python": _first_line([python, "-c", "import sys; print(sys.version.split()[0])"]),
        "wrk": _first_line(["wrk", "-v"]).split(" Copyright")[0],
        "nginx": _first_line([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]).replace("nginx version: ", ""),
    }


def _meminfo_gb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _os_name() -> str:
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def package_versions(python: str, names: list[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = 'not installed'\n"
            "print(json.dumps(out))")
    try:
        res = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, timeout=20)
        return json.loads(res.stdout)
    except Exception:  # noqa: BLE001 - facts are best effort
        return {n: "unknown" for n in names}


def now_utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def wait_quiet(limit: float, threshold: float = 10.0) -> bool:
    """Wait up to `limit` seconds for one second in which no core is busier than `threshold` percent."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = core_times()
        time.sleep(1.0)
        after = core_times()
        if all((core_busy(before, after, c) or 0.0) < threshold for c in after):
            return True
    return False
