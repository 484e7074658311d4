"""One way to run an SDK scenario under any SDK generation and client kind: ``SdkRunner``.

    runner = SdkRunner("1.x", "async", legacy_process)      # usually from the `sdk` / `make_sdk` fixtures
    result = await runner.run("stream_text", base_url, api_key, text="hi")

Generation 2.x runs in the test process (the sync client in a worker thread, so the event loop that serves the
mock and the gateway keeps running); 1.x runs in the shared child process of sdk_legacy.py. Either way the result is
plain JSON (see sdk_scenarios.py for its shape, errors included). The runner also says what its generation sends,
so a test can check what arrived upstream: `auth_header`, `api_version`, `beta_query`.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Optional

import anthropic

import sdk_scenarios
from sdk_legacy import LegacySdkProcess

GENERATIONS = ("2.x", "1.x")
MODES = ("sync", "async")
CALL_TIMEOUT = 60.0


@dataclass
class SdkRunner:
    generation: str          # "2.x" (in process) or "1.x" (legacy child process)
    mode: str                # "sync" or "async"
    legacy: Optional[LegacySdkProcess] = None

    def __post_init__(self) -> None:
        if self.generation not in GENERATIONS or self.mode not in MODES:
            raise ValueError(f"unknown SDK runner {self.generation}/{self.mode}")
        if self.generation == "2.x" and not anthropic.__version__.startswith("2."):
            raise RuntimeError(f"the test process must have the 2.x SDK, found {anthropic.__version__}")

    @property
    def auth_header(self) -> str:
        """The header that carries the key in this generation's default style."""
        return "authorization" if self.generation == "2.x" else "x-api-key"

    @property
    def api_version(self) -> str:
        return "2026-10-21" if self.generation == "2.x" else "2023-06-01"

    @property
    def beta_query(self) -> str:
        """The query string of beta calls (`client.beta.messages...`)."""
        return "" if self.generation == "2.x" else "beta=true"

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
        if self.mode == "sync":
            result = await asyncio.wait_for(asyncio.to_thread(sdk_scenarios.run_sync, name, **args), timeout)
        else:
            result = await asyncio.wait_for(sdk_scenarios.run_async(name, **args), timeout)
        return json.loads(json.dumps(result))  # the same plain-JSON types as the child process returns
