"""README "Backups and retention": `db backup` while the gateway serves and meters, then the README's restore steps
(stop, remove the database and its -wal/-shm, copy the backup in, start): the restored database serves the same
key, and its settled spend agrees with its ledger (one consistent snapshot)."""
from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3

from tests.support.processes import CliRunner, ServeProcess, ask
from tests.ops.test_ready_spool_full import _post
from tests.support.served_gateway import prepare_db


async def test_a_backup_taken_while_metering_restores_consistent_and_serves(tmp_path, mock_upstream):
    db = str(tmp_path / "gateway.db")
    key = prepare_db(db, mock_upstream.base_url)
    backup = str(tmp_path / "backup.db")
    async with ServeProcess(tmp_path, db) as server:
        stop = asyncio.Event()

        async def load() -> int:
            n = 0
            while not stop.is_set():
                assert await asyncio.to_thread(_post, server.base_url, key) == 200
                n += 1
            return n
        loaders = [asyncio.create_task(load()) for _ in range(3)]
        await asyncio.sleep(0.8)
        await CliRunner(tmp_path, db).ok("db", "backup", backup)
        await asyncio.sleep(0.3)
        stop.set()
        assert sum(await asyncio.gather(*loaders)) > 0
        assert await server.stop() == 0
    assert oct(os.stat(backup).st_mode & 0o777) == "0o600"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    shutil.copy(backup, db)
    conn = sqlite3.connect(db)
    try:
        spent = conn.execute("SELECT coalesce(sum(cost), 0) FROM key_spend").fetchone()[0]
        ledger = conn.execute("SELECT coalesce(sum(cost), 0), count(*) FROM usage").fetchone()
    finally:
        conn.close()
    assert ledger[1] > 0
    assert abs(spent - ledger[0]) < 1e-9, f"settled spend {spent} but the ledger sums to {ledger[0]}"
    async with ServeProcess(tmp_path, db) as restored:
        reply = await ask(restored.base_url, key)
        assert reply.content
