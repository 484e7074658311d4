"""Quota periods (UTC day, ISO week from Monday, calendar month) and the --quota AMOUNT/PERIOD syntax."""
from __future__ import annotations

import argparse
from datetime import datetime, timezone

import pytest

from apertis_proxy.budgets.periods import current_bounds, period_end, period_start
from apertis_proxy.cli import parse_budget


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("period, when, start, end", [
    ("day", "2026-12-06T23:59:59", "2026-12-06", "2026-12-07"),
    ("day", "2026-12-07T00:00:00", "2026-12-07", "2026-12-08"),
    ("week", "2026-12-06T12:00:00", "2026-11-30", "2026-12-07"),     # a Sunday belongs to the week from Monday
    ("week", "2026-11-30T00:00:00", "2026-11-30", "2026-12-07"),     # Monday 00:00 starts a week
    ("week", "2027-01-01T08:00:00", "2026-12-28", "2027-01-04"),     # across a year end
    ("month", "2026-12-31T23:59:59", "2026-12-01", "2027-01-01"),
    ("month", "2028-02-29T10:00:00", "2028-02-01", "2028-03-01"),
])
def test_periods_are_utc_calendar_periods(period, when, start, end):
    assert period_start(period, ts(when)) == start
    assert period_end(period, start) == end
    assert current_bounds(period, ts(when)) == (start, end)


def test_a_lifetime_quota_has_no_bounds():
    assert current_bounds(None, ts("2026-12-06T00:00:00")) == (None, None)


@pytest.mark.parametrize("text, expected", [
    ("50/month", (50.0, None, "month")),
    ("$2.5/day", (2.5, None, "day")),
    ("2mtokens/week", (None, 2_000_000, "week")),
    ("50 / Month", (50.0, None, "month")),
    ("50", (50.0, None, None)),
])
def test_quota_with_a_period(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["50/year", "50/", "/month", "abc/day"])
def test_quota_with_a_bad_period_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_budget(text)


def test_keys_create_and_set_store_the_period(tmp_path, capsys):
    from apertis_proxy.cli import main
    from apertis_proxy.store import keys as key_store
    from apertis_proxy.store.schema import connect
    db = str(tmp_path / "apertis.db")

    def period(name: str):
        conn = connect(db)
        try:
            key = key_store.get_key(conn, name)
            return key["quota_cost"], key["quota_tokens"], key["quota_period"]
        finally:
            conn.close()
    assert main(["keys", "create", "team", "--quota", "50/month", "--db", db]) == 0
    assert "quota: $50.00/month" in capsys.readouterr().out
    assert period("team") == (50.0, None, "month")
    assert main(["keys", "set", "team", "--quota", "1mtokens/week", "--db", db]) == 0
    assert period("team") == (None, 1_000_000, "week")
    assert main(["keys", "set", "team", "--quota", "20", "--db", db]) == 0
    assert period("team") == (20.0, None, None)
    assert main(["keys", "set", "team", "--quota", "5/day", "--db", db]) == 0
    assert main(["keys", "set", "team", "--quota", "none", "--db", db]) == 0
    assert period("team") == (None, None, None)
    capsys.readouterr()
    assert main(["keys", "show", "team", "--db", db]) == 0
    assert "quota: -" in capsys.readouterr().out
