"""Running apertis-proxy as an operator does, for the tests: `python -m apertis_proxy` commands (CliRunner) and
`serve` (ServeProcess) as real subprocesses driven through asyncio (the MockUpstream runs in the test's event loop,
so a blocking wait would freeze it), the official SDK as the client, and small waits."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import anthropic

from .mock_upstream import MOCK_API_KEY

MODEL = "claude-haiku-4-5-20251001"
CLI_TIMEOUT = 30.0
START_TIMEOUT = 15.0
EXIT_TIMEOUT = 15.0
EDIT_TIMEOUT = 10.0      # "a CLI edit reaches a running server within a few seconds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child: none of the developer's ANTHROPIC_* / APERTIS_* settings, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "APERTIS_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def connect_refused(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:port any more."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str,
                   interval: float = 0.1) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class CliRunner:
    """`python -m apertis_proxy ARGS` in `cwd`; returns (exit code, stdout, stderr)."""

    def __init__(self, cwd: Path, db: Optional[str], env: Optional[dict[str, str]] = None) -> None:
        self.cwd = cwd
        self.db = db             # None: rely on APERTIS_DB / the default
        self.env = env if env is not None else clean_env()

    async def __call__(self, *args: str, stdin: Optional[str] = None) -> tuple[int, str, str]:
        argv = [*args, *(["--db", self.db] if self.db else [])]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "apertis_proxy", *argv, cwd=self.cwd, env=self.env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), CLI_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"apertis-proxy {' '.join(argv)} did not finish in {CLI_TIMEOUT}s") from None
        return proc.returncode, out.decode(), err.decode()

    async def ok(self, *args: str, stdin: Optional[str] = None) -> str:
        code, out, err = await self(*args, stdin=stdin)
        assert code == 0, f"apertis-proxy {' '.join(args)} exited {code}: {err}"
        return out

    async def create_key(self, name: str) -> str:
        out = await self.ok("keys", "create", name)
        return out.strip().splitlines()[-1]

    async def add_channel(self, name: str, base_url: str, api_key: str = MOCK_API_KEY, *extra: str) -> None:
        await self.ok("channels", "add", name, "--base-url", base_url, "--api-key", api_key, *extra)

    async def usage(self) -> dict[str, Any]:
        return json.loads(await self.ok("usage", "--json"))


class ServeProcess:
    """`python -m apertis_proxy serve` on a free port, its output in files under `workdir`."""

    def __init__(self, workdir: Path, db: Optional[str], *extra: str, env: Optional[dict[str, str]] = None,
                 port: Optional[int] = None, preexec_fn: Optional[Callable[[], None]] = None) -> None:
        self.workdir = workdir
        self.preexec_fn = preexec_fn        # run in the child before exec (e.g. to set its resource limits)
        self.port = port or free_port()
        self.argv = ["serve", "--host", "127.0.0.1", "--port", str(self.port), *(["--db", db] if db else []),
                     *extra]
        self.env = env if env is not None else clean_env()
        self.proc: Optional[asyncio.subprocess.Process] = None
        self._out_path = workdir / f"serve-{self.port}.out"
        self._err_path = workdir / f"serve-{self.port}.err"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout(self) -> str:
        return self._out_path.read_text()

    @property
    def stderr(self) -> str:
        return self._err_path.read_text()

    async def start(self) -> "ServeProcess":
        with open(self._out_path, "wb") as out, open(self._err_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "apertis_proxy", *self.argv, cwd=self.workdir, env=self.env,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err, preexec_fn=self.preexec_fn)
        await wait_for(self._accepting, START_TIMEOUT, f"serve to accept connections on port {self.port}")
        return self

    async def _accepting(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode} before listening:\n{self.stderr}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 1.0)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        await writer.wait_closed()
        return True

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"serve did not exit within {timeout}s:\n{self.stderr}") from None

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT) -> int:
        self.send_signal(signum)
        return await self.wait(timeout)

    async def kill(self) -> None:
        """Teardown: make sure nothing outlives the test."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def __aenter__(self) -> "ServeProcess":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.kill()


def sdk_client(base_url: str, key: str) -> anthropic.AsyncAnthropic:
    # No retries: every answer the gateway gives is what the test sees.
    return anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0, timeout=30.0)


async def ask(base_url: str, key: str, text: str = "ping") -> anthropic.types.Message:
    async with sdk_client(base_url, key) as client:
        return await client.messages.create(model=MODEL, max_tokens=64,
                                            messages=[{"role": "user", "content": text}])


async def usage_with(cli: CliRunner, requests: int) -> dict[str, Any]:
    """`usage --json`, once the server's meter has written at least `requests` rows."""
    seen: dict[str, Any] = {}

    async def landed() -> bool:
        seen.update(await cli.usage())
        return seen["requests"] >= requests
    await wait_for(landed, EDIT_TIMEOUT, f"{requests} usage row(s)", interval=0.2)
    return seen


# -- the README flow ------------------------------------------------------------------------------------------------
