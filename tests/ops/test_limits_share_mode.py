"""`[limits] on_store_down = "share"` with the ledger settling spend: what a request admitted alone counts once its
ledger row lands.  The keys plugin is driven as the gateway drives it (authenticate, release, finish) on a real
SQLite file, with the sqlite meter's settlement (meters=("sqlite",)): the ledger row is written with
Store.write_ledger, as the meter ships it."""
from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time

import pytest

from apertis_plugins.keys_auth import KeysAuth
from apertis_proxy.plugin_api import PluginContext, RequestInfo, UsageRecord
from apertis_proxy.store import admissions as sqlite_admissions
from apertis_proxy.store import service
from apertis_proxy.store.keys import create_key
from tests.ops.test_admissions_store import stored_spend
from tests.unit.test_plugins_unit import running

SONNET = "claude-sonnet-4-5-20250929"
_ids = (f"req_review2_{n}" for n in range(10**9))


def new_key(url: str, name: str, **limits) -> tuple[int, str]:
    conn = service.connect(url)
    try:
        key_id, plain = create_key(conn, name, **limits)
        conn.commit()
        return key_id, plain
    finally:
        conn.close()


def keys_plugin(url: str, **options) -> KeysAuth:
    """The keys plugin of a gateway whose meter is the ledger ("sqlite": the ledger settles spend)."""
    ctx = PluginContext(name="keys", options={"poll_interval": 60.0, **options}, db_path=url,
                        log=logging.getLogger("test.review2.keys"), workers=1, meters=("sqlite",))
    return KeysAuth(ctx)


def request(plain: str, max_tokens: int = 16) -> RequestInfo:
    body = {"model": SONNET, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    return RequestInfo(method="POST", path="/v1/messages", query="", headers={"x-api-key": plain}, body=body,
                       model=SONNET, stream=False, client="127.0.0.1:5000", request_id=next(_ids))


def record_of(req: RequestInfo, caller, **fields) -> UsageRecord:
    return UsageRecord(request_id=req.request_id, started_at=time.time(), endpoint="/v1/messages", status=200,
                       key_id=caller.key_id, key_name=caller.key_name, requested_model=SONNET, **fields)


def unpriced(req: RequestInfo, caller, input_tokens: int, output_tokens: int) -> UsageRecord:
    """Answered with its usage, which has no price here (an allow_unpriced model): tokens known, cost None."""
    return record_of(req, caller, reached_upstream=True, input_tokens=input_tokens, output_tokens=output_tokens,
                     raw_usage={"input_tokens": input_tokens, "output_tokens": output_tokens}, cost=None,
                     attempt_log=[{"channel": "main", "channel_id": 1, "outcome": "ok", "status": 200}])


def cut(req: RequestInfo, caller) -> UsageRecord:
    """Its client left after it went upstream, before any usage: usage unknown, cost None."""
    rec = record_of(req, caller, reached_upstream=True, interrupted=True, cost=None)
    rec.status, rec.error_type = 499, "client_closed_request"
    assert rec.usage_unknown
    return rec


async def end(auth: KeysAuth, caller, rec: UsageRecord) -> None:
    """As the gateway ends a request: release(), then finish()."""
    await auth.release(caller, rec)
    await auth.finish(caller, rec)
    await auth.limiter.drain()


async def admitted_alone(auth: KeysAuth, url: str, plain: str, n: int) -> list[tuple[RequestInfo, object]]:
    """`n` requests admitted while another connection holds SQLite's write lock (the store is away): alone, each
    with the bound it was admitted with; (request, caller) each."""
    first = request(plain)
    caller = await auth.admit(first, await auth.authenticate(first))
    await end(auth, caller, record_of(first, caller))           # the store seen once: a share to admit from
    blocker = sqlite3.connect(url, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        reqs = [request(plain) for _ in range(n)]
        admitted = [(req, await auth.admit(req, await auth.authenticate(req))) for req in reqs]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert all(c.data.get("alone") and c.data.get("bound") for _, c in admitted)
    return admitted


# -- share mode, the sqlite meter: an unpriced request admitted alone --------------------------------------------------

async def test_share_mode_counts_the_tokens_of_an_unpriced_request_admitted_alone_once(tmp_path, monkeypatch):
    """A request admitted alone while the store is away whose usage has no price (cost None, its 50 tokens known)
    counts its bound's cost (the keys plugin settles it: no admission holds it for the ledger row) and its 50
    tokens once (its ledger row settles them)."""
    monkeypatch.setattr(sqlite_admissions, "LOCK_WAIT", 0.3)       # the store counts as away after 0.3 s
    url = str(tmp_path / "gw.db")
    service.connect(url).close()
    key_id, plain = new_key(url, "alone", quota_cost=10.0, quota_tokens=1_000_000)
    async with running(keys_plugin(url, limits_on_store_down="share")) as auth:
        ((req, caller),) = await admitted_alone(auth, url, plain, 1)
        rec = unpriced(req, caller, 30, 20)
        await end(auth, caller, rec)
        # The ledger row lands (the meter ships it), and the plugin settles what it set aside.
        assert await auth.store.write_ledger([dataclasses.asdict(rec)]) == 1
        await auth.refresh()
        cost, tokens = stored_spend(url, key_id)
    assert cost == pytest.approx(caller.data["bound"][0])
    assert tokens == 50, f"a 50-token unpriced request admitted alone counted {tokens} tokens against the quota"


async def test_share_mode_counts_a_cut_request_admitted_alone_at_its_bound_once(tmp_path, monkeypatch):
    """A request admitted alone and cut before any usage (cost None, no tokens) counts its bound's cost and tokens
    once, whichever of its ledger row and the plugin's settlement lands first."""
    monkeypatch.setattr(sqlite_admissions, "LOCK_WAIT", 0.3)
    url = str(tmp_path / "gw.db")
    service.connect(url).close()
    key_id, plain = new_key(url, "cut-alone", quota_cost=10.0, quota_tokens=1_000_000)
    async with running(keys_plugin(url, limits_on_store_down="share")) as auth:
        reqs, callers = zip(*await admitted_alone(auth, url, plain, 2))
        records = [cut(req, c) for req, c in zip(reqs, callers)]
        await end(auth, callers[0], records[0])
        assert await auth.store.write_ledger([dataclasses.asdict(records[0])]) == 1     # the row first
        await auth.refresh()
        await end(auth, callers[1], records[1])
        await auth.refresh()                                                            # the plugin first
        assert await auth.store.write_ledger([dataclasses.asdict(records[1])]) == 1
        await auth.refresh()
        cost, tokens = stored_spend(url, key_id)
        bounds = [c.data["bound"] for c in callers]
        assert cost == pytest.approx(sum(b[0] for b in bounds))
        assert tokens == sum(b[1] for b in bounds)
        assert auth.by_id[key_id].pending_cost == 0 and auth.by_id[key_id].pending_tokens == 0
