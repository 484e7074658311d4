"""Load for the per-key limits over several gateway processes: `serve --workers 2` on one SQLite file, or two
gateway processes ("hosts") sharing PostgreSQL; requests whose cost is known in advance; a mock upstream that
counts the messages requests it is answering at once; the key's ledger read back.

    mock = CountingUpstream()                                   # a MockUpstream; .max_in_flight, .in_flight
    setup_store(db, mock, "alice", "--quota", "1")              # channel to the mock, key with its limits
    async with Hosts.postgres(db, tmp_path, lease_seconds=3) as hosts:     # or Hosts.workers(db, tmp_path)
        answer = await send(hosts.ports[0], key, costed_body(), COSTED)    # an Answer
    rows = ledger_rows(db, "alice")                              # the key's usage rows

The cost of a request: the mock reports the usage of the `x-mock-scenario` header (mock_upstream.py), priced at
claude-haiku-4-5's rates (USD per million tokens: input 1, output 5, cache writes at most 2). Most of it is output
tokens, which the gateway reserves at exactly their rate (max_tokens at the output rate), so the upper bound it
reserves for a request is only a little above what the request then costs: many requests fit in a quota at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from apertis_proxy import cli
from apertis_proxy.store import service

from .gateway_process import GatewayProcess, toml_tables
from .mock_upstream import MOCK_API_KEY, MockUpstream
from .processes import ServeProcess, clean_env, wait_for
from .rawhttp import RawConnection, request_bytes

MODEL = "claude-haiku-4-5-20251001"
INPUT_RATE, OUTPUT_RATE, TOP_INPUT_RATE = 1.0, 5.0, 2.0     # USD per million tokens (haiku 4.5)

# The usage every costed request reports: $0.0201, 4100 tokens.
INPUT_TOKENS, OUTPUT_TOKENS = 100, 4000
MAX_TOKENS = OUTPUT_TOKENS
REQUEST_COST = (INPUT_TOKENS * INPUT_RATE + OUTPUT_TOKENS * OUTPUT_RATE) / 1e6
REQUEST_TOKENS = INPUT_TOKENS + OUTPUT_TOKENS
USAGE = json.dumps({"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS})


def costed_body(n: int, *, stream: bool = False) -> dict:
    """A messages request of about 150 bytes asking for MAX_TOKENS: its reserved bound is
    150 * TOP_INPUT_RATE + MAX_TOKENS * OUTPUT_RATE per million, about $0.0203 (4150 tokens)."""
    return {"model": MODEL, "max_tokens": MAX_TOKENS, "stream": stream,
            "messages": [{"role": "user", "content": f"costed request {n}"}]}


def reserved_bound(body: dict) -> tuple[float, int]:
    """The upper bound (USD, tokens) the gateway reserves for `body`, as the issue defines it."""
    size = len(json.dumps(body).encode())
    return (size * TOP_INPUT_RATE + body["max_tokens"] * OUTPUT_RATE) / 1e6, size + body["max_tokens"]


def costed_headers(*scenario: str) -> dict:
    """The `x-mock-scenario` header that makes the mock report USAGE (plus other scenario items)."""
    return {"x-mock-scenario": "; ".join([f"usage={USAGE}", *scenario])}


# -- the upstream --------------------------------------------------------------------------------------------------

class CountingUpstream(MockUpstream):
    """A MockUpstream that counts the POST /v1/messages it is answering at once, from the whole request read to the
    last byte of the answer written (a stream: its message_stop), over every connection of every gateway process:
    `in_flight` now, `max_in_flight` ever (reset_max() starts a new count)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight = 0
        self.max_in_flight = 0

    def reset_max(self) -> None:
        self.max_in_flight = self.in_flight

    async def _messages(self, conn, request, version) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await super()._messages(conn, request, version)
        finally:
            self.in_flight -= 1


# -- the store ------------------------------------------------------------------------------------------------------

def cli_ok(*argv: str) -> str:
    """`apertis-proxy ARGV` in this process; its standard output (blocking: call it through asyncio.to_thread)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    assert code == 0, f"apertis-proxy {' '.join(argv)} exited {code}: {out.getvalue()}"
    return out.getvalue()


def setup_store(db: str, upstream: MockUpstream, name: str, *limits: str) -> str:
    """Channel `main` to the mock and the key `name` with these `keys create` flags; returns the key."""
    cli_ok("channels", "add", "main", "--base-url", upstream.base_url, "--api-key", MOCK_API_KEY, "--db", db)
    return create_key(db, name, *limits)


def create_key(db: str, name: str, *limits: str) -> str:
    out = cli_ok("keys", "create", name, *limits, "--db", db)
    return re.search(r"sk-apx-[A-Za-z0-9_-]+", out).group(0)


def _query(db: str, sql: str) -> list[dict]:
    conn = service.connect(db)
    try:
        return [dict(row) for row in conn.execute(sql)]
    finally:
        conn.close()


def ledger_rows(db: str, name: str) -> list[dict]:
    """The usage rows of the key called `name` (its name is a plain identifier)."""
    return _query(db, f"SELECT u.* FROM usage u JOIN keys k ON k.id = u.key_id WHERE k.name = '{name}' "
                      "ORDER BY u.ts, u.request_id")


def key_spend(db: str, name: str) -> tuple[float, int]:
    """The key's settled spend (USD, tokens): key_spend, (0, 0) before its first settlement."""
    rows = _query(db, f"SELECT s.cost, s.tokens FROM key_spend s JOIN keys k ON k.id = s.key_id "
                      f"WHERE k.name = '{name}'")
    return (float(rows[0]["cost"]), int(rows[0]["tokens"])) if rows else (0.0, 0)


def row_tokens(row: dict) -> int:
    return (row["input_tokens"] + row["output_tokens"] + row["cache_read_input_tokens"]
            + row["cache_creation_input_tokens"])


async def ledger_with(db: str, name: str, successes: int, timeout: float = 15.0) -> list[dict]:
    """The key's rows once at least `successes` of them are status 200 (the meter ships them after the answers)."""
    rows: list[dict] = []

    async def landed() -> bool:
        rows[:] = await asyncio.to_thread(ledger_rows, db, name)
        return sum(1 for r in rows if r["status"] == 200) >= successes
    await wait_for(landed, timeout, f"{successes} successful ledger rows of key {name}", interval=0.2)
    return rows


# -- the gateway processes ------------------------------------------------------------------------------------------

FAST_POLLS = {"plugins.options.keys": {"poll_interval": 0.2}, "plugins.options.channels": {"poll_interval": 0.2},
              "plugins.options.sqlite": {"flush_interval": 0.05}}


@dataclass
class Hosts:
    """Gateway processes sharing one store, the ports to spread requests over (one for `serve --workers`: the
    kernel spreads its connections over the workers)."""
    db: str
    processes: list = field(default_factory=list)        # GatewayProcess or ServeProcess
    ports: list[int] = field(default_factory=list)

    @classmethod
    async def postgres(cls, db: str, tmp_path: Path, count: int = 2, lease_seconds: float = 3) -> "Hosts":
        """`count` gateway processes ("hosts") on the PostgreSQL database `db`."""
        hosts = cls(db)
        try:
            for n in range(count):
                process = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / f"host{n}",
                                                  tables={"limits": {"lease_seconds": lease_seconds}})
                hosts.processes.append(process)
                hosts.ports.append(process.port)
        except BaseException:
            await hosts.close()
            raise
        return hosts

    @classmethod
    async def workers(cls, db: str, tmp_path: Path, workers: int = 2, lease_seconds: float = 3) -> "Hosts":
        """`serve --workers N` on the SQLite file `db`."""
        config = tmp_path / "apertis.toml"
        config.write_text(toml_tables({"server": {"shutdown_timeout": 2, "drain_delay": 0}, **FAST_POLLS,
                                       "limits": {"lease_seconds": lease_seconds}}))
        server = ServeProcess(tmp_path, db, "--workers", str(workers), "--config", str(config), env=clean_env())
        hosts = cls(db, [server], [server.port])
        try:
            await server.start()
        except BaseException:
            await hosts.close()
            raise
        return hosts

    def port(self, n: int) -> int:
        """Port of the n-th request of a spread (round robin over the hosts)."""
        return self.ports[n % len(self.ports)]

    async def close(self) -> None:
        for process in self.processes:
            if isinstance(process, GatewayProcess):
                await asyncio.to_thread(process.stop)
            else:
                try:
                    await process.stop()           # SIGTERM: the workers ship their ledger rows and exit
                except AssertionError:
                    pass
                await process.kill()

    @property
    def logs(self) -> str:
        out = []
        for process in self.processes:
            if isinstance(process, GatewayProcess):
                out.append(process.log)
            else:
                out.append(process.stderr)
        return "\n".join(out)

    async def __aenter__(self) -> "Hosts":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# -- requests --------------------------------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def error_type(self) -> Optional[str]:
        try:
            return json.loads(self.body)["error"]["type"]
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def complete(self) -> bool:
        """A 200 answer that came whole: a JSON message, or a stream through its message_stop."""
        if self.status != 200:
            return False
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            return b"event: message_stop" in self.body
        return json.loads(self.body).get("type") == "message"

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.headers}, {self.body[:300]!r})"


async def send(port: int, key: str, body: dict, headers: Optional[dict] = None, timeout: float = 30.0) -> Answer:
    """One request on its own connection, read to its end."""
    async with await RawConnection.open("127.0.0.1", port) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01",
                                                               **(headers or {})}, json_body=body))
        response = await conn.read_response(timeout=timeout)
    return Answer(response.status, dict(response.headers), response.body)


class OpenStream:
    """A stream whose head was read; the request is in flight until its body is read (finish) or dropped (abort)."""

    def __init__(self, conn: RawConnection, head) -> None:
        self.conn = conn
        self.head = head

    @property
    def status(self) -> int:
        return self.head.status

    @classmethod
    async def open(cls, port: int, key: str, body: dict, headers: Optional[dict] = None,
                   timeout: float = 30.0) -> "OpenStream":
        conn = await RawConnection.open("127.0.0.1", port)
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01",
                                                               **(headers or {})}, json_body=body))
        return cls(conn, await conn.read_head(timeout))

    async def finish(self, timeout: float = 30.0) -> Answer:
        body = b"".join([chunk async for chunk in self.conn.iter_chunks(self.head, timeout)])
        self.conn.close()
        return Answer(self.head.status, dict(self.head.headers), body)

    def abort(self) -> None:
        """Reset the connection, unless it is closed already (finished)."""
        if not self.conn.writer.is_closing():
            self.conn.abort()


def refusal_problem(answer: Answer) -> Optional[str]:
    """None when `answer` is one of the refusals a limited key may get: 402 billing_error with x-should-retry:
    false, or 429 rate_limit_error with retry-after (whole seconds, at least 1); else what is wrong with it."""
    if answer.status == 402:
        if answer.error_type != "billing_error" or answer.headers.get("x-should-retry") != "false":
            return f"a 402 that is not billing_error with x-should-retry: false: {answer!r}"
        return None
    if answer.status == 429:
        retry_after = answer.headers.get("retry-after", "")
        if answer.error_type != "rate_limit_error" or not retry_after.isdigit() or int(retry_after) < 1:
            return f"a 429 that is not rate_limit_error with retry-after: {answer!r}"
        return None
    return f"neither 200 nor a limit's refusal: {answer!r}"
