"""`apertis-proxy usage`: totals, refusals and rows from the usage ledger."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from ..store import budgets as budget_store
from ..store import usage as usage_store
from . import values
from .commands import Commands
from .database import open_store
from .output import money, table


def usage_flags(p) -> None:
    p.add_argument("--key", metavar="NAME", help="only this key")
    p.add_argument("--model", help="only this requested model")
    p.add_argument("--channel", metavar="NAME", help="only this channel")
    p.add_argument("--since", type=values.since, metavar="WHEN",
                   help="from this ISO date/datetime (UTC unless given) or this long ago (7d, 12h); "
                        "'today' works too")
    p.add_argument("--until", type=values.until, metavar="WHEN",
                   help="up to this date/datetime (a bare date includes that whole day)")
    p.add_argument("--by", choices=tuple(usage_store.GROUPINGS),
                   help="break totals down (days, weeks from Monday and months are UTC)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--refused", action="store_true",
                   help="requests the gateway refused itself (401, 402, 403, 429), per key and reason")
    p.add_argument("--csv", action="store_true", help="print the matching ledger rows as CSV")


def cmd_usage(args) -> int:
    if args.csv:
        return _usage_csv(args)
    if args.refused:
        return _usage_refused(args)
    with open_store(args) as conn:
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
    # Tokens of iterations billed apart (advisor, compaction, fallback): a column when there are any.
    iterations = summary["iteration_tokens"] > 0
    headers = ("REQUESTS", "INPUT", "OUTPUT", "CACHE READ", "CACHE WRITE", *(("ITERATIONS",) if iterations else ()),
               "COST", "ERRORS", "INTERRUPTED", "FAILED ATTEMPTS")

    def cells(s: dict) -> tuple:
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in s["failures"].items())
        return (f"{s['requests']:,}", f"{s['input_tokens']:,}", f"{s['output_tokens']:,}",
                f"{s['cache_read_input_tokens']:,}", f"{s['cache_creation_input_tokens']:,}",
                *((f"{s['iteration_tokens']:,}",) if iterations else ()),
                "unpriced" if s["requests"] and s["unpriced"] == s["requests"] else money(s["cost"]),
                f"{s['errors']:,}", f"{s['interrupted']:,}",
                f"{s['failed_attempts']:,}" + (f" ({kinds})" if kinds else ""))
    if args.by:
        rows = [(r[args.by] if r[args.by] is not None else "(none)", *cells(r)) for r in summary["by"]]
        rows.append(("TOTAL", *cells(summary)))
        print(table((args.by.upper(), *headers), rows, right=range(1, len(headers) + 1)))
    else:
        print(table(headers, [cells(summary)], right=range(len(headers))))
    if iterations:
        print("ITERATIONS: tokens of advisor, compaction and fallback iterations, billed apart from the other"
              " columns (in COST; token quotas count them)")
    if summary["unpriced"]:
        print(f"cost excludes unpriced, {summary['unpriced']:,} requests (models without a price: "
              "see prices list; and requests cut before the upstream reported any usage, by their client "
              "leaving or the gateway stopping: their cost is unknown)")
    if refused:
        print(f"the gateway refused {sum(r['count'] for r in refused):,} more requests"
              " (not in the ledger): see usage --refused")
    return 0


def _usage_json(s: dict) -> dict:
    out = {f: s[f] for f in usage_store.TOTAL_FIELDS + usage_store.FAILURE_FIELDS}
    out["errors"] = s["errors"]
    out["interrupted"] = s["interrupted"]
    out["unpriced_requests"] = s["unpriced"]      # rows whose cost is unknown (not in `cost`)
    return out


def _usage_refused(args) -> int:
    """Requests the gateway refused itself (401/402/403/429), per key and reason: at the key
    check (401 unknown key, 402 quota, 429 rpm...), or later without any upstream attempt."""
    if args.model or args.channel or args.by:
        raise argparse.ArgumentTypeError("--refused counts per key and reason: --model, --channel and --by"
                                         " do not apply")
    with open_store(args) as conn:
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
    with open_store(args) as conn:
        columns, rows = usage_store.ledger_rows(conn, key=args.key, model=args.model, channel=args.channel,
                                                since=args.since, until=args.until)
        out = csv.writer(sys.stdout, lineterminator="\r\n")
        out.writerow(columns)
        for row in rows:
            out.writerow(tuple(map(_inert, row)))
    return 0


# A cell a spreadsheet would run as a formula (a model name is whatever a client sent): written after a quote.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _inert(value: Any) -> Any:
    return "'" + value if type(value) is str and value.startswith(_FORMULA_START) else value


def add_commands(commands: Commands) -> None:
    commands.add("usage", cmd_usage, "totals from the usage ledger", usage_flags)
