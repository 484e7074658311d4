"""Instructions per request, counted by valgrind's callgrind: a figure the machine's noise does not move.

    python bench/instructions.py                      # 2,000 small JSON requests, every plugin on
    python bench/instructions.py --no-meter           # the same with metering off
    python bench/instructions.py --no-observe         # the same with metrics and the access log off
    python bench/instructions.py --no-access-log      # metrics on, the access log off
    python bench/instructions.py --json-log           # the access log in JSON instead of text
    python bench/instructions.py --stream             # bulk SSE streams: per stream and per event
    python bench/instructions.py --stream --gap-ms 20 # paced SSE: one event per read, as real streams come
    python bench/instructions.py --path /health       # the HTTP layer alone (no upstream, no plugins)
    python bench/instructions.py --realistic          # the SDK's request head, the API's ~25-header answer
    python bench/instructions.py --limits             # the key with limits: admitted through the store
    python bench/instructions.py --no-fast-heads      # every head parsed by h11 ([server] fast_heads = false)
    python bench/instructions.py --h11 [--realistic]  # the heads alone: h11 and the fast parser on both heads

Wall-clock figures on a shared virtual machine drift 10-20% within minutes, so a
change worth 2% cannot be seen in `run.py`'s table.  This counts the user-space
instructions the proxy process executes (every thread: the event loop and the
SQLite writer) while it serves a fixed number of requests: the same code gives
the same count to within about 0.3%, whatever else the machine is doing.  Use it
to decide whether an optimisation pays; use `run.py` for what users see.

What it does: starts the mock upstream, then `apertis-proxy serve --workers 1`
under `valgrind --tool=callgrind --instr-atstart=no` (about 50 times slower, so
counts only), sends a warm-up, switches counting on with `callgrind_control`,
sends N requests over 8 keep-alive connections, waits for the meter's flush,
switches counting off and divides.  Kernel time (the socket calls) is not
counted: compare it with `run.py`'s CPU per request to see the split.

`--h11` counts what parsing the heads costs, outside the proxy: a fresh
h11.Connection parsing the request head (as the server does), one parsing the
mock's response head (as the upstream side does), and the fast parsers
(http/fast_head.py) on the same bytes, each in a loop in a plain Python process
under callgrind, run for 1 and for N+1 iterations; the difference over N is the
per-request figure.  `--realistic` uses the official SDK's request head (16
headers, bench/scenarios.py SDK_HEADERS) and the mock's answer with an API-like
head of 25 headers (`real_head=1`) instead of the benchmark's small heads.

Needs valgrind (Debian: `apt-get install valgrind`).  `--keep` keeps the work
directory with the callgrind output for `callgrind_annotate`.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from scenarios import SDK_HEADERS
from services import (CHANNEL_KEY, ServiceError, pinned, proxy_command, setup_proxy_db, start_mock, tail, wait_port,
                      write_config, free_port, Service)

CONNECTIONS = 8


def request_bytes(key: str, path: str, stream: bool) -> bytes:
    body = (b'{"model": "claude-sonnet-5-5", "max_tokens": 64, '
            + (b'"stream": true, ' if stream else b"")
            + b'"messages": [{"role": "user", "content": "' + b"x" * 900 + b'"}]}')
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"x-api-key: " + key.encode() + b"\r\nanthropic-version: 2023-06-01\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body)


def sdk_request_bytes(key: str, path: str, stream: bool) -> bytes:
    """The same request as the official Python SDK writes it (its headers, a bearer credential), asking the
    mock for its answer with an API-like head."""
    plain = request_bytes(key, path, stream)
    body = plain[plain.index(b"\r\n\r\n") + 4:]
    path += ("&" if "?" in path else "?") + "real_head=1"
    headers = [("Host", "127.0.0.1"), *SDK_HEADERS, ("Authorization", f"Bearer {key}"),
               ("Content-Length", str(len(body)))]
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)).encode() + b"\r\n" + body


def content_length(head: bytes) -> Optional[int]:
    lower = head.lower()
    if b"content-length:" not in lower:
        return None
    return int(lower.split(b"content-length:")[1].split(b"\r\n")[0])


def callgrind_total(paths) -> int:
    """Instructions recorded in callgrind output files (their `totals:` lines)."""
    total = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


async def _one_connection(port: int, request: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the proxy answered {head[:120]!r}")
            length = content_length(head)
            if length is not None:
                await reader.readexactly(length)
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
          stream: bool, requests: int, cpu: Optional[int], observe: bool = True, realistic: bool = False,
          fast_heads: bool = True, logging: str = "") -> int:
    """Instructions the proxy executed while serving `requests` requests (`logging`: extra [logging] settings)."""
    config = write_config(workdir, f"{'meter' if meter else 'nometer'}-{'observe' if observe else 'noobserve'}"
                                   f"-{'fast' if fast_heads else 'h11'}", meter, observe, fast_heads,
                          f"[logging]\n{logging}" if logging and observe else "")
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
        request = (sdk_request_bytes if realistic else request_bytes)(key, path, stream)
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
    total = callgrind_total(workdir.glob(out.name + "*"))
    if total == 0:
        raise ServiceError(f"callgrind counted nothing; see {log}: {tail(log)}")
    return total


HEAD_LOOP = """\
import gc, sys
side, parser, path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = open(path, "rb").read()
gc.disable()
if parser == "h11":
    import h11
    role = h11.SERVER if side == "server" else h11.CLIENT
    for _ in range(n):
        # What the proxy does per request (http/protocol.py, upstream/connection.py):
        # a fresh connection, the bytes as read, one event, the bytes after the head.
        conn = h11.Connection(role)
        conn.receive_data(data)
        event = conn.next_event()
        conn.trailing_data
    assert type(event) is (h11.Request if side == "server" else h11.Response), event
else:
    from apertis_proxy.http.fast_head import parse_request, parse_response
    for _ in range(n):
        event = parse_request(data, 65536) if side == "server" else parse_response(data)
    assert event is not None, "the fast parser declined the head"
"""


def mock_response(port: int, request: bytes) -> bytes:
    """The mock's answer to `request`, as raw bytes (head and body)."""
    def more(sock: socket.socket) -> bytes:
        piece = sock.recv(65536)
        if not piece:
            raise ServiceError("the mock closed the connection before its answer was complete")
        return piece

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += more(sock)
        head, _, body = data.partition(b"\r\n\r\n")
        length = content_length(head)
        if length is None:
            raise ServiceError(f"the mock answered without a content-length: {head[:200]!r}")
        while len(body) < length:
            body += more(sock)
    return head + b"\r\n\r\n" + body


def count_loop(python: str, workdir: Path, side: str, parser: str, data: bytes, n: int) -> int:
    """Instructions of HEAD_LOOP over n iterations (process start-up included)."""
    script, payload = workdir / "head_loop.py", workdir / f"{side}.bytes"
    script.write_text(HEAD_LOOP)
    payload.write_bytes(data)
    out = workdir / f"head-{side}-{parser}-{n}.out"
    res = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, str(script),
                          side, parser, str(payload), str(n)], capture_output=True, text=True, timeout=900,
                         cwd=workdir)
    if res.returncode != 0:
        raise ServiceError(f"head loop failed: {res.stderr.strip()[-600:]}")
    total = callgrind_total([out])
    if total == 0:
        raise ServiceError(f"callgrind counted nothing for the head loop ({out})")
    return total


def count_heads(python: str, workdir: Path, mock_port: int, key: str, requests: int,
                realistic: bool) -> dict[tuple[str, str], float]:
    """Per-request instructions of h11 and of the fast parser on the request head and the mock's response head."""
    build = sdk_request_bytes if realistic else request_bytes
    answer = mock_response(mock_port, build(CHANNEL_KEY, "/v1/messages", False))
    figures = {}
    for side, data in (("server", build(key, "/v1/messages", False)), ("client", answer)):
        for parser in ("h11", "fast"):
            figures[side, parser] = (count_loop(python, workdir, side, parser, data, requests + 1)
                                     - count_loop(python, workdir, side, parser, data, 1)) / requests
    return figures


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests (or streams) counted (2000)")
    ap.add_argument("--no-meter", action="store_true", help="metering off ([plugins] meter = [])")
    ap.add_argument("--no-observe", action="store_true", help="metrics and the access log off")
    ap.add_argument("--no-access-log", action="store_true", help="metrics on, the access log off")
    ap.add_argument("--json-log", action="store_true", help='the access log in JSON ([logging] format = "json")')
    ap.add_argument("--stream", action="store_true",
                    help="bulk SSE streams, counted at 10 and at 110 events: per stream and per event")
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="with --stream: the mock paces the events this far apart, so each comes in a read of its "
                         "own (20 is enough under callgrind; less lets reads merge). Time-driven work (flush "
                         "timers) then falls on the longer streams too: read the figure as an upper bound")
    ap.add_argument("--path", default="/v1/messages", help="request path (/health: the HTTP layer alone)")
    ap.add_argument("--h11", action="store_true",
                    help="count the heads alone: h11 and the fast parser on this request's head (server side) and "
                         "the mock's response head (client side); only --requests, --realistic and --python apply")
    ap.add_argument("--realistic", action="store_true",
                    help="the official SDK's request head and the mock's answer with an API-like 25-header head")
    ap.add_argument("--limits", action="store_true",
                    help="the key with a quota, rpm and concurrency that never bind (admitted through the store)")
    ap.add_argument("--no-fast-heads", action="store_true",
                    help="every head parsed by h11 ([server] fast_heads = false)")
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
        if args.limits:
            res = subprocess.run([*cmd, "keys", "set", "bench", "--quota", "1000000", "--rpm", "1000000",
                                  "--concurrency", "1000", "--db", str(db)], capture_output=True, text=True,
                                 timeout=60)
            if res.returncode != 0:
                raise ServiceError(f"'apertis-proxy keys set' failed: {(res.stdout + res.stderr).strip()[-600:]}")
        heads = "the SDK's request head and an API-like answer" if args.realistic else "the benchmark's heads"
        if args.h11:
            h = count_heads(args.python, workdir, mock.port, key, args.requests, args.realistic)
            print(f"{heads}, instructions per head ({args.requests} iterations each):")
            for parser in ("h11", "fast"):
                print(f"  {parser:>4}: request head {h['server', parser]:,.0f}, response head "
                      f"{h['client', parser]:,.0f}; {h['server', parser] + h['client', parser]:,.0f} per "
                      f"proxied request")
            return 0
        meter, observe, fast = not args.no_meter, not args.no_observe, not args.no_fast_heads
        logging = ("access_log = false\n" if args.no_access_log else "") + (
            'format = "json"\n' if args.json_log else "")
        observed = ("metrics on, access log off" if args.no_access_log
                    else f"metrics and {'JSON' if args.json_log else 'text'} access log on")
        label = (f"{args.path}, {heads}, {'metering on' if meter else 'metering off'}, "
                 f"{'a key with limits, ' if args.limits else ''}"
                 f"{observed if observe else 'metrics and access log off'}, "
                 f"{'fast heads' if fast else 'h11 for every head'}")
        if not args.stream:
            n = count(args.python, workdir, db, key, meter=meter, path=args.path, stream=False,
                      requests=args.requests, cpu=args.cpu, observe=observe, realistic=args.realistic,
                      fast_heads=fast, logging=logging)
            print(f"{label}: {n / args.requests:,.0f} instructions per request ({args.requests} requests)")
            return 0
        figures = {}
        for events in (10, 110):
            path = f"{args.path}?events={events}&ttfb_ms=0&gap_ms={args.gap_ms:g}"
            figures[events] = count(args.python, workdir, db, key, meter=meter, path=path, stream=True,
                                    requests=args.requests, cpu=args.cpu, observe=observe,
                                    realistic=args.realistic, fast_heads=fast, logging=logging) / args.requests
        per_event = (figures[110] - figures[10]) / 100
        kind = f"paced SSE ({args.gap_ms:g} ms apart)" if args.gap_ms else "bulk SSE"
        print(f"{label}, {kind}: {figures[10]:,.0f} instructions per stream of 10 events, "
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
