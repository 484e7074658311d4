"""Runtime settings: defaults, overridden by an optional TOML file, then by CLI flags.

The TOML file (``--config PATH`` or env ``APERTIS_CONFIG``) mirrors these
fields; plugin selection lives under ``[plugins]``:

    [server]
    max_body_bytes = 33554432

    [plugins]
    auth = ["keys"]
    router = ["channels"]
    meter = ["sqlite"]

    [plugins.options.channels]      # options handed to one plugin by name
    max_attempts = 3
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    db: str = "./apertis.db"
    workers: int = 1
    # Client side limits and timeouts (seconds).
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 32 * 1024 * 1024
    header_timeout: float = 30.0        # first byte of a request head to its end
    body_timeout: float = 60.0          # between body bytes
    keepalive_timeout: float = 75.0     # idle connection between requests
    shutdown_timeout: float = 30.0      # in-flight work gets this long after SIGTERM
    write_high_water: int = 64 * 1024   # pause upstream reads above this much unsent client data
    # Upstream side (seconds).
    connect_timeout: float = 10.0
    read_timeout: float = 600.0         # between upstream bytes, not total: streams last long
    pool_max_idle: int = 1024           # idle keep-alive connections kept per upstream origin
    pool_idle_timeout: float = 60.0
    # Request contract.
    thinking_budget_max: int = 32768
    default_api_version: str = "2023-06-01"
    # Plugins: entry-point names per group, in chain order, and their options.
    auth_plugins: list[str] = field(default_factory=lambda: ["keys"])
    router_plugins: list[str] = field(default_factory=lambda: ["channels"])
    meter_plugins: list[str] = field(default_factory=lambda: ["sqlite"])
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    config_poll_interval: float = 1.0   # how often the store is checked for CLI edits
    log_level: str = "INFO"

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_SECTIONS = ("server", "upstream", "contract", "logging")


def load(path: Optional[str] = None, **overrides: Any) -> Settings:
    """Defaults <- TOML file <- environment (APERTIS_DB) <- explicit overrides."""
    s = Settings()
    path = path or os.environ.get("APERTIS_CONFIG")
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in _SECTIONS and isinstance(value, dict):
                flat.update(value)
            elif key != "plugins":
                flat[key] = value
        plugins = data.get("plugins", {})
        for group in ("auth", "router", "meter"):
            if group in plugins:
                flat[f"{group}_plugins"] = list(plugins[group])
        if "options" in plugins:
            flat["plugin_options"] = dict(plugins["options"])
        known = {f.name for f in dataclasses.fields(Settings)}
        unknown = set(flat) - known
        if unknown:
            raise ValueError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
        s = s.replace(**flat)
    if os.environ.get("APERTIS_DB"):
        s.db = os.environ["APERTIS_DB"]
    return s.replace(**overrides)
