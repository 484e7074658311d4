"""Queries over the usage ledger (the `usage` table the meter writes)."""
from __future__ import annotations

from typing import Any, Optional

# The totals every summary reports, in this order.
TOTAL_FIELDS = ("requests", "input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_creation_input_tokens", "cost")
# Extra counts a summary also reports.
COUNT_FIELDS = ("errors", "interrupted", "unpriced")
# Failed attempts on upstream channels (from each row's attempt log): a count and {kind: count}.
FAILURE_FIELDS = ("failed_attempts", "failures")

# --by value -> the SQL expression rows are grouped on.  Periods are UTC, named
# by their first day as quota periods are (a week starts on Monday).
GROUPINGS = {
    "key": "key_name",
    "model": "requested_model",
    "channel": "channel_name",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
    "week": "date(ts, 'unixepoch', '-6 days', 'weekday 1')",
    "month": "strftime('%Y-%m-01', ts, 'unixepoch')",
}
_BY_TIME = ("day", "week", "month")

_AGGREGATES = """
    COUNT(*) AS requests,
    COALESCE(SUM(input_tokens), 0) AS input_tokens,
    COALESCE(SUM(output_tokens), 0) AS output_tokens,
    COALESCE(SUM(cache_read_input_tokens), 0) AS cache_read_input_tokens,
    COALESCE(SUM(cache_creation_input_tokens), 0) AS cache_creation_input_tokens,
    COALESCE(SUM(cost), 0.0) AS cost,            -- unpriced rows (cost NULL) are counted apart
    COALESCE(SUM(status >= 400 OR error_type IS NOT NULL), 0) AS errors,
    COALESCE(SUM(interrupted != 0), 0) AS interrupted,
    COALESCE(SUM(cost IS NULL), 0) AS unpriced
"""


def summarize(conn, *, key: Optional[str] = None, model: Optional[str] = None,
              channel: Optional[str] = None, since: Optional[float] = None,
              until: Optional[float] = None, by: Optional[str] = None) -> dict[str, Any]:
    """Totals over the rows matching the filters (`since` <= ts < `until`, unix time).

    Returns a dict with TOTAL_FIELDS, COUNT_FIELDS and FAILURE_FIELDS; with `by` (a key of
    GROUPINGS) also "by": a list of dicts, each holding the group value under
    the name `by` plus the same fields.  Periods come oldest first, other groups
    by cost and then requests, largest first.
    """
    where, params = _filters(key=key, model=model, channel=channel, since=since, until=until)
    result = dict(conn.execute(f"SELECT {_AGGREGATES} FROM usage {where}", params).fetchone())
    failures = failed_attempts(conn, key=key, model=model, channel=channel, since=since, until=until)
    result.update(_failure_fields(failures.get(None, {})))
    if by is not None:
        if by not in GROUPINGS:
            raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(GROUPINGS)}")
        order = "grp" if by in _BY_TIME else "cost DESC, requests DESC, grp"
        rows = conn.execute(
            f"SELECT {GROUPINGS[by]} AS grp, {_AGGREGATES} FROM usage {where}"
            f" GROUP BY grp ORDER BY {order}", params).fetchall()
        grouped = failed_attempts(conn, key=key, model=model, channel=channel, since=since, until=until,
                                  by=by)
        result["by"] = [{by: r["grp"], **{f: r[f] for f in TOTAL_FIELDS + COUNT_FIELDS},
                         **_failure_fields(grouped.pop(r["grp"], {}))} for r in rows]
        # Groups with failed attempts only: a channel that never answered.
        result["by"] += [{by: grp, **{f: 0 for f in TOTAL_FIELDS + COUNT_FIELDS}, **_failure_fields(kinds)}
                         for grp, kinds in sorted(grouped.items(), key=lambda g: str(g[0]))]
    return result


def ledger_rows(conn, *, key: Optional[str] = None, model: Optional[str] = None,
                channel: Optional[str] = None, since: Optional[float] = None,
                until: Optional[float] = None) -> tuple[list[str], Any]:
    """(column names, a cursor over the matching ledger rows, oldest first)."""
    where, params = _filters(key=key, model=model, channel=channel, since=since, until=until)
    cur = conn.execute(f"SELECT * FROM usage {where} ORDER BY ts, id", params)
    return [d[0] for d in cur.description], cur


# --by value -> what the failed attempts are grouped on: a channel's failures
# are the attempts made on it, whichever channel the request ended on.
_ATTEMPT_GROUPINGS = {**GROUPINGS, "channel": "json_extract(a.value, '$.channel')"}


def failed_attempts(conn, *, key: Optional[str] = None, model: Optional[str] = None,
                    channel: Optional[str] = None, since: Optional[float] = None,
                    until: Optional[float] = None, by: Optional[str] = None) -> dict[Any, dict[str, int]]:
    """Failed attempts (every channel tried, failed-over ones included) by outcome kind:
    {group: {kind: count}}, the group None without `by`.  `channel` selects the
    attempts made on that channel."""
    where, params = _filters(key=key, model=model, channel=None, since=since, until=until)
    clauses = [where[len("WHERE "):]] if where else []
    clauses.append("json_extract(a.value, '$.outcome') != 'ok'")
    if channel is not None:
        clauses.append("json_extract(a.value, '$.channel') = ?")
        params.append(channel)
    group = _ATTEMPT_GROUPINGS[by] if by is not None else "NULL"
    out: dict[Any, dict[str, int]] = {}
    for grp, kind, n in conn.execute(
            f"SELECT {group} AS grp, json_extract(a.value, '$.outcome') AS kind, COUNT(*)"
            f" FROM usage, json_each(usage.attempt_log) AS a WHERE {' AND '.join(clauses)}"
            " GROUP BY grp, kind", params):
        out.setdefault(grp, {})[kind] = n
    return out


def _failure_fields(kinds: dict[str, int]) -> dict[str, Any]:
    return {"failed_attempts": sum(kinds.values()), "failures": dict(sorted(kinds.items()))}


def unpriced_requests(conn) -> list[tuple[str, int]]:
    """(model, rows) for every model with ledger rows whose cost is unknown."""
    return [(r[0] or "(none)", r[1]) for r in conn.execute(
        "SELECT COALESCE(upstream_model, requested_model), COUNT(*) FROM usage WHERE cost IS NULL"
        " GROUP BY 1 ORDER BY 2 DESC, 1")]


def _filters(**given: Any) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for name, clause in (("key", "key_name = ?"), ("model", "requested_model = ?"),
                         ("channel", "channel_name = ?"), ("since", "ts >= ?"),
                         ("until", "ts < ?")):
        if given[name] is not None:
            clauses.append(clause)
            params.append(given[name])
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params
