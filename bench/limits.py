"""What per-key limits cost on the request path: keys with limits against keys without, in one run.

    python bench/limits.py [--quick] [--repeat N] [--stores postgres,sqlite] [--durable] [--profile]

A key with a quota, requests per minute or concurrency is admitted by one transaction in the shared store
(apertis_proxy/store/admissions.py, through budgets/limiter.py); a key without limits never touches the store on
the request path. For each store this starts `apertis-proxy serve` (PostgreSQL: a throwaway server, without fsync
unless --durable, and one worker; SQLite: a file and `--workers 2`) with one channel to the bench's mock, 8 keys
without limits and 8 keys whose limits never bind (quota $1,000,000, 1,000,000 requests per minute, 1,000 in
flight), then drives 64 keep-alive connections of small JSON Messages requests, spread round-robin over the 8 keys,
for a fixed time after a warm-up: unlimited keys, then limited keys (A B, A B, ... with --repeat), twice: saturated
(each connection sends its next request at once: throughput) and paced at --rate requests/s (latency below
saturation). It prints, and writes to bench/.work/limits.md (git-ignored), requests/s, p50 and p99 of both, the
latency the limits add and the throughput ratio, beside the issue's targets:

- PostgreSQL: added p50 under 1 ms and added p99 under 3 ms (limited minus unlimited, same run, paced);
- SQLite with `serve --workers 2`: limited throughput at least 80% of unlimited (saturated).

Any non-2xx answer is an error and makes the run invalid: a 429 or 402 means a limit did bind.
See bench/README.md ("Limits").
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
import profile_summary  # noqa: E402
from drivers import API_VERSION  # noqa: E402
from loadgen import ClientConnection, _new_loop, build_request, percentile  # noqa: E402
from scenarios import write_bodies  # noqa: E402
from services import (WORK, Service, ServiceError, pinned, proxy_command,  # noqa: E402
                      raise_nofile, setup_proxy_db, start_mock, start_proxy, tail, write_config)

perf = time.perf_counter

KEYS = 8                      # keys of each kind
# Each store is measured twice: saturated (closed loop: throughput) and paced at PACED_RATE requests/s over the
# same connections, below what either kind of key saturates at (latency: what an admission adds to a request,
# not the queueing of an overloaded gateway).
MODES = ("saturated", "paced")
PACED_RATE = 1000.0
CONNECTIONS = 64
LIMITS = ("--quota", "1000000", "--rpm", "1000000", "--concurrency", "1000")   # never bind at this load
TIMEOUT = 10.0                # seconds per request
FOREIGN_WARN = 10.0           # points of a core busy beyond our own processes: the row is marked

# The targets.
PG_ADDED_P50_MS = 1.0
PG_ADDED_P99_MS = 3.0
SQLITE_MIN_RATIO = 0.80

STORES = {
    # name: (label, workers)
    "postgres": ("PostgreSQL", 1),
    "sqlite": ("SQLite", 2),
}


# -- the client -----------------------------------------------------------------------------------------------------

class PhaseResult:
    """One measured phase: 2xx answers completed inside the window (latency, when), every error of the phase
    (warm-up and drain included)."""

    def __init__(self) -> None:
        self.latency: list[float] = []       # seconds, 2xx answers completed in the window
        self.ends: list[float] = []          # when each of those completed, seconds into the window
        self.ok = 0
        self.answered = 0                    # every whole answer of the phase (any status)
        self.answered_2xx = 0
        self.errors: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.first_error: Optional[str] = None
        self.window = 0.0
        self.marks: dict[str, Any] = {}

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if self.first_error is None:
            self.first_error = f"{kind}: {detail}"


async def _drive(port: int, requests: list[bytes], connections: int, warmup: float, duration: float,
                 on_start: Callable[[], Any], on_end: Callable[[], Any],
                 interval: Optional[float] = None) -> PhaseResult:
    """`connections` keep-alive connections, connection i sending requests[i % len(requests)] one after the other
    for warmup + duration seconds; no request starts after that, the last ones are awaited.  Without `interval`
    each sends its next request as soon as it has the answer (closed loop: as fast as the gateway goes); with it,
    each sends one request every `interval` seconds (staggered), or at once when an answer came later (paced)."""
    loop = asyncio.get_running_loop()
    res = PhaseResult()
    t0 = perf()
    t_start, t_end = t0 + warmup, t0 + warmup + duration

    def start_mark() -> None:
        res.marks["start"] = on_start()

    def end_mark() -> None:
        res.marks["end"] = on_end()

    loop.call_later(warmup, start_mark)
    loop.call_later(warmup + duration, end_mark)

    async def one_connection(i: int) -> None:
        request = requests[i % len(requests)]
        conn: Optional[ClientConnection] = None
        next_at = t0 + (interval * i / connections if interval else 0.0)
        while perf() < t_end:
            if interval:
                await asyncio.sleep(max(0.0, next_at - perf()))
                next_at = max(next_at + interval, perf())
            if conn is None or conn.closed or not conn.keep_alive:
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                try:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(lambda: ClientConnection(loop), "127.0.0.1", port), TIMEOUT)
                except (OSError, asyncio.TimeoutError) as exc:
                    res.error("connect", repr(exc))
                    conn = None
                    await asyncio.sleep(0.05)
                    continue
            try:
                outcome = await asyncio.wait_for(conn.send(request), TIMEOUT)
            except asyncio.TimeoutError:
                outcome = "timeout"
            end = perf()
            if outcome != "ok":
                res.error(outcome, f"after {end - conn.sent_at:.3f}s, status {conn.status}")
                conn.keep_alive = False
                continue
            res.answered += 1
            res.statuses[conn.status] = res.statuses.get(conn.status, 0) + 1
            if not 200 <= conn.status < 300:
                res.error(f"http_{conn.status}", f"HTTP {conn.status}: {conn.tail[-200:]!r}")
                continue
            res.answered_2xx += 1
            if t_start <= end <= t_end:
                res.ok += 1
                res.latency.append(end - conn.sent_at)
                res.ends.append(end - t_start)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(one_connection(i) for i in range(connections)))
    res.window = duration
    return res


def drive(port: int, requests: list[bytes], connections: int, warmup: float, duration: float,
          on_start: Callable[[], Any] = lambda: None, on_end: Callable[[], Any] = lambda: None,
          interval: Optional[float] = None) -> PhaseResult:
    loop = _new_loop()
    try:
        return loop.run_until_complete(_drive(port, requests, connections, warmup, duration, on_start, on_end,
                                              interval))
    finally:
        loop.close()


async def _one(port: int, request: bytes) -> tuple[str, int, bytes]:
    loop = asyncio.get_running_loop()
    transport, conn = await asyncio.wait_for(
        loop.create_connection(lambda: ClientConnection(loop), "127.0.0.1", port), TIMEOUT)
    try:
        outcome = await asyncio.wait_for(conn.send(request), TIMEOUT)
    except asyncio.TimeoutError:
        outcome = "timeout"
    finally:
        transport.close()
    return outcome, conn.status, conn.tail


def preflight(port: int, requests: dict[str, bytes]) -> Optional[str]:
    """One request per key; None when every one came back whole and 2xx, else what went wrong."""
    loop = _new_loop()
    try:
        for name, request in requests.items():
            try:
                outcome, status, body = loop.run_until_complete(_one(port, request))
            except (OSError, asyncio.TimeoutError) as exc:
                return f"key {name}: {exc!r}"
            if outcome != "ok" or not 200 <= status < 300:
                return f"key {name}: {outcome}, HTTP {status}: {body[-200:]!r}"
    finally:
        loop.close()
    return None


# -- the systems under test -----------------------------------------------------------------------------------------

def create_key(cmd: list[str], db: Any, name: str, *limits: str) -> str:
    res = subprocess.run([*cmd, "keys", "create", name, *limits, "--db", str(db)], capture_output=True,
                         text=True, timeout=60)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise ServiceError(f"'apertis-proxy keys create {name}' failed: {(res.stdout + res.stderr).strip()[-600:]}")
    return lines[-1].strip()


def make_keys(cmd: list[str], workdir: Path, mock_port: int, db: Any) -> tuple[Any, list[str], list[str]]:
    """One channel to the mock, KEYS keys without limits, KEYS keys with limits that never bind."""
    db, first = setup_proxy_db(cmd, workdir, mock_port, db=db)
    free = [first] + [create_key(cmd, db, f"free-{i}") for i in range(2, KEYS + 1)]
    limited = [create_key(cmd, db, f"limited-{i}", *LIMITS) for i in range(1, KEYS + 1)]
    return db, free, limited


_COUNT = """
import sys
from apertis_proxy.store.service import connect
conn = connect(sys.argv[1], create=False)
print(conn.execute("SELECT COUNT(*) FROM admission_times WHERE at >= ?", (float(sys.argv[2]),)).fetchone()[0])
"""


def store_admissions(python: str, db: Any, since: float) -> Optional[int]:
    """Admissions recorded in the store since `since` (unix time): each admitted request of a key with a
    requests-per-minute limit adds one row to admission_times."""
    try:
        res = subprocess.run([python, "-c", _COUNT, str(db), f"{since:.6f}"], capture_output=True, text=True,
                             timeout=60)
        return int(res.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def check_implementation(python: str) -> tuple[str, str]:
    """(where apertis_proxy is imported from, problem): the measured code must be this worktree's."""
    code = ("import apertis_proxy, apertis_proxy.store.admissions, apertis_proxy.budgets.limiter;"
            "print(apertis_proxy.__file__)")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    if res.returncode != 0:
        last = (res.stdout + res.stderr).strip().splitlines()[-1:] or ["?"]
        return "", f"the store admissions do not import: {last[0]}"
    where = Path(res.stdout.strip().splitlines()[-1]).resolve()
    if ROOT not in where.parents:
        return str(where), f"apertis_proxy is imported from {where}, not from this worktree ({ROOT})"
    return str(where), ""


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        branch = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--abbrev-ref", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{branch} {head}" + (f" + uncommitted changes in {len(dirty.splitlines())} file(s)" if dirty else "")


def pg_postmaster(server: Any) -> Optional[int]:
    try:
        return int(Path(server.data, "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def py_spy(python: str) -> Optional[str]:
    local = Path(python).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


# -- one run --------------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, load_cpu: Optional[int], sut_cpus: Optional[str]) -> None:
        self.args = args
        self.python = args.python
        self.load_cpu = load_cpu
        self.sut_cpus = sut_cpus
        self.sut_cpu_list = (sorted(_cpu_list(sut_cpus)) if sut_cpus is not None else [])
        self.rows: list[dict] = []
        self.problems: list[str] = []
        self.profiles: list[Path] = []
        self.mock: Optional[Service] = None
        self.postgres = None

    def measure_store(self, store: str, workdir: Path, cmd: list[str], body: bytes) -> None:
        label, workers = STORES[store]
        db: Any = None
        svc: Optional[Service] = None
        pg_pid = None
        try:
            if store == "postgres":
                from tests.support.pg_server import PgServer, PgUnavailable
                try:
                    self.postgres = PgServer.start(durable=self.args.durable)
                    db = self.postgres.create_database("limits")
                except PgUnavailable as exc:
                    self._skip(label, f"PostgreSQL unavailable: {exc}")
                    return
                pg_pid = pg_postmaster(self.postgres)
            else:
                db = workdir / "limits.db"
            t = time.monotonic()
            db, free, limited = make_keys(cmd, workdir, self.mock.port, db)
            print(f"  {label}: channel and {2 * KEYS} keys created in {time.monotonic() - t:.1f} s", flush=True)
            config = write_config(workdir, f"limits-{store}", meter=True)
            svc = start_proxy(cmd, f"limits-{store}", self.sut_cpus, workdir, db, config, workers)
            url = f"http://127.0.0.1:{svc.port}/v1/messages"
            reqs = {kind: [build_request(url, body, [f"x-api-key: {k}", f"anthropic-version: {API_VERSION}"])[0]
                           for k in keys] for kind, keys in (("unlimited", free), ("limited", limited))}
            problem = preflight(svc.port, {f"{kind}-{i + 1}": r for kind, rs in reqs.items()
                                           for i, r in enumerate(rs)})
            if problem:
                self._skip(label, f"preflight: {problem}; proxy log: {tail(svc.log)}")
                return
            for rnd in range(1, self.args.repeat + 1):
                for mode in MODES:
                    for kind in ("unlimited", "limited"):
                        row = self.phase(label, workers, kind, rnd, svc, reqs[kind], db, pg_pid, mode)
                        self.rows.append(row)
                        if svc.proc.poll() is not None:
                            self.problems.append(f"{label}: the gateway exited ({svc.proc.returncode}) during "
                                                 f"the {kind} {mode} run: {tail(svc.log)}")
                            return
            log_problems = _log_problems(svc.log)
            if log_problems:
                self.problems.append(f"{label}: the gateway logged: {log_problems}")
        except (ServiceError, subprocess.TimeoutExpired) as exc:
            self._skip(label, str(exc))
        finally:
            if svc is not None:
                svc.stop()
                if self.args.keep:
                    shutil.copy(svc.log, WORK / f"limits-{store}.log")
            if self.postgres is not None:
                self.postgres.close()
                self.postgres = None

    def _skip(self, label: str, why: str) -> None:
        print(f"  {label}: not measured: {why}", flush=True)
        self.problems.append(f"{label}: not measured: {why}")
        self.rows.append({"store": label, "kind": "-", "status": "error", "note": why})

    def phase(self, label: str, workers: int, kind: str, rnd: int, svc: Service, requests: list[bytes], db: Any,
              pg_pid: Optional[int], mode: str = "saturated") -> dict:
        args = self.args
        spy = self._start_profile(label, kind, rnd, svc.pid)
        mock_pid = self.mock.pid

        def reading() -> dict:
            return {"t": perf(), "proxy": procstat.cpu_seconds(svc.pid), "mock": procstat.cpu_seconds(mock_pid),
                    "pg": procstat.cpu_seconds(pg_pid) if pg_pid else 0.0, "own": procstat.own_cpu_seconds(),
                    "cores": procstat.core_times()}

        if args.quiet_wait > 0 and not procstat.wait_quiet(args.quiet_wait):
            self.problems.append(f"{label} {kind} round {rnd}: the machine was not quiet for a second within "
                                 f"{args.quiet_wait:g} s; measured anyway")
        since = time.time()
        interval = CONNECTIONS / args.rate if mode == "paced" else None
        res = drive(svc.port, requests, CONNECTIONS, args.warmup, args.duration, reading, reading, interval)
        profile_summary.stop_recording(spy)
        admitted = store_admissions(self.python, db, since)
        a, b = res.marks.get("start"), res.marks.get("end")
        row: dict[str, Any] = {"store": label, "workers": workers, "kind": kind, "round": rnd, "status": "ok",
                               "mode": mode,
                               "ok": res.ok, "answered": res.answered, "answered_2xx": res.answered_2xx,
                               "errors": res.errors, "statuses": res.statuses, "first_error": res.first_error,
                               "admissions": admitted}
        lat = sorted(res.latency)
        window = (b["t"] - a["t"]) if a and b else res.window
        row["rps"] = res.ok / window if window else 0.0
        row["p50"] = _ms(percentile(lat, 50))
        row["p99"] = _ms(percentile(lat, 99))
        row["p50_first"], row["p50_last"] = _edge_p50(res, window)
        if a and b and res.ok:
            row["proxy_us"] = (b["proxy"] - a["proxy"]) * 1e6 / res.ok
            row["pg_us"] = (b["pg"] - a["pg"]) * 1e6 / res.ok if pg_pid else None
            sut_busy = [procstat.core_busy(a["cores"], b["cores"], c) or 0.0 for c in self.sut_cpu_list]
            load_busy = procstat.core_busy(a["cores"], b["cores"], self.load_cpu)
            row["sut_busy"] = sum(sut_busy) / len(sut_busy) if sut_busy else None
            row["load_busy"] = load_busy
            if sut_busy:
                row["sut_foreign"] = row["sut_busy"] - 100.0 * (b["proxy"] - a["proxy"]) / window / len(sut_busy)
            if load_busy is not None:
                ours = (b["mock"] - a["mock"]) + (b["pg"] - a["pg"]) + (b["own"] - a["own"])
                row["load_foreign"] = load_busy - 100.0 * ours / window
        print(f"  {label:10} {mode:9} {kind:9} round {rnd}: {row['rps']:8,.0f} req/s  p50 {row['p50']:.2f} ms  "
              f"p99 {row['p99']:.2f} ms  errors {sum(res.errors.values())}"
              + (f" ({res.first_error[:160]})" if res.first_error else "")
              + (f"  admissions in store {admitted}" if admitted is not None else ""), flush=True)
        return row

    # -- optional py-spy profile of the gateway during the limited runs --
    def _start_profile(self, label: str, kind: str, rnd: int, pid: int) -> Optional[subprocess.Popen]:
        if not self.args.profile:
            return None
        spy = py_spy(self.python)
        if spy is None:
            if not any("py-spy" in p for p in self.problems):
                self.problems.append("--profile: py-spy is not installed (python -m pip install py-spy)")
            return None
        out_dir = WORK / "profiles"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"limits-{label.lower()}-{kind}-{rnd}.txt"
        self.profiles.append(out)
        cmd = pinned([spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "250", "--nonblocking",
                      "--format", "raw", "--output", str(out)], self.load_cpu)
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cpu_list(spec: str) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _ms(v: Optional[float]) -> Optional[float]:
    return None if v is None else v * 1000.0


def _edge_p50(res: PhaseResult, window: float) -> tuple[Optional[float], Optional[float]]:
    """p50 of the answers completed in the window's first and last second (a drift inside the run)."""
    first = sorted(lat for lat, end in zip(res.latency, res.ends) if end < 1.0)
    last = sorted(lat for lat, end in zip(res.latency, res.ends) if end >= window - 1.0)
    return _ms(percentile(first, 50)), _ms(percentile(last, 50))


def _log_problems(log: Path, limit: int = 3) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    bad = [ln.strip() for ln in lines if any(w in ln for w in ("ERROR", "Traceback", "CRITICAL", "WARNING"))]
    if not bad:
        return ""
    return f"{len(bad)} warning/error line(s), first: " + " | ".join(b[:200] for b in bad[:limit])


# -- the report -----------------------------------------------------------------------------------------------------

def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _errors(r: dict) -> str:
    n = sum(r.get("errors", {}).values())
    if not n:
        return "0"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items()))
    return f"**{n}** ({kinds})"


def _busy(r: dict) -> str:
    s, ld = r.get("sut_busy"), r.get("load_busy")
    if s is None and ld is None:
        return "-"
    warn = " ⚠" if max(r.get("sut_foreign") or 0.0, r.get("load_foreign") or 0.0) > FOREIGN_WARN else ""
    return f"{_f(s, '{:.0f}')}% / {_f(ld, '{:.0f}')}%{warn}"


def runs_table(rows: list[dict]) -> str:
    head = ("| store | load | round | keys | req/s | p50 ms | p99 ms | p50 first s / last s | errors | "
            "admissions in store / 2xx | proxy CPU µs/req | PostgreSQL CPU µs/req | core busy SUT / load |\n"
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |")
    out = [head]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['store']} | - | - | - | - | - | - | - | not measured: {r['note'][:300]} | | | | |")
            continue
        adm = "-" if r.get("admissions") is None else f"{r['admissions']:,} / {r['answered_2xx']:,}"
        out.append(f"| {r['store']} ({r['workers']} worker{'s' if r['workers'] > 1 else ''}) | {r['mode']} | "
                   f"{r['round']} | "
                   f"{r['kind']} | {r['rps']:,.0f} | {_f(r['p50'])} | {_f(r['p99'])} | "
                   f"{_f(r['p50_first'])} / {_f(r['p50_last'])} | {_errors(r)} | {adm} | "
                   f"{_f(r.get('proxy_us'), '{:.0f}')} | {_f(r.get('pg_us'), '{:.0f}')} | {_busy(r)} |")
    return "\n".join(out)


def summarize(rows: list[dict]) -> list[dict]:
    """Per store: the median of each figure over the rounds, for both kinds of key, and the comparisons."""
    out = []
    groups = list(dict.fromkeys((r["store"], r.get("mode", "saturated")) for r in rows if r["status"] == "ok"))
    for store, mode in groups:
        ok = [r for r in rows if r["store"] == store and r["status"] == "ok" and r.get("mode") == mode]
        if not ok:
            continue
        s: dict[str, Any] = {"store": store, "mode": mode, "workers": ok[0]["workers"],
                             "rounds": max(r["round"] for r in ok)}
        for kind in ("unlimited", "limited"):
            rs = [r for r in ok if r["kind"] == kind]
            if not rs:
                continue
            s[kind] = {f: statistics.median(r[f] for r in rs) for f in ("rps", "p50", "p99")
                       if all(r[f] is not None for r in rs)}
            s[kind]["errors"] = sum(sum(r["errors"].values()) for r in rs)
            s[kind]["admitted"] = all(r.get("admissions") is not None for r in rs) and \
                all(r["admissions"] >= r["answered_2xx"] for r in rs)
            s[kind]["stored"] = sum(r.get("admissions") or 0 for r in rs)
        u, lim = s.get("unlimited"), s.get("limited")
        if u and lim and "p50" in u and "p50" in lim:
            s["added_p50"] = lim["p50"] - u["p50"]
            s["added_p99"] = lim["p99"] - u["p99"]
            s["ratio"] = lim["rps"] / u["rps"] if u["rps"] else None
            s["round_added_p50"] = [lm["p50"] - w["p50"] for w, lm in _pairs(ok)]
            s["round_added_p99"] = [lm["p99"] - w["p99"] for w, lm in _pairs(ok)]
            s["round_ratio"] = [lm["rps"] / w["rps"] for w, lm in _pairs(ok) if w["rps"]]
        s["valid"] = bool(u and lim) and u["errors"] == 0 and lim["errors"] == 0
        out.append(s)
    return out


def _pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    by = {(r["round"], r["kind"]): r for r in rows}
    return [(by[(n, "unlimited")], by[(n, "limited")]) for n in sorted({r["round"] for r in rows})
            if (n, "unlimited") in by and (n, "limited") in by]


def verdicts(s: dict) -> list[tuple[str, str, str]]:
    """(figure, target, PASS/FAIL/INVALID/no target) for one store's summary."""
    bad = "INVALID (errors)" if not s["valid"] else None
    out = []
    pg = s["store"] == "PostgreSQL" and s["mode"] == "paced"        # latency: below saturation
    sq = s["store"] == "SQLite" and s["mode"] == "saturated"        # throughput: at saturation
    if "added_p50" in s:
        out.append((f"added p50 {s['added_p50']:+.2f} ms", f"< {PG_ADDED_P50_MS:g} ms" if pg else "(none)",
                    (bad or ("PASS" if s["added_p50"] < PG_ADDED_P50_MS else "FAIL")) if pg else "-"))
        out.append((f"added p99 {s['added_p99']:+.2f} ms", f"< {PG_ADDED_P99_MS:g} ms" if pg else "(none)",
                    (bad or ("PASS" if s["added_p99"] < PG_ADDED_P99_MS else "FAIL")) if pg else "-"))
        if s.get("ratio") is not None:
            out.append((f"throughput ratio {s['ratio']:.1%}", f">= {SQLITE_MIN_RATIO:.0%}" if sq else "(none)",
                        (bad or ("PASS" if s["ratio"] >= SQLITE_MIN_RATIO else "FAIL")) if sq else "-"))
    return out


def summary_table(summaries: list[dict]) -> str:
    out = ["| store | load | keys | req/s | p50 ms | p99 ms | errors |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for s in summaries:
        for kind in ("unlimited", "limited"):
            k = s.get(kind)
            if not k:
                continue
            out.append(f"| {s['store']} ({s['workers']} worker{'s' if s['workers'] > 1 else ''}) | {s['mode']} | "
                       f"{KEYS} {kind} | {k['rps']:,.0f} | {_f(k.get('p50'))} | {_f(k.get('p99'))} | {k['errors']} |")
    out += ["", "| store | load | limited minus unlimited | per round | target | result |",
            "| --- | --- | --- | --- | --- | --- |"]
    for s in summaries:
        per_round = {"added p50": s.get("round_added_p50"), "added p99": s.get("round_added_p99"),
                     "throughput ratio": s.get("round_ratio")}
        for figure, target, result in verdicts(s):
            name = figure.rsplit(" ", 2)[0] if not figure.startswith("throughput") else "throughput ratio"
            vals = per_round.get(name) or []
            shown = ", ".join(f"{v:.1%}" if name == "throughput ratio" else f"{v:+.2f}" for v in vals)
            out.append(f"| {s['store']} | {s['mode']} | {figure} | {shown} | {target} | {result} |")
    return "\n".join(out)


def render(args: argparse.Namespace, bench: Bench, started: str, elapsed: float, where: str,
           background: dict[int, float]) -> tuple[str, list[dict]]:
    summaries = summarize(bench.rows)
    facts = procstat.machine_facts(args.python)
    versions = procstat.package_versions(args.python, ["apertis-proxy", "h11", "uvloop", "asyncpg"])
    mode = "quick (smoke run)" if args.quick else "full"
    mode += f"; {args.repeat} round(s) of unlimited then limited keys, figures are medians over the rounds"
    mode += "; PostgreSQL durable (fsync, synchronous commits)" if args.durable else ""
    problems = list(bench.problems)
    for s in summaries:
        lim = s.get("limited")
        if lim and not lim["admitted"]:
            problems.append(f"{s['store']}: the store recorded fewer admissions than limited requests answered "
                            f"2xx: the limited keys may not have been admitted through the store")
        u = s.get("unlimited")
        if u and u["stored"]:
            problems.append(f"{s['store']}: {u['stored']} admission(s) recorded while only unlimited keys ran")
    for r in bench.rows:
        if r["status"] == "ok" and r.get("errors"):
            problems.append(f"{r['store']} {r['kind']} round {r['round']}: {sum(r['errors'].values())} error(s), "
                            f"statuses {r['statuses']}; first: {r['first_error']}")
        if r["status"] == "ok" and max(r.get("sut_foreign") or 0.0, r.get("load_foreign") or 0.0) > FOREIGN_WARN:
            problems.append(f"{r['store']} {r['kind']} round {r['round']}: other work on the machine used "
                            f"{max(r.get('sut_foreign') or 0, r.get('load_foreign') or 0):.0f} points of a core (⚠)")
    command = shlex.join([sys.executable, *sys.argv])
    text = f"""# Per-key limits: keys with limits against keys without

- Date: {started} (took {elapsed:.0f} s)
- Command: `{command}`
- Code measured: {git_describe()}; apertis_proxy imported from `{where}`
- Mode: {mode}
- Machine: {facts['CPU']}, {facts['cores']} cores, {facts['memory']}; kernel {facts['kernel']}; {facts['OS']}
- Software: Python {facts['Python']}; {', '.join(f'{k} {v}' for k, v in versions.items())}
- CPU layout: gateway on CPU {bench.sut_cpus}; mock upstream, load client, this harness and PostgreSQL on
  CPU {bench.load_cpu}
- Background load in the second before the run: {', '.join(f'CPU {c} {v:.0f}%' for c, v in background.items())}
- Load: {CONNECTIONS} keep-alive connections, round-robin over {KEYS} keys (8 connections per key), ~1 KB
  non-streaming Messages requests, closed loop; {args.warmup:g} s warm-up, then {args.duration:g} s measured.
  Limited keys: `keys create {' '.join(LIMITS)}` (never binds at this load).

## Summary

{summary_table(summaries)}

Targets (the issue): on PostgreSQL (1 worker) added p50 under {PG_ADDED_P50_MS:g} ms and added p99 under
{PG_ADDED_P99_MS:g} ms; on SQLite with `serve --workers 2`, limited throughput at least {SQLITE_MIN_RATIO:.0%} of
unlimited. A run with any non-2xx answer is invalid (a 429 or 402 means a limit did bind).

## Every run

{runs_table(bench.rows)}

"admissions in store" counts the rows the phase added to `admission_times` (one per admitted request of a key
with a requests-per-minute limit) beside the 2xx answers of the phase (warm-up included): it shows the limited
keys went through the store and the unlimited ones did not. "p50 first s / last s" is the median latency of the
answers completed in the first and the last second of the measured window (a drift within the run). CPU is
utime+stime of the gateway's process tree (and of the PostgreSQL server's) over the measured window, per 2xx
answer.

## Problems seen in this run

{chr(10).join(f'- {p}' for p in problems) if problems else 'None.'}
"""
    return text, summaries


# -- main -----------------------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 s measured per run instead of 10")
    p.add_argument("--repeat", type=int, default=1, help="rounds of (unlimited, limited) per store")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 10, 3 with --quick)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each run")
    p.add_argument("--rate", type=float, default=PACED_RATE,
                   help=f"requests/s offered in the paced runs (default {PACED_RATE:g})")
    p.add_argument("--stores", default="postgres,sqlite", help="postgres,sqlite or one of them")
    p.add_argument("--durable", action="store_true",
                   help="PostgreSQL with fsync and synchronous commits on, as in production (default: off)")
    p.add_argument("--quiet-wait", type=float,
                   help="before each run, wait up to this many seconds for a second in which no core is more than "
                        "10%% busy (default 30, 0 with --quick)")
    p.add_argument("--python", default=sys.executable, help="Python whose bin/ holds apertis-proxy")
    p.add_argument("--load-cpu", type=int, help="CPU for the mock, the client and PostgreSQL (default: first)")
    p.add_argument("--sut-cpu", help="CPU(s) for the gateway, taskset syntax (default: second)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy profile of the gateway during every run, into bench/.work/profiles/")
    p.add_argument("--output", help="markdown output (default bench/.work/limits.md)")
    p.add_argument("--keep", action="store_true", help="copy the gateway logs to bench/.work/")
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.repeat = max(1, args.repeat)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 30.0
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if set(stores) - set(STORES):
        p.error(f"unknown store(s): {', '.join(sorted(set(stores) - set(STORES)))}")

    cmd = proxy_command(args.python)
    if cmd is None:
        print(f"limits: no apertis-proxy script next to {args.python} or on PATH", file=sys.stderr)
        return 1
    where, problem = check_implementation(args.python)
    if problem:
        print(f"limits: {problem}", file=sys.stderr)
        return 1
    raise_nofile()
    allowed = sorted(os.sched_getaffinity(0))
    load_cpu = args.load_cpu if args.load_cpu is not None else allowed[0]
    sut_cpus = args.sut_cpu if args.sut_cpu is not None else (str(allowed[1]) if len(allowed) > 1 else None)
    if len(allowed) > 1 or args.load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})   # the client and PostgreSQL (started from here) stay off the SUT
    output = Path(args.output) if args.output else WORK / "limits.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    started, t0 = procstat.now_utc(), time.monotonic()
    before = procstat.core_times()
    time.sleep(1.0)
    after = procstat.core_times()
    background = {c: procstat.core_busy(before, after, c) or 0.0 for c in sorted(after)}
    busy = [f"CPU {c} {v:.0f}%" for c, v in background.items() if v > 10]
    if busy:
        print(f"limits: warning: the machine is not idle ({', '.join(busy)} busy); figures will be noisy",
              file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="apertis-limits-"))
    bench = Bench(args, load_cpu, sut_cpus)
    body = write_bodies(workdir)[("small", False)].read_bytes()
    print(f"limits: stores {', '.join(stores)}; gateway on CPU {sut_cpus}, load on CPU {load_cpu}; "
          f"{args.repeat} round(s) of {args.warmup:g} s warm-up + {args.duration:g} s", flush=True)
    interrupted = False
    try:
        bench.mock = start_mock(args.python, load_cpu, workdir, 2.0)
        for store in stores:
            bench.measure_store(store, workdir, cmd, body)
    except KeyboardInterrupt:
        print("limits: interrupted; writing what was measured", file=sys.stderr)
        interrupted = True
    finally:
        if bench.mock is not None:
            bench.mock.stop()
        if bench.postgres is not None:
            bench.postgres.close()
        shutil.rmtree(workdir, ignore_errors=True)
    text, summaries = render(args, bench, started, time.monotonic() - t0, where, background)
    print()
    print(text)
    output.write_text(text)
    print(f"limits: written to {output}")
    if bench.profiles:
        print("limits: profiles: " + ", ".join(str(p) for p in bench.profiles if p.exists()))
    if interrupted:
        return 130
    return 0 if summaries and all(s["valid"] for s in summaries) and \
        all(r["status"] == "ok" for r in bench.rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))     # tests.support.pg_server
    sys.exit(main())
