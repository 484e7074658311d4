"""A catalogue file's prompt-size bands and multipliers are checked as its price rows are: `prices import` takes
only a file the store can be read back from and that prices no request below $0.

A price row missing a field, or with a negative one, is refused by `read_catalog_file`; the same file shape also
carries `bands` (each a full set of rates above a prompt size), `fast_multiplier` and `geo_multipliers`, which
multiply every token charge.  Each case below imports a one-model file into a fresh store and reads the catalogue
back the way the gateway and every `prices` command do.
"""
from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from apertis_proxy import cli
from apertis_proxy.gateway.pricing import price
from apertis_proxy.plugin_api import UsageRecord
from apertis_proxy.store import catalog as catalog_store
from apertis_proxy.store import schema

RATES = {"input": 6, "output": 30, "cache_write_5m": 7.5, "cache_write_1h": 12, "cache_read": 0.6}
MODEL = "claude-opus-6"


def model_doc(**fields) -> dict:
    return {"version": "2099-01-01", "models": [{"id": MODEL, "display_name": "Claude Opus 6",
                                                 "created_at": "2026-12-01T00:00:00Z", **fields}]}


def import_file(tmp_path, doc: dict, capsys) -> tuple[int, str, str]:
    db = str(tmp_path / "store.db")
    schema.connect(db).close()
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(doc))
    rc = cli.main(["prices", "import", str(path), "--db", db])
    out = capsys.readouterr()
    return rc, db, out.out + out.err


def cost_of(db: str, **usage) -> Decimal:
    conn = schema.connect(db)
    try:
        catalog = catalog_store.load_catalog(conn)
    finally:
        conn.close()
    record = UsageRecord(request_id="r", started_at=time.time(), endpoint="/v1/messages", upstream_model=MODEL,
                         **usage)
    price(record, catalog)
    return Decimal(record.prices["cost"])


def test_a_band_missing_a_rate_is_refused_by_import(tmp_path, capsys):
    """A band with only input and output (no cache rates): a price row like it is refused with a message; this
    one is stored, and from then on no catalogue read works (KeyError 'cache_write_5m'): `prices list` fails and
    a gateway cannot load its prices."""
    band = {"above_prompt_tokens": 200_000, "input": 12, "output": 45}
    rc, db, out = import_file(tmp_path, model_doc(prices=[{"from": None, **RATES, "bands": [band]}]), capsys)
    readable = True
    conn = schema.connect(db)
    try:
        catalog_store.load_catalog(conn)
    except KeyError as exc:
        readable = f"KeyError {exc}"
    finally:
        conn.close()
    assert rc != 0 and readable is True, (
        f"`prices import` of a band without cache rates returned {rc} ({out.strip()!r}); the store's catalogue "
        f"then reads as: {readable}")


@pytest.mark.parametrize("where", ["band", "fast_multiplier", "geo_multipliers"])
def test_negative_rates_and_multipliers_are_refused_by_import(tmp_path, capsys, where):
    """A negative band rate, fast multiplier or geo multiplier: a negative price row is refused, these are
    stored and price requests below zero."""
    prices = {"from": None, **RATES}
    fields: dict = {"prices": [prices]}
    usage: dict = {"input_tokens": 1_000, "output_tokens": 100}
    if where == "band":
        prices["bands"] = [{"above_prompt_tokens": 200_000, **RATES, "input": -12}]
        usage["input_tokens"] = 300_000
    elif where == "fast_multiplier":
        fields["fast_multiplier"] = -2
    else:
        fields["geo_multipliers"] = {"us": -1.1}
    rc, db, out = import_file(tmp_path, model_doc(**fields), capsys)
    if rc == 0:
        if where == "fast_multiplier":
            usage["speed"] = "fast"
        elif where == "geo_multipliers":
            usage["inference_geo"] = "us"
        pytest.fail(f"`prices import` took a negative {where} (rc 0); a request of {usage} is then priced "
                    f"${cost_of(db, **usage)}")
