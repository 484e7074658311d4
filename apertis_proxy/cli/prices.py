"""`apertis-proxy prices ...`: the model catalogue, its prices and their history."""
from __future__ import annotations

import json
import time
from typing import Optional

from ..store import catalog as catalog_store
from ..store import usage as usage_store
from . import values
from .commands import Commands
from .database import open_store
from .output import add_json_flag, err, num, table, when


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
    with open_store(args) as conn:
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
        cells = (tuple(num(prices[f]) for f in catalog_store.PRICE_FIELDS) if prices
                 else ("unpriced",) + ("",) * (len(catalog_store.PRICE_FIELDS) - 1))
        rows.append((e.id, ",".join(e.aliases), _lifecycle_text(e, now), *cells))
    print(table(("MODEL", "ALIASES", "LIFECYCLE", "INPUT", "OUTPUT", "CACHE WRITE 5M",
                 "CACHE WRITE 1H", "CACHE READ"), rows, right=(3, 4, 5, 6, 7)))
    print("(USD per million tokens, in force now; price history and sources: prices show MODEL)")
    for model, count in unpriced:
        print(f"{model}: unpriced, {count:,} requests in the ledger without a cost")
    return 0


def model_only(p) -> None:
    p.add_argument("model")


def cmd_prices_show(args) -> int:
    with open_store(args) as conn:
        entry = catalog_store.load_catalog(conn).lookup(args.model)
    if entry is None:
        err(f"no model {args.model!r} in the catalogue")
        return 1
    print(f"{entry.id} ({entry.display_name}): {_lifecycle_text(entry, time.time())}; "
          f"aliases: {','.join(entry.aliases) or '-'}")
    rows = [(when(r.effective_from) if r.effective_from else "(start)", r.origin,
             *(num(r.rates[f]) for f in catalog_store.PRICE_FIELDS), r.source) for r in entry.price_rows]
    print(table(("FROM", "ORIGIN", "INPUT", "OUTPUT", "CACHE WRITE 5M", "CACHE WRITE 1H", "CACHE READ",
                 "SOURCE"), rows, right=(2, 3, 4, 5, 6)) if rows else "unpriced")
    return 0


def set_flags(p) -> None:
    p.add_argument("model", help="model id or alias")
    for flag in ("--input", "--output", "--cache-write-5m", "--cache-write-1h", "--cache-read"):
        p.add_argument(flag, type=values.price, metavar="USD")
    p.add_argument("--alias", action="extend", nargs="+", metavar="NAME", help="add client-facing names")
    p.add_argument("--remove-alias", action="extend", nargs="+", metavar="NAME")
    p.add_argument("--display-name")
    p.add_argument("--from", dest="effective_from", type=values.effective, metavar="TIME",
                   help="the prices apply from this time on (ISO date or datetime, UTC; default now); "
                        "earlier requests keep the prices they were charged")
    p.add_argument("--successor", metavar="MODEL",
                   help="once this model is retired, send its requests to MODEL (the response says so)")


def cmd_prices_set(args) -> int:
    prices = {"input": args.input, "output": args.output, "cache_write_5m": args.cache_write_5m,
              "cache_write_1h": args.cache_write_1h, "cache_read": args.cache_read}
    with open_store(args) as conn:
        entry, created = catalog_store.set_model(
            conn, args.model, prices=prices, add_aliases=args.alias or (),
            remove_aliases=args.remove_alias or (), display_name=args.display_name,
            effective_from=args.effective_from, successor=args.successor)
    row = entry.price_at(args.effective_from if args.effective_from is not None else time.time())
    priced = (", ".join(f"{f} {num(row.rates[f])}" for f in catalog_store.PRICE_FIELDS)
              if row else "unpriced")
    since = f" from {when(args.effective_from)}" if args.effective_from is not None else ""
    print(f"{'added' if created else 'updated'} {entry.id}{since}: {priced}"
          + f"; aliases: {','.join(entry.aliases) or '-'}"
          + (f"; once retired, requests go to {entry.redirect_to}" if entry.redirect_to else ""))
    return 0


def import_flags(p) -> None:
    p.add_argument("file")


def cmd_prices_import(args) -> int:
    doc = catalog_store.read_catalog_file(args.file)     # checked whole before the store is touched
    with open_store(args) as conn:
        conn.execute("BEGIN IMMEDIATE")
        with conn:
            added, updated = catalog_store.import_catalog(conn, doc)
    print(f"imported catalogue {doc['version']} from {args.file}: {added} models added, {updated} updated "
          "(prices and fields set with `prices set` are kept, and so are billing rates the file leaves out)")
    return 0


def cmd_prices_remove(args) -> int:
    with open_store(args) as conn:
        model_id = catalog_store.remove_model(conn, args.model)
    print(f"removed {model_id} from the catalogue")
    return 0


def add_commands(commands: Commands) -> None:
    prices = commands.group("prices", "the model catalogue and its prices")
    prices.add("list", cmd_prices_list, "list models and prices (USD per million tokens)", add_json_flag)
    prices.add("set", cmd_prices_set,
               "change a model's prices or aliases, or add a model (then --input and --output are required)",
               set_flags)
    prices.add("show", cmd_prices_show, "one model's price history, with sources", model_only)
    prices.add("import", cmd_prices_import,
               "load a catalogue file (the shape of the shipped catalog.json); operator edits are kept",
               import_flags)
    prices.add("remove", cmd_prices_remove, "remove a model from the catalogue", model_only)
