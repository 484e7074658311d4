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
import datetime
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Optional

from .budgets.webhook import check_url
from .gateway.client_address import FORWARDED_HEADERS, parse_networks
from .gateway.cors import ANY_ORIGIN, is_origin
from .plugin_api import DEFAULT_API_VERSION


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    db: str = "./apertis.db"
    workers: int = 1
    # Client side limits and timeouts (seconds).
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 32 * 1024 * 1024
    # The body limit while no auth plugin has vouched for the request's credential from
    # its head (a plugin without check_head): a keyless client cannot make a worker
    # buffer max_body_bytes per connection.
    max_unvouched_body_bytes: int = 1024 * 1024
    header_timeout: float = 30.0        # first byte of a request head to its end
    body_timeout: float = 60.0          # between body bytes
    keepalive_timeout: float = 75.0     # idle connection between requests
    shutdown_timeout: float = 30.0      # in-flight work gets this long after SIGTERM
    drain_delay: float = 0.0            # after SIGTERM, /ready says 503 and serving goes on this long
    write_high_water: int = 64 * 1024   # pause upstream reads above this much unsent client data
    max_connections: int = 10_000       # client connections per worker (lowered to fit the descriptor limit)
    # Well-formed heads (requests and upstream responses) are parsed by a strict
    # fast parser, anything else by h11; the check parses each both ways and logs
    # any difference (for debugging: it costs more than h11 alone).
    fast_heads: bool = True
    fast_heads_check: bool = False
    # TLS on the listener: both files or neither (PEM); reloaded on SIGHUP.
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    # Peers whose X-Forwarded-For / Forwarded headers name the client (CIDRs).
    trusted_proxies: list[str] = field(default_factory=list)
    # The header those proxies write: "x-forwarded-for" or "forwarded" (the other is never read).
    forwarded_header: str = "x-forwarded-for"
    # The gateway's address as clients reach it ("https://llm.example.com"), for URLs it hands out (a batch's
    # results_url); unset: the request's Host, https when the listener has TLS.
    public_url: Optional[str] = None
    # Origins whose browser pages may call the API (CORS, gateway/cors.py): "*" any, [] none.
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    # Upstream side (seconds).
    connect_timeout: float = 10.0
    read_timeout: float = 600.0         # between upstream bytes, not total: streams last long
    pool_max_idle: int = 1024           # idle keep-alive connections kept per upstream origin
    pool_idle_timeout: float = 60.0
    # Request contract.
    thinking_budget_max: int = 32768
    default_api_version: str = DEFAULT_API_VERSION
    # Billing: serve models the catalogue has no price for (recorded with cost
    # unknown; refused for keys with a USD quota).  Per channel: --allow-unpriced.
    allow_unpriced: bool = False
    # Plugins: entry-point names per group, in chain order, and their options.
    auth_plugins: list[str] = field(default_factory=lambda: ["keys"])
    router_plugins: list[str] = field(default_factory=lambda: ["channels"])
    meter_plugins: list[str] = field(default_factory=lambda: ["sqlite"])
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    config_poll_interval: float = 1.0   # how often the store is checked for CLI edits
    log_level: str = "INFO"
    # Usage rows older than this many days are deleted in the background; 0 keeps them all.
    keep_days: float = 0.0
    # [ledger] spool: usage rows on local disk until the database has them (see ledger_spool.py).
    spool_dir: str = ""                 # "" = "<database file>.spool", beside it (PostgreSQL: ./apertis-ledger.spool)
    spool_max_bytes: int = 256 << 20    # full: new requests get 503 overloaded_error
    spool_warn_bytes: int = 16 << 20    # a warning in the log past this
    ledger_fsync: str = "batch"         # [ledger] fsync: "batch", "always" or "never"
    log_format: str = "text"            # [logging] format: "text" or "json" (one object per line)
    access_log: bool = True             # one line per request
    # [metrics]: GET /metrics answers clients in these networks only.
    metrics_enabled: bool = True
    metrics_allow: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    metrics_per_key: bool = False       # a `key` label on request, token and cost series
    metrics_flush_interval: float = 1.0  # with --workers: how often each worker shares its figures
    # [budgets]: a webhook told once per key, quota period and threshold (percent of the quota).
    budget_webhook_url: Optional[str] = None
    budget_thresholds: list[int] = field(default_factory=lambda: [80, 100])
    budget_webhook_attempts: int = 5
    budget_webhook_backoff: float = 1.0     # seconds before the second attempt, doubled after each
    # [limits]: keys' quotas, rpm and concurrency are decided in the shared store.  A gateway
    # process killed while holding admissions frees them once its lease (seconds) runs out.
    limits_lease_seconds: float = 30.0
    # While the store cannot be reached, limited keys get 503 ("refuse"), or each process
    # admits against its share of the last known headroom ("share").
    limits_on_store_down: str = "refuse"

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Each setting's table and its key there, as README's Configuration block shows them; a key
# anywhere else is refused, so a misplaced one is never silently applied.
_TABLES: dict[str, tuple[str, ...]] = {
    "server": ("host", "port", "workers", "config_poll_interval", "max_body_bytes", "max_unvouched_body_bytes",
               "max_header_bytes", "header_timeout", "body_timeout", "keepalive_timeout", "shutdown_timeout",
               "drain_delay", "write_high_water", "max_connections", "tls_cert", "tls_key", "trusted_proxies",
               "forwarded_header", "public_url", "cors_origins", "fast_heads", "fast_heads_check"),
    "upstream": ("connect_timeout", "read_timeout", "pool_max_idle", "pool_idle_timeout"),
    "contract": ("thinking_budget_max", "default_api_version"),
    "billing": ("allow_unpriced",),
    "logging": ("log_level", "format", "access_log"),
    "metrics": ("enabled", "allow", "per_key", "flush_interval"),
    "ledger": ("keep_days", "spool_dir", "spool_max_bytes", "spool_warn_bytes", "fsync"),
    "budgets": ("webhook_url", "thresholds", "webhook_attempts", "webhook_backoff"),
    "limits": ("lease_seconds", "on_store_down"),
}
# Keys whose field name differs from the key in its section.
_RENAMED = {
    "ledger": {"fsync": "ledger_fsync"},
    "logging": {"format": "log_format"},
    "metrics": {"enabled": "metrics_enabled", "allow": "metrics_allow", "per_key": "metrics_per_key",
                "flush_interval": "metrics_flush_interval"},
    "limits": {"lease_seconds": "limits_lease_seconds", "on_store_down": "limits_on_store_down"},
    "budgets": {"webhook_url": "budget_webhook_url", "thresholds": "budget_thresholds",
                "webhook_attempts": "budget_webhook_attempts", "webhook_backoff": "budget_webhook_backoff"},
}
# Where a key (or a field name written as a key) belongs: name -> (table, key there).
_HOME = {name: (table, key) for table, keys in _TABLES.items() for key in keys
         for name in {key, _RENAMED.get(table, {}).get(key, key)}}


def _placed(path: str, table: Optional[str], key: str) -> str:
    """The setting `key` as found in `table` (None: the top level), or ValueError saying where it goes."""
    where = f"[{table}]" if table else "the top level"
    if key == "db":
        raise ValueError(f"{path}: db is not a file setting; give the database with --db or env APERTIS_DB")
    if table is not None and key in _TABLES[table]:
        return _RENAMED.get(table, {}).get(key, key)
    if key in _HOME:
        home, name = _HOME[key]
        if home == table:
            raise ValueError(f"{path}: under [{table}] this setting is written {name}, not {key}")
        written = f" as {name}" if name != key else ""
        raise ValueError(f"{path}: {key} belongs under [{home}]{written}, not {where}")
    raise ValueError(f"unknown setting(s) in {path}: {key}" + (f" under [{table}]" if table else ""))


def load(path: Optional[str] = None, **overrides: Any) -> Settings:
    """Defaults <- TOML file <- environment (APERTIS_DB) <- explicit overrides."""
    s = Settings()
    path = path or os.environ.get("APERTIS_CONFIG")
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in _TABLES:
                if not isinstance(value, dict):
                    raise ValueError(f"{path}: [{key}] must be a table")
                flat.update({_placed(path, key, k): v for k, v in value.items()})
            elif key != "plugins":
                flat[_placed(path, None, key)] = value
        plugins = data.get("plugins", {})
        if not isinstance(plugins, dict):
            raise ValueError(f"{path}: [plugins] must be a table")
        stray = set(plugins) - {"auth", "router", "meter", "options"}
        if stray:
            raise ValueError(f"unknown key(s) under [plugins] in {path}: {', '.join(sorted(stray))} "
                             f"(known: auth, router, meter, options)")
        for group in ("auth", "router", "meter"):
            if group in plugins:
                flat[f"{group}_plugins"] = plugins[group]
        if "options" in plugins:
            flat["plugin_options"] = plugins["options"]
        s = s.replace(**flat)
    if os.environ.get("APERTIS_DB"):
        s.db = os.environ["APERTIS_DB"]
    s = s.replace(**overrides)
    check(s, path or "the settings")
    return s


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# field -> (kind, lowest allowed); a wrong type or value is refused at start-up,
# not found out by the first request (a timeout of "10s" failed every request).
_RULES: dict[str, tuple[str, float]] = {
    "port": ("int", 0), "workers": ("int", 1), "max_header_bytes": ("int", 1024),
    "max_body_bytes": ("int", 1), "max_unvouched_body_bytes": ("int", 1), "write_high_water": ("int", 1024),
    "pool_max_idle": ("int", 0),
    "max_connections": ("int", 1), "spool_max_bytes": ("int", 4096), "spool_warn_bytes": ("int", 0),
    "thinking_budget_max": ("int", 1024),
    "header_timeout": ("seconds", 0), "body_timeout": ("seconds", 0), "keepalive_timeout": ("seconds", 0),
    "connect_timeout": ("seconds", 0), "read_timeout": ("seconds", 0), "pool_idle_timeout": ("seconds", 0),
    "config_poll_interval": ("seconds", 0), "shutdown_timeout": ("seconds or 0", 0),
    "drain_delay": ("seconds or 0", 0), "metrics_flush_interval": ("seconds", 0),
    "budget_webhook_attempts": ("int", 1), "budget_webhook_backoff": ("seconds", 0),
    "limits_lease_seconds": ("seconds", 0),
}
LOG_FORMATS = ("text", "json")
LIMITS_ON_STORE_DOWN = ("refuse", "share")
LEDGER_FSYNC = ("batch", "always", "never")


def check(s: Settings, where: str) -> None:
    """Raise ValueError naming the first setting of the wrong type or out of range."""
    for name, (kind, low) in _RULES.items():
        value = getattr(s, name)
        if kind == "int":
            if type(value) is not int or value < low:
                raise ValueError(f"{where}: {name} must be a whole number >= {low:g}, not {value!r}")
        elif (type(value) not in (int, float) or value != value
              or not (value >= 0 if kind == "seconds or 0" else value > 0)):
            raise ValueError(f"{where}: {name} must be a number of seconds "
                             f"{'>= 0' if kind == 'seconds or 0' else '> 0'}, not {value!r}")
    if type(s.keep_days) not in (int, float) or not 0 <= s.keep_days < float("inf"):
        raise ValueError(f"{where}: keep_days must be a number of days >= 0 (0 keeps every row), "
                         f"not {s.keep_days!r}")
    if s.ledger_fsync not in LEDGER_FSYNC:
        raise ValueError(f"{where}: [ledger] fsync must be one of {', '.join(LEDGER_FSYNC)}, not {s.ledger_fsync!r}")
    if not isinstance(s.spool_dir, str):
        raise ValueError(f"{where}: spool_dir must be a directory path, not {s.spool_dir!r}")
    _check_tls(s, where)
    _check_public_url(s, where)
    _check_cors_origins(s.cors_origins, where)
    if not isinstance(s.trusted_proxies, list):
        raise ValueError(f"{where}: trusted_proxies must be a list of CIDRs, like [\"10.0.0.0/8\"], "
                         f"not {s.trusted_proxies!r}")
    try:
        parse_networks(s.trusted_proxies)
    except ValueError as exc:
        raise ValueError(f"{where}: trusted_proxies: {exc}") from None
    if s.port > 65535:
        raise ValueError(f"{where}: port must be 0..65535, not {s.port}")
    for name in ("host", "db", "default_api_version", "log_level"):
        if not isinstance(getattr(s, name), str) or not getattr(s, name):
            raise ValueError(f"{where}: {name} must be a non-empty string, not {getattr(s, name)!r}")
    if type(s.allow_unpriced) is not bool:
        raise ValueError(f"{where}: allow_unpriced must be true or false, not {s.allow_unpriced!r}")
    if s.log_level.upper() not in LOG_LEVELS:
        raise ValueError(f"{where}: log_level must be one of {', '.join(LOG_LEVELS)}, not {s.log_level!r}")
    if not _is_api_version(s.default_api_version):
        raise ValueError(f"{where}: default_api_version must be a date like 2023-06-01, "
                         f"not {s.default_api_version!r}")
    if s.forwarded_header not in FORWARDED_HEADERS:
        raise ValueError(f"{where}: forwarded_header must be one of {', '.join(FORWARDED_HEADERS)}, "
                         f"not {s.forwarded_header!r}")
    if s.log_format not in LOG_FORMATS:
        raise ValueError(f"{where}: [logging] format must be one of {', '.join(LOG_FORMATS)}, not {s.log_format!r}")
    for name in ("access_log", "metrics_enabled", "metrics_per_key", "fast_heads", "fast_heads_check"):
        if type(getattr(s, name)) is not bool:
            raise ValueError(f"{where}: {name} must be true or false, not {getattr(s, name)!r}")
    _check_networks(s.metrics_allow, where)
    _check_budgets(s, where)
    _check_limits(s, where)
    for group in ("auth", "router", "meter"):
        names = getattr(s, f"{group}_plugins")
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{where}: [plugins] {group} must be a list of plugin names, "
                             f"like {group} = [\"name\"], not {names!r}")
    options = s.plugin_options
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError(f"{where}: [plugins.options.NAME] must be tables of options, one per plugin")
    # A table no chain reads (a misspelt name) would leave its options silently unapplied.
    running = [*s.auth_plugins, *s.router_plugins, *s.meter_plugins]
    unread = sorted(set(options) - set(running))
    if unread:
        tables = ", ".join(f"[plugins.options.{name}]" for name in unread)
        raise ValueError(f"{where}: no plugin that runs reads {tables} "
                         f"(running: {', '.join(dict.fromkeys(running)) or 'none'})")


def _check_public_url(s: Settings, where: str) -> None:
    url = s.public_url
    if url is None:
        return
    scheme, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
    if scheme not in ("http", "https") or not sep or not rest or any(c in rest for c in "?#@ ") or \
            not rest.split("/", 1)[0]:
        raise ValueError(f"{where}: public_url must be an http(s) address like \"https://llm.example.com\", "
                         f"not {url!r}")


def _check_cors_origins(origins: Any, where: str) -> None:
    if not isinstance(origins, list) or not all(
            isinstance(o, str) and (o == ANY_ORIGIN or is_origin(o.lower())) for o in origins):
        raise ValueError(f"{where}: cors_origins must be a list of origins like [\"https://app.example.com\"] "
                         f"(scheme, host and port, no path), [\"*\"] for any or [] for none, not {origins!r}")


def _check_tls(s: Settings, where: str) -> None:
    for name in ("tls_cert", "tls_key"):
        value = getattr(s, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}: {name} must be the path of a PEM file, not {value!r}")
        if value is not None and not os.path.isfile(value):
            raise ValueError(f"{where}: {name} {value!r} is not a readable file")
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ValueError(f"{where}: tls_cert and tls_key go together: set both or neither")


def _check_limits(s: Settings, where: str) -> None:
    if s.limits_on_store_down not in LIMITS_ON_STORE_DOWN:
        raise ValueError(f"{where}: [limits] on_store_down must be one of {', '.join(LIMITS_ON_STORE_DOWN)}, "
                         f"not {s.limits_on_store_down!r}")


def _check_budgets(s: Settings, where: str) -> None:
    url = s.budget_webhook_url
    if url is not None:
        try:
            check_url(url if isinstance(url, str) else "")
        except ValueError:
            raise ValueError(f"{where}: [budgets] webhook_url must be an http:// or https:// URL, "
                             f"not {url!r}") from None
    thresholds = s.budget_thresholds
    if (not isinstance(thresholds, list) or not thresholds
            or not all(type(t) is int and 0 < t <= 1000 for t in thresholds)):
        raise ValueError(f"{where}: [budgets] thresholds must be a list of percentages of the quota "
                         f"(whole numbers 1..1000), like [80, 100], not {thresholds!r}")


def _check_networks(networks: Any, where: str) -> None:
    if not isinstance(networks, list):
        raise ValueError(f"{where}: [metrics] allow must be a list of networks, like [\"10.0.0.0/8\"], "
                         f"not {networks!r}")
    for net in networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: [metrics] allow: {net!r} is not a network like 10.0.0.0/8") from None


def _is_api_version(value: str) -> bool:
    try:
        return datetime.date.fromisoformat(value).isoformat() == value
    except ValueError:
        return False
