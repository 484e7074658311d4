"""Queries over the usage ledger (the `usage` table the meter writes).

On PostgreSQL a grouped report whose filters are whole UTC days (or absent)
reads the daily rollup ``usage_daily`` (pg_ledger.py) instead of the ledger rows,
so it stays fast on millions of rows.
"""
from __future__ import annotations

from typing import Any, Optional

from . import ledger_write, pg_ledger
from .url import dialect

# The totals every summary reports, in this order.  iteration_tokens: the tokens of the iterations billed apart
# from the top-level counts (advisor, compaction, fallback; UsageRecord.billed_tokens), which cost includes.
TOTAL_FIELDS = ("requests", "input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_creation_input_tokens", "iteration_tokens", "cost")
# Extra counts a summary also reports.
COUNT_FIELDS = ("errors", "interrupted", "unpriced")
# Failed attempts on upstream channels (from each row's attempt log): a count and {kind: count}.
FAILURE_FIELDS = ("failed_attempts", "failures")

# --by value -> the SQL expression rows are grouped on.  Periods are UTC, named
# by their first day as quota periods are (a week starts on Monday).  A row's day is
# that of its whole second: the databases round a fraction (SQLite to the
# millisecond, PostgreSQL to the microsecond), which would put a row started just
# before midnight in the next day, while --until (ts < until) counts it in its own.
GROUPINGS = {
    "key": "key_name",
    "model": "requested_model",
    "channel": "channel_name",
    "day": "strftime('%Y-%m-%d', CAST(ts AS INTEGER), 'unixepoch')",
    "week": "date(CAST(ts AS INTEGER), 'unixepoch', '-6 days', 'weekday 1')",
    "month": "strftime('%Y-%m-01', CAST(ts AS INTEGER), 'unixepoch')",
}
_BY_TIME = ("day", "week", "month")

PG_GROUPINGS = {**GROUPINGS, **{
    by: f"to_char(date_trunc('{by}', to_timestamp(floor(ts)) AT TIME ZONE 'UTC'), 'YYYY-MM-DD')"
    for by in ("day", "week", "month")}}

_AGGREGATES = """
    COUNT(*) AS requests,
    COALESCE(SUM(input_tokens), 0) AS input_tokens,
    COALESCE(SUM(output_tokens), 0) AS output_tokens,
    COALESCE(SUM(cache_read_input_tokens), 0) AS cache_read_input_tokens,
    COALESCE(SUM(cache_creation_input_tokens), 0) AS cache_creation_input_tokens,
    COALESCE(SUM(ITERATION_TOKENS), 0) AS iteration_tokens,
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
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(GROUPINGS)}")
    postgres = dialect(conn) == "postgresql"
    rollup = postgres and all(t is None or t % 86400 == 0 for t in (since, until))
    given = dict(key=key, model=model, channel=channel, since=since, until=until)
    if rollup:
        table, aggregates, groupings = "usage_daily", _ROLLUP_AGGREGATES, _ROLLUP_GROUPINGS
        where, params = _rollup_filters(**given)
    else:
        table, groupings = "usage", PG_GROUPINGS if postgres else GROUPINGS
        aggregates = _PG_AGGREGATES if postgres else _AGGREGATES
        where, params = _filters(**given)
    result = _counts(conn.execute(f"SELECT {aggregates} FROM {table} {where}", params).fetchone())
    failures = failed_attempts(conn, **given)
    result.update(_failure_fields(failures.get(None, {})))
    if by is not None:
        order = "grp" if by in _BY_TIME else "cost DESC, requests DESC, grp"
        rows = conn.execute(
            f"SELECT {groupings[by]} AS grp, {aggregates} FROM {table} {where}"
            f" GROUP BY grp ORDER BY {order}", params).fetchall()
        grouped = failed_attempts(conn, **given, by=by)
        result["by"] = [{by: r["grp"], **_counts(r), **_failure_fields(grouped.pop(r["grp"], {}))} for r in rows]
        # Groups with failed attempts only: a channel that never answered.
        result["by"] += [{by: grp, **{f: 0 for f in TOTAL_FIELDS + COUNT_FIELDS}, **_failure_fields(kinds)}
                         for grp, kinds in sorted(grouped.items(), key=lambda g: str(g[0]))]
    return result


def _counts(row) -> dict[str, Any]:
    """The summary fields of a row; counts as int (PostgreSQL sums BIGINTs as NUMERIC); cost at the ledger's
    precision (each row's is rounded to 1e-10 USD; a sum of floats is not: ten $0.1 rows sum to 0.9999999999999999)."""
    return {f: (round(float(row[f]), 10) if f == "cost" else int(row[f])) for f in TOTAL_FIELDS + COUNT_FIELDS}


# PostgreSQL sums booleans as integers only when told to.
_PG_AGGREGATES = (_AGGREGATES.replace("ITERATION_TOKENS", pg_ledger.iteration_tokens_sql("usage"))
                  .replace("SUM(status >= 400 OR error_type IS NOT NULL)",
                                      "SUM((status >= 400 OR error_type IS NOT NULL)::int)")
                  .replace("SUM(interrupted != 0)", "SUM((interrupted != 0)::int)")
                  .replace("SUM(cost IS NULL)", "SUM((cost IS NULL)::int)")
                  .replace("-- unpriced rows (cost NULL) are counted apart", ""))
_AGGREGATES = _AGGREGATES.replace("ITERATION_TOKENS", ledger_write.iteration_tokens_sql("usage"))
_ROLLUP_AGGREGATES = ", ".join(f"COALESCE(SUM({f}), 0) AS {f}" for f in pg_ledger.ROLLUP_FIELDS)
# The rollup stores '' for "none": NULLIF gives reports the ledger's NULL back.
_ROLLUP_GROUPINGS = {"key": "NULLIF(key_name, '')", "model": "NULLIF(requested_model, '')",
                     "channel": "NULLIF(channel_name, '')",
                     **{by: f"to_char(date_trunc('{by}', day), 'YYYY-MM-DD')" for by in ("day", "week", "month")}}


def _rollup_filters(**given: Any) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for name, clause in (("key", "key_name = ?"), ("model", "requested_model = ?"),
                         ("channel", "channel_name = ?"),
                         ("since", "day >= (to_timestamp(?) AT TIME ZONE 'UTC')::date"),
                         ("until", "day < (to_timestamp(?) AT TIME ZONE 'UTC')::date")):
        if given[name] is not None:
            clauses.append(clause)
            params.append(given[name])
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def ledger_rows(conn, *, key: Optional[str] = None, model: Optional[str] = None,
                channel: Optional[str] = None, since: Optional[float] = None,
                until: Optional[float] = None) -> tuple[list[str], Any]:
    """(column names, a cursor over the matching ledger rows, oldest first)."""
    where, params = _filters(key=key, model=model, channel=channel, since=since, until=until)
    # PostgreSQL's ledger has no id column: its rows are (request_id, ts).
    order = "ts, id" if dialect(conn) == "sqlite" else "ts, request_id"
    cur = conn.execute(f"SELECT * FROM usage {where} ORDER BY {order}", params)
    return [d[0] for d in cur.description], cur


# --by value -> what the failed attempts are grouped on: a channel's failures
# are the attempts made on it, whichever channel the request ended on.  `a` is
# one element of a row's attempt log; {field} is read out of it per dialect.
_ATTEMPT_FIELD = {"sqlite": "json_extract(a.value, '$.{field}')", "postgresql": "(a.value ->> '{field}')"}
_EACH_ATTEMPT = {"sqlite": "json_each(usage.attempt_log) AS a",
                 "postgresql": "jsonb_array_elements(usage.attempt_log::jsonb) AS a(value)"}


def failed_attempts(conn, *, key: Optional[str] = None, model: Optional[str] = None,
                    channel: Optional[str] = None, since: Optional[float] = None,
                    until: Optional[float] = None, by: Optional[str] = None) -> dict[Any, dict[str, int]]:
    """Failed attempts (every channel tried, failed-over ones included) by outcome kind:
    {group: {kind: count}}, the group None without `by`.  `channel` selects the
    attempts made on that channel.  An attempt the gateway died during (gateway_stopped)
    is no failure of its channel."""
    name = dialect(conn)
    field = _ATTEMPT_FIELD[name].format
    where, params = _filters(key=key, model=model, channel=None, since=since, until=until)
    clauses = [where[len("WHERE "):]] if where else []
    clauses.append(f"{field(field='outcome')} NOT IN ('ok', 'gateway_stopped', 'resent')")
    if channel is not None:
        clauses.append(f"{field(field='channel')} = ?")
        params.append(channel)
    groupings = {**(PG_GROUPINGS if name == "postgresql" else GROUPINGS), "channel": field(field="channel")}
    group = groupings[by] if by is not None else "NULL"
    out: dict[Any, dict[str, int]] = {}
    for grp, kind, n in conn.execute(
            f"SELECT {group} AS grp, {field(field='outcome')} AS kind, COUNT(*)"
            f" FROM usage, {_EACH_ATTEMPT[name]} WHERE usage.attempt_log IS NOT NULL AND {' AND '.join(clauses)}"
            " GROUP BY grp, kind", params).fetchall():
        out.setdefault(grp, {})[kind] = int(n)
    return out


def _failure_fields(kinds: dict[str, int]) -> dict[str, Any]:
    return {"failed_attempts": sum(kinds.values()), "failures": dict(sorted(kinds.items()))}


def unpriced_requests(conn) -> list[tuple[str, int]]:
    """(model, rows) for every model with ledger rows that hold usage and no cost (the model, or a part of
    its request, had no price); rows without usage (cut before the upstream reported any) are not the
    model's."""
    return [(r[0] or "(none)", r[1]) for r in conn.execute(
        "SELECT COALESCE(upstream_model, requested_model), COUNT(*) FROM usage"
        " WHERE cost IS NULL AND input_tokens + output_tokens + cache_read_input_tokens"
        " + cache_creation_input_tokens + web_search_requests > 0 GROUP BY 1 ORDER BY 2 DESC, 1")]


def _filters(**given: Any) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for name, clause in (("key", "key_name = ?"), ("model", "requested_model = ?"),
                         ("channel", "channel_name = ?"), ("since", "ts >= ?"),
                         ("until", "ts < ?")):
        if given[name] is not None:
            clauses.append(clause)
            params.append(given[name])
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params
