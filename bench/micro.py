"""Micro-benchmarks of the gateway's hot paths, in nanoseconds per operation.

    python bench/micro.py [--filter sse] [--quick]

Each benchmark is one function below, marked with @bench.  Benchmarks of the
gateway's own modules import them lazily and are skipped, with the reason,
when a module or name is missing or its interface changed: adapt the marked
function (``# WIRE:`` comments) when the module's interface moves.  Library
baselines (h11, orjson, prebuilt byte templates) always run, so a change in
the gateway can be read against what the libraries cost.

Timing: the best of several repeats of a calibrated loop (timeit), which is
the least disturbed figure on a shared machine.  Pin it for steadier numbers:
``taskset -c 1 python bench/micro.py``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Callable, Optional

import h11
import orjson

RESULTS: list[tuple[str, Optional[float], str]] = []
BENCHES: list[tuple[str, Callable[[argparse.Namespace], None]]] = []


class Skip(Exception):
    pass


def bench(name: str):
    def register(fn):
        BENCHES.append((name, fn))
        return fn
    return register


def measure(fn: Callable[[], object], quick: bool, per: int = 1) -> float:
    """ns per operation (fn does `per` operations), best of the repeats."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()                  # at least 0.2 s per repeat
    if quick:
        number = max(1, number // 4)
    best = min(timer.repeat(repeat=3 if quick else 7, number=number))
    return best / number / per * 1e9


def record(name: str, ns: Optional[float], note: str = "") -> None:
    RESULTS.append((name, ns, note))


# ----------------------------------------------------------------- test data

def request_body(size: int, stream: bool = False) -> bytes:
    head = {"model": "claude-sonnet-5-5", "max_tokens": 1024, **({"stream": True} if stream else {})}
    filler = "The quick brown fox jumps over the lazy dog. " * (size // 45 + 1)
    text = filler[:max(0, size - 110)]
    return orjson.dumps({**head, "messages": [{"role": "user", "content": text}]})


def request_head(body_len: int, target: bytes = b"/v1/messages") -> bytes:
    """A request head like the official Python SDK's."""
    return (b"POST " + target + b" HTTP/1.1\r\n"
            b"host: 127.0.0.1:8080\r\naccept: application/json\r\naccept-encoding: gzip, deflate\r\n"
            b"connection: keep-alive\r\ncontent-type: application/json\r\n"
            b"user-agent: Anthropic/Python 2.14.0\r\nx-stainless-lang: python\r\n"
            b"x-stainless-package-version: 2.14.0\r\nx-stainless-os: Linux\r\nx-stainless-arch: x64\r\n"
            b"x-stainless-runtime: CPython\r\nx-stainless-runtime-version: 3.11.7\r\n"
            b"x-stainless-retry-count: 0\r\nx-stainless-read-timeout: 600\r\n"
            b"anthropic-version: 2023-06-01\r\nx-api-key: sk-ap-0123456789abcdef0123456789abcdef\r\n"
            b"content-length: %d\r\n\r\n" % body_len)


def sse_events(deltas: int = 100) -> list[bytes]:
    """One stream as upstream sends it, one event per item (what the upstream client hands on)."""
    def ev(name: str, data: dict) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    out = [
        ev("message_start", {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "content": [],
            "model": "claude-sonnet-5-5", "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "output_tokens": 1}}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ]
    out += [ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "lorem ipsum "}})] * deltas
    out += [
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": deltas * 2}}),
        ev("message_stop", {"type": "message_stop"}),
    ]
    return out


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


# ------------------------------------------------------- library baselines

@bench("h11: parse request head + 1 KB body (new connection)")
def h11_parse_new(args: argparse.Namespace) -> None:
    body = request_body(1024)
    raw = request_head(len(body)) + body

    def op() -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(raw)
        conn.next_event()      # Request
        conn.next_event()      # Data
        conn.next_event()      # EndOfMessage
    record("h11: parse request head + 1 KB body (new connection)", measure(op, args.quick))


@bench("h11: parse request on a kept-alive connection")
def h11_parse_keepalive(args: argparse.Namespace) -> None:
    body = request_body(1024)
    raw = request_head(len(body)) + body
    conn = h11.Connection(h11.SERVER)
    response = h11.Response(status_code=200, headers=[(b"content-length", b"2")])

    def op() -> None:
        conn.receive_data(raw)
        conn.next_event()
        conn.next_event()
        conn.next_event()
        conn.send(response)
        conn.send(h11.Data(data=b"{}"))
        conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
    record("h11: request cycle on a kept-alive connection (parse + send 200)", measure(op, args.quick),
           "includes h11 building a small response")


@bench("orjson: parse body")
def orjson_parse(args: argparse.Namespace) -> None:
    for size in (1024, 30 * 1024):
        body = request_body(size)
        ns = measure(lambda body=body: orjson.loads(body), args.quick)
        record(f"orjson.loads: {size // 1024} KB request body", ns)


@bench("response head: h11 vs template")
def response_head(args: argparse.Namespace) -> None:
    headers = [(b"content-type", b"application/json"), (b"request-id", b"req_0123456789abcdef01234567"),
               (b"content-length", b"420")]

    def with_h11() -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        conn.next_event()
        conn.next_event()
        conn.send(h11.Response(status_code=200, headers=headers))
    ns_parse = measure(lambda: (lambda c: (c.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"),
                                           c.next_event(), c.next_event()))(h11.Connection(h11.SERVER)),
                       args.quick)
    record("h11: build a response head (net of a minimal GET parse)",
           measure(with_h11, args.quick) - ns_parse)
    template = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: %s\r\ncontent-length: %d\r\n\r\n"
    record("template: response head from bytes %-formatting",
           measure(lambda: template % (b"req_0123456789abcdef01234567", 420), args.quick))


@bench("chunk framing: h11 vs template")
def chunk_framing(args: argparse.Namespace) -> None:
    event = sse_events(1)[3]
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    conn.next_event()
    conn.next_event()
    conn.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
    data = h11.Data(data=event)
    record("h11: frame one SSE event as a chunk", measure(lambda: conn.send(data), args.quick))
    record("template: frame one SSE event as a chunk",
           measure(lambda: b"%x\r\n%s\r\n" % (len(event), event), args.quick))


@bench("h11 client: read a chunked SSE response")
def h11_client_sse(args: argparse.Namespace) -> None:
    events = sse_events(100)
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    chunks = [b"%x\r\n" % len(e) + e + b"\r\n" for e in events] + [b"0\r\n\r\n"]
    request = h11.Request(method="POST", target="/v1/messages", headers=[(b"host", b"x"),
                                                                          (b"content-length", b"0")])

    def op() -> None:
        conn = h11.Connection(h11.CLIENT)
        conn.send(request)
        conn.send(h11.EndOfMessage())
        conn.receive_data(head)
        conn.next_event()
        for c in chunks:
            conn.receive_data(c)
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA or type(ev) is h11.EndOfMessage:
                    break
    record("h11 client: de-chunk an SSE response, per event (one chunk per read)",
           measure(op, args.quick, per=len(events)))


# ------------------------------------------------------ the gateway's code

def _import(module: str, name: str):
    try:
        mod = __import__(module, fromlist=[name])
    except ImportError as exc:
        raise Skip(f"{module} not importable ({exc})") from None
    if not hasattr(mod, name):
        raise Skip(f"{module}.{name} missing")
    return getattr(mod, name)


def _new_splicer():
    # WIRE: how the gateway builds one stream's splicer (gateway/forward.py).
    SseSplicer = _import("apertis_proxy.gateway.sse", "SseSplicer")
    UsageMeter = _import("apertis_proxy.gateway.usage", "UsageMeter")
    UsageRecord = _import("apertis_proxy.plugin_api", "UsageRecord")
    record_ = UsageRecord(request_id="req_bench", started_at=time.time(), endpoint="/v1/messages")
    return SseSplicer(UsageMeter(record_)), record_


@bench("gateway: SSE splice with usage extraction")
def sse_splice(args: argparse.Namespace) -> None:
    events = sse_events(100)
    whole = b"".join(events)
    cases = [("one event per read", events), ("1,400-byte reads", split_every(whole, 1400)),
             ("16 KB reads", split_every(whole, 16384))]
    splicer, rec = _new_splicer()
    for chunk in events:                      # WIRE: feed() returns the bytes to forward now
        splicer.feed(chunk)
    if rec.output_tokens != 200 or rec.input_tokens != 25:
        raise Skip(f"usage not extracted as expected (input {rec.input_tokens}, output {rec.output_tokens})")
    for label, chunks in cases:
        def op(chunks=chunks) -> None:
            s, _ = _new_splicer()
            feed = s.feed
            for c in chunks:
                feed(c)
            s.flush()
        record(f"gateway SseSplicer: per event, {label}", measure(op, args.quick, per=len(events)),
               "includes building the splicer once per stream")


@bench("baseline: minimal SSE splitter")
def sse_baseline(args: argparse.Namespace) -> None:
    """A yardstick: split on blank lines, parse only message_start/message_delta."""
    events = sse_events(100)

    def op() -> None:
        tail = b""
        usage = {}
        for chunk in events:
            buf = tail + chunk if tail else chunk
            end = buf.rfind(b"\n\n")
            if end < 0:
                tail = buf
                continue
            region, tail = buf[:end + 2], buf[end + 2:]
            if b"event: message_" in region:
                for ev in region.split(b"\n\n"):
                    if ev.startswith(b"event: message_start") or ev.startswith(b"event: message_delta"):
                        data = orjson.loads(ev[ev.index(b"data:") + 5:])
                        u = data.get("usage") or (data.get("message") or {}).get("usage") or {}
                        usage.update(u)
    record("baseline splitter: per event, one event per read", measure(op, args.quick, per=len(events)))


@bench("gateway: request contract")
def contract(args: argparse.Namespace) -> None:
    validate = _import("apertis_proxy.gateway.contract", "validate")
    prepare = _import("apertis_proxy.gateway.contract", "prepare_for_channel")
    Channel = _import("apertis_proxy.plugin_api", "Channel")
    body = orjson.loads(request_body(1024))
    channel = Channel(id=1, name="mock", base_url="http://127.0.0.1:1", api_key="k")
    record("gateway contract.validate: 1 KB body", measure(lambda: validate(body), args.quick))
    # WIRE: prepare_for_channel(body, channel, client_version=...) -> Prepared
    record("gateway contract.prepare_for_channel: unchanged body",
           measure(lambda: prepare(body, channel, client_version="2023-06-01"), args.quick))


@bench("gateway: headers upstream")
def headers_upstream(args: argparse.Namespace) -> None:
    upstream_headers = _import("apertis_proxy.gateway.headers", "upstream_headers")
    Channel = _import("apertis_proxy.plugin_api", "Channel")
    raw = request_head(1000)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    req = conn.next_event()
    headers = list(req.headers)
    channel = Channel(id=1, name="mock", base_url="http://127.0.0.1:1", api_key="k")
    # WIRE: upstream_headers(client_headers, channel, host, version, length)
    record("gateway headers.upstream_headers: SDK-like request",
           measure(lambda: upstream_headers(headers, channel, b"127.0.0.1:1", "2023-06-01", 1000), args.quick))


class _PluginDB:
    """A throwaway SQLite store with one channel and one key, made by the real CLI."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="apertis-micro-")
        self.db = str(Path(self.dir.name) / "micro.db")
        cli = Path(sys.executable).parent / "apertis-proxy"
        cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "apertis_proxy"]
        run = lambda *a: subprocess.run([*cmd, *a, "--db", self.db], capture_output=True,  # noqa: E731
                                        text=True, timeout=60)
        res = run("channels", "add", "mock", "--base-url", "http://127.0.0.1:9", "--api-key", "sk-upstream")
        if res.returncode != 0:
            raise Skip(f"apertis-proxy channels add failed: {(res.stdout + res.stderr).strip()[-200:]}")
        res = run("keys", "create", "micro")
        if res.returncode != 0 or not res.stdout.strip():
            raise Skip(f"apertis-proxy keys create failed: {(res.stdout + res.stderr).strip()[-200:]}")
        self.key = res.stdout.strip().splitlines()[-1].strip()


def _request_info(key: str):
    RequestInfo = _import("apertis_proxy.plugin_api", "RequestInfo")
    body = orjson.loads(request_body(1024))
    return RequestInfo(method="POST", path="/v1/messages", query="", headers={
        "x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"},
        body=body, model=body["model"], stream=False, client="127.0.0.1:5000", request_id="req_bench")


def _plugin(module: str, cls: str, db: str):
    factory = _import(module, cls)
    PluginContext = _import("apertis_proxy.plugin_api", "PluginContext")
    return factory(PluginContext(name=cls, options={}, db_path=db, log=logging.getLogger("micro")))


@bench("plugins: auth and routing")
def plugins(args: argparse.Namespace) -> None:
    store = _PluginDB()
    info = _request_info(store.key)
    auth = _plugin("apertis_plugins.keys_auth", "KeysAuth", store.db)
    router = _plugin("apertis_plugins.channel_router", "ChannelRouter", store.db)
    Caller = _import("apertis_proxy.plugin_api", "Caller")
    caller = Caller(key_id=1, key_name="micro")
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(auth.start())
        loop.run_until_complete(router.start())
        got = loop.run_until_complete(auth.authenticate(info))
        routed = loop.run_until_complete(router.route(info, got or caller))
        if not got or not routed:
            raise Skip(f"plugins not ready (caller {got!r}, channels {routed!r})")

        async def authenticate(n: int) -> None:
            # WIRE: the keys plugin counts requests in flight until finish(); reset so quotas never bite.
            for _ in range(n):
                await auth.authenticate(info)
            for state in getattr(auth, "by_hash", {}).values():
                if hasattr(state, "in_flight"):
                    state.in_flight = 0

        async def route(n: int) -> None:
            for _ in range(n):
                await router.route(info, caller)

        record("plugin keys: authenticate (hash + lookup + checks)", _run_async_on(loop, authenticate, args.quick))
        record("plugin channels: route (one channel)", _run_async_on(loop, route, args.quick))
    finally:
        for plugin in (auth, router):
            close = getattr(plugin, "close", None)
            if close:
                loop.run_until_complete(close())
        loop.close()
        store.dir.cleanup()


def _run_async_on(loop: asyncio.AbstractEventLoop, make: Callable[[int], object], quick: bool,
                  n: int = 20000) -> float:
    runs = n // 4 if quick else n
    loop.run_until_complete(make(1000))
    best = None
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter_ns()
        loop.run_until_complete(make(runs))
        ns = (time.perf_counter_ns() - t0) / runs
        best = ns if best is None else min(best, ns)
    return best


# ------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--filter", default="", help="run only benchmarks whose name contains this")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"# micro-benchmarks (Python {sys.version.split()[0]}, h11 {h11.__version__}, "
          f"orjson {orjson.__version__}, pid {os.getpid()})")
    skipped = []
    for name, fn in BENCHES:
        if args.filter.lower() not in name.lower():
            continue
        try:
            fn(args)
        except Skip as exc:
            skipped.append(f"{name}: skipped: {exc}")
        except Exception as exc:  # noqa: BLE001 - an interface moved: say so, run the rest
            skipped.append(f"{name}: skipped after {type(exc).__name__}: {exc} (adapt the WIRE lines)")
    width = max((len(n) for n, _, _ in RESULTS), default=10)
    for name, ns, note in RESULTS:
        figure = f"{ns:>10,.0f} ns/op" if ns is not None else "         —"
        print(f"{name:<{width}}  {figure}" + (f"   ({note})" if note else ""))
    for line in skipped:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
