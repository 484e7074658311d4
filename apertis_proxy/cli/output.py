"""How the command line prints: tables, money, times, quotas, errors."""
from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

from ..budgets.report import percent_used
from ..observe import logs


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


def when(ts: Optional[float]) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%MZ")


def when_seconds(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def num(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def quota_text(cost: Optional[float], tokens: Optional[int], period: Optional[str] = None) -> str:
    parts = []
    if cost is not None:
        parts.append(money(cost))
    if tokens is not None:
        parts.append(f"{tokens:,} tok")
    if parts and period:
        return " + ".join(parts) + f"/{period}"
    return " + ".join(parts) or "-"


def period_text(key: dict, budget: dict) -> str:
    """Spend in the current quota period, with the share of the quota used."""
    if key["quota_period"] is None:
        return "-"
    spent = (money(budget["period_spent_cost"]) if key["quota_cost"] is not None
             else f"{budget['period_spent_tokens']:,} tok")
    used = percent_used(key, budget)
    return f"{spent} ({used:.0f}%) since {budget['period_start']}" if used is not None else spent


def err(message: str, log_format: str = "text") -> None:
    """`error: message` on stderr; with log_format "json", one line shaped like the log's, so that every line
    `serve` writes parses."""
    if log_format == "json":
        print(logs.json_line(logging.ERROR, "apertis_proxy.cli", message), file=sys.stderr)
    else:
        print(f"error: {message}", file=sys.stderr)


def add_json_flag(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
