"""One way to run an SDK scenario under any SDK generation and client kind: ``SdkRunner``.

    runner = SdkRunner("1.x", "async", legacy_process)      # usually from the `sdk` / `make_sdk` fixtures
    result = await runner.run("stream_text", base_url, api_key, text="hi")

Generation 2.x runs in the test process (the sync client in a worker thread, so the event loop that serves the
mock and the gateway keeps running); 1.x runs in the shared child process of sdk_legacy.py; "js" (the official
JavaScript SDK, async only) runs in the shared Node child process of sdk_js.py. Either way the result is plain JSON
(see sdk_scenarios.py for its shape, errors included). The runner also says what its generation sends, so a test can
check what arrived upstream: `auth_header`, `api_version`, `beta_query`, `lang` (x-stainless-lang); and
`stream_error_class`, the error class its SDK raises for an in-band `error` event.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Optional

import anthropic

from . import sdk_scenarios
from .sdk_js import JsSdkProcess
from .sdk_legacy import LegacySdkProcess

GENERATIONS = ("2.x", "1.x", "js")
MODES = ("sync", "async")
GENERATION_MODES = {"2.x": MODES, "1.x": MODES, "js": ("async",)}   # the JS SDK has one client kind
CALL_TIMEOUT = 60.0


@dataclass
class SdkRunner:
    generation: str          # "2.x" (in process), "1.x" (legacy child process) or "js" (Node child process)
    mode: str                # "sync" or "async" ("async" only for "js")
    legacy: Optional[LegacySdkProcess] = None
    js: Optional[JsSdkProcess] = None

    def __post_init__(self) -> None:
        if self.mode not in GENERATION_MODES.get(self.generation, ()):
            raise ValueError(f"unknown SDK runner {self.generation}/{self.mode}")
        if self.generation == "2.x" and not anthropic.__version__.startswith("2."):
            raise RuntimeError(f"the test process must have the 2.x SDK, found {anthropic.__version__}")

    @property
    def auth_header(self) -> str:
        """The header that carries the key in this generation's default style."""
        return "x-api-key" if self.generation == "1.x" else "authorization"   # js: Bearer from apiKey too

    @property
    def api_version(self) -> str:
        return "2023-06-01" if self.generation == "1.x" else "2026-10-21"

    @property
    def beta_query(self) -> str:
        """The query string of beta calls (`client.beta.messages...`)."""
        return "beta=true" if self.generation == "1.x" else ""

    @property
    def lang(self) -> str:
        """The SDK's x-stainless-lang header."""
        return "js" if self.generation == "js" else "python"

    @property
    def stream_error_class(self) -> str:
        """The class of the error raised for an `event: error` inside a 200 stream (no HTTP status of its own)."""
        return "APIError" if self.generation == "js" else "APIStatusError"

    def __str__(self) -> str:
        return f"sdk{self.generation}-{self.mode}"

    async def run(self, name: str, base_url: str, api_key: str, *, auth: str = "default",
                  client_options: Optional[dict] = None, timeout: float = CALL_TIMEOUT, **kw: Any) -> dict:
        """Run scenario `name` against `base_url`; `auth` and `client_options` as in sdk_scenarios.client_kwargs."""
        if name not in sdk_scenarios.SCENARIOS:
            raise KeyError(f"no SDK scenario {name!r}")
        args = {"base_url": base_url, "api_key": api_key, "auth": auth, "client_options": client_options, **kw}
        if self.generation == "1.x":
            return await self.legacy.run(self.mode, name, args, timeout)
        if self.generation == "js":
            return await self.js.run(self.mode, name, args, timeout)
        if self.mode == "sync":
            result = await asyncio.wait_for(asyncio.to_thread(sdk_scenarios.run_sync, name, **args), timeout)
        else:
            result = await asyncio.wait_for(sdk_scenarios.run_async(name, **args), timeout)
        return json.loads(json.dumps(result))  # the same plain-JSON types as the child process returns
