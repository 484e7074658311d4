"""Starting and stopping what the benchmark measures: the mock, nginx and apertis-proxy.

Every server binds 127.0.0.1 and is pinned to one CPU with taskset.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"     # git-ignored: results and profiles of runs; bench/RESULTS.md is the committed one
CHANNEL_KEY = "sk-bench-channel-key"      # what upstream (the mock) expects; not a real secret


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cmd: list[str], cpu: Optional[int | str]) -> list[str]:
    """`cmd` under `taskset -c CPU` (a CPU number or a taskset list such as "1-2")."""
    return cmd if cpu is None else ["taskset", "-c", str(cpu), *cmd]


def find_nginx() -> Optional[str]:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def ensure_tools(wrk: bool = True, nginx: bool = True) -> None:
    """wrk and nginx come from Debian's packages; install the ones asked for if missing (needs root)."""
    wanted = [pkg for pkg, asked in (("wrk", wrk), ("nginx", nginx)) if asked]
    missing = _missing(wanted)
    if not missing:
        return
    hint = f"install them with: apt-get update && apt-get install -y {' '.join(missing)}"
    if shutil.which("apt-get") is None:
        raise SystemExit(f"bench: {', '.join(missing)} missing and apt-get is not available; {hint}")
    if os.geteuid() != 0:
        raise SystemExit(f"bench: {', '.join(missing)} missing and not running as root; {hint}")
    print(f"bench: installing {' '.join(missing)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"bench: '{' '.join(cmd)}' timed out; {hint}") from None
        if res.returncode != 0:
            tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-10:])
            raise SystemExit(f"bench: '{' '.join(cmd)}' failed ({res.returncode}):\n{tail}\n{hint}")
    still = _missing(missing)
    if still:
        raise SystemExit(f"bench: {', '.join(still)} still missing after apt-get install; {hint}")


def _missing(packages: list[str]) -> list[str]:
    found = {"wrk": lambda: shutil.which("wrk"), "nginx": find_nginx}
    return [pkg for pkg in packages if not found[pkg]()]


def wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with {proc.returncode}: {tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServiceError(f"{what} did not listen on port {port} within {timeout:.0f}s: {tail(log)}")


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class Service:
    def __init__(self, name: str, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_mock(python: str, cpu: Optional[int], workdir: Path, tick_ms: float) -> Service:
    log = workdir / "mock.log"
    cmd = pinned([python, str(HERE / "mock_upstream.py"), "--port", "0", "--api-key", CHANNEL_KEY,
                  "--tick-ms", str(tick_ms)], cpu)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("wb"), text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("listening "):
        proc.kill()
        raise ServiceError(f"mock did not start: {line!r} {tail(log)}")
    port = int(line.rsplit(":", 1)[1])
    return Service("mock", proc, port, log)


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {conns}; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream mock {{
        server 127.0.0.1:{mock_port};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header x-api-key "{channel_key}";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


def start_nginx(cpu: Optional[int], workdir: Path, mock_port: int, nofile: int) -> Service:
    """nginx as a plain reverse proxy: one worker, keep-alive to the mock, no buffering of responses."""
    nginx = find_nginx()
    if nginx is None:
        raise ServiceError("nginx not found")
    ndir = workdir / "nginx"
    ndir.mkdir(exist_ok=True)
    port = free_port()
    conf = ndir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(
        user="user root;\n" if os.geteuid() == 0 else "", dir=ndir, nofile=nofile,
        conns=max(1024, nofile - 64), mock_port=mock_port, port=port, channel_key=CHANNEL_KEY))
    log = ndir / "nginx-error.log"
    proc = subprocess.Popen(pinned([nginx, "-p", str(ndir), "-c", str(conf)], cpu),
                            stdout=subprocess.DEVNULL, stderr=(ndir / "stderr.log").open("wb"))
    svc = Service("nginx", proc, port, log)
    try:
        wait_port(port, proc, 15, "nginx", log)
    except ServiceError:
        svc.stop()
        raise
    return svc


def proxy_command(python: str) -> Optional[list[str]]:
    exe = Path(python).parent / "apertis-proxy"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("apertis-proxy")
    return [found] if found else None


def setup_proxy_db(cmd: list[str], workdir: Path, mock_port: int, db: Any = None) -> tuple[Any, str]:
    """A fresh store (a SQLite file, or the database URL `db`) with one channel to the mock and one client key;
    returns (db, key)."""
    db = db or workdir / "apertis-bench.db"
    run = lambda *a: subprocess.run([*cmd, *a, "--db", str(db)], capture_output=True,  # noqa: E731
                                    text=True, timeout=60)
    res = run("channels", "add", "mock", "--base-url", f"http://127.0.0.1:{mock_port}", "--api-key", CHANNEL_KEY)
    if res.returncode != 0:
        raise ServiceError(f"'apertis-proxy channels add' failed: {(res.stdout + res.stderr).strip()[-600:]}")
    res = run("keys", "create", "bench")
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise ServiceError(f"'apertis-proxy keys create' failed: {(res.stdout + res.stderr).strip()[-600:]}")
    return db, lines[-1].strip()


def write_config(workdir: Path, name: str, meter: bool, observe: bool = True, fast_heads: bool = True,
                 extra: str = "") -> Path:
    """The proxy's config file: metering off unless `meter`; metrics and the access log off unless `observe`;
    every head parsed by h11 unless `fast_heads`; `extra` TOML at the end."""
    path = workdir / f"{name}.toml"
    text = "" if fast_heads else "[server]\nfast_heads = false\n"
    text += "" if meter else "[plugins]\nmeter = []\n"
    if not observe:
        text += "[metrics]\nenabled = false\n[logging]\naccess_log = false\n"
    path.write_text(text + extra)
    return path


def start_proxy(cmd: list[str], name: str, cpu: Optional[int | str], workdir: Path, db: Any,
                config: Path, workers: int = 1) -> Service:
    port = free_port()
    log = workdir / f"{name}.log"
    argv = [*cmd, "serve", "--host", "127.0.0.1", "--port", str(port), "--db", str(db), "--workers", str(workers),
            "--config", str(config)]
    proc = subprocess.Popen(pinned(argv, cpu), stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=workdir)
    svc = Service(name, proc, port, log)
    try:
        wait_port(port, proc, 30, name, log)
    except ServiceError:
        svc.stop()
        raise
    return svc


def raise_nofile() -> int:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def python_has(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0
