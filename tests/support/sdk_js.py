"""The official JavaScript SDK (``@anthropic-ai/sdk``, pinned in tests/js_sdk/package.json) as a third SDK generation,
"js", beside the two Python ones (see sdk_harness.py).

The package is installed on first use, with npm and the committed lock file, into ``tests/.js-sdk/`` (gitignored),
and reused while its version and the package.json/lock it came from are unchanged. A long-lived Node child process
(tests/js_sdk/runner.mjs) runs the scenarios of sdk_scenarios.py, rewritten with the JS SDK's own API, over the
JSON-lines protocol of legacy_sdk_runner.py. The JS SDK has one client kind, async. Without Node.js (or without npm
before the first install), `unavailable_reason()` says why and the `sdk` / `make_sdk` fixtures skip the JS runs.
Use it through those fixtures rather than directly.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from . import sdk_scenarios
from .sdk_legacy import LegacySdkProcess, install_atomically

TESTS_DIR = Path(__file__).resolve().parent
SOURCE = TESTS_DIR / "js_sdk"                 # committed: package.json, package-lock.json, runner.mjs
RUNNER = SOURCE / "runner.mjs"
JS_ROOT = TESTS_DIR / ".js-sdk"               # gitignored: the installs
PACKAGE = "@anthropic-ai/sdk"
PINNED_VERSION: str = json.loads((SOURCE / "package.json").read_text())["dependencies"][PACKAGE]
# .ci/latest-sdks sets APERTIS_TEST_JS_SDK to try another release (installed without the committed lock).
JS_SDK_VERSION: str = os.environ.get("APERTIS_TEST_JS_SDK") or PINNED_VERSION
MIN_NODE = 18                                  # the SDK needs a global fetch
INSTALL_TIMEOUT = 600.0
MARKER = ".installed-from"                     # the digest of the package.json and lock an install came from


class JsSdkUnavailable(RuntimeError):
    """Node.js (or npm, for the first install) is missing; the fixtures turn this into a skip."""


def _source_digest() -> str:
    digest = hashlib.sha256(JS_SDK_VERSION.encode() + b"\0")
    for name in ("package.json", "package-lock.json"):
        path = SOURCE / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"") + b"\0")
    return digest.hexdigest()


def _installed(target: Path) -> bool:
    manifest = target / "node_modules" / "@anthropic-ai" / "sdk" / "package.json"
    marker = target / MARKER
    try:
        return (json.loads(manifest.read_text())["version"] == JS_SDK_VERSION
                and marker.read_text().strip() == _source_digest())
    except (OSError, ValueError, KeyError):
        return False


def install_dir() -> Path:
    return JS_ROOT / f"anthropic-sdk-{JS_SDK_VERSION}"


@functools.cache
def unavailable_reason() -> Optional[str]:
    """Why the JS runs cannot happen here, or None."""
    node = shutil.which("node")
    if node is None:
        return f"Node.js is not installed: the JS SDK ({PACKAGE} {JS_SDK_VERSION}) runs need node >= {MIN_NODE} and npm"
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"node does not run ({exc}): the JS SDK runs need node >= {MIN_NODE}"
    major = re.match(r"v(\d+)\.", version)
    if not major or int(major.group(1)) < MIN_NODE:
        return f"node {version or '(no version)'} is too old: the JS SDK runs need node >= {MIN_NODE}"
    if not _installed(install_dir()) and shutil.which("npm") is None:
        return f"npm is not installed, and {PACKAGE} {JS_SDK_VERSION} is not installed yet in {JS_ROOT}"
    return None


_install_failure: Optional[str] = None  # a failed install is not retried by every later test of the session


def ensure_installed() -> Path:
    """The folder whose node_modules holds the pinned SDK, installing it on first use (under a lock, atomically)."""
    global _install_failure
    target = install_dir()
    if _installed(target):
        return target
    if _install_failure:
        raise RuntimeError(f"(not retried) {_install_failure}")
    try:
        return _install(target)
    except RuntimeError as exc:
        _install_failure = str(exc)
        raise


def _install(target: Path) -> Path:
    def npm_install(staging: Path) -> tuple[bool, str]:
        npm = shutil.which("npm")
        if npm is None:
            raise JsSdkUnavailable(f"npm is not installed: cannot install {PACKAGE} {JS_SDK_VERSION}")
        digest = _source_digest()
        for name in ("package.json", "package-lock.json"):
            if (SOURCE / name).exists():
                shutil.copyfile(SOURCE / name, staging / name)
        command = [npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund", "--loglevel=error"]
        if JS_SDK_VERSION != PINNED_VERSION:            # another release than the lock holds
            (staging / "package-lock.json").unlink(missing_ok=True)
            command.append(f"{PACKAGE}@{JS_SDK_VERSION}")
        env = {**os.environ, "NPM_CONFIG_UPDATE_NOTIFIER": "false"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env,
                                  cwd=str(staging), timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"npm install of {PACKAGE} {JS_SDK_VERSION} took over {INSTALL_TIMEOUT:.0f}s") from exc
        (staging / MARKER).write_text(digest + "\n")
        return done.returncode == 0, (f"could not install {PACKAGE} {JS_SDK_VERSION} into {JS_ROOT} "
                                      f"(npm exit code {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return install_atomically(JS_ROOT, target, _installed, npm_install)


def scenario_constants() -> dict:
    """What runner.mjs takes from sdk_scenarios, so the two sets of scenarios use the same model and payloads."""
    return {"DEFAULT_MODEL": sdk_scenarios.DEFAULT_MODEL, "PNG_1X1": sdk_scenarios.PNG_1X1,
            "PDF_TINY": sdk_scenarios.PDF_TINY, "WEATHER_TOOL": sdk_scenarios.WEATHER_TOOL}


class JsSdkProcess(LegacySdkProcess):
    """The Node child process running JS SDK scenarios; started (and the SDK installed) on first use, shared by
    the whole test session. Same interface as LegacySdkProcess: `await run("async", name, args)`, `close()`."""

    label = "JS SDK"

    def _start(self) -> subprocess.Popen:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self._proc
            reason = unavailable_reason()
            if reason:
                raise JsSdkUnavailable(reason)
            sdk_dir = ensure_installed()
            env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
            env.pop("NODE_OPTIONS", None)  # a developer's --require hooks must not print onto the protocol
            proc = subprocess.Popen([shutil.which("node"), str(RUNNER), str(sdk_dir),
                                     json.dumps(scenario_constants())],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
                                    env=env, cwd=str(SOURCE))
            hello = proc.stdout.readline()
            if not hello:
                proc.wait()
                raise RuntimeError(f"JS SDK process exited at start (code {proc.returncode}); see its stderr")
            hello = json.loads(hello)["hello"]
            self.version = hello["anthropic"]
            problem = None
            if self.version != JS_SDK_VERSION:
                problem = f"JS SDK process loaded {PACKAGE} {self.version}, not {JS_SDK_VERSION}"
            elif set(hello["scenarios"]) != set(sdk_scenarios.SCENARIOS):
                problem = (f"runner.mjs and sdk_scenarios.py disagree on the scenarios: "
                           f"{sorted(set(hello['scenarios']) ^ set(sdk_scenarios.SCENARIOS))}")
            if problem:
                proc.kill()
                proc.wait()
                raise RuntimeError(problem)
            return self._serve(proc)
