"""`apertis-proxy db copy`: everything of one store into another (SQLite -> PostgreSQL,
typically), safe to run again.

Keys (their hashes: plain keys are never stored), rotated-out secrets, deleted
keys, channels (upstream keys as stored, encrypted or not), settled spend and
owned upstream state are inserted unless a row with the same key (or name) is
already there; the catalogue (models, prices, billing rates) is the source's:
rows new or different in the source are written over the target's, rows the
source lacks are deleted, equal rows are left alone; the ledger goes through the
idempotent ledger write.  So a second run copies nothing twice.
"""
from __future__ import annotations

from typing import Callable, Optional

from .url import dialect
from .ledger_write import COLUMN_OF_FIELD, ledger_shape, write_ledger_rows

# Copied row by row, a row already in the target (same primary key or unique name) left alone.
KEPT_TABLES = ("keys", "deleted_keys", "key_grace", "key_spend", "key_period_spend", "budget_alerts", "refusals",
               "channels", "owned_state")
# The catalogue, by primary key: the source's rows replace the target's.
CATALOG_TABLES = {"models": ("id",), "model_prices": ("model_id", "origin", "effective_from")}
CATALOG_META = ("billing_rates", "catalog_version")
LEDGER_BATCH = 5000


def _columns(conn, table: str) -> list[str]:
    if dialect(conn) == "sqlite":
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    return [r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?"
        " AND table_schema = current_schema() ORDER BY ordinal_position", (table,))]


def copy_store(source, target, progress: Optional[Callable[[str], None]] = None) -> dict[str, int]:
    """Copy `source` into `target` (two open store connections); rows inserted per table."""
    counts: dict[str, int] = {}
    target.execute("BEGIN IMMEDIATE")
    with target:
        for table in KEPT_TABLES:
            columns = [c for c in _columns(source, table) if c in set(_columns(target, table))]
            sql = (f"INSERT OR IGNORE INTO {table} ({', '.join(columns)})"
                   f" VALUES ({', '.join('?' * len(columns))})")
            inserted = 0
            for row in source.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall():
                inserted += target.execute(sql, tuple(row)).rowcount
            counts[table] = inserted
        for table, key in CATALOG_TABLES.items():
            counts[table] = _sync_catalog_table(source, target, table, key)
        for name in CATALOG_META:
            row = source.execute("SELECT v FROM meta WHERE k = ?", (name,)).fetchone()
            if row is not None:
                target.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (name, row[0]))
        _advance_channel_ids(target)
    counts["usage"] = _copy_ledger(source, target, progress)
    return counts


def _sync_catalog_table(source, target, table: str, key: tuple[str, ...]) -> int:
    """Make the target's `table` the source's, touching only rows that differ (an unchanged row is not
    rewritten: no config revision bump, no churn); rows written."""
    columns = [c for c in _columns(source, table) if c in set(_columns(target, table))]
    at = [columns.index(c) for c in key]
    select = f"SELECT {', '.join(columns)} FROM {table}"
    wanted = {tuple(row[i] for i in at): tuple(row) for row in source.execute(select).fetchall()}
    present = {tuple(row[i] for i in at): tuple(row) for row in target.execute(select).fetchall()}
    where = " AND ".join(f"{c} = ?" for c in key)
    for k in present.keys() - wanted.keys():
        target.execute(f"DELETE FROM {table} WHERE {where}", k)
    insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    written = 0
    for k, row in wanted.items():
        if present.get(k) == row:
            continue
        if k in present:
            target.execute(f"DELETE FROM {table} WHERE {where}", k)
        target.execute(insert, row)
        written += 1
    return written


def _advance_channel_ids(target) -> None:
    """Channels were copied with their ids: the target's id sequence continues after them."""
    if dialect(target) == "sqlite":
        return      # SQLite picks max(id) + 1 by itself
    target.execute("SELECT setval(pg_get_serial_sequence('channels', 'id'),"
                   " GREATEST((SELECT COALESCE(MAX(id), 0) FROM channels), 1))")


def _copy_ledger(source, target, progress) -> int:
    """The source's ledger rows, as the spool would hold them (field names), written idempotently."""
    shape = ledger_shape(target)
    field_of_column = {column: field for field, column in COLUMN_OF_FIELD.items()}
    columns = [c for c in _columns(source, "usage") if c in set(shape.columns)]
    inserted = copied = 0
    rows = source.execute(f"SELECT {', '.join(columns)} FROM usage ORDER BY ts").fetchall()
    for start in range(0, len(rows), LEDGER_BATCH):
        batch = [{field_of_column.get(c, c): row[i] for i, c in enumerate(columns)}
                 for row in rows[start:start + LEDGER_BATCH]]
        inserted += write_ledger_rows(target, batch, shape, settle=False)   # the spend is copied as it is
        copied += len(batch)
        if progress is not None:
            progress(f"ledger: {copied:,} of {len(rows):,} rows read, {inserted:,} new")
    return inserted
