"""`apertis-proxy channels ...`: the upstream channels requests are routed to."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from ..plugin_api import DEFAULT_API_VERSION
from ..store import catalog as catalog_store
from ..store import channel_health
from ..store import channels as channel_store
from . import values
from .channel_probe import DEFAULT_TEST_MODEL, probe_channel
from .commands import Commands, name_only
from .database import command_line, db_path, open_store
from .model_names import warn_unknown_models
from .output import add_json_flag, table, when_seconds


def no_channel_help(db: str) -> str:
    """What to do when no channel is configured (printed by `serve` and `channels list`)."""
    add = command_line(db, "channels", "add", "anthropic", "--base-url", "https://api.anthropic.com",
                       "--api-key", "YOUR_ANTHROPIC_KEY")
    return ("no upstream channel is configured: requests will fail until you add one.\n"
            f"  {add}\n"
            f"(or start once with {channel_store.BOOTSTRAP_KEY_ENV} set; the server picks up new channels"
            " without a restart)")


def _channel_flags(p, *, adding: bool) -> None:
    """The settings `channels add` and `channels set` share."""
    p.add_argument("--base-url", type=values.base_url, required=adding, metavar="URL")
    p.add_argument("--api-key", required=adding, metavar="KEY",
                   help="the upstream key ('-' reads it from stdin, keeping it out of shell history)")
    p.add_argument("--models", type=values.model_list, metavar="A,B",
                   help="models served" + (" (default: any)" if adding else ""))
    p.add_argument("--priority", type=values.whole_number, help="higher tiers are tried first (default 0)")
    p.add_argument("--weight", type=values.positive_int, help="share inside a tier (default 1)")
    p.add_argument("--alias", type=values.alias, action="extend", nargs="+", metavar="CLIENT=UPSTREAM",
                   help="map a client-facing model name to the upstream id")
    p.add_argument("--api-version", choices=channel_store.API_VERSIONS,
                   help=f"anthropic-version sent upstream (default {DEFAULT_API_VERSION})")
    p.add_argument("--forward-client-version", action=argparse.BooleanOptionalAction,
                   help="send the client's anthropic-version instead")
    p.add_argument("--forward-extras", action=argparse.BooleanOptionalAction,
                   help="forward OpenAI-style extras unchanged")
    p.add_argument("--auth-header", choices=("x-api-key", "bearer", "authorization"),
                   help="how the key is sent upstream (default x-api-key)")
    p.add_argument("--workspace-id", type=values.header_value, metavar="ID",
                   help="anthropic-workspace-id sent upstream (clients' own is never forwarded; '' clears)")
    p.add_argument("--user-profile-id", type=values.header_value, metavar="ID",
                   help="anthropic-user-profile-id sent upstream (clients' own is never forwarded; '' clears)")
    p.add_argument("--allow-unpriced", action=argparse.BooleanOptionalAction,
                   help="serve models the catalogue has no price for (cost recorded as unknown)")


def _read_api_key(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if value == "-":
        value = sys.stdin.readline()
    value = value.strip()
    # The key goes into an HTTP header: printable ASCII without spaces only.
    if not value or not values.is_header_token(value):
        raise ValueError("the API key must be non-empty printable ASCII without spaces")
    return value


def _channel_options(args) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.forward_client_version is not None:
        options["forward_client_version"] = args.forward_client_version
    if args.forward_extras is not None:
        options["forward_extras"] = args.forward_extras
    if args.auth_header is not None:
        options["auth_header"] = "x-api-key" if args.auth_header == "x-api-key" else "authorization"
    for option in ("workspace_id", "user_profile_id"):
        value = getattr(args, option)
        if value is not None:
            options[option] = value.strip()      # "" clears it
    if args.allow_unpriced is not None:
        options["allow_unpriced"] = args.allow_unpriced
    return options


def _check_base_url(base_url: Optional[str]) -> None:
    """Refuse a user name or password in the URL (ValueError, one line, the password not shown); warn about
    a path ending in /v1."""
    if base_url is not None and channel_store.has_userinfo(base_url):
        channel_store.normalize_base_url(base_url)      # ValueError: credentials go in --api-key
    if base_url and urlsplit(base_url).path.rstrip("/").endswith("/v1"):
        print("warning: the base URL ends in /v1; requests go to BASE_URL/v1/messages, "
              "so it is usually given without it", file=sys.stderr)


def add_flags(p) -> None:
    p.add_argument("name", type=values.name)
    _channel_flags(p, adding=True)


def cmd_channels_add(args) -> int:
    api_key = _read_api_key(args.api_key)
    _check_base_url(args.base_url)
    with open_store(args) as conn:
        warn_unknown_models(conn, args.models, channel=True)
        channel_store.add_channel(
            conn, args.name, args.base_url, api_key, models=args.models,
            priority=args.priority if args.priority is not None else 0,
            weight=args.weight if args.weight is not None else 1,
            aliases=dict(args.alias or ()), api_version=args.api_version or DEFAULT_API_VERSION,
            options=_channel_options(args))
    print(f"added channel {args.name!r} -> {channel_store.redact_base_url(args.base_url)}"
          f" (models: {', '.join(sorted(set(args.models))) if args.models else 'any'})")
    return 0


def set_flags(p) -> None:
    p.add_argument("name")
    _channel_flags(p, adding=False)
    p.add_argument("--any-model", action="store_true", help="serve every model (drops --models)")
    p.add_argument("--remove-alias", action="extend", nargs="+", metavar="CLIENT")
    p.add_argument("--clear-aliases", action="store_true")


def cmd_channels_set(args) -> int:
    api_key = _read_api_key(args.api_key)
    _check_base_url(args.base_url)
    kwargs: dict[str, Any] = dict(
        base_url=args.base_url, api_key=api_key, priority=args.priority, weight=args.weight,
        set_aliases=dict(args.alias or ()), remove_aliases=args.remove_alias or (),
        clear_aliases=args.clear_aliases, api_version=args.api_version,
        options=_channel_options(args))
    if args.any_model:
        kwargs["models"] = None
    elif args.models is not None:
        kwargs["models"] = args.models
    if "models" not in kwargs and all(v is None or v is False or v == () or v == {} for v in kwargs.values()):
        raise argparse.ArgumentTypeError("nothing to change")   # as `keys set` says
    with open_store(args) as conn:
        warn_unknown_models(conn, kwargs.get("models"), channel=True)
        channel_store.update_channel(conn, args.name, **kwargs)
    print(f"updated channel {args.name!r}")
    return 0


def _options_text(options: dict[str, Any]) -> str:
    flags = []
    if options.get("auth_header") == "authorization":
        flags.append("bearer")
    if options.get("forward_client_version"):
        flags.append("fwd-version")
    if options.get("forward_extras"):
        flags.append("fwd-extras")
    if options.get("workspace_id"):
        flags.append("workspace=" + options["workspace_id"])
    if options.get("user_profile_id"):
        flags.append("profile=" + options["user_profile_id"])
    if options.get("allow_unpriced"):
        flags.append("allow-unpriced")
    return ",".join(flags)


def cmd_channels_list(args) -> int:
    with open_store(args) as conn:
        channels = channel_store.list_channels(conn)
        health = channel_health.read_health(conn)
    for c in channels:
        c.update(channel_health.channel_state(c, health.get(c["id"])))
    if args.json:
        print(json.dumps(channels))
        return 0
    if not channels:
        print(no_channel_help(db_path(args)))
        return 0
    rows = [(c["name"], c["type"], c["base_url"], c["key_storage"],
             ",".join(c["models"]) if c["models"] else "any",
             ",".join(f"{k}={v}" for k, v in sorted(c["aliases"].items())),
             c["priority"], c["weight"], "yes" if c["enabled"] else "no", _state_text(c),
             ", ".join(f"{kind} {n}" for kind, n in sorted(c["recent_failures"].items())),
             c["api_version"], _options_text(c["options"]), c["disabled_reason"])
            for c in channels]
    print(table(("NAME", "TYPE", "BASE URL", "KEY", "MODELS", "ALIASES", "PRIORITY", "WEIGHT",
                 "ENABLED", "STATE", "FAILURES (1H)", "API VERSION", "OPTIONS", "DISABLED REASON"),
                rows, right=(6, 7)))
    for c in channels:
        if c["last_error"]:
            print(f"{c['name']}: last error {when_seconds(c['last_error_at'])}"
                  f" (request {c['last_error_request_id'] or '-'}): {c['last_error']}")
    return 0


def _state_text(channel: dict) -> str:
    if channel["state"] != "cooling":
        return channel["state"]
    workers = (f", {channel['cooling_workers']} of {channel['workers_reporting']} workers"
               if channel["workers_reporting"] > 1 else "")
    return (f"cooling until {when_seconds(channel['cooling_until'])}"
            f" ({channel['cooling_cause'] or 'failure'}{workers})")


def _channels_toggle(enabled: bool) -> Callable[[Any], int]:
    def run(args) -> int:
        with open_store(args) as conn:
            channel_store.set_channel_enabled(
                conn, args.name, enabled, reason=None if enabled else "disabled by operator")
        print(f"{'enabled' if enabled else 'disabled'} channel {args.name!r}")
        return 0
    return run


def cmd_channels_remove(args) -> int:
    with open_store(args) as conn:
        channel_store.remove_channel(conn, args.name)
    print(f"removed channel {args.name!r}")
    return 0


def test_flags(p) -> None:
    p.add_argument("name")
    p.add_argument("--model",
                   help=f"model to ask for (default: the channel's first, or {DEFAULT_TEST_MODEL})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")


def cmd_channels_test(args) -> int:
    with open_store(args) as conn:
        channel = channel_store.get_channel(conn, args.name, catalog_store.load_catalog(conn).aliases)
        listed = next(c for c in channel_store.list_channels(conn) if c["name"] == args.name)
    model = args.model or (sorted(channel.models)[0] if channel.models else DEFAULT_TEST_MODEL)
    upstream_model = channel.upstream_model(model)
    if not listed["enabled"]:
        print(f"note: channel {args.name!r} is disabled ({listed['disabled_reason'] or 'no reason given'});"
              " testing it anyway")
    result = probe_channel(channel, upstream_model, timeout=args.timeout)
    out = sys.stdout if result.ok else sys.stderr
    head = f"channel {channel.name!r} ({upstream_model}):"
    if result.status is None:
        print(f"{head} request failed after {result.latency_ms:.0f} ms: {result.detail}", file=out)
    else:
        print(f"{head} HTTP {result.status} in {result.latency_ms:.0f} ms", file=out)
        print(result.detail, file=out)
    return 0 if result.ok else 1


def add_commands(commands: Commands) -> None:
    channels = commands.group("channels", "manage upstream channels")
    channels.add("add", cmd_channels_add, "add an Anthropic-type channel", add_flags)
    channels.add("set", cmd_channels_set, "change a channel", set_flags)
    channels.add("list", cmd_channels_list, "list channels (never the upstream key)", add_json_flag)
    channels.add("enable", _channels_toggle(True), "enable a channel", name_only)
    channels.add("disable", _channels_toggle(False), "disable a channel", name_only)
    channels.add("remove", cmd_channels_remove, "remove a channel", name_only)
    channels.add("test", cmd_channels_test, "send one real minimal request (max_tokens 1)", test_flags)
