"""Observability and HTTP hardening, unit level: log lines a client cannot dress up, metrics files that
survive PID reuse, an h11 that frames chunked bodies safely.  Each docstring says what could go wrong and the
behaviour that prevents it."""
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
    """A value with control characters (ESC sequences that clear the screen or recolour it, NUL, DEL, C1) is
    quoted and escaped in the text log, as JSON escapes it, so no raw control character reaches a terminal.  The
    gateway refuses such model ids before they are recorded; a plugin's key name or a looser check would reach here."""
    line = _text_line("\x1b[2J\x1b[Hforged\x00\x7f")
    assert line.endswith("\n")
    found = sorted({c for c in line[:-1] if c in _CONTROLS})
    assert not found, f"raw control characters in a text log line: {found!r}"


def _requests_snapshot(count: int) -> dict:
    return {"counters": {"apertis_requests": [["endpoint"], [[["/v1/messages"], count]]]}}


def test_a_dead_workers_counts_survive_a_later_worker_with_the_same_pid(tmp_path):
    """A dead worker's counts stay in the total when its PID comes back for a later worker that dies too (PIDs
    wrap quickly in a container): each dead worker's file has a name of its own."""
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
    """h11 before 0.16.0 takes any two bytes after a chunk's data as its CRLF (CVE-2025-43859); chunked request
    bodies are framed by h11, so `5\\r\\nhelloXX0\\r\\n\\r\\n` would pass.  The package allows no such h11."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    h11 = next(Requirement(r) for r in requires("apertis-proxy") or [] if Requirement(r).name == "h11")
    allowed = [v for v in ("0.14.0", "0.15.0") if h11.specifier.contains(v)]
    assert not allowed, f"h11 {allowed} allowed by {h11}"


async def test_a_worker_that_cannot_listen_for_asks_still_shares_its_figures(tmp_path):
    """A run directory whose socket path is too long for AF_UNIX (a long TMPDIR): the worker starts anyway, and
    scrapes read the others' files as last written."""
    from apertis_proxy.observe import shared
    run_dir = tmp_path / ("d" * 120)
    run_dir.mkdir()
    shared.write(str(run_dir), 4242, _requests_snapshot(3))

    async def snapshot() -> dict:
        return _requests_snapshot(1)
    share = shared.WorkerShare(str(run_dir), snapshot, interval=30.0)
    share.start()
    try:
        others = await share.fresh_others(timeout=0.2)
    finally:
        await share.close()
    assert [s["counters"]["apertis_requests"][1][0][1] for s, _ in others] == [3]


def test_a_worker_file_renamed_while_a_scrape_reads_is_read_under_its_new_name(tmp_path, monkeypatch):
    """A worker that ends between a scrape's listing of the run directory and its read of the worker's file:
    its counts are read from the dead file (once), not left out of that scrape as if reset."""
    from pathlib import Path

    from apertis_proxy.observe import shared
    run_dir = str(tmp_path)
    shared.write(run_dir, 4242, _requests_snapshot(5))
    shared.write(run_dir, 4343, _requests_snapshot(1))
    read_bytes = Path.read_bytes

    def ends_meanwhile(path: Path) -> bytes:
        if path.name == "worker-4242.json":
            shared.mark_dead(run_dir, 4242)
        return read_bytes(path)
    monkeypatch.setattr(Path, "read_bytes", ends_meanwhile)
    others = shared.read_others(run_dir, own_pid=1)
    assert sorted(s["counters"]["apertis_requests"][1][0][1] for s, _ in others) == [1, 5]


def test_a_long_path_is_cut_so_a_line_is_one_atomic_pipe_write():
    """Lines from several workers share one stderr pipe; a write of at most PIPE_BUF bytes is never split by
    another's.  A request for a path of thousands of characters (quotes doubled by the escaping) still gets a
    line within PIPE_BUF, its path cut and marked."""
    from apertis_proxy.observe.access_log import PIPE_BUF
    path = "/v1/" + '"' * 6000
    record = UsageRecord(request_id="req_1", started_at=0.0, endpoint="", key_name="alice",
                         requested_model="m" * 256, upstream_model="m" * 256, status=404, error_type="not_found_error")
    for fmt in ("text", "json"):
        log = AccessLog(fmt)
        line = log.lines([log.entry(0.0, 0.01, 404, "GET", path, "127.0.0.1:5", "req_1", record)])
        assert len(line) <= PIPE_BUF and line.count(b"...") == 2, (fmt, len(line))
