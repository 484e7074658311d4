"""Instructions per request, counted by valgrind's callgrind: a figure the machine's noise does not move.

    python bench/instructions.py                      # 2,000 small JSON requests, every plugin on
    python bench/instructions.py --no-meter           # the same with metering off
    python bench/instructions.py --stream             # bulk SSE streams: per stream and per event
    python bench/instructions.py --path /health       # the HTTP layer alone (no upstream, no plugins)

Wall-clock figures on a shared virtual machine drift 10-20% within minutes, so a
change worth 2% cannot be seen in `run.py`'s table.  This counts the user-space
instructions the proxy process executes (every thread: the event loop and the
SQLite writer) while it serves a fixed number of requests: the same code gives
the same count to within about 0.1%, whatever else the machine is doing.  Use it
to decide whether an optimisation pays; use `run.py` for what users see.

What it does: starts the mock upstream, then `apertis-proxy serve --workers 1`
under `valgrind --tool=callgrind --instr-atstart=no` (about 50 times slower, so
counts only), sends a warm-up, switches counting on with `callgrind_control`,
sends N requests over 8 keep-alive connections, waits for the meter's flush,
switches counting off and divides.  Kernel time (the socket calls) is not
counted: compare it with `run.py`'s CPU per request to see the split.

Needs valgrind (Debian: `apt-get install valgrind`).  `--keep` keeps the work
directory with the callgrind output for `callgrind_annotate`.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from services import (ServiceError, pinned, proxy_command, setup_proxy_db, start_mock, tail, wait_port,
                      write_config, free_port, Service)

CONNECTIONS = 8


def request_bytes(key: str, path: str, stream: bool) -> bytes:
    body = (b'{"model": "claude-sonnet-4.5", "max_tokens": 64, '
            + (b'"stream": true, ' if stream else b"")
            + b'"messages": [{"role": "user", "content": "' + b"x" * 900 + b'"}]}')
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"x-api-key: " + key.encode() + b"\r\nanthropic-version: 2023-06-01\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body)


async def _one_connection(port: int, request: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the proxy answered {head[:120]!r}")
            lower = head.lower()
            if b"content-length:" in lower:
                await reader.readexactly(int(lower.split(b"content-length:")[1].split(b"\r\n")[0]))
            else:
                await reader.readuntil(b"\r\n0\r\n\r\n")
    finally:
        writer.close()


def send(port: int, request: bytes, total: int) -> None:
    per = max(1, total // CONNECTIONS)

    async def main() -> None:
        await asyncio.gather(*(_one_connection(port, request, per) for _ in range(CONNECTIONS)))
    asyncio.run(main())


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def count(python: str, workdir: Path, db: Path, key: str, *, meter: bool, path: str,
          stream: bool, requests: int, cpu: Optional[int]) -> int:
    """Instructions the proxy executed while serving `requests` requests."""
    config = write_config(workdir, "meter" if meter else "nometer", meter)
    out = workdir / f"callgrind-{time.monotonic_ns()}.out"
    port = free_port()
    log = workdir / "proxy-valgrind.log"
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            python, "-m", "apertis_proxy", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--db", str(db), "--workers", "1", "--config", str(config)]
    # cwd: `python -m` puts the working directory first on sys.path, and a
    # checkout there would shadow the environment's installed copy.
    proc = subprocess.Popen(pinned(argv, cpu), stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=workdir)
    svc = Service("proxy", proc, port, log)
    try:
        wait_port(port, proc, 180, "apertis-proxy under valgrind", log)
        request = request_bytes(key, path, stream)
        send(port, request, 200)                      # warm-up: imports, pools, caches
        time.sleep(1.0)
        callgrind_control("-i", "on", str(proc.pid))
        send(port, request, requests)
        time.sleep(1.5)                               # the meter writes within 0.5 s
        callgrind_control("-i", "off", str(proc.pid))
        callgrind_control("-d", str(proc.pid))
    finally:
        svc.stop(grace=60)
    # One file per dump (the one asked for, and the final one at exit).
    total = 0
    for part in workdir.glob(out.name + "*"):
        for line in part.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    if total == 0:
        raise ServiceError(f"callgrind counted nothing; see {log}: {tail(log)}")
    return total


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests (or streams) counted (2000)")
    ap.add_argument("--no-meter", action="store_true", help="metering off ([plugins] meter = [])")
    ap.add_argument("--stream", action="store_true",
                    help="bulk SSE streams, counted at 10 and at 110 events: per stream and per event")
    ap.add_argument("--path", default="/v1/messages", help="request path (/health: the HTTP layer alone)")
    ap.add_argument("--python", default=sys.executable, help="Python whose environment has apertis-proxy")
    ap.add_argument("--cpu", type=int, default=1, help="CPU for the proxy (the mock and client use CPU 0)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found; install valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
            return 2
    cmd = proxy_command(args.python)
    if cmd is None:
        print("bench: apertis-proxy is not installed in this environment (pip install -e .)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="apertis-instructions-"))
    mock = start_mock(args.python, 0, workdir, tick_ms=10)
    try:
        db, key = setup_proxy_db(cmd, workdir, mock.port)
        meter = not args.no_meter
        label = f"{args.path}, {'metering on' if meter else 'metering off'}"
        if not args.stream:
            n = count(args.python, workdir, db, key, meter=meter, path=args.path, stream=False,
                      requests=args.requests, cpu=args.cpu)
            print(f"{label}: {n / args.requests:,.0f} instructions per request ({args.requests} requests)")
            return 0
        figures = {}
        for events in (10, 110):
            path = f"{args.path}?events={events}&ttfb_ms=0&gap_ms=0"
            figures[events] = count(args.python, workdir, db, key, meter=meter, path=path, stream=True,
                                    requests=args.requests, cpu=args.cpu) / args.requests
        per_event = (figures[110] - figures[10]) / 100
        print(f"{label}, bulk SSE: {figures[10]:,.0f} instructions per stream of 10 events, "
              f"{figures[110]:,.0f} per stream of 110; {per_event:,.0f} per event ({args.requests} streams each)")
        return 0
    finally:
        mock.stop()
        if args.keep:
            print(f"bench: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
