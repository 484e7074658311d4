"""A small load client for many long-lived SSE streams (where wrk is poor).

Raw asyncio Protocol (uvloop when installed), HTTP/1.1 keep-alive, one request
at a time per connection.  For every request it measures the time to the
first response byte and to the end, counts SSE events (blank-line terminated,
after de-chunking) and classifies failures: connect errors, timeouts, non-2xx,
connections closed early, incomplete streams (fewer events than expected or no
``message_stop`` at the end).

    python bench/loadgen.py --url http://127.0.0.1:8080/v1/messages?ttfb_ms=300 \\
        --body-file body.json -H 'x-api-key: K' --connections 5000 --ramp 2 \\
        --requests 1 --expect-events 106 --max-time 60

Bounded by construction: each connection sends at most ``--requests`` requests
and nothing is started after ``--max-time`` seconds; the whole run ends by
``--max-time`` plus ``--timeout``.  Prints one JSON object.  Loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import resource
import sys
import time
from typing import Optional
from urllib.parse import urlsplit

perf = time.perf_counter
_STOP_MARK = b"event: message_stop"


class Result:
    """Per-process accumulators (plain lists: a few thousand floats at most per second)."""

    def __init__(self) -> None:
        self.latency: list[float] = []     # seconds, successful requests
        self.ttfb: list[float] = []
        self.events = 0
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.in_flight = 0
        self.peak_in_flight = 0
        self.first_error: Optional[str] = None

    def error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if self.first_error is None:
            self.first_error = f"{kind}: {detail}" if detail else kind

    def as_dict(self) -> dict:
        return {"latency": self.latency, "ttfb": self.ttfb, "events": self.events, "ok": self.ok,
                "errors": self.errors, "statuses": self.statuses, "peak_in_flight": self.peak_in_flight,
                "first_error": self.first_error}


class ClientConnection(asyncio.Protocol):
    """Parses one response at a time: head, then a content-length, chunked or close-delimited body."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: Optional[asyncio.Transport] = None
        self.done: Optional[asyncio.Future] = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.sent_at = 0.0
        self.first_at = 0.0
        self.head = b""
        self.status = 0
        self.mode = ""                # "length" | "chunked" | "eof"
        self.remaining = 0            # length mode: body bytes left; chunked: bytes left in this chunk
        self.cbuf = b""               # chunked: unparsed framing bytes
        self.need_crlf = False
        self.events = 0
        self.last_nl = False
        self.tail = b""
        self.keep_alive = True

    # -- request side --
    def send(self, request: bytes) -> asyncio.Future:
        self._reset()
        self.done = self.loop.create_future()
        self.sent_at = perf()
        self.transport.write(request)
        return self.done

    def _finish(self, outcome: str) -> None:
        done, self.done = self.done, None
        if done is not None and not done.done():
            done.set_result(outcome)

    # -- protocol callbacks --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        if self.done is not None:
            if self.mode == "eof":
                self._finish("ok")
            else:
                self._finish("closed_early")

    def data_received(self, data: bytes) -> None:
        if self.done is None:         # bytes outside a request: ignore (and stop reusing)
            self.keep_alive = False
            return
        if not self.first_at:
            self.first_at = perf()
        if not self.mode:
            head = self.head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self.head = head
                return
            self._parse_head(head[:end])
            data = head[end + 4:]
            if self.done is None:
                return
        if self.mode == "chunked":
            self._feed_chunked(data)
        elif self.mode == "length":
            self._payload(data[:self.remaining])
            self.remaining -= len(data)
            if self.remaining <= 0:
                self._finish("ok")
        else:
            self._payload(data)

    # -- parsing --
    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        try:
            self.status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.keep_alive = False
            self._finish("bad_response")
            return
        length: Optional[int] = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection" and value.strip().lower() == b"close":
                self.keep_alive = False
        if chunked:
            self.mode = "chunked"
        elif length is not None:
            self.mode = "length"
            self.remaining = length
            if length == 0:
                self._finish("ok")
        else:
            self.mode = "eof"
            self.keep_alive = False

    def _payload(self, piece: bytes) -> None:
        if not piece:
            return
        n = piece.count(b"\n\n")
        if self.last_nl and piece[0] == 10:
            n += 1
        self.events += n
        self.last_nl = piece[-1] == 10
        self.tail = (self.tail + piece)[-96:]

    def _feed_chunked(self, data: bytes) -> None:
        buf = self.cbuf + data if self.cbuf else data
        pos, n = 0, len(buf)
        while pos < n:
            if self.remaining:
                take = min(self.remaining, n - pos)
                self._payload(buf[pos:pos + take])
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.need_crlf = True
                continue
            if self.need_crlf:
                if n - pos < 2:
                    break
                pos += 2
                self.need_crlf = False
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                self.keep_alive = False
                self._finish("bad_response")
                return
            if size == 0:
                end = buf.find(b"\r\n\r\n", eol)   # terminal chunk, optional trailers, blank line
                if end < 0:
                    break
                self.cbuf = b""
                self._finish("ok")
                return
            self.remaining = size
            pos = eol + 2
        self.cbuf = buf[pos:]


class Runner:
    def __init__(self, args: argparse.Namespace, request: bytes, host: str, port: int) -> None:
        self.args = args
        self.request = request
        self.host = host
        self.port = port
        self.result = Result()
        self.deadline = 0.0

    async def run(self, connections: int, offset: int, total: int) -> None:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.args.max_time
        ramp = self.args.ramp
        tasks = []
        for i in range(connections):
            delay = ramp * (offset + i) / total if total > 1 else 0.0
            tasks.append(loop.create_task(self._connection(delay)))
        await asyncio.gather(*tasks)

    async def _connection(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        if delay:
            await asyncio.sleep(delay)
        res = self.result
        conn: Optional[ClientConnection] = None
        for _ in range(self.args.requests):
            if loop.time() >= self.deadline:
                return
            if conn is None or conn.closed or not conn.keep_alive:
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                try:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(lambda: ClientConnection(loop), self.host, self.port),
                        self.args.timeout)
                except (OSError, asyncio.TimeoutError) as exc:
                    res.error("connect", repr(exc))
                    conn = None
                    await asyncio.sleep(0.05)
                    continue
            await self._one(conn)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def _one(self, conn: ClientConnection) -> None:
        res = self.result
        res.in_flight += 1
        if res.in_flight > res.peak_in_flight:
            res.peak_in_flight = res.in_flight
        try:
            outcome = await asyncio.wait_for(conn.send(self.request), self.args.timeout)
        except asyncio.TimeoutError:
            outcome = "timeout"
            conn.keep_alive = False
        finally:
            res.in_flight -= 1
        end = perf()
        if outcome != "ok":
            res.error(outcome, f"after {end - conn.sent_at:.3f}s, status {conn.status}")
            conn.keep_alive = False
            return
        res.statuses[conn.status] = res.statuses.get(conn.status, 0) + 1
        if not 200 <= conn.status < 300:
            res.error("status", f"HTTP {conn.status}: {conn.tail[-200:]!r}")
            return
        res.events += conn.events
        expect = self.args.expect_events
        if expect is not None and (conn.events != expect or _STOP_MARK not in conn.tail):
            res.error("incomplete_stream", f"{conn.events} events of {expect}")
            return
        res.ok += 1
        res.latency.append(end - conn.sent_at)
        res.ttfb.append(conn.first_at - conn.sent_at)


def build_request(url: str, body: bytes, headers: list[str]) -> tuple[bytes, str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loadgen: only http:// on loopback is allowed")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    port = parts.port or 80
    lines = [f"POST {target} HTTP/1.1", f"host: {parts.hostname}:{port}",
             "content-type: application/json", f"content-length: {len(body)}"]
    lines += [h.strip() for h in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body, parts.hostname, port


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _shard(args: argparse.Namespace, request: bytes, host: str, port: int,
           connections: int, offset: int) -> dict:
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    runner = Runner(args, request, host, port)
    try:
        loop.run_until_complete(runner.run(connections, offset, args.connections))
    finally:
        loop.close()
    return runner.result.as_dict()


def _shard_entry(pipe, *a) -> None:
    pipe.send(_shard(*a))
    pipe.close()


def percentile(sorted_values: list[float], q: float) -> Optional[float]:
    if not sorted_values:
        return None
    # Nearest rank: the smallest value with at least q% of the samples at or below it.
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[idx]


def summarize(parts: list[dict], wall: float) -> dict:
    latency = sorted(x for p in parts for x in p["latency"])
    ttfb = sorted(x for p in parts for x in p["ttfb"])
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in p["statuses"].items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    ms = lambda v: None if v is None else round(v * 1000.0, 3)  # noqa: E731
    ok = sum(p["ok"] for p in parts)
    events = sum(p["events"] for p in parts)
    return {
        "ok": ok, "errors": errors, "error_total": sum(errors.values()), "statuses": statuses,
        "first_error": next((p["first_error"] for p in parts if p["first_error"]), None),
        "wall_s": round(wall, 3), "rps": round(ok / wall, 2) if wall > 0 else 0.0,
        "events": events, "events_per_s": round(events / wall, 1) if wall > 0 else 0.0,
        "peak_in_flight": sum(p["peak_in_flight"] for p in parts),
        "latency_ms": {f"p{q:g}": ms(percentile(latency, q)) for q in (50, 90, 99, 99.9)}
        | {"max": ms(latency[-1] if latency else None)},
        "ttfb_ms": {f"p{q:g}": ms(percentile(ttfb, q)) for q in (50, 90, 99, 99.9)}
        | {"max": ms(ttfb[-1] if ttfb else None)},
    }


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--body-file", required=True)
    p.add_argument("-H", "--header", action="append", default=[])
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--requests", type=int, default=1, help="requests per connection (upper bound)")
    p.add_argument("--ramp", type=float, default=0.0, help="seconds over which connections start")
    p.add_argument("--max-time", type=float, default=60.0, help="no request starts after this")
    p.add_argument("--timeout", type=float, default=60.0, help="per request")
    p.add_argument("--expect-events", type=int, help="SSE events a complete stream has")
    p.add_argument("--procs", type=int, default=1, help="client processes sharing the connections")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.connections + 64 > hard * max(1, args.procs):
        raise SystemExit(f"loadgen: {args.connections} connections exceed the open-file limit {hard}")
    with open(args.body_file, "rb") as fh:
        body = fh.read()
    request, host, port = build_request(args.url, body, args.header)
    started = perf()
    if args.procs <= 1:
        parts = [_shard(args, request, host, port, args.connections, 0)]
    else:
        ctx = multiprocessing.get_context("fork")
        procs, pipes = [], []
        share, extra = divmod(args.connections, args.procs)
        offset = 0
        for i in range(args.procs):
            n = share + (1 if i < extra else 0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_shard_entry, args=(send, args, request, host, port, n, offset))
            proc.start()
            procs.append(proc)
            pipes.append(recv)
            offset += n
        parts = [pipe.recv() for pipe in pipes]
        for proc in procs:
            proc.join()
    json.dump(summarize(parts, perf() - started), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
