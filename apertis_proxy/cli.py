"""The operator command line: `apertis-proxy serve|keys|channels|prices|usage`.

This module parses arguments and prints; the SQL lives in `store/`.  Every
edit goes straight to the SQLite file, where triggers bump the config
revision that a running server polls, so no restart is needed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import re
import shlex
import sqlite3
import ssl
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlsplit

from . import __version__
from . import settings as settings_module
from .gateway.usage import redact
from .plugin_api import DEFAULT_API_VERSION
from .plugin_host import PluginLoadError
from .budgets.periods import PERIODS
from .budgets.report import key_budget, percent_used
from .store import budgets as budget_store
from .store import catalog as catalog_store
from .store import channel_health
from .store import dbfile
from .store import key_encryption
from .store import channels as channel_store
from .store import keys as key_store
from .store import usage as usage_store
from .store import service as store_service
from .store.url import parse as parse_db_url

DEFAULT_DB = "./apertis.db"
DEFAULT_TEST_MODEL = "claude-haiku-4-5-20251001"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,63}$")
_KEEP: Any = object()   # "option not given" where None already means "clear the limit"


# --------------------------------------------------------------------------- argument types
# Each raises ArgumentTypeError, which argparse turns into a usage error (exit 2).

def _name(text: str) -> str:
    if not _NAME_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid name {text!r}: use up to 64 letters, digits and . _ @ : + - "
            "(starting with a letter or digit)")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {text!r}")
    return value


def _price(text: str) -> float:
    try:
        value = float(text.strip().lstrip("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a price in USD per million tokens, got {text!r}") \
            from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid price {text!r}")
    return value


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a parser so that "none" means "no limit" (clears the value)."""
    def wrapped(text: str) -> Any:
        return None if text.strip().lower() in ("none", "unlimited") else parse(text)
    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def _model_list(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise argparse.ArgumentTypeError("expected one or more model names separated by commas")
    return models


def _alias(text: str) -> tuple[str, str]:
    client, sep, upstream = text.partition("=")
    if not sep or not client.strip() or not upstream.strip():
        raise argparse.ArgumentTypeError(f"expected CLIENT=UPSTREAM, got {text!r}")
    return client.strip(), upstream.strip()


def _base_url(text: str) -> str:
    try:
        return channel_store.normalize_base_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_TOKENS_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([km]?)\s*(?:tokens?|toks?)$")
_MONEY_RE = re.compile(r"^\$?\s*(\d+(?:\.\d+)?)\s*(?:usd|\$)?$")


def parse_quota(text: str) -> tuple[Optional[float], Optional[int]]:
    """"25", "25usd", "$25" -> (25.0, None); "2000000tokens", "2mtok", "500k tokens" -> (None, n)."""
    s = text.strip().lower().replace("_", "").replace(",", "")
    m = _TOKENS_RE.match(s)
    if m:
        scale = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2)]
        return None, int(round(float(m.group(1)) * scale))
    m = _MONEY_RE.match(s)
    if m:
        return float(m.group(1)), None
    raise argparse.ArgumentTypeError(
        f"invalid quota {text!r}: use USD (25, 25usd, $25) or tokens (2000000tokens, 2mtokens, 500ktok)")


def parse_budget(text: str) -> tuple[Optional[float], Optional[int], Optional[str]]:
    """A quota with an optional reset period: "50/month", "2mtokens/day" -> (cost, tokens, period);
    a quota without "/PERIOD" is a lifetime quota (period None)."""
    amount, slash, period = text.rpartition("/") if "/" in text else (text, "", "")
    period = period.strip().lower()
    if slash and period not in PERIODS:
        raise argparse.ArgumentTypeError(
            f"invalid quota period {period!r} in {text!r}: use /day, /week or /month (UTC), or none")
    cost, tokens = parse_quota(amount)
    return cost, tokens, (period or None)


_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DATE_ONLY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_time(text: str, *, now: Optional[float] = None, relative_sign: int = -1,
               date_is_end_of_day: bool = False) -> float:
    """A point in time (unix seconds) from an ISO date/datetime or a duration such as "30d".

    A duration counts from now: forwards with relative_sign=+1 (expiry),
    backwards with -1 (--since).  Times without an offset are UTC.  A bare
    date means midnight at its start, or with date_is_end_of_day the midnight
    that ends it (so "--until 2026-11-30" includes the 30th).
    """
    now = time.time() if now is None else now
    s = text.strip()
    m = _DURATION_RE.match(s.lower())
    if m:
        return now + relative_sign * float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if s.lower() == "today":
        s = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d")
    try:
        when = datetime.fromisoformat(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use an ISO date or datetime (2026-12-31, "
            "2026-12-31T18:00Z) or a duration (30d, 12h, 90m, 2w)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if date_is_end_of_day and _DATE_ONLY_RE.match(s):
        when += timedelta(days=1)
    return when.timestamp()


def _expiry(text: str) -> float:
    when = parse_time(text, relative_sign=+1, date_is_end_of_day=True)
    if when <= time.time():
        raise argparse.ArgumentTypeError(f"expiry {text!r} is in the past")
    return when


def _duration(text: str) -> float:
    m = _DURATION_RE.match(text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use 30m, 24h, 7d, 2w or 0s")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _since(text: str) -> float:
    return parse_time(text)


def _effective(text: str) -> float:
    return parse_time(text, relative_sign=+1)


def _until(text: str) -> float:
    return parse_time(text, date_is_end_of_day=True)


# --------------------------------------------------------------------------- output helpers

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Plain-text columns, two spaces apart; columns listed in `right` are right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None or c == "" else str(c) for c in r]
                                           for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def money(value: float) -> str:
    text = f"{value:.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def _when(ts: Optional[float]) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%MZ")


def _num(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def _quota_text(cost: Optional[float], tokens: Optional[int], period: Optional[str] = None) -> str:
    parts = []
    if cost is not None:
        parts.append(money(cost))
    if tokens is not None:
        parts.append(f"{tokens:,} tok")
    if parts and period:
        return " + ".join(parts) + f"/{period}"
    return " + ".join(parts) or "-"


def _period_text(key: dict, budget: dict) -> str:
    """Spend in the current quota period, with the share of the quota used."""
    if key["quota_period"] is None:
        return "-"
    spent = (money(budget["period_spent_cost"]) if key["quota_cost"] is not None
             else f"{budget['period_spent_tokens']:,} tok")
    used = percent_used(key, budget)
    return f"{spent} ({used:.0f}%) since {budget['period_start']}" if used is not None else spent


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- database

def _db_path(args) -> str:
    return getattr(args, "db", None) or os.environ.get("APERTIS_DB") or DEFAULT_DB


# Commands that may create the database; every other one refuses a missing file.
_CREATING = {("keys", "create"), ("channels", "add"), ("prices", "set")}


def _open(args):
    path = _db_path(args)
    return _open_path(path, create=(args.command, getattr(args, "action", None)) in _CREATING)


@contextlib.contextmanager
def _open_path(path: str, *, create: bool = True):
    """A connection to the store at `path` (a file or a database URL), schema made current."""
    url = parse_db_url(path)
    try:
        conn = store_service.connect(url, create=create)
    except sqlite3.Error as exc:
        raise OSError(f"cannot open database {url.redacted()}: {exc}") from None
    try:
        yield conn
    finally:
        conn.close()


# --------------------------------------------------------------------------- serve

def cmd_serve(args) -> int:
    overrides = {k: getattr(args, k) for k in ("host", "port", "workers", "log_level")
                 if getattr(args, k) is not None}
    if getattr(args, "db", None):
        overrides["db"] = args.db
    settings = settings_module.load(args.config, **overrides)
    with _open_path(settings.db) as conn:   # creates or migrates the schema before workers start
        if not parse_db_url(settings.db).is_postgres and dbfile.readable_by_others(settings.db):
            print(f"warning: {settings.db} holds upstream keys and other users may read it;"
                  f" restrict it with: chmod 600 {shlex.quote(settings.db)}", file=sys.stderr)
        created = channel_store.bootstrap_default_channel(conn, os.environ)
        if created:
            print(created, flush=True)
        _check_key_storage(conn)
        if channel_store.channel_count(conn) == 0:
            print(_no_channel_help(settings.db), flush=True)
        elif not key_store.list_keys(conn):
            create = _command(settings.db, "keys", "create", "NAME")
            print(f"no user key exists yet; create one with:\n  {create}", flush=True)
    from .server import run   # imported late: the CLI's other commands do not need the server
    return int(run(settings) or 0)


def _check_key_storage(conn) -> None:
    """Refuse to serve channels whose keys cannot be opened; point out plain-text ones."""
    storage = channel_store.key_storage(conn)
    box = key_encryption.from_environment()
    sealed = [c["name"] for c in storage if c["storage"] == "encrypted" and c["opens"] is not True]
    if sealed:
        raise key_encryption.SecretKeyError(
            f"the upstream keys of channel(s) {', '.join(sealed)} are encrypted and "
            + ("no key in" if box is not None else "not set:") + f" {key_encryption.ENV_KEY}"
            + (" opens them" if box is not None else ""))
    plain = [c["name"] for c in storage if c["storage"] == "plain text"]
    if box is not None and plain:
        print(f"warning: the upstream keys of channel(s) {', '.join(plain)} are stored in plain text;"
              " encrypt them with: apertis-proxy db reencrypt", file=sys.stderr)


def _command(db: str, *words: str) -> str:
    db_flag = [] if db == DEFAULT_DB else ["--db", parse_db_url(db).redacted()]
    return " ".join(["apertis-proxy", *words, *(shlex.quote(w) for w in db_flag)])


def _no_channel_help(db: str) -> str:
    add = _command(db, "channels", "add", "anthropic", "--base-url", "https://api.anthropic.com",
                   "--api-key", "YOUR_ANTHROPIC_KEY")
    return ("no upstream channel is configured: requests will fail until you add one.\n"
            f"  {add}\n"
            f"(or start once with {channel_store.BOOTSTRAP_KEY_ENV} set; the server picks up new channels"
            " without a restart)")


# --------------------------------------------------------------------------- keys

def cmd_keys_create(args) -> int:
    quota_cost, quota_tokens, quota_period = args.quota if args.quota else (None, None, None)
    with _open(args) as conn:
        _warn_unknown_models(conn, args.models)
        key_id, plain = key_store.create_key(
            conn, args.name, models=args.models, quota_cost=quota_cost, quota_tokens=quota_tokens,
            quota_period=quota_period, rpm=args.rpm, concurrency=args.concurrency, expires_at=args.expires,
            note=args.note)
    print(f"created key {args.name!r} (id {key_id})")
    print(f"  models: {', '.join(sorted(set(args.models))) if args.models else 'any'};"
          f" quota: {_quota_text(quota_cost, quota_tokens, quota_period)};"
          f" rpm: {args.rpm or '-'}; concurrency: {args.concurrency or '-'};"
          f" expires: {_when(args.expires)}")
    print("the key is shown only this once (only its hash is stored):")
    print(plain)
    return 0


def cmd_keys_list(args) -> int:
    now = time.time()
    with _open(args) as conn:
        keys = key_store.list_keys(conn)
        old_secrets = key_store.old_secrets(conn)
        budgets = {k["id"]: key_budget(conn, k, now) for k in keys}
    if args.json:
        print(json.dumps([{**k, **budgets[k["id"]], "old_secrets": old_secrets.get(k["name"], [])}
                          for k in keys]))
        return 0
    if not keys:
        print("no keys; create one with: apertis-proxy keys create NAME")
        return 0
    rows = []
    for k in keys:
        if not k["enabled"]:
            state = "no"
        elif k["expires_at"] is not None and k["expires_at"] <= now:
            state = "expired"
        else:
            state = "yes"
        prefix = k["key_prefix"] + "".join(f" (+{o['key_prefix']} until {_when(o['until'])})"
                                           for o in old_secrets.get(k["name"], []))
        rows.append((k["name"], prefix, state, _when(k["created_at"]), _when(k["expires_at"]),
                     ",".join(k["models"]) if k["models"] else "any",
                     _quota_text(k["quota_cost"], k["quota_tokens"], k["quota_period"]),
                     _period_text(k, budgets[k["id"]]),
                     f"{money(k['spent_cost'])} / {k['spent_tokens']:,} tok",
                     k["rpm"], k["concurrency"], k["note"]))
    print(table(("NAME", "KEY", "ENABLED", "CREATED", "EXPIRES", "MODELS", "QUOTA", "THIS PERIOD", "SPENT",
                 "RPM", "CONCURRENCY", "NOTE"), rows, right=(9, 10)))
    return 0


def cmd_keys_show(args) -> int:
    now = time.time()
    with _open(args) as conn:
        key = key_store.get_key(conn, args.name)
        if key is None:
            raise LookupError(f"no key named {args.name!r}")
        budget = key_budget(conn, key, now)
        periods = (budget_store.period_history(conn, key["id"], key["quota_period"])
                   if key["quota_period"] else [])
        alerts = budget_store.alerts(conn, key["id"])
        refused = budget_store.refusal_counts(conn, key=key["name"])
    if args.json:
        print(json.dumps({**key, **budget, "periods": periods, "alerts": alerts, "refused": refused}))
        return 0
    print(f"key {key['name']} ({key['key_prefix']}, id {key['id']})")
    print(f"  enabled: {'yes' if key['enabled'] else 'no'}; expires: {_when(key['expires_at'])};"
          f" models: {','.join(key['models']) if key['models'] else 'any'}")
    print(f"  quota: {_quota_text(key['quota_cost'], key['quota_tokens'], key['quota_period'])};"
          f" rpm: {key['rpm'] or '-'}; concurrency: {key['concurrency'] or '-'}")
    print(f"  spent (lifetime): {money(key['spent_cost'])} / {key['spent_tokens']:,} tok")
    if key["quota_period"]:
        print(f"  this {key['quota_period']} ({budget['period_start']} to {budget['period_end']}, UTC):"
              f" {_period_text(key, budget)}")
        if periods:
            print(table(("PERIOD START", "COST", "TOKENS"),
                        [(p["start"], money(p["cost"]), f"{p['tokens']:,}") for p in periods], right=(1, 2)))
    for a in alerts:
        state = (f"sent {_when(a['sent_at'])}" if a["sent_at"] else
                 f"not delivered ({a['attempts']} attempts: {a['last_error'] or 'in progress'})")
        print(f"  alert: {a['threshold']}% of the {a['period']} quota"
              f"{' from ' + a['start'] if a['start'] else ''}, {state}")
    for r in refused:
        print(f"  refused: {r['count']:,} x {r['reason']} ({r['status']}), {r['first_day']} to {r['last_day']}")
    if key["note"]:
        print(f"  note: {key['note']}")
    return 0


def cmd_keys_set(args) -> int:
    changes: dict[str, Any] = {}
    if args.any_model:
        changes["models"] = None
    elif args.models is not None:
        changes["models"] = args.models
    if args.quota is not _KEEP:
        # "none" clears both kinds; a new quota replaces the old one, of either kind, and its period.
        cost, tokens, period = args.quota or (None, None, None)
        changes.update(quota_cost=cost, quota_tokens=tokens, quota_period=period)
    for field in ("rpm", "concurrency", "note"):
        value = getattr(args, field)
        if value is not _KEEP:
            changes[field] = value
    if args.expires is not _KEEP:
        changes["expires_at"] = args.expires
    if not changes:
        raise argparse.ArgumentTypeError("nothing to change")   # turned into a usage error below
    with _open(args) as conn:
        _warn_unknown_models(conn, changes.get("models"))
        key_store.update_key(conn, args.name, **changes)
    print(f"updated key {args.name!r}")
    return 0


def _keys_toggle(enabled: bool) -> Callable[[Any], int]:
    def run(args) -> int:
        with _open(args) as conn:
            key_store.set_key_enabled(conn, args.name, enabled)
        print(f"{'enabled' if enabled else 'disabled'} key {args.name!r}")
        return 0
    return run


def cmd_keys_delete(args) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise argparse.ArgumentTypeError(
                f"deleting key {args.name!r} needs confirmation: run it in a terminal or add --yes")
        answer = input(f"delete key {args.name!r}? Its limits and settled spend go; the usage ledger"
                       " keeps its rows under its name. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    with _open(args) as conn:
        key_store.delete_key(conn, args.name)
    print(f"deleted key {args.name!r}")
    return 0


def cmd_keys_rotate(args) -> int:
    with _open(args) as conn:
        plain, until = key_store.rotate_key(conn, args.name, args.grace)
    print(f"rotated key {args.name!r}: name, limits, spend and history are unchanged")
    if args.grace:
        print(f"  the old secret keeps working until {_when(until)}")
    else:
        print("  the old secret is refused from now on")
    print("the new key is shown only this once (only its hash is stored):")
    print(plain)
    return 0


def _warn_unknown_models(conn, models, *, channel: bool = False) -> None:
    """Warn about model names nobody knows: a typo in a key's list is a 403 later, and a
    channel's model missing from the catalogue is metered without prices."""
    if not models:
        return
    catalog = catalog_store.load_catalog(conn)
    listed = set()
    for row in channel_store.list_channels(conn):
        listed.update(row["models"] or ())
        listed.update(row["aliases"])
    for name in sorted(n for n in set(models) if catalog.lookup(n) is None):
        if channel:
            print(f"warning: model {name!r} has no prices in the catalogue, so its usage is metered"
                  f" at $0; add them with: apertis-proxy prices set {name} --input USD --output USD",
                  file=sys.stderr)
        elif name not in listed:
            print(f"warning: no channel lists model {name!r} and the catalogue does not know it",
                  file=sys.stderr)


# --------------------------------------------------------------------------- channels

def _read_api_key(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if value == "-":
        value = sys.stdin.readline()
    value = value.strip()
    # The key goes into an HTTP header: printable ASCII without spaces only.
    if not value or not all(33 <= ord(c) < 127 for c in value):
        raise ValueError("the API key must be non-empty printable ASCII without spaces")
    return value


def _header_value(value: str) -> str:
    if not all(33 <= ord(c) < 127 for c in value.strip()):
        raise argparse.ArgumentTypeError("must be printable ASCII without spaces")
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


def _warn_versioned_path(base_url: Optional[str]) -> None:
    if base_url and urlsplit(base_url).path.rstrip("/").endswith("/v1"):
        print("warning: the base URL ends in /v1; requests go to BASE_URL/v1/messages, "
              "so it is usually given without it", file=sys.stderr)


def cmd_channels_add(args) -> int:
    api_key = _read_api_key(args.api_key)
    _warn_versioned_path(args.base_url)
    with _open(args) as conn:
        _warn_unknown_models(conn, args.models, channel=True)
        channel_store.add_channel(
            conn, args.name, args.base_url, api_key, models=args.models,
            priority=args.priority if args.priority is not None else 0,
            weight=args.weight if args.weight is not None else 1,
            aliases=dict(args.alias or ()), api_version=args.api_version or DEFAULT_API_VERSION,
            options=_channel_options(args))
    print(f"added channel {args.name!r} -> {args.base_url}"
          f" (models: {', '.join(sorted(set(args.models))) if args.models else 'any'})")
    return 0


def cmd_channels_set(args) -> int:
    api_key = _read_api_key(args.api_key)
    _warn_versioned_path(args.base_url)
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
    with _open(args) as conn:
        _warn_unknown_models(conn, kwargs.get("models"), channel=True)
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
    with _open(args) as conn:
        channels = channel_store.list_channels(conn)
        health = channel_health.read_health(conn)
    for c in channels:
        c.update(channel_health.channel_state(c, health.get(c["id"])))
    if args.json:
        print(json.dumps(channels))
        return 0
    if not channels:
        print(_no_channel_help(_db_path(args)))
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
            print(f"{c['name']}: last error {_when_seconds(c['last_error_at'])}"
                  f" (request {c['last_error_request_id'] or '-'}): {c['last_error']}")
    return 0


def _state_text(channel: dict) -> str:
    if channel["state"] != "cooling":
        return channel["state"]
    workers = (f", {channel['cooling_workers']} of {channel['workers_reporting']} workers"
               if channel["workers_reporting"] > 1 else "")
    return (f"cooling until {_when_seconds(channel['cooling_until'])}"
            f" ({channel['cooling_cause'] or 'failure'}{workers})")


def _when_seconds(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _channels_toggle(enabled: bool) -> Callable[[Any], int]:
    def run(args) -> int:
        with _open(args) as conn:
            channel_store.set_channel_enabled(
                conn, args.name, enabled, reason=None if enabled else "disabled by operator")
        print(f"{'enabled' if enabled else 'disabled'} channel {args.name!r}")
        return 0
    return run


def cmd_channels_remove(args) -> int:
    with _open(args) as conn:
        channel_store.remove_channel(conn, args.name)
    print(f"removed channel {args.name!r}")
    return 0


def cmd_channels_test(args) -> int:
    with _open(args) as conn:
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


class ProbeResult:
    __slots__ = ("ok", "status", "latency_ms", "detail")

    def __init__(self, ok: bool, status: Optional[int], latency_ms: float, detail: str) -> None:
        self.ok, self.status, self.latency_ms, self.detail = ok, status, latency_ms, detail


def probe_channel(channel, upstream_model: str, *, timeout: float = 30.0) -> ProbeResult:
    """Send one minimal real request (max_tokens 1) to the channel and describe the answer.

    Nothing returned contains the channel's key: every text is passed through
    `_redact` in case an upstream or an exception echoes it.
    """
    key = channel.api_key
    if not key or not all(33 <= ord(c) < 127 for c in key):
        # http.client would put the bad header value, key and all, into its exception.
        return ProbeResult(False, None, 0.0, "the channel's API key is empty or contains characters "
                                             "not allowed in an HTTP header; replace it with channels set")
    url = urlsplit(channel.base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    body = json.dumps({"model": upstream_model, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "ping"}]}).encode()
    headers = {"content-type": "application/json", "accept": "application/json",
               "anthropic-version": channel.api_version,
               "user-agent": f"apertis-proxy/{__version__} (channels test)"}
    if channel.auth_header == "authorization":
        headers["authorization"] = f"Bearer {key}"
    else:
        headers["x-api-key"] = key
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(url.hostname, port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(url.hostname, port, timeout=timeout)
    started = time.perf_counter()
    try:
        conn.request("POST", url.path.rstrip("/") + "/v1/messages", body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read(1024 * 1024)
        request_id = response.getheader("request-id")
    except Exception as exc:   # any failure is reported, never raised with the key inside
        elapsed = (time.perf_counter() - started) * 1000
        return ProbeResult(False, None, elapsed, redact(f"{type(exc).__name__}: {exc}", key))
    finally:
        conn.close()
    elapsed = (time.perf_counter() - started) * 1000
    ok = 200 <= response.status < 300
    return ProbeResult(ok, response.status, elapsed,
                       redact(_describe_reply(raw, ok, request_id), key))


def _describe_reply(raw: bytes, ok: bool, request_id: Optional[str]) -> str:
    suffix = f" (request-id {request_id})" if request_id else ""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        snippet = raw[:300].decode("utf-8", "replace").strip()
        return f"{'reply' if ok else 'error'} (not JSON): {snippet or '(empty body)'}{suffix}"
    if ok:
        usage = data.get("usage") or {}
        counts = " ".join(f"{k}={v}" for k, v in usage.items() if isinstance(v, int))
        return (f"model: {data.get('model')}  stop_reason: {data.get('stop_reason')}"
                f"  usage: {counts or '-'}{suffix}")
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    message = error.get("message") or raw[:300].decode("utf-8", "replace")
    return f"error: {error.get('type', 'unknown')}: {message}{suffix}"


# --------------------------------------------------------------------------- prices

def _day(stamp: Optional[str]) -> str:
    return (stamp or "?")[:10]


def _lifecycle_text(entry, now: float) -> str:
    state = entry.lifecycle_at(now)
    if state == "deprecated":
        return f"deprecated, end of life {_day(entry.retires_at)}"
    if state == "retired":
        target = entry.redirect_to or entry.successor
        arrow = "->" if entry.redirect_to else "successor"
        return f"retired {_day(entry.retires_at)}" + (f", {arrow} {target}" if target else "")
    return "active"


def cmd_prices_list(args) -> int:
    now = time.time()
    with _open(args) as conn:
        entries = catalog_store.load_catalog(conn).entries
        unpriced = usage_store.unpriced_requests(conn)
    if args.json:
        # One object a model; price fields are decimal strings (exact), null when unpriced.
        counts = dict(unpriced)
        out = [{"id": e.id, "aliases": list(e.aliases), "display_name": e.display_name,
                "lifecycle": e.lifecycle_at(now), "retires_at": e.retires_at, "successor": e.successor,
                "redirect_to": e.redirect_to,
                **{f: (str(e.prices[f]) if e.prices else None) for f in catalog_store.PRICE_FIELDS},
                "unpriced_requests": counts.pop(e.id, 0)} for e in entries]
        out += [{"id": model, "aliases": [], "display_name": None, "lifecycle": None, "retires_at": None,
                 "successor": None, "redirect_to": None, **dict.fromkeys(catalog_store.PRICE_FIELDS),
                 "unpriced_requests": count} for model, count in counts.items()]
        print(json.dumps(out))
        return 0
    rows = []
    for e in entries:
        prices = e.prices
        cells = (tuple(_num(prices[f]) for f in catalog_store.PRICE_FIELDS) if prices
                 else ("unpriced",) + ("",) * (len(catalog_store.PRICE_FIELDS) - 1))
        rows.append((e.id, ",".join(e.aliases), _lifecycle_text(e, now), *cells))
    print(table(("MODEL", "ALIASES", "LIFECYCLE", "INPUT", "OUTPUT", "CACHE WRITE 5M",
                 "CACHE WRITE 1H", "CACHE READ"), rows, right=(3, 4, 5, 6, 7)))
    print("(USD per million tokens, in force now; price history and sources: prices show MODEL)")
    for model, count in unpriced:
        print(f"{model}: unpriced, {count:,} requests in the ledger without a cost")
    return 0


def cmd_prices_show(args) -> int:
    with _open(args) as conn:
        entry = catalog_store.load_catalog(conn).lookup(args.model)
    if entry is None:
        _err(f"no model {args.model!r} in the catalogue")
        return 1
    print(f"{entry.id} ({entry.display_name}): {_lifecycle_text(entry, time.time())}; "
          f"aliases: {','.join(entry.aliases) or '-'}")
    rows = [(_when(r.effective_from) if r.effective_from else "(start)", r.origin,
             *(_num(r.rates[f]) for f in catalog_store.PRICE_FIELDS), r.source) for r in entry.price_rows]
    print(table(("FROM", "ORIGIN", "INPUT", "OUTPUT", "CACHE WRITE 5M", "CACHE WRITE 1H", "CACHE READ",
                 "SOURCE"), rows, right=(2, 3, 4, 5, 6)) if rows else "unpriced")
    return 0


def cmd_prices_set(args) -> int:
    prices = {"input": args.input, "output": args.output, "cache_write_5m": args.cache_write_5m,
              "cache_write_1h": args.cache_write_1h, "cache_read": args.cache_read}
    with _open(args) as conn:
        entry, created = catalog_store.set_model(
            conn, args.model, prices=prices, add_aliases=args.alias or (),
            remove_aliases=args.remove_alias or (), display_name=args.display_name,
            effective_from=args.effective_from, successor=args.successor)
    row = entry.price_at(args.effective_from if args.effective_from is not None else time.time())
    priced = (", ".join(f"{f} {_num(row.rates[f])}" for f in catalog_store.PRICE_FIELDS)
              if row else "unpriced")
    since = f" from {_when(args.effective_from)}" if args.effective_from is not None else ""
    print(f"{'added' if created else 'updated'} {entry.id}{since}: {priced}"
          + f"; aliases: {','.join(entry.aliases) or '-'}"
          + (f"; once retired, requests go to {entry.redirect_to}" if entry.redirect_to else ""))
    return 0


def cmd_prices_import(args) -> int:
    with _open(args) as conn:
        doc = catalog_store.read_catalog_file(args.file)
        conn.execute("BEGIN IMMEDIATE")
        with conn:
            added, updated = catalog_store.import_catalog(conn, doc)
    print(f"imported catalogue {doc['version']} from {args.file}: {added} models added, {updated} updated "
          "(prices and fields set with `prices set` are kept)")
    return 0


def cmd_prices_remove(args) -> int:
    with _open(args) as conn:
        model_id = catalog_store.remove_model(conn, args.model)
    print(f"removed {model_id} from the catalogue")
    return 0


# --------------------------------------------------------------------------- usage

def _usage_json(s: dict) -> dict:
    out = {f: s[f] for f in usage_store.TOTAL_FIELDS + usage_store.FAILURE_FIELDS}
    out["errors"] = s["errors"]
    out["interrupted"] = s["interrupted"]
    out["unpriced_requests"] = s["unpriced"]      # rows whose cost is unknown (not in `cost`)
    return out


def cmd_usage(args) -> int:
    if args.csv:
        return _usage_csv(args)
    if args.refused:
        return _usage_refused(args)
    with _open(args) as conn:
        summary = usage_store.summarize(conn, key=args.key, model=args.model, channel=args.channel,
                                        since=args.since, until=args.until, by=args.by)
        refused = budget_store.refusal_counts(conn, key=args.key, since=args.since, until=args.until)
        refused = [r for r in refused if r["source"] == "auth"]     # the ledger's are in `errors` already
    if args.json:
        out = _usage_json(summary)
        out["refused"] = sum(r["count"] for r in refused)
        if args.by:
            out["by"] = [{args.by: r[args.by], **_usage_json(r)} for r in summary["by"]]
        print(json.dumps(out))
        return 0
    headers = ("REQUESTS", "INPUT", "OUTPUT", "CACHE READ", "CACHE WRITE", "COST", "ERRORS",
               "INTERRUPTED", "FAILED ATTEMPTS")

    def cells(s: dict) -> tuple:
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in s["failures"].items())
        return (f"{s['requests']:,}", f"{s['input_tokens']:,}", f"{s['output_tokens']:,}",
                f"{s['cache_read_input_tokens']:,}", f"{s['cache_creation_input_tokens']:,}",
                money(s["cost"]), f"{s['errors']:,}", f"{s['interrupted']:,}",
                f"{s['failed_attempts']:,}" + (f" ({kinds})" if kinds else ""))
    if args.by:
        rows = [(r[args.by] if r[args.by] is not None else "(none)", *cells(r)) for r in summary["by"]]
        rows.append(("TOTAL", *cells(summary)))
        print(table((args.by.upper(), *headers), rows, right=range(1, len(headers) + 1)))
    else:
        print(table(headers, [cells(summary)], right=range(len(headers))))
    if summary["unpriced"]:
        print(f"cost excludes unpriced, {summary['unpriced']:,} requests (models without a price: "
              "see prices list)")
    if refused:
        print(f"the gateway refused {sum(r['count'] for r in refused):,} more requests"
              " (not in the ledger): see usage --refused")
    return 0


def _usage_refused(args) -> int:
    """Requests the gateway refused itself (401/402/403/429), per key and reason: at the key
    check (401 unknown key, 402 quota, 429 rpm...), or later without any upstream attempt."""
    if args.model or args.channel or args.by:
        raise argparse.ArgumentTypeError("--refused counts per key and reason: --model, --channel and --by"
                                         " do not apply")
    with _open(args) as conn:
        rows = budget_store.refusal_counts(conn, key=args.key, since=args.since, until=args.until)
    if args.json:
        print(json.dumps({"refused": sum(r["count"] for r in rows), "by": rows}))
        return 0
    if not rows:
        print("no refused requests")
        return 0
    print(table(("KEY", "REASON", "STATUS", "REFUSED", "FIRST DAY", "LAST DAY", "BY"),
                [(r["key_name"], r["reason"], r["status"], f"{r['count']:,}", r["first_day"], r["last_day"],
                  "key check" if r["source"] == "auth" else "gateway (in the ledger)")
                 for r in rows], right=(2, 3)))
    return 0


def _usage_csv(args) -> int:
    """Every matching ledger row as CSV (RFC 4180: a header line, CRLF line ends, quotes where needed)."""
    if args.by or args.json or args.refused:
        raise argparse.ArgumentTypeError("--csv prints ledger rows: --by, --json and --refused do not apply")
    with _open(args) as conn:
        columns, rows = usage_store.ledger_rows(conn, key=args.key, model=args.model, channel=args.channel,
                                                since=args.since, until=args.until)
        out = csv.writer(sys.stdout, lineterminator="\r\n")
        out.writerow(columns)
        for row in rows:
            out.writerow(tuple(row))
    return 0


# --------------------------------------------------------------------------- db

def cmd_db_backup(args) -> int:
    if parse_db_url(_db_path(args)).is_postgres:
        raise ValueError("db backup copies a SQLite file; back a PostgreSQL database up with pg_dump")
    with _open(args) as conn:
        size = dbfile.backup(conn, args.file)
    print(f"backed up {os.path.abspath(_db_path(args))} to {args.file} ({size:,} bytes)")
    return 0


def cmd_db_copy(args) -> int:
    from .store.copy import copy_store
    source_url, target_url = parse_db_url(args.source), parse_db_url(args.target)
    if source_url == target_url:
        raise ValueError("--from and --to name the same database")
    with _open_path(args.source, create=False) as source, _open_path(args.target) as target:
        counts = copy_store(source, target)
    print(f"copied {source_url.redacted()} to {target_url.redacted()}: "
          + ", ".join(f"{table} {count:,}" for table, count in counts.items())
          + " (rows new to the target; a second run copies nothing twice)")
    return 0


def cmd_db_secret_key(args) -> int:
    print(key_encryption.new_secret_key())
    return 0


def cmd_db_secrets(args) -> int:
    with _open(args) as conn:
        storage = channel_store.key_storage(conn)
    box = key_encryption.from_environment()
    opens = {True: "yes", False: "NO", None: "-"}
    print(table(("CHANNEL", "KEY STORED", "OPENS WITH THE SECRET KEY"),
                [(c["name"], c["storage"], opens[c["opens"]]) for c in storage]))
    plain = sum(c["storage"] == "plain text" for c in storage)
    if box is None:
        print(f"no secret key configured ({key_encryption.ENV_KEY} or {key_encryption.ENV_KEY_FILE}):"
              " new upstream keys are stored in plain text")
    elif plain:
        print(f"{plain} key(s) in plain text: encrypt them with apertis-proxy db reencrypt")
    return 1 if any(c["opens"] is False for c in storage) else 0


def cmd_db_reencrypt(args) -> int:
    box = key_encryption.from_environment()
    if box is None:
        raise key_encryption.SecretKeyError(
            f"set {key_encryption.ENV_KEY} (or {key_encryption.ENV_KEY_FILE}) first: the new key first,"
            " then the old ones, separated by commas")
    with _open(args) as conn:
        count = channel_store.reencrypt_keys(conn, box)
    print(f"encrypted {count} upstream key(s) under the first key of {key_encryption.ENV_KEY};"
          " older keys may now be removed from it")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    # --db may come at any level; SUPPRESS keeps an inner default from hiding an outer value.
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS,
                    help=f"SQLite database (default: env APERTIS_DB or {DEFAULT_DB})")

    parser = argparse.ArgumentParser(
        prog="apertis-proxy", parents=[db], allow_abbrev=False,
        description="Self-hosted gateway for the Anthropic Messages API.")
    parser.add_argument("--version", action="version", version=f"apertis-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sub(group, name: str, handler: Callable[[Any], int], help_text: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, parents=[db], help=help_text, description=help_text,
                             allow_abbrev=False)
        p.set_defaults(handler=handler)
        return p

    p = sub(commands, "serve", cmd_serve, "run the gateway")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port to listen on (default 8080)")
    p.add_argument("--workers", type=_positive_int, help="worker processes sharing the port")
    p.add_argument("--config", metavar="FILE", help="TOML settings file (default: env APERTIS_CONFIG)")
    p.add_argument("--log-level", type=str.upper, choices=settings_module.LOG_LEVELS)

    _add_key_commands(commands, sub, db)
    _add_channel_commands(commands, sub, db)
    _add_price_commands(commands, sub, db)
    _add_db_commands(commands, sub, db)

    p = sub(commands, "usage", cmd_usage, "totals from the usage ledger")
    p.add_argument("--key", metavar="NAME", help="only this key")
    p.add_argument("--model", help="only this requested model")
    p.add_argument("--channel", metavar="NAME", help="only this channel")
    p.add_argument("--since", type=_since, metavar="WHEN",
                   help="from this ISO date/datetime (UTC unless given) or this long ago (7d, 12h); "
                        "'today' works too")
    p.add_argument("--until", type=_until, metavar="WHEN",
                   help="up to this date/datetime (a bare date includes that whole day)")
    p.add_argument("--by", choices=tuple(usage_store.GROUPINGS),
                   help="break totals down (days, weeks from Monday and months are UTC)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--refused", action="store_true",
                   help="requests the gateway refused itself (401, 402, 403, 429), per key and reason")
    p.add_argument("--csv", action="store_true", help="print the matching ledger rows as CSV")
    return parser


def _group(commands, name: str, help_text: str, db) -> Any:
    p = commands.add_parser(name, parents=[db], help=help_text, description=help_text)
    return p.add_subparsers(dest="action", required=True, metavar="ACTION")


def _add_key_commands(commands, sub, db) -> None:
    keys = _group(commands, "keys", "manage user keys", db)
    p = sub(keys, "create", cmd_keys_create, "create a key; prints it once, as the last line")
    p.add_argument("name", type=_name)
    p.add_argument("--models", type=_model_list, metavar="A,B", help="allowed models (default: any)")
    p.add_argument("--quota", type=parse_budget, metavar="AMOUNT[/PERIOD]",
                   help="USD (25, $25, 25usd) or tokens (2000000tokens, 2mtokens); with /day, /week or"
                        " /month it resets each UTC period (50/month), else it is for the key's lifetime")
    p.add_argument("--rpm", type=_positive_int, help="requests per minute")
    p.add_argument("--concurrency", type=_positive_int, help="requests in flight")
    p.add_argument("--expires", type=_expiry, metavar="WHEN",
                   help="ISO date/datetime (UTC unless given; a bare date is valid through that day) "
                        "or a duration from now (30d, 12h, 2w)")
    p.add_argument("--note")

    p = sub(keys, "set", cmd_keys_set, "change a key's limits ('none' clears one)")
    p.add_argument("name")
    models = p.add_mutually_exclusive_group()
    models.add_argument("--models", type=_model_list, metavar="A,B")
    models.add_argument("--any-model", action="store_true", help="allow every model")
    p.add_argument("--quota", type=_or_none(parse_budget), default=_KEEP, metavar="AMOUNT[/PERIOD]|none")
    p.add_argument("--rpm", type=_or_none(_positive_int), default=_KEEP, metavar="N|none")
    p.add_argument("--concurrency", type=_or_none(_positive_int), default=_KEEP, metavar="N|none")
    p.add_argument("--expires", type=_or_none(_expiry), default=_KEEP, metavar="WHEN|none")
    p.add_argument("--note", default=_KEEP)

    _json_flag(sub(keys, "list", cmd_keys_list, "list keys (never the key itself)"))
    p = sub(keys, "show", cmd_keys_show, "one key: limits, spend per quota period, budget alerts, refusals")
    p.add_argument("name")
    _json_flag(p)
    for action, handler, help_text in (("enable", _keys_toggle(True), "enable a key"),
                                       ("disable", _keys_toggle(False), "disable a key")):
        sub(keys, action, handler, help_text).add_argument("name")
    p = sub(keys, "delete", cmd_keys_delete,
            "delete a key and its spend (asks first; the ledger keeps its rows under its name)")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask (for scripts)")
    p = sub(keys, "rotate", cmd_keys_rotate,
            "give a key a new secret, keeping its name, limits, spend and history; prints it once")
    p.add_argument("name")
    p.add_argument("--grace", type=_duration, default=0.0, metavar="DURATION",
                   help="how long the old secret keeps working (24h, 7d; default: not at all)")


def _json_flag(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_channel_options(p, *, adding: bool) -> None:
    p.add_argument("--base-url", type=_base_url, required=adding, metavar="URL")
    p.add_argument("--api-key", required=adding, metavar="KEY",
                   help="the upstream key ('-' reads it from stdin, keeping it out of shell history)")
    p.add_argument("--models", type=_model_list, metavar="A,B",
                   help="models served" + (" (default: any)" if adding else ""))
    p.add_argument("--priority", type=_int, help="higher tiers are tried first (default 0)")
    p.add_argument("--weight", type=_positive_int, help="share inside a tier (default 1)")
    p.add_argument("--alias", type=_alias, action="extend", nargs="+", metavar="CLIENT=UPSTREAM",
                   help="map a client-facing model name to the upstream id")
    p.add_argument("--api-version", choices=channel_store.API_VERSIONS,
                   help=f"anthropic-version sent upstream (default {DEFAULT_API_VERSION})")
    p.add_argument("--forward-client-version", action=argparse.BooleanOptionalAction,
                   help="send the client's anthropic-version instead")
    p.add_argument("--forward-extras", action=argparse.BooleanOptionalAction,
                   help="forward OpenAI-style extras unchanged")
    p.add_argument("--auth-header", choices=("x-api-key", "bearer", "authorization"),
                   help="how the key is sent upstream (default x-api-key)")
    p.add_argument("--workspace-id", type=_header_value, metavar="ID",
                   help="anthropic-workspace-id sent upstream (clients' own is never forwarded; '' clears)")
    p.add_argument("--user-profile-id", type=_header_value, metavar="ID",
                   help="anthropic-user-profile-id sent upstream (clients' own is never forwarded; '' clears)")
    p.add_argument("--allow-unpriced", action=argparse.BooleanOptionalAction,
                   help="serve models the catalogue has no price for (cost recorded as unknown)")


def _add_channel_commands(commands, sub, db) -> None:
    channels = _group(commands, "channels", "manage upstream channels", db)
    p = sub(channels, "add", cmd_channels_add, "add an Anthropic-type channel")
    p.add_argument("name", type=_name)
    _add_channel_options(p, adding=True)

    p = sub(channels, "set", cmd_channels_set, "change a channel")
    p.add_argument("name")
    _add_channel_options(p, adding=False)
    p.add_argument("--any-model", action="store_true", help="serve every model (drops --models)")
    p.add_argument("--remove-alias", action="extend", nargs="+", metavar="CLIENT")
    p.add_argument("--clear-aliases", action="store_true")

    _json_flag(sub(channels, "list", cmd_channels_list, "list channels (never the upstream key)"))
    for action, handler, help_text in (("enable", _channels_toggle(True), "enable a channel"),
                                       ("disable", _channels_toggle(False), "disable a channel"),
                                       ("remove", cmd_channels_remove, "remove a channel")):
        sub(channels, action, handler, help_text).add_argument("name")

    p = sub(channels, "test", cmd_channels_test, "send one real minimal request (max_tokens 1)")
    p.add_argument("name")
    p.add_argument("--model",
                   help=f"model to ask for (default: the channel's first, or {DEFAULT_TEST_MODEL})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")


def _add_price_commands(commands, sub, db) -> None:
    prices = _group(commands, "prices", "the model catalogue and its prices", db)
    _json_flag(sub(prices, "list", cmd_prices_list, "list models and prices (USD per million tokens)"))
    p = sub(prices, "set", cmd_prices_set,
            "change a model's prices or aliases, or add a model (then --input and --output are required)")
    p.add_argument("model", help="model id or alias")
    for flag in ("--input", "--output", "--cache-write-5m", "--cache-write-1h", "--cache-read"):
        p.add_argument(flag, type=_price, metavar="USD")
    p.add_argument("--alias", action="extend", nargs="+", metavar="NAME", help="add client-facing names")
    p.add_argument("--remove-alias", action="extend", nargs="+", metavar="NAME")
    p.add_argument("--display-name")
    p.add_argument("--from", dest="effective_from", type=_effective, metavar="TIME",
                   help="the prices apply from this time on (ISO date or datetime, UTC; default now); "
                        "earlier requests keep the prices they were charged")
    p.add_argument("--successor", metavar="MODEL",
                   help="once this model is retired, send its requests to MODEL (the response says so)")
    sub(prices, "show", cmd_prices_show, "one model's price history, with sources").add_argument("model")
    sub(prices, "import", cmd_prices_import,
        "load a catalogue file (the shape of the shipped catalog.json); operator edits are kept"
        ).add_argument("file")
    sub(prices, "remove", cmd_prices_remove, "remove a model from the catalogue").add_argument("model")


def _add_db_commands(commands, sub, db) -> None:
    group = _group(commands, "db", "the database file", db)
    p = sub(group, "backup", cmd_db_backup,
            "copy the database to FILE (consistent, also while the server runs)")
    p.add_argument("file", metavar="FILE", help="a new file (an existing one is not overwritten)")
    p = sub(group, "copy", cmd_db_copy,
            "copy keys, channels, catalogue, spend and the ledger into another database")
    p.add_argument("--from", dest="source", required=True, metavar="DB",
                   help="the database to copy from (a file path, sqlite:///path or postgresql://...)")
    p.add_argument("--to", dest="target", required=True, metavar="DB",
                   help="the database to copy into (created or upgraded as needed)")
    sub(group, "secret-key", cmd_db_secret_key,
        f"print a new random key for {key_encryption.ENV_KEY}")
    sub(group, "secrets", cmd_db_secrets,
        "how each channel's upstream key is stored (encrypted or plain text)")
    sub(group, "reencrypt", cmd_db_reencrypt,
        f"store every upstream key encrypted under the first key of {key_encryption.ENV_KEY}")


# --------------------------------------------------------------------------- entry point

def _redacted(args, message: str) -> str:
    """`message` without the password of any database URL given (a driver may quote the URL)."""
    for value in (_db_path(args), getattr(args, "source", None), getattr(args, "target", None)):
        try:
            message = parse_db_url(value).scrub(message) if value else message
        except ValueError:
            pass
    return message


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:      # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return args.handler(args)
    except argparse.ArgumentTypeError as exc:
        _err(str(exc))
        return 2
    except OverflowError:          # an integer option past what SQLite stores
        _err("a number given is too large")
        return 2
    except (ValueError, LookupError, OSError, sqlite3.Error, PluginLoadError, store_service.StoreUnavailable,
            store_service.NewerSchemaError) as exc:
        _err(_redacted(args, str(exc)))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
