"""`apertis-proxy keys ...`: user keys, their limits and their spend."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from ..budgets.report import key_budget
from ..store import budgets as budget_store
from ..store import keys as key_store
from . import values
from .commands import Commands, name_only
from .database import open_store
from .model_names import warn_unknown_models
from .output import add_json_flag, money, period_text, quota_text, table, when


def create_flags(p) -> None:
    p.add_argument("name", type=values.name)
    p.add_argument("--models", type=values.model_list, metavar="A,B", help="allowed models (default: any)")
    p.add_argument("--quota", type=values.parse_budget, metavar="AMOUNT[/PERIOD]",
                   help="USD (25, $25, 25usd) or tokens (2000000tokens, 2mtokens); with /day, /week or"
                        " /month it resets each UTC period (50/month), else it is for the key's lifetime")
    p.add_argument("--rpm", type=values.positive_int, help="requests per minute")
    p.add_argument("--concurrency", type=values.positive_int, help="requests in flight")
    p.add_argument("--expires", type=values.expiry, metavar="WHEN",
                   help="ISO date/datetime (UTC unless given; a bare date is valid through that day) "
                        "or a duration from now (30d, 12h, 2w)")
    p.add_argument("--note")


def cmd_keys_create(args) -> int:
    quota_cost, quota_tokens, quota_period = args.quota if args.quota else (None, None, None)
    with open_store(args) as conn:
        warn_unknown_models(conn, args.models)
        key_id, plain = key_store.create_key(
            conn, args.name, models=args.models, quota_cost=quota_cost, quota_tokens=quota_tokens,
            quota_period=quota_period, rpm=args.rpm, concurrency=args.concurrency, expires_at=args.expires,
            note=args.note)
    print(f"created key {args.name!r} (id {key_id})")
    print(f"  models: {', '.join(sorted(set(args.models))) if args.models else 'any'};"
          f" quota: {quota_text(quota_cost, quota_tokens, quota_period)};"
          f" rpm: {args.rpm or '-'}; concurrency: {args.concurrency or '-'};"
          f" expires: {when(args.expires)}")
    print("the key is shown only this once (only its hash is stored):")
    print(plain)
    return 0


def cmd_keys_list(args) -> int:
    now = time.time()
    with open_store(args) as conn:
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
        prefix = k["key_prefix"] + "".join(f" (+{o['key_prefix']} until {when(o['until'])})"
                                           for o in old_secrets.get(k["name"], []))
        rows.append((k["name"], prefix, state, when(k["created_at"]), when(k["expires_at"]),
                     ",".join(k["models"]) if k["models"] else "any",
                     quota_text(k["quota_cost"], k["quota_tokens"], k["quota_period"]),
                     period_text(k, budgets[k["id"]]),
                     f"{money(k['spent_cost'])} / {k['spent_tokens']:,} tok",
                     k["rpm"], k["concurrency"], k["note"]))
    print(table(("NAME", "KEY", "ENABLED", "CREATED", "EXPIRES", "MODELS", "QUOTA", "THIS PERIOD", "SPENT",
                 "RPM", "CONCURRENCY", "NOTE"), rows, right=(9, 10)))
    return 0


def show_flags(p) -> None:
    p.add_argument("name")
    add_json_flag(p)


def cmd_keys_show(args) -> int:
    now = time.time()
    with open_store(args) as conn:
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
    print(f"  enabled: {'yes' if key['enabled'] else 'no'}; expires: {when(key['expires_at'])};"
          f" models: {','.join(key['models']) if key['models'] else 'any'}")
    print(f"  quota: {quota_text(key['quota_cost'], key['quota_tokens'], key['quota_period'])};"
          f" rpm: {key['rpm'] or '-'}; concurrency: {key['concurrency'] or '-'}")
    print(f"  spent (lifetime): {money(key['spent_cost'])} / {key['spent_tokens']:,} tok")
    if key["quota_period"]:
        print(f"  this {key['quota_period']} ({budget['period_start']} to {budget['period_end']}, UTC):"
              f" {period_text(key, budget)}")
        if periods:
            print(table(("PERIOD START", "COST", "TOKENS"),
                        [(p["start"], money(p["cost"]), f"{p['tokens']:,}") for p in periods], right=(1, 2)))
    for a in alerts:
        state = (f"sent {when(a['sent_at'])}" if a["sent_at"] else
                 f"not delivered ({a['attempts']} attempts: {a['last_error'] or 'in progress'})")
        print(f"  alert: {a['threshold']}% of the {a['period']} quota"
              f"{' from ' + a['start'] if a['start'] else ''}, {state}")
    for r in refused:
        print(f"  refused: {r['count']:,} x {r['reason']} ({r['status']}), {r['first_day']} to {r['last_day']}")
    if key["note"]:
        print(f"  note: {key['note']}")
    return 0


def set_flags(p) -> None:
    p.add_argument("name")
    models = p.add_mutually_exclusive_group()
    models.add_argument("--models", type=values.model_list, metavar="A,B")
    models.add_argument("--any-model", action="store_true", help="allow every model")
    p.add_argument("--quota", type=values.or_none(values.parse_budget), default=values.KEEP,
                   metavar="AMOUNT[/PERIOD]|none")
    p.add_argument("--rpm", type=values.or_none(values.positive_int), default=values.KEEP, metavar="N|none")
    p.add_argument("--concurrency", type=values.or_none(values.positive_int), default=values.KEEP,
                   metavar="N|none")
    p.add_argument("--expires", type=values.or_none(values.expiry), default=values.KEEP, metavar="WHEN|none")
    p.add_argument("--note", default=values.KEEP)


def cmd_keys_set(args) -> int:
    changes: dict[str, Any] = {}
    if args.any_model:
        changes["models"] = None
    elif args.models is not None:
        changes["models"] = args.models
    if args.quota is not values.KEEP:
        # "none" clears both kinds; a new quota replaces the old one, of either kind, and its period.
        cost, tokens, period = args.quota or (None, None, None)
        changes.update(quota_cost=cost, quota_tokens=tokens, quota_period=period)
    for field in ("rpm", "concurrency", "note"):
        value = getattr(args, field)
        if value is not values.KEEP:
            changes[field] = value
    if args.expires is not values.KEEP:
        changes["expires_at"] = args.expires
    if not changes:
        raise argparse.ArgumentTypeError("nothing to change")   # turned into a usage error below
    with open_store(args) as conn:
        warn_unknown_models(conn, changes.get("models"))
        key_store.update_key(conn, args.name, **changes)
    print(f"updated key {args.name!r}")
    return 0


def _keys_toggle(enabled: bool) -> Callable[[Any], int]:
    def run(args) -> int:
        with open_store(args) as conn:
            key_store.set_key_enabled(conn, args.name, enabled)
        print(f"{'enabled' if enabled else 'disabled'} key {args.name!r}")
        return 0
    return run


def delete_flags(p) -> None:
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask (for scripts)")


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
    with open_store(args) as conn:
        key_store.delete_key(conn, args.name)
    print(f"deleted key {args.name!r}")
    return 0


def rotate_flags(p) -> None:
    p.add_argument("name")
    p.add_argument("--grace", type=values.duration, default=0.0, metavar="DURATION",
                   help="how long the old secret keeps working (24h, 7d; default: not at all)")


def cmd_keys_rotate(args) -> int:
    with open_store(args) as conn:
        plain, until = key_store.rotate_key(conn, args.name, args.grace)
    print(f"rotated key {args.name!r}: name, limits, spend and history are unchanged")
    if args.grace:
        print(f"  the old secret keeps working until {when(until)}")
    else:
        print("  the old secret is refused from now on")
    print("the new key is shown only this once (only its hash is stored):")
    print(plain)
    return 0


def add_commands(commands: Commands) -> None:
    keys = commands.group("keys", "manage user keys")
    keys.add("create", cmd_keys_create, "create a key; prints it once, as the last line", create_flags)
    keys.add("set", cmd_keys_set, "change a key's limits ('none' clears one)", set_flags)
    keys.add("list", cmd_keys_list, "list keys (never the key itself)", add_json_flag)
    keys.add("show", cmd_keys_show, "one key: limits, spend per quota period, budget alerts, refusals",
             show_flags)
    keys.add("enable", _keys_toggle(True), "enable a key", name_only)
    keys.add("disable", _keys_toggle(False), "disable a key", name_only)
    keys.add("delete", cmd_keys_delete,
             "delete a key and its spend (asks first; the ledger keeps its rows under its name)", delete_flags)
    keys.add("rotate", cmd_keys_rotate,
             "give a key a new secret, keeping its name, limits, spend and history; prints it once",
             rotate_flags)
