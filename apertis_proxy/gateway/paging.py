"""Anthropic's list paging over an ordered list of ids.

Every list pages by `limit`, `after_id` and `before_id` (the models and batches lists, SDK 1.x's files list).
SDK 2.x's files list pages by cursor instead: `page` sends back a previous answer's opaque `next_page`, and
`ids` (`ids[]=a&ids[]=b` as the SDK encodes an array, or repeated `ids`) asks for one page of just those ids.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar
from urllib.parse import parse_qs

from ..errors import GatewayError

T = TypeVar("T")
Params = dict[str, list[str]]

MAX_IDS = 100
CURSOR_PREFIX = "page_"


@dataclass(frozen=True, slots=True)
class Walk:
    """The ids a page is taken from, in the order it takes them, and at most how many it takes."""
    ids: Sequence[str]
    limit: int
    backwards: bool = False     # before_id alone: the page nearest before_id, taken walking back from it


def query_params(query: str) -> Params:
    return parse_qs(query, keep_blank_values=True)


def last(params: Params, name: str) -> Optional[str]:
    """The parameter's value (its last, when it is repeated); None when absent or blank."""
    values = params.get(name)
    return (values[-1] or None) if values else None


def page(items: Sequence[T], ids: Sequence[str], query: str, noun: str) -> tuple[list[T], bool]:
    """The page of `items` (whose ids are `ids`, in list order) the query asks for, and has_more."""
    how = walk(ids, query_params(query), noun)
    item_of = dict(zip(ids, items))
    chosen = [item_of[i] for i in how.ids[:how.limit]]
    if how.backwards:
        chosen.reverse()
    return chosen, len(how.ids) > how.limit


def walk(ids: Sequence[str], params: Params, noun: str) -> Walk:
    """The walk `limit`, `after_id` and `before_id` ask for along `ids` (in list order)."""
    limit = read_limit(params)
    start, end = bounds(ids, params, noun)
    if is_backwards(params):
        return Walk(ids[start:end][::-1], limit, backwards=True)
    return Walk(ids[start:end], limit)


def cursor_walk(ids: Sequence[str], params: Params, noun: str) -> Walk:
    """The walk of a list that also pages by cursor: `ids`, else `page`, else as `walk`."""
    if "ids" in params or "ids[]" in params:
        return named_walk(ids, params)
    cursor = last(params, "page")
    if cursor is None:
        return walk(ids, params, noun)
    if last(params, "after_id"):
        raise GatewayError(400, "page, after_id: give one of them, not both")
    return walk(ids[cursor_position(ids, cursor, noun):], params, noun)


def named_walk(ids: Sequence[str], params: Params) -> Walk:
    """One page of the `ids` named that are in `ids`, in list order; the others are left out."""
    paging = [name for name in ("page", "limit", "after_id", "before_id") if name in params]
    if paging:
        raise GatewayError(400, f"ids: cannot be combined with {', '.join(paging)}")
    wanted = {v for v in params.get("ids", []) + params.get("ids[]", []) if v}
    if len(wanted) > MAX_IDS:
        raise GatewayError(400, f"ids: at most {MAX_IDS} ids (after de-duplication), got {len(wanted)}")
    chosen = [i for i in ids if i in wanted]
    return Walk(chosen, len(chosen))


def read_limit(params: Params) -> int:
    values = params.get("limit")
    try:
        limit = int(values[-1] if values else "20")
    except ValueError:
        raise GatewayError(400, "limit: must be an integer") from None
    if not 1 <= limit <= 1000:
        raise GatewayError(400, "limit: must be between 1 and 1000")
    return limit


def bounds(ids: Sequence[str], params: Params, noun: str) -> tuple[int, int]:
    """The slice of `ids` strictly between after_id and before_id."""
    after, before = last(params, "after_id"), last(params, "before_id")
    start = position(ids, after, f"after_id: unknown {noun} id {after}") + 1 if after else 0
    end = position(ids, before, f"before_id: unknown {noun} id {before}") if before else len(ids)
    return start, end


def is_backwards(params: Params) -> bool:
    return bool(last(params, "before_id")) and not last(params, "after_id")


def position(ids: Sequence[str], ident: str, unknown: str) -> int:
    try:
        return ids.index(ident)
    except ValueError:
        raise GatewayError(400, unknown) from None


# -- cursors ------------------------------------------------------------------
# A cursor names the id its page starts at, so a client that deletes what it has listed while it pages
# (a clean-up loop) still finds where to go on.

def next_page(ident: str) -> str:
    """The `next_page` cursor of the page that starts at `ident`."""
    return CURSOR_PREFIX + base64.urlsafe_b64encode(ident.encode()).decode("ascii").rstrip("=")


def cursor_position(ids: Sequence[str], cursor: str, noun: str) -> int:
    """Where in `ids` the cursor's page starts; 400 for a cursor this list did not make, or whose
    first id is no longer listed."""
    ident = cursor_id(cursor)
    if ident is None:
        raise GatewayError(400, f"page: {cursor!r} is not a cursor of this list; send back an answer's next_page")
    return position(ids, ident, f"page: the cursor's {noun} {ident} is no longer listed; list from the start")


def cursor_id(cursor: str) -> Optional[str]:
    """The id a `next_page` cursor names; None for a string `next_page` did not make."""
    if not cursor.startswith(CURSOR_PREFIX):
        return None
    encoded = cursor[len(CURSOR_PREFIX):]
    try:
        ident = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except ValueError:      # not base64 (binascii.Error), not ASCII, or not UTF-8 once decoded
        return None
    # The decoder skips characters outside its alphabet; only the cursor `next_page` makes is accepted.
    return ident if ident and next_page(ident) == cursor else None
