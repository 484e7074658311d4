"""The 1.x generation of the `anthropic` SDK (1.17.0: ``x-api-key``, ``anthropic-version: 2023-06-01``,
``?beta=true``), run beside the 2.x SDK the test process imports.

Two versions of one package cannot live in one interpreter, so 1.17.0 is installed once, without dependencies (they
are the same as 2.x's), into ``tests/.legacy-sdk/anthropic-1.17.0`` (gitignored), and a long-lived child process
(legacy_sdk_runner.py) with that folder first on PYTHONPATH runs the scenarios of sdk_scenarios.py. Use it through
the `sdk` / `make_sdk` fixtures rather than directly.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

# The pinned 1.x release; .ci/latest-sdks sets APERTIS_TEST_LEGACY_SDK to try the newest one instead.
LEGACY_VERSION = os.environ.get("APERTIS_TEST_LEGACY_SDK") or "1.17.0"
TESTS_DIR = Path(__file__).resolve().parent
LEGACY_ROOT = TESTS_DIR / ".legacy-sdk"
RUNNER = TESTS_DIR / "legacy_sdk_runner.py"


def _installed(target: Path) -> bool:
    version_file = target / "anthropic" / "_version.py"
    return version_file.is_file() and f'"{LEGACY_VERSION}"' in version_file.read_text()


def ensure_installed() -> Path:
    """The folder holding anthropic==LEGACY_VERSION, installing it on first use (under a lock, atomically)."""
    target = LEGACY_ROOT / f"anthropic-{LEGACY_VERSION}"
    if _installed(target):
        return target

    def pip_install(staging: Path) -> tuple[bool, str]:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--quiet",
             "--target", str(staging), f"anthropic=={LEGACY_VERSION}"],
            capture_output=True, text=True)
        return done.returncode == 0, (f"could not install anthropic=={LEGACY_VERSION} into {LEGACY_ROOT}:\n"
                                      f"{done.stdout}\n{done.stderr}")
    return install_atomically(LEGACY_ROOT, target, _installed, pip_install)


def install_atomically(root: Path, target: Path, installed: Callable[[Path], bool],
                       install: Callable[[Path], tuple[bool, str]]) -> Path:
    """`target` under `root`, made by `install(staging)` in a staging folder and swapped in whole, under a lock
    shared by every test process; `install` answers (ok, the error to raise if not). Also used by sdk_js.py."""
    root.mkdir(exist_ok=True)
    with open(root / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed(target):
            return target
        staging = Path(tempfile.mkdtemp(dir=root, prefix="staging-"))
        try:
            ok, failure = install(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not ok or not installed(staging):
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(failure)
        shutil.rmtree(target, ignore_errors=True)
        staging.chmod(0o755)  # mkdtemp made it private
        staging.rename(target)
    return target


class LegacySdkProcess:
    """The child process running SDK 1.x scenarios; started on first use, shared by the whole test session.

    `run` is a coroutine and many may be in flight at once (the child runs each in its own thread)."""

    label = "legacy SDK"     # in error messages; sdk_js.JsSdkProcess runs another child over the same protocol

    def __init__(self) -> None:
        self.version: Optional[str] = None
        self._proc: Optional[subprocess.Popen] = None
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._reader: Optional[threading.Thread] = None

    def _start(self) -> subprocess.Popen:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self._proc
            env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
            env["PYTHONPATH"] = os.pathsep.join([str(ensure_installed()), str(TESTS_DIR)])
            proc = subprocess.Popen([sys.executable, str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, encoding="utf-8", env=env, cwd=str(TESTS_DIR))
            hello = proc.stdout.readline()
            if not hello:
                proc.wait()
                raise RuntimeError(f"legacy SDK process exited at start (code {proc.returncode}); see its stderr")
            self.version = json.loads(hello)["hello"]["anthropic"]
            if self.version != LEGACY_VERSION:
                proc.kill()
                raise RuntimeError(f"legacy SDK process imported anthropic {self.version}, not {LEGACY_VERSION}")
            return self._serve(proc)

    def _serve(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Take `proc`, started and greeted, as the child: its replies are read from now on."""
        self._reader = threading.Thread(target=self._read_replies, args=(proc,), daemon=True)
        self._reader.start()
        self._proc = proc
        return proc

    def _read_replies(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            message = json.loads(line)
            future = self._pending.pop(message["id"], None)
            if future is None:
                continue
            if "crash" in message:
                future.set_exception(RuntimeError(f"{self.label} scenario crashed:\n" + message["crash"]))
            else:
                future.set_result(message["result"])
        for future in list(self._pending.values()):
            future.set_exception(RuntimeError(f"{self.label} process exited"))
        self._pending.clear()

    async def run(self, mode: str, name: str, args: dict[str, Any], timeout: float = 60.0) -> dict:
        proc = await asyncio.to_thread(self._start)  # the first call may install and spawn: keep the loop free
        future: concurrent.futures.Future = concurrent.futures.Future()
        request_id = next(self._ids)
        self._pending[request_id] = future
        line = json.dumps({"id": request_id, "mode": mode, "name": name, "args": args}) + "\n"
        with self._lock:
            proc.stdin.write(line)
            proc.stdin.flush()
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._reader.join(timeout=10)  # it ends at the pipe's EOF
        proc.stdout.close()
