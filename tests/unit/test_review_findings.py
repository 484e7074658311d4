"""Defects found by a review of the fast head parser and observability: each test fails on main.

Each test's docstring says what is wrong and what the right behaviour is.
"""
from __future__ import annotations

from apertis_proxy.observe.access_log import AccessLog
from apertis_proxy.plugin_api import UsageRecord

# What a terminal or a log viewer acts on: C0 controls (ESC starts an escape sequence, NUL truncates in C
# tools) and DEL.  A text log line may hold none of them but its final newline.
_CONTROLS = {chr(c) for c in range(0x20)} | {"\x7f"}


def _text_line(requested_model: str) -> str:
    record = UsageRecord(request_id="req_1", started_at=0.0, endpoint="/v1/messages", key_name="alice",
                         requested_model=requested_model, status=404, error_type="not_found_error")
    log = AccessLog("text")
    return log.lines([log.entry(0.0, 0.01, 404, "POST", "/v1/messages", "127.0.0.1:5", "req_1", record)]).decode()


def test_text_access_log_escapes_control_characters_in_a_clients_model_name():
    """The text access log writes a value bare when it has no whitespace, quote, `=` or backslash
    (access_log._PLAIN, whose comment promises "a client's model name cannot forge a line"), so control
    characters that are not whitespace pass through raw: ESC sequences (clear the screen, move the
    cursor, recolour), NUL, DEL.  Latent today: the gateway refuses a model id of anything but lowercase
    letters, digits and `._-:@/` before it is recorded (checked end to end: the line then shows
    `requested_model=-`), and the other text fields are operator-set or h11-validated; a plugin's key name or
    a looser model check would reach it.  Right: a value with any control character is quoted and escaped,
    as orjson escapes it in the JSON format."""
    line = _text_line("\x1b[2J\x1b[Hforged\x00\x7f")
    assert line.endswith("\n")
    found = sorted({c for c in line[:-1] if c in _CONTROLS})
    assert not found, f"raw control characters in a text log line: {found!r}"


def _requests_snapshot(count: int) -> dict:
    return {"counters": {"apertis_requests": [["endpoint"], [[["/v1/messages"], count]]]}}


def test_a_dead_workers_counts_survive_a_later_worker_with_the_same_pid(tmp_path):
    """shared.mark_dead() renames `worker-PID.json` to `dead-PID.json` with os.replace: when the PID of a
    worker that died is reused by a later worker that also dies (PIDs wrap, quickly in a container's small
    PID space), the second rename overwrites the first dead worker's file and its requests leave every later
    total, a counter reset as Prometheus reads it.  Right: a dead worker's counts stay whatever PID comes
    next (a unique file name per worker life, or the dead ones folded into one total)."""
    from apertis_proxy.observe import shared
    run_dir = str(tmp_path)
    shared.write(run_dir, 4242, _requests_snapshot(7))      # a worker serves 7 requests, then is killed
    shared.mark_dead(run_dir, 4242)
    shared.write(run_dir, 4242, _requests_snapshot(2))      # its PID comes back for a later worker: 2, killed
    shared.mark_dead(run_dir, 4242)
    snapshots = shared.read_others(run_dir, own_pid=1)
    counted = sum(value for snapshot, _ in snapshots
                  for _, value in snapshot["counters"]["apertis_requests"][1])
    assert counted == 9, f"the dead workers' 7 + 2 requests sum to {counted}"


def test_no_h11_with_the_chunked_body_smuggling_flaw_is_allowed():
    """setup.cfg allows h11>=0.14 (and .ci/h11-range tests 0.14.0 as the lowest), but h11 up to 0.15.0 takes
    any two bytes after a chunk's data as its CRLF (GHSA-vqfr-h8mv-ghfj, CVE-2025-43859, fixed in 0.16.0).
    Chunked request bodies are framed by h11 on the server's path, so an install that resolves to 0.14 or
    0.15 accepts `5\\r\\nhelloXX0\\r\\n\\r\\n` (checked by hand: `serve` with h11 0.14.0 on its path forwards
    such a Messages request and answers 200; with 0.16.0 it answers 400 "malformed chunk footer"), the shape
    that smuggles a request past a front end that reads to the next CRLF.
    Right: the range starts at 0.16.0, and the lowest h11 the CI tries is 0.16.0."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    h11 = next(Requirement(r) for r in requires("apertis-proxy") or [] if Requirement(r).name == "h11")
    allowed = [v for v in ("0.14.0", "0.15.0") if h11.specifier.contains(v)]
    assert not allowed, f"h11 {allowed} allowed by {h11}"
