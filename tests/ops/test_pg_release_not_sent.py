"""A release without a ledger (the keys' spend settled by the release itself) that never reached PostgreSQL,
made again after its admission was collected, still adds the request's cost to the spend.

Limiter.release keeps a failed release for the renewal loop: one that did not run at all (ReleaseNotRun) is
made again as a first release, which settles the cost also when the admission is gone; any other failure may
have committed, and is made again as a retry, which adds nothing once the admission is gone.  A release for
which no connection could be had (the store refused it: nothing was sent) is one that did not run.  Here the
store is away for longer than STALE_LEASE_SECONDS, so another host's renewal collects this host's admission as
soon as the store is back, before the release is made again.
"""
from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from apertis_proxy.budgets.limiter import Limiter
from apertis_proxy.store import service
from apertis_proxy.store.admissions import STALE_LEASE_SECONDS, Limits
from apertis_proxy.store.keys import create_key
from tests.support.pg_server import PgServer, PgUnavailable


async def test_a_release_the_server_never_received_settles_its_cost_after_the_admission_was_collected(
        pg_server, tmp_path, caplog):
    # pg_server: PostgreSQL is there (or the test skips, or fails in CI); this test stops a server of its own.
    try:
        server = await asyncio.to_thread(PgServer.start)
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    store = limiter = other = None
    try:
        url = await asyncio.to_thread(server.create_database, "retry")
        conn = service.connect(url)
        try:
            key_id, _ = create_key(conn, "no-ledger")
            conn.commit()
        finally:
            conn.close()
        store = await service.open_store(url)
        limiter = Limiter(store, lease_seconds=30.0, log=logging.getLogger("test.pg-release.limits"))
        await limiter.start()
        limits = Limits(key_id, quota_cost=1.0)
        assert (await limiter.admit(limits, "c1", 0.5, 0)).admitted
        # The renewal loop stands still: the test makes its steps itself, in the order that loses the cost.
        limiter._task.cancel()
        await asyncio.gather(limiter._task, return_exceptions=True)

        # The store goes away; the request ends: its release (no ledger settles the spend) cannot even connect.
        await asyncio.to_thread(server.stop, "fast")
        with caplog.at_level(logging.WARNING, logger="test.pg-release.limits"):
            await limiter.release(key_id, "c1", 0.4, 10, False)
        why = [r.getMessage() for r in caplog.records if "could not release" in r.getMessage()]
        kept = list(limiter._unreleased)
        assert kept and kept[0][0][:2] == (key_id, "c1"), kept
        first = kept[0][1]

        # Back after more than STALE_LEASE_SECONDS: another host's renewal collects this host's admissions first.
        await asyncio.to_thread(server.start_again)
        target = server.url("retry")
        raw = await asyncpg.connect(target)
        try:
            await raw.execute("UPDATE limit_leases SET expires_at = extract(epoch FROM clock_timestamp()) - $1"
                              " WHERE holder = $2", STALE_LEASE_SECONDS + 60.0, limiter.holder)
        finally:
            await raw.close()
        other = await store.admissions()
        await other.renew_lease("another-host", 30.0)
        raw = await asyncpg.connect(target)
        try:
            collected = await raw.fetchval("SELECT COUNT(*) FROM admissions WHERE request_id = 'c1'") == 0
        finally:
            await raw.close()
        assert collected

        # The renewal loop's retry of the kept release (tried until the pool has a connection again).
        for _ in range(20):
            try:
                await limiter._retry_releases()
                break
            except Exception:  # noqa: BLE001 - a pooled connection the restart cut: the next try opens one
                await asyncio.sleep(0.1)
        assert not limiter._unreleased
        try:
            spend = (await store.read_spend()).get(key_id)
        except service.StoreUnavailable:        # the store's own connection, cut by the restart: opened again
            spend = (await store.read_spend()).get(key_id)
        assert spend is not None and spend[0] == pytest.approx(0.4) and spend[1] == 10, (
            f"the request's cost is lost: key_spend {spend} after a release that never reached the server was "
            f"kept as {'a first release' if first else 'a retry'} ({why}) and made again after its admission was "
            f"collected")
    finally:
        if other is not None:
            await other.close()
        if limiter is not None:
            limiter._unreleased.clear()
            await limiter.close()
        if store is not None:
            await store.close()
        await asyncio.to_thread(server.close)
