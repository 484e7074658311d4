"""Benchmark apertis-proxy beside direct-to-mock and nginx, in one command.

    python bench/run.py [--quick] [--scenarios a,d-5000]
                        [--targets direct,nginx,proxy,proxy-w2,proxy-nometer,proxy-noobserve,proxy-h11,proxy-pg]

Installs wrk and nginx from Debian's packages if missing (only those the chosen
scenarios and targets use), starts the mock upstream, nginx (plain reverse
proxy) and apertis-proxy (one worker; once with every first-party plugin, once
with metering off, once with metrics and the access log off, once with h11
for every head, once on a PostgreSQL store), pins them to
CPUs, runs the scenarios and prints one table, also written to
bench/.work/RESULTS.md (RESULTS-quick.md for --quick; the folder is
git-ignored, `--output bench/RESULTS.md` replaces the committed figures).
See bench/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import procstat
import profile_summary
import report
import scenarios as scn
from drivers import DriverError, preflight, run_loadgen, run_wrk
from scenarios import Scenario
from services import (CHANNEL_KEY, WORK, Service, ServiceError, ensure_tools, pinned, proxy_command,
                      python_has, raise_nofile, setup_proxy_db, start_mock, start_nginx, start_proxy,
                      write_config)

ALL_TARGETS = ("direct", "nginx", "proxy", "proxy-w2", "proxy-nometer", "proxy-noobserve", "proxy-h11", "proxy-pg")
SETTLE = 0.3            # seconds after the load before CPU is read: deferred work (meter flushes) counts
WARMUP_SETTLE = 1.0     # seconds between the warm-up and the measured run


@dataclasses.dataclass
class Target:
    name: str
    key: str
    start: Optional[Callable[[], Service]]   # None: no system under test (direct)
    fixed_port: int = 0
    unavailable: str = ""


@dataclasses.dataclass
class Layout:
    load_cpu: Optional[int]
    sut_cpu: Optional[int]

    def describe(self) -> str:
        if self.sut_cpu is None:
            return "no pinning (fewer than two CPUs available): every process shares the CPUs"
        return (f"CPU {self.load_cpu}: mock upstream + load generator (wrk -t1 or bench/loadgen.py) + this harness; "
                f"CPU {self.sut_cpu}: the system under test alone (nginx with one worker process, or "
                f"`apertis-proxy serve --workers 1`). \"direct\" is the load generator talking straight to the "
                f"mock, so it also shows what the load core alone can do.")


def choose_layout(args: argparse.Namespace) -> Layout:
    allowed = sorted(os.sched_getaffinity(0))
    if args.load_cpu is not None or args.sut_cpu is not None:
        return Layout(args.load_cpu if args.load_cpu is not None else allowed[0],
                      args.sut_cpu if args.sut_cpu is not None else allowed[-1])
    if len(allowed) < 2:
        return Layout(None, None)
    return Layout(allowed[0], allowed[1])


def blocks(chosen: list[Scenario]) -> list[list[Scenario]]:
    out: list[list[Scenario]] = []
    for sc in chosen:
        if out and out[-1][0].block == sc.block:
            out[-1].append(sc)
        else:
            out.append([sc])
    return out


def preflight_variant(sc: Scenario) -> Scenario:
    """A short request of the same kind (a paced stream of 10 s would slow every start)."""
    if sc.paced:
        return dataclasses.replace(sc, deltas=3, ttfb_ms=20, gap_ms=10, ramp=0)
    return dataclasses.replace(sc, ramp=0)


class Bench:
    def __init__(self, args: argparse.Namespace, layout: Layout, workdir: Path) -> None:
        self.args = args
        self.layout = layout
        self.workdir = workdir
        self.python = args.python
        self.bodies = scn.write_bodies(workdir)
        self.rows: list[dict] = []
        self.idle: dict[str, list[int]] = {}
        self.mock: Optional[Service] = None
        self.profiles: list[Path] = []
        self.postgres = None          # the throwaway PostgreSQL of the proxy-pg target

    # -- targets --
    def targets(self, wanted: list[str], nofile: int) -> list[Target]:
        mock_port = self.mock.port
        out = []
        for name in wanted:
            if name == "direct":
                out.append(Target("direct", CHANNEL_KEY, None, fixed_port=mock_port))
            elif name == "nginx":
                out.append(Target("nginx", CHANNEL_KEY, lambda: start_nginx(
                    self.layout.sut_cpu, self.workdir, mock_port, nofile)))
        proxies = [n for n in wanted if n.startswith("proxy")]
        if proxies:
            cmd, reason, db, key = proxy_command(self.python), "", None, ""
            if cmd is None:
                reason = "apertis-proxy is not installed (no console script next to the Python or on PATH)"
            else:
                reason = _proxy_unusable(cmd)
            if not reason:
                try:
                    db, key = setup_proxy_db(cmd, self.workdir, mock_port)
                except (ServiceError, subprocess.TimeoutExpired) as exc:
                    reason = str(exc)
            for name in proxies:
                target_db, target_key, target_reason = db, key, reason
                if name == "proxy-pg" and not reason:
                    target_db, target_key, target_reason = self._postgres_db(cmd, mock_port)
                if target_reason:
                    out.append(Target(name, "", None, unavailable=target_reason))
                    continue
                config = write_config(self.workdir, name, meter=(name != "proxy-nometer"),
                                      observe=(name != "proxy-noobserve"), fast_heads=(name != "proxy-h11"))
                # proxy-w2: `serve --workers 2` on the same core as every other system under test.
                workers = 2 if name == "proxy-w2" else 1
                out.append(Target(name, target_key, (lambda n=name, c=config, d=target_db, w=workers: start_proxy(
                    cmd, n, self.layout.sut_cpu, self.workdir, d, c, w))))
        return out

    def _postgres_db(self, cmd: list[str], mock_port: int) -> tuple[Optional[str], str, str]:
        """A throwaway PostgreSQL (tests/support/pg_server.py, on the load core: it inherits the harness's CPU) with the
        same channel and key as the SQLite file; (database URL, key, why not)."""
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
        from pg_server import PgServer, PgUnavailable
        try:
            self.postgres = PgServer.start()
            url = self.postgres.create_database("bench")
            db, key = setup_proxy_db(cmd, self.workdir, mock_port, db=url)
        except (PgUnavailable, ServiceError, subprocess.TimeoutExpired) as exc:
            return None, "", f"PostgreSQL unavailable: {exc}"
        return db, key, ""

    # -- running --
    def run(self, chosen: list[Scenario], targets: list[Target], retries: int, repeat: int = 1) -> None:
        """Every block on every target; with repeat > 1 the targets take turns (A B C, A B C, ...), so
        slow drifts of the machine hit them alike, and one row per scenario and target is kept."""
        for block in blocks(chosen):
            start = len(self.rows)
            for _ in range(repeat):
                for target in targets:
                    self._run_block(block, target, retries)
            if repeat > 1:
                self.rows[start:] = keep_representative(self.rows[start:])

    def _row(self, sc: Scenario, target: Target, status: str, note: str = "", **fields) -> dict:
        row = {"scenario": sc.key, "group": sc.group, "label": sc.label, "target": target.name,
               "status": status, "note": note, **fields}
        print(f"  {sc.key:8} {target.name:14} {status:7} " + (_brief(row) if status == "ok" else note[:200]),
              flush=True)
        return row

    def _run_block(self, block: list[Scenario], target: Target, retries: int) -> None:
        """The block's scenarios on one fresh start of the target.  A measurement that other work on the
        machine disturbed is taken again after a quiet moment (paced streams on a fresh start, so memory
        per stream starts clean) and the least disturbed attempt is kept."""
        if target.unavailable:
            self.rows.extend(self._row(sc, target, "skipped", target.unavailable) for sc in block)
            return
        svc: Optional[Service] = None
        try:
            for i, sc in enumerate(block):
                best: Optional[dict] = None
                for attempt in range(1 + retries):
                    if attempt:
                        print(f"  ... other work on the machine disturbed {sc.key} on {target.name}; "
                              f"waiting for a quiet moment, then attempt {attempt + 1}", flush=True)
                        procstat.wait_quiet(60.0)
                    if target.start is not None and (svc is None or (attempt and sc.paced)):
                        if svc is not None:
                            svc.stop()
                        try:
                            svc = target.start()
                        except ServiceError as exc:
                            svc = None
                            best = self._row(sc, target, "error", f"start failed: {exc}")
                            break
                    port = svc.port if svc else target.fixed_port
                    row = self._measure(sc, target, svc, port, idle=(i == 0 and attempt == 0))
                    if best is None or (row["status"] == "ok" and _foreign(row) < _foreign(best)):
                        best = row
                    if row["status"] != "ok" or not report.disturbed(row):
                        break
                self.rows.append(best)
        finally:
            if svc is not None:
                svc.stop()

    def _measure(self, sc: Scenario, target: Target, svc: Optional[Service], port: int, idle: bool) -> dict:
        lay, py = self.layout, self.python
        body = self.bodies[(sc.body, sc.stream)]
        problem = preflight(py, preflight_variant(sc), port, target.key, body, lay.load_cpu)
        if problem:
            return self._row(sc, target, "error", f"preflight: {problem}")
        pid = svc.pid if svc else None
        if idle and pid:
            time.sleep(0.5)
            self.idle.setdefault(target.name, []).append(procstat.rss_kb(pid))
        try:
            if sc.driver == "wrk" and sc.warmup:
                run_wrk(sc, port, target.key, body, lay.load_cpu, self.workdir, sc.warmup)
                # wrk leaves with requests in flight; until the target has answered them, their server
                # sockets linger, and a new connection that reuses a client port collides with one and
                # waits out a SYN retransmission (1 s): seen as a p99 of 1-2 s at c=256.
                time.sleep(WARMUP_SETTLE)
            cpu0 = procstat.cpu_seconds(pid) if pid else 0.0
            mock0 = procstat.cpu_seconds(self.mock.pid)
            cores0, own0, t_start = procstat.core_times(), procstat.own_cpu_seconds(), time.monotonic()
            hwm_ok = procstat.reset_peak(pid) if pid else False
            rss0 = procstat.rss_kb(pid) if pid else 0
            spy = self._start_profile(sc, target, pid)
            with procstat.RssSampler(pid or self.mock.pid) as sampler:
                if sc.driver == "wrk":
                    res = run_wrk(sc, port, target.key, body, lay.load_cpu, self.workdir, int(sc.duration))
                else:
                    res = run_loadgen(py, sc, port, target.key, body, lay.load_cpu, requests=sc.requests)
                profile_summary.stop_recording(spy)
                time.sleep(SETTLE)
            cpu = (procstat.cpu_seconds(pid) - cpu0) if pid else None
            mock_cpu = procstat.cpu_seconds(self.mock.pid) - mock0
            cores1, own1, window = procstat.core_times(), procstat.own_cpu_seconds(), time.monotonic() - t_start
        except DriverError as exc:
            return self._row(sc, target, "error", str(exc))
        if pid and svc.proc.poll() is not None:
            return self._row(sc, target, "error", f"{target.name} exited during the run ({svc.proc.returncode})")
        peak = max(procstat.hwm_kb(pid) if hwm_ok else 0, sampler.peak) if pid else None
        ok, events = res["ok"], res["events"]
        fields = dict(res)
        fields.update(
            cpu_s=cpu,
            cpu_us_req=(cpu * 1e6 / ok) if cpu is not None and ok else None,
            cpu_us_event=(cpu * 1e6 / events) if cpu is not None and events else None,
            mock_cpu_us_req=(mock_cpu * 1e6 / ok) if ok else None,
            rss_before_kb=rss0 or None, peak_rss_kb=peak,
            kb_per_stream=((peak - rss0) / res["in_flight"]) if pid and sc.paced and res["in_flight"] else None,
            sut_busy=procstat.core_busy(cores0, cores1, lay.sut_cpu),
            load_busy=procstat.core_busy(cores0, cores1, lay.load_cpu),
        )
        # Load on a core beyond what our own processes used there: other work on the machine.
        if fields["sut_busy"] is not None:
            fields["sut_foreign"] = fields["sut_busy"] - 100.0 * (cpu or 0.0) / window
        if fields["load_busy"] is not None:
            fields["load_foreign"] = fields["load_busy"] - 100.0 * (mock_cpu + own1 - own0) / window
        return self._row(sc, target, "ok", **fields)

    # -- optional py-spy profile of the proxy during the measured run --
    def _start_profile(self, sc: Scenario, target: Target, pid: Optional[int]) -> Optional[subprocess.Popen]:
        if not (self.args.profile and pid and target.name.startswith("proxy")):
            return None
        spy = _py_spy(self.python)
        if spy is None:
            return None
        out_dir = WORK / "profiles"
        out_dir.mkdir(parents=True, exist_ok=True)
        # Collapsed stacks: summarised as text below, and open in speedscope or flamegraph.pl.
        out = out_dir / f"{sc.key}-{target.name}.txt"
        self.profiles.append(out)
        cmd = pinned([spy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
                      "--format", "raw", "--output", str(out)], self.layout.load_cpu)
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def keep_representative(rows: list[dict]) -> list[dict]:
    """One row per (scenario, target) out of repeated runs: the median by requests/s (of an even
    count, the upper middle one: the best of two).  Error rows count only if nothing else ran."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["target"]), []).append(r)
    out = []
    for group in groups.values():
        ok = sorted((r for r in group if r["status"] == "ok"), key=lambda r: r["rps"])
        if ok:
            chosen = dict(ok[len(ok) // 2])
            chosen["repeats"] = [round(r["rps"], 1) for r in ok]
            out.append(chosen)
        else:
            out.append(group[-1])
    return out


def _foreign(r: dict) -> float:
    return max(r.get("sut_foreign") or 0.0, r.get("load_foreign") or 0.0)


def _brief(r: dict) -> str:
    parts = [f"{r['rps']:,.1f} req/s", f"p50 {r['p50']} ms", f"p99 {r['p99']} ms"]
    if r.get("ttfb99") is not None:
        parts.append(f"ttfb p99 {r['ttfb99']} ms")
    if r.get("cpu_us_req") is not None:
        parts.append(f"{r['cpu_us_req']:.0f} µs/req")
    if r.get("errors"):
        parts.append(f"errors {r['errors']}")
    return ", ".join(parts)


def _proxy_unusable(cmd: list[str]) -> str:
    try:
        res = subprocess.run([*cmd, "serve", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apertis-proxy serve --help failed: {exc}"
    if res.returncode != 0:
        last = (res.stdout + res.stderr).strip().splitlines()[-1:] or ["?"]
        return f"apertis-proxy serve is not usable yet: {last[0]}"
    return ""


def _py_spy(python: str) -> Optional[str]:
    local = Path(python).parent / "py-spy"
    found = str(local) if local.exists() else shutil.which("py-spy")
    if found:
        return found
    print("bench: installing py-spy from PyPI for --profile ...", flush=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "py-spy"], check=False, timeout=600)
    return str(local) if local.exists() else shutil.which("py-spy")


def background_load(layout: Layout, seconds: float = 1.0) -> dict[int, float]:
    """Core load before anything of ours runs: other work on the machine skews every figure."""
    before = procstat.core_times()
    time.sleep(seconds)
    after = procstat.core_times()
    return {cpu: procstat.core_busy(before, after, cpu) or 0.0 for cpu in sorted(after)}


def render(args: argparse.Namespace, bench: Bench, chosen: list[Scenario], layout: Layout,
           started: str, elapsed: float, background: dict[int, float]) -> str:
    facts = procstat.machine_facts(args.python)
    versions = procstat.package_versions(args.python, ["apertis-proxy", "h11", "uvloop", "orjson", "asyncpg"])
    order = [s.key for s in chosen]
    packages = ", ".join(f"{k} {v}" for k, v in versions.items())
    command = shlex.join([sys.executable, *sys.argv])
    mode = "quick (smoke run: short, low concurrency; not for comparison)" if args.quick else "full"
    if args.repeat > 1:
        mode += (f"; every scenario run {args.repeat} times with the targets taking turns, the median row kept "
                 f"(the upper middle of an even count)")
    scenario_lines = "\n".join(
        f"- `{s.key}`: {s.label} ({s.driver}, {s.connections} connection(s), "
        + (f"{s.duration:g} s measured after {s.warmup} s warm-up" if s.driver == "wrk"
           else f"{s.requests} request(s) per connection, connections opened over {s.ramp:g} s")
        + (f"; mock: `{s.query}`" if s.query else "") + ")" for s in chosen)
    return f"""# apertis-proxy benchmark results

- Date: {started} (took {elapsed:.0f} s)
- Command: `{command}`
- Mode: {mode}
- Machine: {facts['CPU']}, {facts['cores']} cores, {facts['memory']}; kernel {facts['kernel']}; {facts['OS']}
- Software: Python {facts['Python']}; {packages}; {facts['wrk']}; {facts['nginx']}
- CPU layout: {layout.describe()}
- Background load in the second before the run: {', '.join(f'CPU {c} {v:.0f}%' for c, v in background.items())}
  (other work on the machine skews every figure; the "core busy" column shows it during each run)

## Results

Every row of a scenario was measured in this run, one target after the other.  "vs nginx" and "vs direct" are
requests/s as a share of that target's; "added" is this target's figure minus direct-to-mock's.  CPU and memory
are those of the system under test only (utime+stime and VmRSS/VmHWM of its process tree, from /proc).
For streams, req/s counts whole streams.

{report.table(bench.rows, order)}

## Idle memory

{report.idle_table(bench.idle)}

## Cost of metering (apertis with and without the SQLite meter)

{report.metering_table(bench.rows, order)}

## Cost of metrics and the access log (apertis with and without them)

{report.observe_table(bench.rows, order)}

## The fast head parsers (apertis with them, and with h11 for every head: `[server] fast_heads = false`)

{report.fast_heads_table(bench.rows, order)}

## Targets (one worker process on one core)

{report.targets(bench.rows, bench.idle)}

## Problems seen in this run

{report.problems(bench.rows)}

## Scenarios

{scenario_lines}
"""


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: short durations, lower concurrency")
    p.add_argument("--scenarios", default="", help="groups (a..e) or keys (a-c64, d-5000) to run; default all")
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"subset of {','.join(ALL_TARGETS)}")
    p.add_argument("--output", help="markdown file (default bench/.work/RESULTS.md, or RESULTS-quick.md with "
                                    "--quick); bench/RESULTS.md replaces the committed figures")
    p.add_argument("--json", help="also write the raw rows here")
    p.add_argument("--python", default=sys.executable, help="Python with uvloop for the mock and loadgen, "
                                                            "and whose bin/ holds apertis-proxy")
    p.add_argument("--load-cpu", type=int, help="CPU for the mock and the load generators (default: first)")
    p.add_argument("--sut-cpu", type=int, help="CPU for the system under test (default: second)")
    p.add_argument("--tick-ms", type=float, default=2.0, help="the mock's timer tick for paced streams")
    p.add_argument("--profile", action="store_true", help="py-spy flame graphs of the proxy into bench/.work/profiles/")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every scenario N times, the targets taking turns; keep the median row")
    p.add_argument("--retries", type=int, help="measure a scenario again when other work on the machine "
                                               "disturbed it (default 2, 0 with --quick)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, DB, configs)")
    args = p.parse_args(argv)

    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = set(wanted) - set(ALL_TARGETS)
    if bad:
        p.error(f"unknown target(s): {', '.join(sorted(bad))}")
    chosen = scn.select(scn.quick() if args.quick else scn.full(), args.scenarios)
    # Only what this run uses: a loadgen-only run against the proxy needs neither.
    ensure_tools(wrk=any(s.driver == "wrk" for s in chosen), nginx="nginx" in wanted)
    if not python_has(args.python, "uvloop"):
        print(f"bench: warning: {args.python} has no uvloop; the mock and loadgen fall back to asyncio "
              f"and may become the bottleneck", file=sys.stderr)
    nofile = raise_nofile()
    layout = choose_layout(args)
    if layout.load_cpu is not None:
        os.sched_setaffinity(0, {layout.load_cpu})     # the harness's own sampling stays off the SUT core
    output = Path(args.output) if args.output else WORK / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    output.parent.mkdir(parents=True, exist_ok=True)
    started, t0 = procstat.now_utc(), time.monotonic()
    background = background_load(layout)
    busy = [f"CPU {c} {v:.0f}%" for c, v in background.items() if v > 10]
    if busy:
        print(f"bench: warning: the machine is not idle ({', '.join(busy)} busy); figures will be noisy",
              file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="apertis-bench-"))
    bench = Bench(args, layout, workdir)
    interrupted = False
    print(f"bench: {len(chosen)} scenario(s), targets {', '.join(wanted)}; {layout.describe()}", flush=True)
    try:
        bench.mock = start_mock(args.python, layout.load_cpu, workdir, args.tick_ms)
        targets = bench.targets(wanted, nofile)
        for t in targets:
            if t.unavailable:
                print(f"bench: {t.name} skipped: {t.unavailable}", flush=True)
        bench.run(chosen, targets, args.retries if args.retries is not None else (0 if args.quick else 2),
                  max(1, args.repeat))
    except KeyboardInterrupt:
        print("bench: interrupted; writing what was measured", file=sys.stderr)
        interrupted = True
    finally:
        if bench.mock is not None:
            bench.mock.stop()
        if bench.postgres is not None:
            bench.postgres.close()
        if args.keep:
            print(f"bench: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    text = render(args, bench, chosen, layout, started, time.monotonic() - t0, background)
    print()
    print(text)
    output.write_text(text)
    print(f"bench: written to {output}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": bench.rows, "idle_rss_kb": bench.idle}, indent=1))
    if bench.profiles:
        print("bench: profiles: " + ", ".join(str(p) for p in bench.profiles if p.exists()))
    if interrupted:
        return 130
    return 0 if all(r["status"] in ("ok", "skipped") and not r.get("errors") for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
