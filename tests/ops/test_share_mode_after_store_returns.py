"""`[limits] on_store_down = "share"`, a key's requests per minute and its concurrency: docs/plugins.md bounds what share mode costs
("the limits can be exceeded by up to one request per process while the store is away"). The requests a process
admitted alone are admissions of that minute too, and those still running hold slots: once the store is back, its
decisions must still count them, or the key gets its whole limit again on top of them.

One process (`holders` 1, so its share is the whole `--rpm 4`): one request admitted in the store, then the store
is away (another connection holds SQLite's write lock) and requests are admitted alone until the share refuses,
then the store is back. Within one minute the key may have had at most 4 + 1 requests admitted.
"""
from __future__ import annotations

import sqlite3

from apertis_proxy.plugin_api import Reject
from apertis_proxy.store import admissions as sqlite_admissions
from apertis_proxy.store import service
from tests.ops.test_limits_share_mode import end, keys_plugin, new_key, record_of, request
from tests.unit.test_plugins_unit import running

RPM = 4


async def admit(auth, plain: str) -> bool:
    """One request through the keys plugin as the gateway sends it; True when admitted (and ended)."""
    req = request(plain)
    try:
        caller = await auth.authenticate(req)
    except Reject as refusal:
        assert refusal.status == 429 and refusal.error_type == "rate_limit_error", refusal
        return False
    await end(auth, caller, record_of(req, caller))
    return True


async def test_requests_admitted_alone_still_count_in_the_minute_once_the_store_is_back(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_admissions, "LOCK_WAIT", 0.3)       # the store counts as away after 0.3 s
    url = str(tmp_path / "gw.db")
    service.connect(url).close()
    _, plain = new_key(url, "paced", rpm=RPM)
    async with running(keys_plugin(url, limits_on_store_down="share")) as auth:
        admitted = [await admit(auth, plain)]                       # in the store: the minute holds one
        blocker = sqlite3.connect(url, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            for _ in range(RPM + 2):                                 # alone, until the share says 429
                admitted.append(await admit(auth, plain))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        alone = sum(admitted[1:])
        assert 1 <= alone <= RPM

        for _ in range(RPM):                                         # the store is back, the same minute
            admitted.append(await admit(auth, plain))
    assert sum(admitted) <= RPM + 1, (f"{sum(admitted)} requests admitted within one minute with --rpm {RPM}: "
                                      f"1 in the store, {alone} alone, {sum(admitted) - 1 - alone} after")


async def test_requests_admitted_alone_still_hold_their_slots_once_the_store_is_back(tmp_path, monkeypatch):
    """`--concurrency 2`, one process: two requests admitted alone while the store is away are still running when
    it is back; the store's count of the key's requests in flight must include them (at most 2 + 1 at once)."""
    monkeypatch.setattr(sqlite_admissions, "LOCK_WAIT", 0.3)
    url = str(tmp_path / "gw.db")
    service.connect(url).close()
    _, plain = new_key(url, "parallel", concurrency=2)
    async with running(keys_plugin(url, limits_on_store_down="share")) as auth:
        assert await admit(auth, plain)                               # the store seen once, the request ended
        running_alone = []
        blocker = sqlite3.connect(url, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            for _ in range(2):
                req = request(plain)
                running_alone.append((req, await auth.authenticate(req)))     # admitted alone, still running
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert all(caller.data.get("alone") for _, caller in running_alone)

        in_store = []
        for _ in range(2):                                            # the store is back
            req = request(plain)
            try:
                in_store.append((req, await auth.authenticate(req)))
            except Reject as refusal:
                assert refusal.status == 429, refusal
        for req, caller in running_alone + in_store:
            await end(auth, caller, record_of(req, caller))
    in_flight = len(running_alone) + len(in_store)
    assert in_flight <= 2 + 1, f"{in_flight} requests in flight at once with --concurrency 2"
