"""Turns the measured rows into the results table (stdout and the markdown file run.py writes)."""
from __future__ import annotations

from typing import Any, Optional

Row = dict[str, Any]

TARGET_LABELS = {
    "direct": "direct to mock",
    "nginx": "nginx",
    "proxy": "apertis (all plugins)",
    "proxy-w2": "apertis (all plugins, --workers 2)",
    "proxy-nometer": "apertis (no metering)",
    "proxy-noobserve": "apertis (no metrics, no access log)",
    "proxy-h11": "apertis (h11 for every head)",
    "proxy-pg": "apertis (all plugins, PostgreSQL store)",
}
DASH = "—"


def _num(v: Optional[float]) -> str:
    if v is None:
        return DASH
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _signed(v: Optional[float]) -> str:
    return DASH if v is None else ("+" if v >= 0 else "-") + _num(abs(v))


def _pct(a: Optional[float], b: Optional[float]) -> str:
    if a is None or not b:
        return DASH
    return f"{100.0 * a / b:.0f}%"


def _pair(a: Optional[float], b: Optional[float], fmt=_num) -> str:
    if a is None and b is None:
        return DASH
    return f"{fmt(a)} / {fmt(b)}"


def _diff(row: Row, base: Optional[Row], key: str) -> Optional[float]:
    if not base or row.get(key) is None or base.get(key) is None:
        return None
    return row[key] - base[key]


def _ok(row: Optional[Row]) -> bool:
    return bool(row) and row.get("status") == "ok"


def _errors(row: Row) -> str:
    errs = row.get("errors") or {}
    total = sum(errs.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in sorted(errs.items())) + ")"


def by_scenario(rows: list[Row]) -> dict[str, dict[str, Row]]:
    out: dict[str, dict[str, Row]] = {}
    for r in rows:
        out.setdefault(r["scenario"], {})[r["target"]] = r
    return out


HEADER = ("| scenario | target | req/s | vs nginx | vs direct | latency p50 / p99 ms | added p50 / p99 ms "
          "| TTFB p50 / p99 ms | added TTFB p50 / p99 ms | CPU µs/req | CPU µs/event | peak RSS MB "
          "| KB/stream | errors | core busy SUT / load |")


def table(rows: list[Row], order: list[str]) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    grouped = by_scenario(rows)
    for key in order:
        targets = grouped.get(key, {})
        direct = targets.get("direct") if _ok(targets.get("direct")) else None
        nginx = targets.get("nginx") if _ok(targets.get("nginx")) else None
        for name in TARGET_LABELS:
            r = targets.get(name)
            if r is None:
                continue
            label = r["label"]
            if r["status"] != "ok":
                lines.append(f"| {key}: {label} | {TARGET_LABELS[name]} | {r['status']}: "
                             f"{_short(r.get('note', ''))} |" + " |" * 12)
                continue
            is_sut = name != "direct"
            lines.append("| " + " | ".join([
                f"{key}: {label}", TARGET_LABELS[name], _num(r["rps"]),
                _pct(r["rps"], nginx["rps"]) if nginx and name not in ("nginx",) else DASH,
                _pct(r["rps"], direct["rps"]) if direct and is_sut else DASH,
                _pair(r["p50"], r["p99"]),
                _pair(_diff(r, direct, "p50"), _diff(r, direct, "p99"), _signed) if is_sut else DASH,
                _pair(r.get("ttfb50"), r.get("ttfb99")),
                _pair(_diff(r, direct, "ttfb50"), _diff(r, direct, "ttfb99"), _signed)
                if is_sut and r.get("ttfb50") is not None else DASH,
                _num(r.get("cpu_us_req")) if is_sut else DASH,
                _num(r.get("cpu_us_event")) if is_sut else DASH,
                _num(r["peak_rss_kb"] / 1024) if is_sut and r.get("peak_rss_kb") else DASH,
                _num(r.get("kb_per_stream")) if is_sut else DASH,
                _errors(r),
                f"{_num(r.get('sut_busy'))}% / {_num(r.get('load_busy'))}%" + (" ⚠" if disturbed(r) else ""),
            ]) + " |")
    return "\n".join(lines)


FOREIGN_LIMIT = 10.0   # percentage points of a core used by processes not ours


def disturbed(r: Row) -> bool:
    return max(r.get("sut_foreign") or 0.0, r.get("load_foreign") or 0.0) > FOREIGN_LIMIT


SATURATION_MS = 50.0   # direct-to-mock TTFB spread that means the load core fell behind


def load_saturated(direct: Optional[Row]) -> bool:
    """Paced streams straight to the mock whose first bytes came late: the load core (mock and
    load generator share it) could not keep up by itself, so no figure of that scenario says
    anything about the system under test."""
    if not _ok(direct) or direct.get("ttfb50") is None or direct.get("ttfb99") is None:
        return False
    return direct["ttfb99"] - direct["ttfb50"] > SATURATION_MS


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def idle_table(idle: dict[str, list[int]]) -> str:
    lines = ["| target | idle RSS MB (after start and one request; max of the starts) |", "|---|---|"]
    for name, values in idle.items():
        if values:
            lines.append(f"| {TARGET_LABELS.get(name, name)} | {_num(max(values) / 1024)} |")
    return "\n".join(lines)


def metering_table(rows: list[Row], order: list[str]) -> str:
    return paired_table(rows, order, "proxy-nometer", "metering")


def observe_table(rows: list[Row], order: list[str]) -> str:
    """All plugins with metrics and the access log on (the default) against the same with both off; for paced
    streams the CPU per forwarded event is the figure that matters."""
    return paired_table(rows, order, "proxy-noobserve", "metrics and access log", per_event=True)


def fast_heads_table(rows: list[Row], order: list[str]) -> str:
    """All plugins with the fast head parsers (the default) against the same with h11 for every head: what
    the fast path gains shows as a negative cost."""
    return paired_table(rows, order, "proxy-h11", "fast heads")


def paired_table(rows: list[Row], order: list[str], without: str, what: str, per_event: bool = False) -> str:
    """The `proxy` rows against the `without` rows of the same scenarios: what `what` costs."""
    grouped = by_scenario(rows)
    event = " | CPU µs/event with / without" if per_event else ""
    lines = [f"| scenario | req/s with {what} | without | throughput cost | CPU µs/req with / without "
             f"| CPU cost{event} |", "|---|---|---|---|---|---|" + ("---|" if per_event else "")]
    for key in order:
        full, bare = grouped.get(key, {}).get("proxy"), grouped.get(key, {}).get(without)
        if not (_ok(full) and _ok(bare)):
            continue
        cost = 100.0 * (bare["rps"] - full["rps"]) / bare["rps"] if bare["rps"] else None
        # CPU per request is the steadier measure when the machine is not quiet.
        fc, bc = full.get("cpu_us_req"), bare.get("cpu_us_req")
        cpu_cost = f"{_num(100.0 * (fc - bc) / bc)}%" if fc is not None and bc else DASH
        events = (f" {_num(full.get('cpu_us_event'))} / {_num(bare.get('cpu_us_event'))} |"
                  if per_event else "")
        lines.append(f"| {key}: {full['label']} | {_num(full['rps'])} | {_num(bare['rps'])} | "
                     f"{_num(cost) + '%' if cost is not None else DASH} | "
                     f"{_num(full.get('cpu_us_req'))} / {_num(bare.get('cpu_us_req'))} | {cpu_cost} |{events}")
    return "\n".join(lines) if len(lines) > 2 else "(needs both proxy rows)"


def _check(ok: Optional[bool]) -> str:
    return "not measured" if ok is None else ("PASS" if ok else "MISS")


def targets(rows: list[Row], idle: dict[str, list[int]]) -> str:
    """The performance targets, for one worker on one core, checked against this run."""
    g = by_scenario(rows)

    def get(key: Optional[str], target: str) -> Optional[Row]:
        r = g.get(key, {}).get(target) if key else None
        return r if _ok(r) else None

    out = []

    def line(text: str, ok: Optional[bool], got: str, *used: Optional[Row]) -> None:
        verdict = _check(ok)
        if ok is not None and any(r and disturbed(r) for r in used):
            verdict += " ⚠ (disturbed run)"
        out.append(f"| {text} | {got} | {verdict} |")

    p, n = get("a-c64", "proxy"), get("a-c64", "nginx")
    line("(a) c=64: req/s at least 15% of nginx (all plugins)",
         (p["rps"] / n["rps"] >= 0.15) if p and n else None, _pct(p and p["rps"], n and n["rps"]), p, n)
    for key in ("a-c64", "f-c64"):
        p, n = get(key, "proxy"), get(key, "nginx")
        line(f"({key[0]}) c=64: req/s at least 20% of nginx (all plugins)",
             (p["rps"] / n["rps"] >= 0.20) if p and n else None, _pct(p and p["rps"], n and n["rps"]), p, n)
    p, d = get("a-c1", "proxy"), get("a-c1", "direct")
    added = _diff(p, d, "p50") if p and d else None
    line("(a) c=1: added p50 latency under 0.3 ms", (added < 0.3) if added is not None else None,
         f"{_signed(added)} ms", p, d)
    ckey = next((k for k in g if k.startswith("c-")), None)
    p, n = get(ckey, "proxy"), get(ckey, "nginx")
    line(f"({ckey or 'c'}) streams/s at least 25% of nginx", (p["rps"] / n["rps"] >= 0.25) if p and n else None,
         _pct(p and p["rps"], n and n["rps"]), p, n)
    line(f"({ckey or 'c'}) streams/s at least 35% of nginx", (p["rps"] / n["rps"] >= 0.35) if p and n else None,
         _pct(p and p["rps"], n and n["rps"]), p, n)
    p, d = get("d-5000", "proxy"), get("d-5000", "direct")
    added = _diff(p, d, "ttfb99") if p and d else None
    got = f"{_signed(added)} ms"
    if load_saturated(d):
        got += f" (⚠ load side saturated: direct-to-mock TTFB p99 {_num(d['ttfb99'])} ms)"
    line("(d) 5,000 streams: added p99 TTFB under 20 ms", (added < 20) if added is not None else None,
         got, p, d)
    line("(d) 5,000 streams: CPU under 10 µs per forwarded event",
         (p["cpu_us_event"] < 10) if p and p.get("cpu_us_event") is not None else None,
         f"{_num(p and p.get('cpu_us_event'))} µs", p)
    line("(d) 5,000 streams: under 25 KB resident per open stream",
         (p["kb_per_stream"] < 25) if p and p.get("kb_per_stream") is not None else None,
         f"{_num(p and p.get('kb_per_stream'))} KB", p)
    line("(d) 5,000 streams: no errors", (not p["errors"]) if p else None, _errors(p) if p else DASH, p)
    n, d = get("d-2000", "nginx"), get("d-2000", "direct")
    for target, workers in (("proxy", "1 worker"), ("proxy-w2", "--workers 2")):
        p = get("d-2000", target)
        added = _diff(p, d, "ttfb99") if p and d else None
        line(f"(d) 2,000 streams at 1,000/s, {workers}: added p99 TTFB under 50 ms",
             (added < 50) if added is not None else None, f"{_signed(added)} ms", p, d)
        mine, theirs = p and p.get("cpu_us_event"), n and n.get("cpu_us_event")
        ratio = mine / theirs if mine is not None and theirs else None
        line(f"(d) 2,000 streams at 1,000/s, {workers}: CPU per event at most 1.5x nginx's",
             (ratio <= 1.5) if ratio is not None else None,
             f"{_num(mine)} µs against {_num(theirs)} µs ({_num(ratio)}x)", p, n)
    full, bare = get("a-c64", "proxy"), get("a-c64", "proxy-nometer")
    cost = 100.0 * (bare["rps"] - full["rps"]) / bare["rps"] if full and bare and bare["rps"] else None
    line("metering costs under 5% of throughput (a, c=64)", (cost < 5) if cost is not None else None,
         f"{_num(cost)}%", full, bare)
    bare = get("a-c64", "proxy-noobserve")
    cost = 100.0 * (bare["rps"] - full["rps"]) / bare["rps"] if full and bare and bare["rps"] else None
    line("metrics and access log cost under 3% of throughput (a, c=64)", (cost < 3) if cost is not None else None,
         f"{_num(cost)}%", full, bare)
    vals = idle.get("proxy") or []
    line("idle resident memory under 60 MB", (max(vals) / 1024 < 60) if vals else None,
         f"{_num(max(vals) / 1024) if vals else DASH} MB")
    return "\n".join(["| target | this run | |", "|---|---|---|", *out])


def problems(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"- {r['scenario']} / {TARGET_LABELS.get(r['target'], r['target'])}: "
                         f"{r['status']}: {_short(r.get('note', ''), 600)}")
        if r.get("status") == "ok" and disturbed(r):
            lines.append(f"- {r['scenario']} / {TARGET_LABELS.get(r['target'], r['target'])}: ⚠ other work on the "
                         f"machine: SUT core {_num(r.get('sut_foreign'))} and load core "
                         f"{_num(r.get('load_foreign'))} points busier than our processes account for; "
                         f"run this scenario again (`--scenarios {r['scenario']}`)")
        if r.get("target") == "direct" and load_saturated(r):
            lines.append(f"- {r['scenario']} / direct to mock: ⚠ the load core could not drive this scenario "
                         f"by itself (TTFB p50 {_num(r['ttfb50'])} ms, p99 {_num(r['ttfb99'])} ms straight to "
                         f"the mock): its other rows measure the load side as much as the target")
        if r.get("status") == "ok" and r.get("errors"):
            lines.append(f"- {r['scenario']} / {TARGET_LABELS.get(r['target'], r['target'])}: {_errors(r)}"
                         + (f"; first: {_short(r['first_error'], 300)}" if r.get("first_error") else ""))
    return "\n".join(lines) if lines else "none"
