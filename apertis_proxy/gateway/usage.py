"""Token usage from Anthropic responses.

Rules (protocol notes, section 3): `message_start.message.usage` carries the
final input and cache counts (its `output_tokens` is a placeholder) and the
fields only it has (the cache TTL split, service tier, speed, inference geo);
`message_delta.usage` is cumulative -- a later non-null value replaces an
earlier one, never adds to it.  A JSON body's `usage` is final as a whole.
Pricing is in pricing.py.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from ..plugin_api import UsageRecord

_COUNTS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
_LABELS = ("service_tier", "speed", "inference_geo")
_MAX_RAW_KEYS = 64
_MAX_MODEL = 256          # a model name longer than this is not one (the record keeps the one sent)
# Counts beyond this are not real (and past 2**63 SQLite cannot even store them:
# one such row would stop the ledger); they are ignored like a missing count.
_MAX_COUNT = 2 ** 53


def _count(value: Any) -> Optional[int]:
    return value if type(value) is int and 0 <= value < _MAX_COUNT else None


def _counted(iteration: dict) -> dict:
    """An iteration whose token counts are real, as it came; else a copy with each count that is not (past
    _MAX_COUNT: one such count would stop the ledger's sums) at 0, like a missing one."""
    if all(_count(iteration.get(name, 0)) is not None for name in _COUNTS):
        return iteration
    return {**iteration, **{name: 0 for name in _COUNTS if _count(iteration.get(name, 0)) is None}}


class UsageMeter:
    """Writes usage into one UsageRecord as it becomes known."""

    __slots__ = ("record", "on_usage")

    def __init__(self, record: UsageRecord) -> None:
        self.record = record
        # Called with the record once a stream's message_start was applied, and after a message_delta whose
        # stream did not end in the same read (the meters' checkpoint: a gateway killed after it still meters
        # the usage read so far; a stream that ended gets its final row at once).
        self.on_usage: Optional[Callable[[UsageRecord], None]] = None

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
        stu = usage.get("server_tool_use")
        if isinstance(stu, dict) and stu:
            # Counts per server tool ({"web_search_requests": 2}); anything else is not kept.
            counts = {k: v for k, v in list(stu.items())[:16] if isinstance(k, str) and _count(v) is not None}
            if counts:
                rec.server_tool_use = counts
                rec.web_search_requests = counts.get("web_search_requests", rec.web_search_requests)
                rec.web_fetch_requests = counts.get("web_fetch_requests", rec.web_fetch_requests)
        for name in _LABELS:
            value = usage.get(name)
            if isinstance(value, str) and len(value) <= 64:
                setattr(rec, name, value)
        iterations = usage.get("iterations")
        if isinstance(iterations, list):
            rec.iterations = [_counted(i) for i in iterations if isinstance(i, dict)]     # each one is billed
        # The usage object as last reported, field by field (a delta lacks
        # what only message_start carries); the first report, of a usual size
        # and without nulls, is that object as it is.
        raw = rec.raw_usage
        if raw is None and len(usage) <= _MAX_RAW_KEYS and None not in usage.values():
            rec.raw_usage = dict(usage)
        else:
            rec.raw_usage = {**(raw or {}), **{k: v for k, v in list(usage.items())[:_MAX_RAW_KEYS]
                                              if v is not None}}

    def message_start(self, message: Mapping[str, Any]) -> None:
        self.apply(message.get("usage"))
        model = message.get("model")
        if model != self.record.upstream_model:
            self.answered_by(model)
        if self.on_usage is not None:
            self.on_usage(self.record)

    def message_delta(self, event: Mapping[str, Any]) -> None:
        self.apply(event.get("usage"))

    def reported(self) -> None:
        """A stream's usage changed and its end is not in sight yet (see SseSplicer): the meters' checkpoint."""
        if self.on_usage is not None:
            self.on_usage(self.record)

    def body(self, body: Mapping[str, Any]) -> None:
        self.apply(body.get("usage"))
        model = body.get("model")
        if model != self.record.upstream_model:
            self.answered_by(model)

    def answered_by(self, model: Any) -> None:
        """The model the answer names, when it is not the one recorded, is the one that answered, and is billed
        (pricing looks it up first, then the requested one): the upstream served the request with another model
        than the one sent (a Claude Fable request a classifier declined, answered by Claude Opus 4.8)."""
        if type(model) is str and 0 < len(model) <= _MAX_MODEL:
            self.record.upstream_model = model




def redactable(secret: Optional[str]) -> bool:
    """Long enough to look for: a very short "key" would redact ordinary words."""
    return bool(secret) and len(secret) >= REDACT_MIN


REDACT_MIN = 8


def redact(text: str, secret: Optional[str]) -> str:
    """`text` without `secret` in it (an upstream quoting the key it was sent), nor any
    prefix of it of REDACT_MIN characters or more (a quote cut short, ours or theirs)."""
    if not redactable(secret):
        return text
    return _redacted(text, secret, "[redacted]")


def redact_bytes(data: bytes, secret: Optional[str]) -> bytes:
    if not redactable(secret):
        return data
    return _redacted(data, secret.encode("utf-8"), b"[redacted]")


def _redacted(text, secret, mark):
    head = secret[:REDACT_MIN]
    at = text.find(head)
    if at < 0:
        return text
    out = []
    start = 0
    while at >= 0:
        end = at + REDACT_MIN
        limit = min(len(text), at + len(secret))
        while end < limit and text[end] == secret[end - at]:
            end += 1
        out += (text[start:at], mark)
        start = end
        at = text.find(head, end)
    out.append(text[start:])
    return mark[:0].join(out)
