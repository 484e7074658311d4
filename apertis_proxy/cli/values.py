"""Argument value parsers.  Each raises ArgumentTypeError, which argparse turns
into a usage error (exit 2); a whole number past what the store holds raises
OverflowError, which argparse lets through to cli.main: one line (exit 2)."""
from __future__ import annotations

import argparse
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

from ..budgets.periods import PERIODS
from ..store import channels as channel_store

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,63}$")
KEEP: Any = object()   # "option not given" where None already means "clear the limit"
# The whole numbers every backend stores: PostgreSQL's INTEGER columns (rpm, concurrency,
# priority, weight) are 32-bit, SQLite's 64.
STORED_INT_MIN, STORED_INT_MAX = -2**31, 2**31 - 1


def name(text: str) -> str:
    if not _NAME_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid name {text!r}: use up to 64 letters, digits and . _ @ : + - "
            "(starting with a letter or digit)")
    return text


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def whole_number(text: str) -> int:
    """A whole number the store holds (see STORED_INT_MAX)."""
    value = _integer(text)
    if value > STORED_INT_MAX:
        raise OverflowError(f"a number given is too large: {text} (at most {STORED_INT_MAX})")
    if value < STORED_INT_MIN:
        raise OverflowError(f"a number given is too small: {text} (at least {STORED_INT_MIN})")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {text!r}")
    return value


def price(text: str) -> float:
    try:
        value = float(text.strip().lstrip("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a price in USD per million tokens, got {text!r}") \
            from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid price {text!r}")
    return value


def or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a parser so that "none" means "no limit" (clears the value)."""
    def wrapped(text: str) -> Any:
        return None if text.strip().lower() in ("none", "unlimited") else parse(text)
    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def model_list(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise argparse.ArgumentTypeError("expected one or more model names separated by commas")
    return models


def alias(text: str) -> tuple[str, str]:
    client, sep, upstream = text.partition("=")
    if not sep or not client.strip() or not upstream.strip():
        raise argparse.ArgumentTypeError(f"expected CLIENT=UPSTREAM, got {text!r}")
    return client.strip(), upstream.strip()


def base_url(text: str) -> str:
    if channel_store.has_userinfo(text):
        return text     # refused by `channels add` / `set` in one line, without argparse's usage text
    try:
        return channel_store.normalize_base_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def is_header_token(text: str) -> bool:
    """Printable ASCII without spaces: what may go into an HTTP header value as is."""
    return all(33 <= ord(c) < 127 for c in text)


def header_value(value: str) -> str:
    if not is_header_token(value.strip()):
        raise argparse.ArgumentTypeError("must be printable ASCII without spaces")
    return value


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


def expiry(text: str) -> float:
    when = parse_time(text, relative_sign=+1, date_is_end_of_day=True)
    if when <= time.time():
        raise argparse.ArgumentTypeError(f"expiry {text!r} is in the past")
    return when


def duration(text: str) -> float:
    m = _DURATION_RE.match(text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use 30m, 24h, 7d, 2w or 0s")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def since(text: str) -> float:
    return parse_time(text)


def effective(text: str) -> float:
    return parse_time(text, relative_sign=+1)


def until(text: str) -> float:
    return parse_time(text, date_is_end_of_day=True)


