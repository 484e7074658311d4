"""Review s10f: the ledger spool as an operator meets it ("The ledger spool" in README.md).

- A spool segment left by a crash, an older version or by hand must not stop the rows after it. README: "A row
  the ledger refuses for a value of its own ... is logged whole and left out, also when it is shipped alone".
  A row object without `ts` is retried forever (NOT NULL constraint failed: usage.ts) and holds back every
  later segment: the ledger stops, the spool grows to spool_max_bytes, then every request gets 503.
- Torn and foreign lines are left out and the rows after them ship (holds; covered here).
"""
from __future__ import annotations

import asyncio
import os

from tests.support.processes import ask, wait_for
from tests.support.served_gateway import configured_server, usage_rows


async def _rows_ship_despite(tmp_path, mock_upstream, lines: bytes) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "ledger-1-deadbeef-1.spool").write_bytes(lines)
    server, db, key = configured_server(tmp_path, mock_upstream.base_url, f'[ledger]\nspool_dir = "{spool}"\n')
    async with server:
        await ask(server.base_url, key)

        async def shipped() -> bool:
            return any(r["status"] == 200 for r in usage_rows(db))
        try:
            await wait_for(shipped, 4.0, "the request's row in the ledger")
        except AssertionError:
            raise AssertionError(
                f"a bad line in a spool segment keeps every later row out of the ledger; spool holds"
                f" {sorted(os.listdir(spool))}; log:\n{server.stderr[-3000:]}") from None


async def test_a_row_object_missing_fields_does_not_stop_shipping(tmp_path, mock_upstream):
    await _rows_ship_despite(tmp_path, mock_upstream, b'{"request_id": "req_000000000000000000000001"}\n')


async def test_a_torn_and_foreign_lines_do_not_stop_shipping(tmp_path, mock_upstream):
    await _rows_ship_despite(tmp_path, mock_upstream, b'[1, 2, 3]\n"text"\nnull\n{"request_id": "req_00')


async def test_a_spool_dir_shared_by_mistake_never_ships_rows_into_the_other_database(tmp_path, mock_upstream):
    """Two gateways with their own databases given one spool_dir (two configs copied from one file; on
    PostgreSQL both default to ./apertis-ledger.spool in the working directory). When one is killed, the other
    adopts its segments and ships its rows into the wrong database, under its own key ids."""
    import signal
    import sqlite3
    from tests.support.processes import ServeProcess
    from tests.support.served_gateway import prepare_db
    spool = tmp_path / "shared.spool"
    config = tmp_path / "apertis.toml"
    config.write_text(f'[ledger]\nspool_dir = "{spool}"\n')
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a_db, b_db = str(a_dir / "a.db"), str(b_dir / "b.db")
    a_key, _ = prepare_db(a_db, mock_upstream.base_url), prepare_db(b_db, mock_upstream.base_url)
    async with ServeProcess(a_dir, a_db, "--config", str(config)) as a:
        holder = sqlite3.connect(a_db, timeout=1.0, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")       # A cannot ship: its row waits in the spool
        try:
            await ask(a.base_url, a_key)
            await a.stop(signal.SIGKILL)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    assert os.listdir(spool)
    async with ServeProcess(b_dir, b_db, "--config", str(config)) as b:
        for _ in range(20):
            if usage_rows(b_db):
                break
            await asyncio.sleep(0.1)
        wrong = usage_rows(b_db)
        assert not wrong, (f"gateway B shipped {len(wrong)} row(s) of gateway A's requests into B's database"
                           f" (key_id {wrong[0].get('key_id')} there is B's key); log:\n{b.stderr[-1500:]}")
