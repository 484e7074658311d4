"""Two configurations of the gateway on the same core at the same time: what one costs against the other.

    python bench/side_by_side.py [--pair observe|meter|fast-heads|limits] [--rounds N] [--seconds S] [--keep]
    python bench/side_by_side.py --pair interpreter --other-python /usr/venv/bin/python

bench/run.py measures the targets one after the other, so the machine's drift between two runs (its speed
moves by more than 10% from minute to minute on a shared virtual machine) lands in every comparison. Here
both systems under test run at once, pinned to the same core, each with its own SQLite file and its own
`wrk -t1` at 64 keep-alive connections of small JSON requests (scenario a-c64): the kernel's scheduler gives
the two busy processes equal shares of the core, and whatever slows the machine slows both alike. Per round
this reads each one's successful requests and CPU time (utime + stime of its process tree); the cost of the
feature is

- throughput: 1 - (req/s with the feature) / (req/s without), both in the same seconds;
- CPU per request: (CPU µs/req with) / (CPU µs/req without) - 1, which does not depend on the shares.

Pairs (the first is the default configuration, the second lacks the feature):

    observe      metrics and the text access log on, against both off
    meter        the SQLite meter and its durable ledger, against no meter
    fast-heads   the fast head parsers, against h11 for every head
    limits       a key with a quota, rpm and concurrency that never bind, against a key without, both sides
                 on `serve --workers 2` (their four workers share the core)
    interpreter  the same gateway on the Python of --other-python against the one of --python (e.g. a build
                 optimised with PGO and LTO, as the container image's python:3.12-slim is, against one without)

The two start in turns (which one wrk starts first swaps every round). Prints a line per round, then a
table and the medians, also written to bench/.work/side-by-side-PAIR.md (git-ignored) or --output.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
import scenarios as scn  # noqa: E402
from drivers import DriverError, preflight, run_wrk  # noqa: E402
from limits import LIMITS  # noqa: E402 - limits that never bind, as bench/limits.py gives its keys
from services import (WORK, ServiceError, ensure_tools, proxy_command, raise_nofile,  # noqa: E402
                      setup_proxy_db, start_mock, start_proxy, write_config)

@dataclasses.dataclass(frozen=True)
class Pair:
    with_label: str
    without_label: str
    with_config: dict           # write_config's keyword arguments
    without_config: dict
    limited: bool = False       # the "with" side's key gets limits that never bind (LIMITS)
    workers: int = 1            # `serve --workers N` on each side
    other_python: bool = False  # the "with" side runs on --other-python


PAIRS = {
    "observe": Pair("metrics and access log on", "both off", {"meter": True}, {"meter": True, "observe": False}),
    "meter": Pair("SQLite meter", "no meter", {"meter": True}, {"meter": False}),
    "fast-heads": Pair("fast heads", "h11 for every head", {"meter": True}, {"meter": True, "fast_heads": False}),
    "limits": Pair("a key with limits, --workers 2", "a key without, --workers 2", {"meter": True}, {"meter": True},
                   limited=True, workers=2),
    "interpreter": Pair("--other-python", "--python", {"meter": True}, {"meter": True}, other_python=True),
}
SCENARIO = "a-c64"
WARMUP = 1


def measure(sides: list[dict], sc: scn.Scenario, load_cpu: int, seconds: int) -> list[dict]:
    """Both wrk runs at once; each side's requests, req/s and CPU µs per request over the same seconds."""
    before = [procstat.cpu_seconds(side["svc"].pid) for side in sides]
    with concurrent.futures.ThreadPoolExecutor(len(sides)) as pool:
        runs = [pool.submit(run_wrk, sc, side["svc"].port, side["key"], side["body"], load_cpu, side["dir"], seconds)
                for side in sides]
        results = [run.result() for run in runs]
    time.sleep(0.3)     # deferred work (the meter's flush) counts
    after = [procstat.cpu_seconds(side["svc"].pid) for side in sides]
    out = []
    for res, b, a in zip(results, before, after):
        cpu = a - b
        out.append({"ok": res["ok"], "errors": res["errors"], "rps": res["rps"], "cpu_s": cpu,
                    "cpu_us_req": 1e6 * cpu / res["ok"] if res["ok"] else None, "share": cpu / res["wall"]})
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=sorted(PAIRS), default="observe")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=int, default=10, help="measured seconds per round (after a 1 s warm-up)")
    p.add_argument("--python", default=sys.executable, help="Python whose environment has apertis-proxy")
    p.add_argument("--other-python", help="--pair interpreter: the Python measured against --python's")
    p.add_argument("--output", help="markdown file (default bench/.work/side-by-side-PAIR.md)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (the two proxies' logs and files)")
    args = p.parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit("bench: needs two CPUs (one for the load, one for the systems under test)")
    load_cpu, sut_cpu = allowed[0], allowed[1]
    ensure_tools(wrk=True, nginx=False)
    cmd = proxy_command(args.python)
    if cmd is None:
        raise SystemExit("bench: apertis-proxy is not installed next to this Python (see --python)")
    pair = PAIRS[args.pair]
    with_label, without_label = pair.with_label, pair.without_label
    with_cmd = cmd
    if pair.other_python:
        with_cmd = proxy_command(args.other_python) if args.other_python else None
        if with_cmd is None:
            raise SystemExit("bench: --pair interpreter needs --other-python, with apertis-proxy installed beside it")
        with_label, without_label = python_label(args.other_python), python_label(args.python)
    raise_nofile()
    os.sched_setaffinity(0, {load_cpu})
    sc = next(s for s in scn.full() if s.key == SCENARIO)
    workdir = Path(tempfile.mkdtemp(prefix="apertis-side-"))
    bodies = scn.write_bodies(workdir)
    mock = start_mock(args.python, load_cpu, workdir, 2.0)
    sides: list[dict] = []
    rows: list[list[dict]] = []
    try:
        for name, label, cfg, side_cmd in (("with", with_label, pair.with_config, with_cmd),
                                           ("without", without_label, pair.without_config, cmd)):
            side_dir = workdir / name
            side_dir.mkdir()
            db, key = setup_proxy_db(side_cmd, side_dir, mock.port)
            if pair.limited and name == "with":
                limit_key(side_cmd, db)
            config = write_config(side_dir, name, **cfg)
            svc = start_proxy(side_cmd, name, sut_cpu, side_dir, db, config, pair.workers)
            sides.append({"name": name, "label": label, "svc": svc, "key": key, "dir": side_dir,
                          "body": bodies[("small", False)]})
            problem = preflight(args.python, sc, svc.port, key, bodies[("small", False)], load_cpu)
            if problem:
                raise ServiceError(f"{label}: {problem}")
        print(f"side by side on CPU {sut_cpu} (load on CPU {load_cpu}): {with_label} against {without_label}, "
              f"{args.rounds} rounds of {args.seconds} s, {sc.connections} connections each", flush=True)
        for rnd in range(args.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            measure(order, sc, load_cpu, WARMUP)
            got = dict(zip((s["name"] for s in order), measure(order, sc, load_cpu, args.seconds)))
            rows.append([got["with"], got["without"]])
            w, o = got["with"], got["without"]
            print(f"  round {rnd + 1}: req/s {w['rps']:,.0f} / {o['rps']:,.0f} ({_cost(w['rps'], o['rps']):+.1f}%), "
                  f"CPU µs/req {w['cpu_us_req']:.0f} / {o['cpu_us_req']:.0f} "
                  f"({_more(w['cpu_us_req'], o['cpu_us_req']):+.1f}%), core share {w['share']:.0%} / "
                  f"{o['share']:.0%}, errors {w['errors'] or 0} / {o['errors'] or 0}", flush=True)
    except (ServiceError, DriverError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        for side in sides:
            side["svc"].stop()
        mock.stop()
        if args.keep:
            print(f"bench: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(args, with_label, without_label, rows, sut_cpu, load_cpu)
    print(text)
    output = Path(args.output) if args.output else WORK / f"side-by-side-{args.pair}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return 0 if all(not w["errors"] and not o["errors"] for w, o in rows) else 1


def python_label(python: str) -> str:
    """A Python by its version and path: "Python 3.11.2 at /venv/bin/python"."""
    res = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True,
                         timeout=30)
    return f"Python {res.stdout.strip()} at {python}" if res.returncode == 0 else python


def limit_key(cmd: list[str], db: Path) -> None:
    """The bench key of `db` gets limits that never bind: every request is admitted through the store."""
    res = subprocess.run([*cmd, "keys", "set", "bench", *LIMITS, "--db", str(db)], capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        raise ServiceError(f"'apertis-proxy keys set' failed: {(res.stdout + res.stderr).strip()[-600:]}")


def _cost(with_rps: float, without_rps: float) -> float:
    """Throughput lost to the feature, in percent."""
    return 100.0 * (1 - with_rps / without_rps) if without_rps else float("nan")


def _more(with_cpu: float, without_cpu: float) -> float:
    """CPU per request the feature adds, in percent."""
    return 100.0 * (with_cpu / without_cpu - 1) if without_cpu else float("nan")


def report(args: argparse.Namespace, with_label: str, without_label: str, rows: list[list[dict]],
           sut_cpu: int, load_cpu: int) -> str:
    costs = [_cost(w["rps"], o["rps"]) for w, o in rows]
    cpu = [_more(w["cpu_us_req"], o["cpu_us_req"]) for w, o in rows]
    lines = [f"# Side by side: {with_label} against {without_label}", "",
             f"- Command: `python bench/side_by_side.py --pair {args.pair} --rounds {args.rounds} "
             f"--seconds {args.seconds}" + (f" --other-python {args.other_python}`" if args.other_python else "`"),
             f"- Date: {procstat.now_utc()}; both on CPU {sut_cpu}, mock and two `wrk -t1 -c64` on CPU {load_cpu}",
             "", "| round | req/s with / without | throughput cost | CPU µs/req with / without | CPU cost "
             "| core share with / without |", "| ---: | --- | ---: | --- | ---: | --- |"]
    for i, ((w, o), c, u) in enumerate(zip(rows, costs, cpu), 1):
        lines.append(f"| {i} | {w['rps']:,.0f} / {o['rps']:,.0f} | {c:+.1f}% | {w['cpu_us_req']:.0f} / "
                     f"{o['cpu_us_req']:.0f} | {u:+.1f}% | {w['share']:.0%} / {o['share']:.0%} |")
    lines += ["", f"Median throughput cost {statistics.median(costs):+.1f}% (from {min(costs):+.1f}% to "
                  f"{max(costs):+.1f}%); median CPU cost per request {statistics.median(cpu):+.1f}% (from "
                  f"{min(cpu):+.1f}% to {max(cpu):+.1f}%)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
