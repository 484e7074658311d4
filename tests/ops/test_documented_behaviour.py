"""README.md and docs/plugins.md followed literally by a new operator and a plugin author.

Each test quotes the sentence it checks.  Real processes (`python -m apertis_proxy ...`), real sockets on
127.0.0.1, the mock upstream; a third-party plugin installed as a module beside its .dist-info on PYTHONPATH, the
way an installed distribution is found through its entry points.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import re
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.plugin_dist import plugin_site
from tests.support.processes import CliRunner, ServeProcess, clean_env, wait_for

# --------------------------------------------------------------------------------------------------------------
# helpers


def run_cli(cwd: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apertis_proxy", *args], cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=30)


def serve_until_listening(cwd: Path, *args: str, env=None, timeout: float = 10.0) -> tuple[str, str]:
    """`serve ARGS` until it logs that it listens, then SIGTERM; (stdout, stderr) of the whole run."""
    proc = subprocess.Popen([sys.executable, "-m", "apertis_proxy", "serve", *args], cwd=cwd,
                            env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    err: list[str] = []
    listening = threading.Event()

    def pump(stream, sink, watch):
        for line in stream:
            sink.append(line)
            if watch and "listening on" in line:
                listening.set()

    threads = [threading.Thread(target=pump, args=(proc.stdout, out, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, True), daemon=True)]
    for t in threads:
        t.start()
    try:
        assert listening.wait(timeout), f"serve did not start:\n{''.join(out)}{''.join(err)}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for t in threads:
            t.join(5)
    return "".join(out), "".join(err)


# --------------------------------------------------------------------------------------------------------------
# README "Logs": with [logging] format = "json" every line the process writes is one JSON object


def test_json_log_format_every_line_the_process_writes_is_json(tmp_path):
    """README.md, "Logs": 'With `[logging] format = "json"` every line the process writes is one JSON object with
    `time` (UTC), `level`, `logger` and `message`'.  `serve` started as the README's "Run it" says (no channel, no
    key yet) prints its start-up hint too: as such a line."""
    (tmp_path / "apertis.toml").write_text('[logging]\nformat = "json"\n')
    out, err = serve_until_listening(tmp_path, "--port", "0", "--config", "apertis.toml")
    not_json = []
    for stream, text in (("stdout", out), ("stderr", err)):
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                not_json.append(f"{stream}: {line}")
                continue
            if not (isinstance(obj, dict) and {"time", "level", "logger", "message"} <= obj.keys()):
                not_json.append(f"{stream}: {line}")
    assert not not_json, ("format = \"json\": lines the process wrote that are not one JSON object with time, "
                          "level, logger and message:\n" + "\n".join(not_json))


# --------------------------------------------------------------------------------------------------------------
# docs/plugins.md: a third-party plugin, written and installed as the document says

PROBE_MODULE = '''
import json
import os

from apertis_proxy.plugin_api import Caller


def _note(event, **fields):
    with open(os.environ["PROBE_OUT"], "a") as fh:
        fh.write(json.dumps({"event": event, **fields}, default=repr) + "\\n")


class Probe:
    """auth, router and meter at once: notes every documented hook and its arguments."""

    def __init__(self, ctx):
        _note("factory", name=ctx.name, options=dict(ctx.options), db_path=ctx.db_path,
              worker=ctx.worker, workers=ctx.workers, logger=ctx.log.name, store=ctx.store is not None,
              meters=list(ctx.meters))

    async def start(self):
        _note("start")

    async def close(self):
        _note("close")

    # auth
    def check_head(self, request):
        if "x-probe-user" in request.headers:
            _note("check_head", body=request.body, model=request.model, request_id=request.request_id)
            return True
        return None

    async def authenticate(self, request):
        user = request.headers.get("x-probe-user")
        if not user:
            return None
        _note("authenticate", method=request.method, path=request.path, query=request.query,
              model=request.model, stream=request.stream, client=request.client, request_id=request.request_id,
              body_model=(request.body or {}).get("model"), joined=request.headers.get("x-twice"),
              body_bytes=request.body_bytes)
        return Caller(key_id=None, key_name="probe-" + user)

    async def release(self, caller, record):
        _note("release", key_name=caller.key_name, request_id=record.request_id, status=record.status)

    async def finish(self, caller, record):
        _note("finish", key_name=caller.key_name, request_id=record.request_id, cost=record.cost)

    # router
    async def route(self, request, caller):
        _note("route", key_name=caller.key_name, model=request.model, request_id=request.request_id)
        return None

    def feedback(self, outcome):
        _note("feedback", ok=outcome.ok, channel=outcome.channel.name, request_id=outcome.request_id)

    # meter
    async def record(self, record):
        _note("record", request_id=record.request_id, key_name=record.key_name, status=record.status,
              channel=record.channel_name, input_tokens=record.input_tokens)
'''


@pytest.fixture(scope="module")
def probe_site(tmp_path_factory) -> Path:
    return plugin_site(tmp_path_factory.mktemp("probe-plugin"), "docs_probe", PROBE_MODULE,
                       {group: {"probe": "docs_probe:Probe"}
                        for group in ("apertis_proxy.auth", "apertis_proxy.router", "apertis_proxy.meter")})


PROBE_CONFIG = """
[plugins]
auth = ["probe", "keys"]
router = ["probe", "channels"]
meter = ["sqlite", "probe"]
"""


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def _serve_with_probe(tmp_path: Path, probe_site: Path, upstream: MockUpstream, config: str = PROBE_CONFIG):
    db = str(tmp_path / "apertis.db")
    out = tmp_path / "probe.jsonl"
    env = clean_env(PYTHONPATH=os.pathsep.join([str(probe_site), os.environ.get("PYTHONPATH", "")]),
                    PROBE_OUT=str(out))
    cli = CliRunner(tmp_path, db, env=env)
    await cli.add_channel("main", upstream.base_url)
    (tmp_path / "apertis.toml").write_text(config)
    server = ServeProcess(tmp_path, db, "--config", str(tmp_path / "apertis.toml"), env=env)
    return server, out


async def test_plugin_options_are_its_table_over_the_gateway_settings(tmp_path, probe_site):
    """docs/plugins.md, "Factory and life cycle": ctx `options` is 'its `[plugins.options.NAME]` table merged over
    the gateway settings plugins act on, the table's own keys winning': poll_interval, the [limits] values, the
    [budgets] ones only with a webhook_url, and for a meter the [ledger] spool settings; `meters` names the
    meter plugins."""
    config = PROBE_CONFIG + "\n[server]\nconfig_poll_interval = 0.5\n[limits]\nlease_seconds = 12.0\n" \
        "[ledger]\nspool_max_bytes = 65536\n[plugins.options.probe]\nlimits_on_store_down = \"share\"\nown = 7\n"
    async with MockUpstream(api_key=MOCK_API_KEY) as upstream:
        server, out = await _serve_with_probe(tmp_path, probe_site, upstream, config)
        async with server:
            pass
    events = [e for e in _events(out) if e["event"] == "factory"]
    assert len(events) == 3 and all(e["meters"] == ["sqlite", "probe"] for e in events), events
    factories = [e["options"] for e in events]
    shared = {"poll_interval": 0.5, "limits_lease_seconds": 12.0, "limits_on_store_down": "share", "own": 7}
    spool = {"spool_dir", "spool_max_bytes", "spool_warn_bytes", "fsync"}
    meters = [o for o in factories if spool <= o.keys()]
    others = [o for o in factories if o not in meters]
    assert len(meters) == 1 and len(others) == 2, factories
    assert all(o == shared for o in others), others
    (meter,) = meters
    assert {k: meter[k] for k in shared} == shared and meter.keys() == shared.keys() | spool, meter
    assert meter["spool_max_bytes"] == 65536 and meter["fsync"] == "batch" and meter["spool_dir"], meter
    assert not any(k.startswith("budget_") for o in factories for k in o), "no webhook_url, no budget options"


def _post_head_then_body(port: int, body: bytes) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/messages?beta=true")
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("X-Probe-User", "zoe"), ("X-Twice", "a"), ("X-Twice", "b")):
            conn.putheader(name, value)
        conn.endheaders()           # the head alone: the body follows in another write
        time.sleep(0.05)
        conn.send(body)
        response = conn.getresponse()
        return response.status, response.getheader("request-id"), response.read()
    finally:
        conn.close()


async def test_plugin_hooks_get_the_documented_arguments(tmp_path, probe_site):
    """docs/plugins.md: authenticate(request) sees method, path (no query), query, lower-cased headers with repeats
    joined by ", ", the parsed body, model, stream, client "ip:port" and request_id; the first Caller wins; route
    (request, caller); feedback(outcome) after every attempt; release() then finish() exactly once for the
    request the plugin authenticated; every meter's record() once; check_head() before the body for a body that
    is not whole with its head."""
    async with MockUpstream(api_key=MOCK_API_KEY) as upstream:
        server, out = await _serve_with_probe(tmp_path, probe_site, upstream)
        async with server:
            body = json.dumps({"model": "claude-haiku-4-5-20251001", "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            # in a thread: the mock upstream runs in this event loop
            status, request_id, payload = await asyncio.to_thread(_post_head_then_body, server.port, body)
            assert status == 200, payload

            async def finished() -> bool:
                return any(e["event"] == "finish" for e in _events(out)) and any(
                    e["event"] == "record" and e["request_id"] == request_id for e in _events(out))
            try:
                await wait_for(finished, 5.0, "finish() and record() of the probe's request")
            except AssertionError:
                raise AssertionError(f"{request_id}: {_events(out)}\n{server.stderr[-3000:]}") from None
            assert await server.stop() == 0, server.stderr       # SIGTERM: every plugin's close()
        events = _events(out)
    mine = [e for e in events if e.get("request_id") == request_id or e["event"] == "check_head"]
    kinds = [e["event"] for e in mine]
    auth = next(e for e in mine if e["event"] == "authenticate")
    assert auth["method"] == "POST" and auth["path"] == "/v1/messages" and auth["query"] == "beta=true", auth
    assert auth["model"] == "claude-haiku-4-5-20251001" and auth["body_model"] == auth["model"], auth
    assert auth["stream"] is False and auth["joined"] == "a, b", auth
    assert auth["client"].startswith("127.0.0.1:") and auth["client"].rsplit(":", 1)[1].isdigit(), auth
    assert auth["request_id"] == request_id and request_id.startswith("req_"), auth
    assert auth["body_bytes"] == len(body), auth
    check = [e for e in mine if e["event"] == "check_head"]
    assert check and check[0]["body"] is None and check[0]["model"] is None and check[0]["request_id"] == "", check
    route = next(e for e in mine if e["event"] == "route")
    assert route["key_name"] == "probe-zoe", route
    assert kinds.count("release") == 1 and kinds.count("finish") == 1, kinds
    assert kinds.index("release") < kinds.index("finish"), kinds
    assert kinds.count("record") == 1, kinds
    record = next(e for e in mine if e["event"] == "record")
    assert record["key_name"] == "probe-zoe" and record["channel"] == "main" and record["status"] == 200, record
    assert any(e["event"] == "feedback" and e["ok"] and e["channel"] == "main" for e in mine), kinds
    assert [e["event"] for e in events].count("start") == 3 and [e["event"] for e in events].count("close") == 3


# --------------------------------------------------------------------------------------------------------------
# README "The CLI" and "Several hosts on PostgreSQL": db copy, usage --json


def test_db_copy_second_run_reports_no_new_rows(tmp_path):
    """README.md, "The CLI": '`db copy --from DB --to DB` ... a second run copies nothing twice'; the command's
    own line says its counts are 'rows new to the target'.  A second run at once (nothing changed) reports 0 for
    every table, the catalogue's included."""
    assert run_cli(tmp_path, "keys", "create", "alice", "--db", "src.db").returncode == 0
    first = run_cli(tmp_path, "db", "copy", "--from", "src.db", "--to", "dst.db")
    assert first.returncode == 0, first.stderr
    second = run_cli(tmp_path, "db", "copy", "--from", "src.db", "--to", "dst.db")
    assert second.returncode == 0, second.stderr
    counts = dict(re.findall(r"(\w+) (\d+(?:,\d{3})*)", second.stdout.split(":", 1)[1].split("(")[0]))
    new = {table: n for table, n in counts.items() if n != "0"}
    assert not new, f"second run of db copy with nothing changed says these rows are new to the target: {new}\n" \
                    f"{second.stdout}"


def test_db_copy_overwrites_only_the_catalogue_rows_that_changed(tmp_path):
    """The catalogue is the source's: a price changed in the source is written over the target's and counted;
    unchanged rows are not rewritten (the target's config revision does not move for them)."""
    import sqlite3
    assert run_cli(tmp_path, "prices", "set", "house-model", "--input", "1", "--output", "2",
                   "--db", "src.db").returncode == 0
    assert run_cli(tmp_path, "db", "copy", "--from", "src.db", "--to", "dst.db").returncode == 0

    def rev() -> int:
        with sqlite3.connect(tmp_path / "dst.db") as conn:
            return conn.execute("SELECT rev FROM config_rev").fetchone()[0]
    before = rev()
    assert run_cli(tmp_path, "prices", "set", "house-model", "--input", "3", "--output", "4",
                   "--db", "src.db").returncode == 0
    proc = run_cli(tmp_path, "db", "copy", "--from", "src.db", "--to", "dst.db")
    assert proc.returncode == 0, proc.stderr
    assert "model_prices 1" in proc.stdout and "models 0" in proc.stdout, proc.stdout
    assert 0 < rev() - before <= 2, "more than the changed price row was rewritten"
    shown = run_cli(tmp_path, "prices", "show", "house-model", "--db", "dst.db")
    assert "3" in shown.stdout and "4" in shown.stdout, shown.stdout


def test_db_copy_creates_its_missing_target_and_no_other_command_does(tmp_path):
    """README.md, "The CLI": 'Only `serve`, `keys create`, `channels add`, `prices set` and `db copy` (its `--to`
    target) create a database that is not there; every other command refuses with one line naming the file it
    looked for.'  A move to a new file creates it; `db copy --from` a missing file is refused and creates nothing."""
    assert run_cli(tmp_path, "keys", "create", "alice", "--db", "src.db").returncode == 0
    proc = run_cli(tmp_path, "db", "copy", "--from", "src.db", "--to", "missing.db")
    assert proc.returncode == 0 and (tmp_path / "missing.db").exists(), proc.stdout + proc.stderr
    assert "keys 1" in proc.stdout, proc.stdout
    assert (tmp_path / "missing.db").stat().st_mode & 0o777 == 0o600
    refused = run_cli(tmp_path, "db", "copy", "--from", "nothere.db", "--to", "other.db")
    assert refused.returncode != 0 and "nothere.db" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "nothere.db").exists() and not (tmp_path / "other.db").exists()
    listed = run_cli(tmp_path, "keys", "list", "--db", "absent.db")
    assert listed.returncode != 0 and "absent.db" in listed.stderr and not (tmp_path / "absent.db").exists()


def test_usage_json_has_by_with_by_only(tmp_path):
    """README.md, "The CLI": '`--json` prints one object with `requests`, ..., `failed_attempts` and `failures`
    (failed attempts by kind), and with `--by` also `by`.'"""
    assert run_cli(tmp_path, "keys", "create", "alice", "--db", "g.db").returncode == 0
    documented = {"requests", "input_tokens", "output_tokens", "cache_read_input_tokens",
                  "cache_creation_input_tokens", "iteration_tokens", "cost", "errors", "interrupted",
                  "unpriced_requests", "refused", "failed_attempts", "failures"}
    proc = run_cli(tmp_path, "usage", "--json", "--db", "g.db")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert documented <= data.keys() and "by" not in data, f"usage --json: {sorted(data)}"
    proc = run_cli(tmp_path, "usage", "--json", "--by", "key", "--db", "g.db")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert documented | {"by"} <= data.keys(), f"usage --json --by key lacks: {sorted(documented - data.keys())}"


# --------------------------------------------------------------------------------------------------------------
# README "Configuration": settings live in their tables; the file is checked before serve starts


def test_setting_in_the_wrong_table_is_refused(tmp_path):
    """README.md, "Configuration": each setting is documented under its table (`[upstream] read_timeout`, `[server]
    max_body_bytes`), and '`serve` checks the file before it starts: an unknown setting, a setting outside its
    table ... stops it with one line naming the setting (and the table it belongs in)'.  `[upstream]
    max_body_bytes` is refused, not taken as the client body limit."""
    (tmp_path / "apertis.toml").write_text("[upstream]\nmax_body_bytes = 1024\n")
    proc = subprocess.Popen([sys.executable, "-m", "apertis_proxy", "serve", "--port", "0", "--config",
                             "apertis.toml"], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    listening = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                listening.set()
        listening.set()            # exited

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    listening.wait(10)
    if proc.poll() is None and any("listening on" in line for line in lines):
        proc.terminate()
    code = proc.wait(10)
    reader.join(5)
    output = "".join(lines)
    started = "listening on" in output
    assert not started and code != 0 and "max_body_bytes belongs under [server], not [upstream]" in output, (
        "serve accepted `[upstream] max_body_bytes`, a setting [upstream] does not have, and started "
        f"(applying it as [server] max_body_bytes):\n{output[-1500:]}")
