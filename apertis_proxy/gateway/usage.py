"""Token usage from Anthropic responses, and its price.

Rules (protocol notes, section 3): `message_start.message.usage` carries the
final input and cache counts (its `output_tokens` is a placeholder);
`message_delta.usage` is cumulative -- a later non-null value replaces an
earlier one, never adds to it.  A JSON body's `usage` is final as a whole.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..plugin_api import UsageRecord
from ..store.catalog import Catalog

_COUNTS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
# Counts beyond this are not real (and past 2**63 SQLite cannot even store them:
# one such row would stop the ledger); they are ignored like a missing count.
_MAX_COUNT = 2 ** 53


def _count(value: Any) -> Optional[int]:
    return value if type(value) is int and 0 <= value < _MAX_COUNT else None


# Iteration types whose tokens are not in the top-level counts: each is billed on its own.
_SEPARATE_ITERATIONS = frozenset(("compaction", "advisor_message", "fallback_message"))


def _iteration(item: Any) -> Optional[dict]:
    """One usage.iterations entry billed apart from the top-level counts, or None."""
    if not isinstance(item, dict) or item.get("type") not in _SEPARATE_ITERATIONS:
        return None
    out: dict = {"type": item["type"]}
    if isinstance(item.get("model"), str):
        out["model"] = item["model"]
    for name in _COUNTS:
        out[name] = _count(item.get(name)) or 0
    return out


class UsageMeter:
    """Writes usage into one UsageRecord as it becomes known."""

    __slots__ = ("record",)

    def __init__(self, record: UsageRecord) -> None:
        self.record = record

    def apply(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        rec = self.record
        for name in _COUNTS:
            value = usage.get(name)
            if type(value) is int and 0 <= value < _MAX_COUNT:     # _count(), inline: every response
                setattr(rec, name, value)
        split = usage.get("cache_creation")
        if isinstance(split, dict):
            v5 = _count(split.get("ephemeral_5m_input_tokens"))
            v1 = _count(split.get("ephemeral_1h_input_tokens"))
            if v5 is not None:
                rec.cache_creation_5m_input_tokens = v5
            if v1 is not None:
                rec.cache_creation_1h_input_tokens = v1
        iterations = usage.get("iterations")
        if isinstance(iterations, list) and iterations:
            billed = [it for it in map(_iteration, iterations[:64]) if it is not None]
            rec.iterations = billed or None
        stu = usage.get("server_tool_use")
        if isinstance(stu, dict) and stu:
            # Counts per server tool ({"web_search_requests": 2}); anything else is not kept.
            counts = {k: v for k, v in list(stu.items())[:16] if isinstance(k, str) and _count(v) is not None}
            if counts:
                rec.server_tool_use = counts

    def message_start(self, message: Mapping[str, Any]) -> None:
        self.apply(message.get("usage"))
        mid = message.get("model")
        if isinstance(mid, str) and not self.record.upstream_model:
            self.record.upstream_model = mid

    def message_delta(self, event: Mapping[str, Any]) -> None:
        self.apply(event.get("usage"))

    def body(self, body: Mapping[str, Any]) -> None:
        self.apply(body.get("usage"))


def price(record: UsageRecord, catalog: Catalog) -> None:
    """Set record.cost and record.prices from the catalogue (USD per million tokens)."""
    entry = catalog.lookup(record.upstream_model) or catalog.lookup(record.requested_model)
    if entry is None:
        record.cost = 0.0
        record.prices = None
        return
    p = entry.prices
    cw = record.cache_creation_input_tokens
    c1h = record.cache_creation_1h_input_tokens or 0
    c5m = record.cache_creation_5m_input_tokens
    if c5m is None:
        c5m = max(cw - c1h, 0)   # without a split, cache writes price as 5-minute ones
    total = (record.input_tokens * p["input"] + record.output_tokens * p["output"]
             + record.cache_read_input_tokens * p["cache_read"]
             + c5m * p["cache_write_5m"] + c1h * p["cache_write_1h"])
    for it in record.iterations or ():
        # An iteration runs at its own model when it names one (advisor, fallback), else the request's.
        q = (catalog.lookup(it.get("model")) or entry).prices
        total += (it["input_tokens"] * q["input"] + it["output_tokens"] * q["output"]
                  + it["cache_read_input_tokens"] * q["cache_read"]
                  + it["cache_creation_input_tokens"] * q["cache_write_5m"])
    record.cost = round(total / 1_000_000, 10)
    record.prices = {"model": entry.id, **p}


def redactable(secret: Optional[str]) -> bool:
    """Long enough to look for: a very short "key" would redact ordinary words."""
    return bool(secret) and len(secret) >= _REDACT_MIN


_REDACT_MIN = 8


def redact(text: str, secret: Optional[str]) -> str:
    """`text` without `secret` in it (an upstream quoting the key it was sent), nor any
    prefix of it of _REDACT_MIN characters or more (a quote cut short, ours or theirs)."""
    if not redactable(secret):
        return text
    return _redacted(text, secret, "[redacted]")


def redact_bytes(data: bytes, secret: Optional[str]) -> bytes:
    if not redactable(secret):
        return data
    return _redacted(data, secret.encode("utf-8"), b"[redacted]")


def _redacted(text, secret, mark):
    head = secret[:_REDACT_MIN]
    at = text.find(head)
    if at < 0:
        return text
    out = []
    start = 0
    while at >= 0:
        end = at + _REDACT_MIN
        limit = min(len(text), at + len(secret))
        while end < limit and text[end] == secret[end - at]:
            end += 1
        out += (text[start:at], mark)
        start = end
        at = text.find(head, end)
    out.append(text[start:])
    return mark[:0].join(out)
