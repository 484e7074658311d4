"""The two load generators, behind one result shape.

wrk (C, closed loop) drives the throughput scenarios; bench/loadgen.py drives
the long paced streams and the single-request preflight checks.  Both report:

    ok, errors {kind: n}, rps, p50/p99 latency (ms), ttfb p50/p99 (ms or None),
    events (SSE events received, or None), wall (s)
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Optional

from scenarios import SDK_HEADERS, Scenario
from services import HERE, pinned

API_VERSION = "2023-06-01"

WRK_SCRIPT = """\
wrk.method = "POST"
local fh = io.open("{body}", "rb")
wrk.body = fh:read("*a")
fh:close()
{headers}

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


class DriverError(RuntimeError):
    pass


def url(port: int, sc: Scenario) -> str:
    query = sc.query
    return f"http://127.0.0.1:{port}/v1/messages" + (f"?{query}" if query else "")


def run_wrk(sc: Scenario, port: int, key: str, body: Path, cpu: Optional[int], workdir: Path,
            seconds: int) -> dict:
    script = workdir / f"wrk-{sc.key}.lua"
    if sc.realistic:
        pairs = [*SDK_HEADERS, ("Authorization", f"Bearer {key}")]
    else:
        pairs = [("content-type", "application/json"), ("x-api-key", key), ("anthropic-version", API_VERSION)]
    headers = "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in pairs)
    script.write_text(WRK_SCRIPT.format(body=body, headers=headers))
    cmd = pinned(["wrk", "-t1", f"-c{sc.connections}", f"-d{seconds}s", "--timeout", f"{sc.timeout:g}s",
                  "-s", str(script), url(port, sc)], cpu)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + sc.timeout + 30)
    except subprocess.TimeoutExpired:
        raise DriverError(f"wrk did not finish within {seconds + sc.timeout + 30:.0f}s") from None
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise DriverError(f"wrk failed ({res.returncode}): {(res.stdout + res.stderr).strip()[-400:]}")
    w = json.loads(line[len("WRKJSON "):])
    wall = w["duration_us"] / 1e6
    errors = {k: w[k] for k in ("connect", "read", "write", "status", "timeout") if w[k]}
    ok = max(0, w["requests"] - w["status"])
    return {
        "ok": ok, "errors": errors, "rps": ok / wall if wall else 0.0,
        "p50": w["p50"] / 1000.0, "p99": w["p99"] / 1000.0, "max": w["max"] / 1000.0,
        "ttfb50": None, "ttfb99": None,
        "events": ok * sc.events_per_stream if sc.stream else None,
        "wall": wall, "in_flight": sc.connections,
    }


def run_loadgen(python: str, sc: Scenario, port: int, key: str, body: Path, cpu: Optional[int],
                connections: Optional[int] = None, requests: int = 1) -> dict:
    conns = sc.connections if connections is None else connections
    cmd = [python, str(HERE / "loadgen.py"), "--url", url(port, sc), "--body-file", str(body),
           "-H", f"x-api-key: {key}", "-H", f"anthropic-version: {API_VERSION}",
           "--connections", str(conns), "--requests", str(requests), "--ramp", f"{sc.ramp:g}",
           "--max-time", f"{sc.duration:g}", "--timeout", f"{sc.timeout:g}"]
    if sc.stream:
        cmd += ["--expect-events", str(sc.events_per_stream)]
    limit = sc.duration + sc.timeout + 30
    try:
        res = subprocess.run(pinned(cmd, cpu), capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise DriverError(f"loadgen did not finish within {limit:.0f}s") from None
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise DriverError(
            f"loadgen failed ({res.returncode}): {(res.stdout + res.stderr).strip()[-400:]}") from None
    lat, ttfb = out["latency_ms"], out["ttfb_ms"]
    return {
        "ok": out["ok"], "errors": out["errors"], "rps": out["rps"],
        "p50": lat["p50"], "p99": lat["p99"], "max": lat["max"],
        "ttfb50": ttfb["p50"] if sc.stream else None, "ttfb99": ttfb["p99"] if sc.stream else None,
        "events": out["events"] if sc.stream else None,
        "wall": out["wall_s"], "in_flight": out["peak_in_flight"], "first_error": out.get("first_error"),
    }


def preflight(python: str, sc: Scenario, port: int, key: str, body: Path, cpu: Optional[int]) -> Optional[str]:
    """One request of the scenario's kind; None if it came back whole and 2xx, else what went wrong."""
    try:
        r = run_loadgen(python, sc, port, key, body, cpu, connections=1, requests=1)
    except DriverError as exc:
        return str(exc)
    if r["ok"] == 1 and not r["errors"]:
        return None
    return r.get("first_error") or f"errors {r['errors']}"
