"""Anthropic's list paging (`limit`, `after_id`, `before_id`) over an ordered list of ids."""
from __future__ import annotations

from typing import Optional, Sequence, TypeVar
from urllib.parse import parse_qsl

from ..errors import GatewayError

T = TypeVar("T")


def page(items: Sequence[T], ids: Sequence[str], query: str, noun: str) -> tuple[list[T], bool]:
    """The page of `items` (whose ids are `ids`, in list order) the query asks for, and has_more."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    try:
        limit = int(params.get("limit", "20"))
    except ValueError:
        raise GatewayError(400, "limit: must be an integer") from None
    if not 1 <= limit <= 1000:
        raise GatewayError(400, "limit: must be between 1 and 1000")
    start, end = 0, len(items)
    after: Optional[str] = params.get("after_id")
    before: Optional[str] = params.get("before_id")
    if after:
        if after not in ids:
            raise GatewayError(400, f"after_id: unknown {noun} id {after}")
        start = list(ids).index(after) + 1
    if before:
        if before not in ids:
            raise GatewayError(400, f"before_id: unknown {noun} id {before}")
        end = list(ids).index(before)
    window = list(items[start:end])
    # Paging backwards (before_id alone) takes the page nearest to before_id.
    chosen = window[-limit:] if before and not after else window[:limit]
    return chosen, len(window) > limit
