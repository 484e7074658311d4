"""README, "Configuration": `serve --workers N`: "processes share the port with `SO_REUSEPORT`"; the port may be 0
(any free port, as `[server] port` allows 0..65535), and `serve` announces the one it listens on.

`serve --workers 2 --port 0`: the port announced is the one both workers listen on, so that every worker gets
connections (else one worker listens on a port nobody was told, and the other takes all the traffic).  If several
workers cannot share a port chosen by the kernel, `serve` should refuse the combination with one line instead."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.processes import clean_env
from tests.support.workers import TCP_LISTEN, children_of, sockets_of


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets and processes from Linux /proc")
def test_two_workers_on_port_zero_listen_on_the_port_announced(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "apertis_proxy", "serve", "--db", str(tmp_path / "g.db"),
                             "--host", "127.0.0.1", "--port", "0", "--workers", "2"],
                            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    announced: list[int] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            match = re.search(r"listening on https?://[^:]+:(\d+)", line)
            if match and not announced:
                announced.append(int(match.group(1)))
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(30) and announced, "".join(lines)
        if proc.poll() is not None:
            # Refusing port 0 with several workers (one line, exit 1) is fine too.
            assert proc.returncode == 1, "".join(lines)
            return
        port = announced[0]
        listening: dict[int, int] = {}
        for _ in range(100):        # both workers up (each listens once it has started)
            workers = children_of(proc.pid)
            listening = {w: sockets_of(w, local_port=port, state=TCP_LISTEN) for w in workers}
            if len(workers) == 2 and all(listening.values()):
                break
            threading.Event().wait(0.1)
        other_ports = {w: sockets_of(w, state=TCP_LISTEN) for w in children_of(proc.pid)}
        assert len(listening) == 2 and all(n == 1 for n in listening.values()), (
            f"port {port} announced; listening sockets on it per worker: {listening}; "
            f"listening sockets of any port per worker: {other_ports}")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        reader.join(5)
