"""The benchmark scenarios, in a full and a quick (smoke) flavour, and the request bodies they send.

A scenario's ``block`` groups scenarios that share one fresh start of the
system under test: memory figures of a block start from a clean process.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SSE_FIXED_EVENTS = 6   # message_start, content_block_start, ping ... content_block_stop, message_delta, message_stop
# The headers the official Python SDK (2.x, sync client) sends beside host, content-length and its credential, in its
# order and spelling: the realistic scenarios' requests.
SDK_HEADERS = (
    ("Accept-Encoding", "gzip, deflate"), ("Connection", "keep-alive"), ("x-stainless-timeout", "600"),
    ("x-stainless-retry-count", "0"), ("x-stainless-read-timeout", "600"), ("Accept", "application/json"),
    ("Content-Type", "application/json"), ("User-Agent", "Anthropic/Python 2.17.0"), ("X-Stainless-Lang", "python"),
    ("X-Stainless-Package-Version", "2.17.0"), ("X-Stainless-OS", "Linux"), ("X-Stainless-Arch", "x64"),
    ("X-Stainless-Runtime", "CPython"), ("X-Stainless-Runtime-Version", "3.11.7"), ("X-Stainless-Async", "false"),
    ("anthropic-version", "2023-06-01"),
)


@dataclass(frozen=True)
class Scenario:
    key: str               # unique, used in --scenarios and file names
    group: str             # a..e: the kind of load (see bench/README.md)
    label: str
    driver: str            # "wrk" (throughput) or "loadgen" (long streams)
    connections: int
    duration: float        # wrk: measured seconds; loadgen: no request starts after this
    body: str              # "small" (~1 KB) or "large" (~30 KB)
    stream: bool = False
    deltas: int = 0        # content_block_delta events per stream
    ttfb_ms: float = 0.0   # paced streams
    gap_ms: float = 0.0
    delay_ms: float = 0.0  # non-streaming upstream latency
    ramp: float = 0.0      # loadgen: seconds over which connections open
    requests: int = 1      # loadgen: requests per connection (one after the other, keep-alive)
    warmup: int = 1        # wrk: seconds of unmeasured load first (0: none)
    timeout: float = 10.0  # per request
    block: str = ""
    # The SDK's request headers (SDK_HEADERS, a bearer credential) and the mock's ~25-header answer (real_head=1).
    realistic: bool = False

    @property
    def query(self) -> str:
        """Mock parameters, sent in the URL query (every proxy forwards it)."""
        params = ["real_head=1"] if self.realistic else []
        if self.stream:
            params.append(f"events={self.deltas}")
        if self.ttfb_ms:
            params.append(f"ttfb_ms={self.ttfb_ms:g}")
        if self.gap_ms:
            params.append(f"gap_ms={self.gap_ms:g}")
        if self.delay_ms:
            params.append(f"delay_ms={self.delay_ms:g}")
        return "&".join(params)

    @property
    def events_per_stream(self) -> int:
        return self.deltas + SSE_FIXED_EVENTS if self.stream else 0

    @property
    def paced(self) -> bool:
        return self.stream and (self.ttfb_ms > 0 or self.gap_ms > 0)


def _paced(n: int, deltas: int, ramp: float, block: str) -> Scenario:
    return Scenario(f"d-{n}", "d", f"paced SSE, {n} streams", "loadgen", n,
                    duration=30.0, body="small", stream=True, deltas=deltas, ttfb_ms=300, gap_ms=100,
                    ramp=ramp, warmup=0, timeout=60.0, block=block)


def _latency(n: int, requests: int, ramp: float, block: str) -> Scenario:
    # loadgen, not wrk: wrk opens every connection at once, so all of them finish on the same
    # second and req/s depends on where the run's end falls; a ramp spreads them out.
    return Scenario(f"e-{n}", "e", f"1 s upstream latency, {n} in flight", "loadgen", n,
                    duration=requests + ramp + 5, body="small", delay_ms=1000, ramp=ramp,
                    requests=requests, warmup=0, timeout=20.0, block=block)


def full() -> list[Scenario]:
    out = [Scenario(f"a-c{c}", "a", f"1 KB request, c={c}", "wrk", c, 10, "small", block="a")
           for c in (1, 16, 64, 256)]
    out.append(Scenario("f-c64", "f", "1 KB request, SDK and API heads, c=64", "wrk", 64, 10, "small", block="a",
                        realistic=True))
    out.append(Scenario("b-c64", "b", "30 KB request, c=64", "wrk", 64, 10, "large", block="b"))
    out.append(Scenario("c-c64", "c", "SSE 300 deltas bulk, c=64", "wrk", 64, 10, "small", stream=True,
                        deltas=300, block="c"))
    # d-2000: 2,000 streams opened at 1,000/s (the fast-path issue's paced target).
    out += [_paced(64, 100, 0.2, "d64"), _paced(1000, 100, 1.0, "d1000"), _paced(2000, 100, 2.0, "d2000"),
            _paced(5000, 100, 2.0, "d5000")]
    out.append(_latency(2000, 8, 1.0, "e"))
    return out


def quick() -> list[Scenario]:
    """Under two minutes: short runs, lower concurrency, one SUT start for the throughput scenarios."""
    out = [Scenario(f"a-c{c}", "a", f"1 KB request, c={c}", "wrk", c, 2, "small", block="q")
           for c in (1, 64)]
    out.append(Scenario("f-c64", "f", "1 KB request, SDK and API heads, c=64", "wrk", 64, 2, "small", block="q",
                        realistic=True))
    out.append(Scenario("b-c64", "b", "30 KB request, c=64", "wrk", 64, 2, "large", block="q"))
    out.append(Scenario("c-c16", "c", "SSE 300 deltas bulk, c=16", "wrk", 16, 2, "small", stream=True,
                        deltas=300, block="q"))
    out.append(_latency(200, 2, 0.5, "q"))
    out += [_paced(64, 10, 0.1, "d64"), _paced(500, 10, 0.3, "d500")]
    return out


def select(scenarios: list[Scenario], wanted: str) -> list[Scenario]:
    """--scenarios a,d-5000: a group letter takes the whole group, a key takes one."""
    if not wanted:
        return scenarios
    names = {w.strip() for w in wanted.split(",") if w.strip()}
    chosen = [s for s in scenarios if s.group in names or s.key in names]
    unknown = names - {s.group for s in scenarios} - {s.key for s in scenarios}
    if unknown:
        raise SystemExit(f"bench: unknown scenario(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(s.key for s in scenarios)}")
    return chosen


_WORDS = ("The quick brown fox jumps over the lazy dog while the gateway forwards every byte. ")


def _body(size: int, stream: bool) -> bytes:
    head = {"model": "claude-sonnet-5-5", "max_tokens": 1024}
    if stream:
        head["stream"] = True
    shell = json.dumps({**head, "messages": [{"role": "user", "content": ""}]}).encode()
    text = (_WORDS * (size // len(_WORDS) + 1))[:max(0, size - len(shell))]
    return json.dumps({**head, "messages": [{"role": "user", "content": text}]}).encode()


def write_bodies(workdir: Path) -> dict[tuple[str, bool], Path]:
    out = {}
    for name, size in (("small", 1024), ("large", 30 * 1024)):
        for stream in (False, True):
            path = workdir / f"body-{name}{'-stream' if stream else ''}.json"
            path.write_bytes(_body(size, stream))
            out[(name, stream)] = path
    return out
