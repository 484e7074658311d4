"""`prices set` rows and the rows around them: a change an operator makes now is not undone by a price row dated
later that they or the catalogue wrote before, for the fields that later row did not itself change.

docs/billing.md: "`prices set MODEL --input X [--from DATE]` adds an operator price row that applies from `--from`
(default: now) on; fields left out keep the rates in force then".  Each row copies every field it was not given
from the row in force at its date when it is written, so a later-dated row written earlier carries the old value
of a field changed since.  (Judgement: the rows are snapshots by design; an operator reads the two commands below as
two independent changes.)
"""
from __future__ import annotations

import time
from decimal import Decimal

from apertis_proxy import cli
from apertis_proxy.store import catalog as catalog_store
from apertis_proxy.store import schema

DAY = 86_400


def rates_at(db: str, model: str, ts: float) -> dict:
    conn = schema.connect(db)
    try:
        row = catalog_store.load_catalog(conn).lookup(model).price_at(ts)
    finally:
        conn.close()
    return {f: row.rates[f] for f in ("input", "output", "cache_read")}


def test_an_output_change_made_now_survives_an_input_change_scheduled_before(tmp_path, capsys):
    """Opus 5 (5 / 25): the operator schedules input 6 from tomorrow, then changes output to 30 from now.
    From tomorrow on Opus 5 should cost input 6 and output 30; the scheduled row still says output 25."""
    db = str(tmp_path / "store.db")
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + DAY))
    assert cli.main(["prices", "set", "claude-opus-5", "--input", "6", "--from", tomorrow, "--db", db]) == 0
    assert cli.main(["prices", "set", "claude-opus-5", "--output", "30", "--db", db]) == 0
    capsys.readouterr()
    now = rates_at(db, "claude-opus-5", time.time() + 60)
    later = rates_at(db, "claude-opus-5", time.time() + 2 * DAY)
    assert now["output"] == Decimal(30) and now["input"] == Decimal(5)
    assert (later["input"], later["output"]) == (Decimal(6), Decimal(30)), (
        f"from tomorrow Opus 5 is priced input {later['input']} / output {later['output']}: the output change "
        f"made today is undone by the row scheduled before it")


def test_a_catalogue_price_cut_still_applies_to_fields_an_earlier_operator_row_left_out(tmp_path, capsys):
    """Sonnet 5.5's cache read is cut from 0.20 to 0.10 on 2026-10-07 (catalogue).  An operator who changed only
    its output price from 2026-10-01 keeps paying 0.20 for cache reads after the cut, forever: the operator row
    copied 0.20 and wins over every catalogue row after it."""
    db = str(tmp_path / "store.db")
    assert cli.main(["prices", "set", "claude-sonnet-5-5", "--output", "12", "--from", "2026-10-01",
                     "--db", db]) == 0
    capsys.readouterr()
    after_cut = rates_at(db, "claude-sonnet-5-5", catalog_store._unix("2026-11-01"))
    assert after_cut["output"] == Decimal(12)
    assert after_cut["cache_read"] == Decimal("0.1"), (
        f"on 2026-11-01 Sonnet 5.5 cache reads are priced {after_cut['cache_read']} (the catalogue's cut to 0.10 "
        f"on 2026-10-07 no longer applies because the operator changed the output price a week earlier)")
