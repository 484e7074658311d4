"""One paced SSE read through the gateway's Python path, alone: instructions and calls per read.

    python bench/read_path.py              # the mock's content_block_delta, one chunk per read
    python bench/read_path.py --thinking   # the same with the thinking-signature scan on (a thinking model)

`bench/instructions.py --stream --gap-ms 20` counts a whole paced event in the running proxy, timers and all;
this counts only what one upstream read costs from `UpstreamConnection.data_received` to the client's
`transport.write`: the chunk decoding, the splice and the client write, on a connection in the middle of a
chunked body, with stand-in transports whose `write` is a C function.  It runs the loop under callgrind for 1 and
for N+1 reads (the difference over N is the figure: instructions, and the calls of CPython's object allocator)
and counts the calls of one read with `sys.setprofile` (Python functions, and C functions called from Python).
The loop runs on uvloop when it is installed, as the gateway does.  Needs valgrind.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mock_upstream import SSE_DELTA


def reader(thinking: bool):
    """data_received of an upstream connection streaming a chunked body to an HTTP/1.1 client."""
    from apertis_proxy.flow_control import FlowControl
    from apertis_proxy.gateway.relay import StreamRelay
    from apertis_proxy.gateway.sse import SseSplicer
    from apertis_proxy.gateway.usage import UsageMeter
    from apertis_proxy.http.responder import Responder
    from apertis_proxy.plugin_api import UsageRecord
    from apertis_proxy.upstream.connection import Phase, UpstreamConnection
    from apertis_proxy.upstream.framing import ChunkedDecoder

    class Transport:
        write = len             # a C function, as uvloop's write is
        pause_reading = resume_reading = staticmethod(lambda: None)

    class Client:               # the HttpConnection a Responder writes to
        closed, http11 = False, True

        def __init__(self) -> None:
            self.transport, self.flow = Transport(), FlowControl()

    conn = UpstreamConnection()
    conn.transport = Transport()
    conn._decoder = ChunkedDecoder()
    conn._phase = Phase.READING_BODY
    record = UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")
    splicer = SseSplicer(UsageMeter(record))
    if thinking:
        splicer._signatures = collections.deque(maxlen=1).append
    resp = Responder(Client(), "req_1", keep_alive=True)    # type: ignore[arg-type]
    resp._chunked = True
    relay = StreamRelay(conn, resp, 200, [], record, 600.0, splicer)
    conn._sink = relay.piece
    if hasattr(conn, "_chunk_sink"):
        conn._chunk_sink = relay.chunk
    return conn.data_received


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def loop(n: int, thinking: bool) -> None:
    async def run() -> None:
        read = reader(thinking)
        for _ in range(n):
            read(SSE_DELTA)
    gc.disable()
    new_loop().run_until_complete(run())


def calls(thinking: bool) -> collections.Counter:
    async def run() -> collections.Counter:
        read = reader(thinking)
        read(SSE_DELTA)
        seen: collections.Counter = collections.Counter()

        def note(frame, event, arg) -> None:
            if event == "call":
                seen[f"{frame.f_code.co_name} (Python)"] += 1
            elif event == "c_call" and arg is not sys.setprofile:
                seen[f"{getattr(arg, '__qualname__', arg)} (C)"] += 1
        sys.setprofile(note)
        read(SSE_DELTA)
        sys.setprofile(None)
        return seen
    return new_loop().run_until_complete(run())


def instructions(python: str, n: int, thinking: bool, workdir: Path) -> tuple[int, int]:
    """Instructions of the loop over n reads (start-up included), and its calls of the object allocator."""
    out = workdir / f"read-{n}.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, __file__, "--loop", str(n)]
    res = subprocess.run(argv + (["--thinking"] if thinking else []), capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"the loop failed: {res.stderr.strip()[-600:]}")
    total = allocations = 0
    names: dict[str, str] = {}
    callee = ""
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            total += int(line.split()[1])
        elif line.startswith(("fn=", "cfn=")):
            # "fn=(id) name" or "cfn=(id) name" names a function the first time, "(id)" alone after that.
            ident, _, name = line.partition("=")[2].partition(" ")
            name = names.setdefault(ident, name)
            if line[0] == "c":
                callee = name
        elif line.startswith("calls=") and callee in ("_PyObject_Malloc", "_PyObject_Calloc"):
            allocations += int(line[6:].split()[0])
    return total, allocations


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--thinking", action="store_true", help="the splicer scans for thinking signatures")
    ap.add_argument("--reads", type=int, default=10000, help="reads counted (10000)")
    ap.add_argument("--python", default=sys.executable, help="Python whose environment has apertis-proxy")
    ap.add_argument("--loop", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loop is not None:
        loop(args.loop, args.thinking)
        return 0
    if shutil.which("valgrind") is None:
        print("bench: valgrind not found (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    seen = calls(args.thinking)
    with tempfile.TemporaryDirectory(prefix="apertis-read-path-") as tmp:
        (many, many_allocs), (one, one_allocs) = (instructions(args.python, n, args.thinking, Path(tmp))
                                                  for n in (args.reads + 1, 1))
    python_calls = sum(v for k, v in seen.items() if k.endswith("(Python)"))
    print(f"one paced read ({len(SSE_DELTA)} bytes, thinking scan {'on' if args.thinking else 'off'}): "
          f"{(many - one) / args.reads:,.0f} instructions, {(many_allocs - one_allocs) / args.reads:.1f} "
          f"allocator calls, {python_calls} Python calls, {sum(seen.values()) - python_calls} C calls")
    for name, count in seen.most_common():
        print(f"  {count} x {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
