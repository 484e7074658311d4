"""`apertis-proxy serve` in a child process, as a second host would run it: its own store
connections, its own change watcher.  It listens on 127.0.0.1:0; the port is read from its log.

    host = GatewayProcess.start(db_url, tmp_path / "a")
    host = GatewayProcess.start(db_url, tmp_path / "a", tables={"limits": {"lease_seconds": 3}})   # more TOML
    status, headers, body = host.post_message(key)
    host.kill()          # SIGKILL;  host.stop() for SIGTERM
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

CONFIG = """
[server]
host = "127.0.0.1"
port = 0
config_poll_interval = 0.2
shutdown_timeout = 2
drain_delay = 0

[plugins.options.keys]
poll_interval = 0.2

[plugins.options.channels]
poll_interval = 0.2
"""


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))        # a basic TOML string


def toml_tables(tables: dict[str, dict]) -> str:
    """`{"limits": {"lease_seconds": 3}}` as TOML text: "\\n[limits]\\nlease_seconds = 3\\n"."""
    return "".join(f"\n[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())
                   for name, values in tables.items())


class GatewayProcess:
    def __init__(self, proc: subprocess.Popen, port: int, lines: list[str]) -> None:
        self.proc = proc
        self.port = port
        self.lines = lines

    @classmethod
    def start(cls, db_url: str, workdir: Path, timeout: float = 30.0, *,
              tables: Optional[dict[str, dict]] = None, prefix: Sequence[str] = (),
              **meter_options) -> "GatewayProcess":
        """`meter_options` go under [plugins.options.sqlite] (e.g. flush_interval, batch_size); `tables` are
        further TOML tables of the config file, {"limits": {"lease_seconds": 3}} for `[limits]` and its keys.
        The ledger spool is workdir/apertis-ledger.spool: a restart in the same workdir ships what a kill left.
        `prefix` runs the command through another (e.g. unshare: a mount of its own), which must exec it."""
        tables = dict(tables or {})
        if "sqlite" in tables.get("plugins", {}).get("meter", ["sqlite"]):   # options for a meter not run are refused
            tables["plugins.options.sqlite"] = {"flush_interval": 0.05, **meter_options}
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "apertis.toml"
        config.write_text(CONFIG + toml_tables(tables))
        env = {**os.environ, "APERTIS_DB": db_url}
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "apertis_proxy.cli", "serve", "--config", str(config)],
                                cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        found: list[int] = []
        ready = threading.Event()

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                match = re.search(r"listening on https?://[^:]+:(\d+)", line)
                if match and not found:
                    found.append(int(match.group(1)))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or not found:
            proc.kill()
            raise RuntimeError("gateway did not start:\n" + "".join(lines))
        return cls(proc, found[0], lines)

    def request(self, method: str, path: str, key: Optional[str], body: Optional[dict] = None,
                timeout: float = 10.0) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
            if key:
                headers["x-api-key"] = key
            conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                         headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def post_message(self, key: Optional[str], model: str = "claude-haiku-4-5-20251001",
                     **extra) -> tuple[int, dict, bytes]:
        body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **extra}
        return self.request("POST", "/v1/messages", key, body)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    @property
    def log(self) -> str:
        return "".join(self.lines)

