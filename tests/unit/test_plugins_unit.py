"""The first-party plugins driven directly: real SQLite files, no gateway.

keys (auth), channels (router) and sqlite (meter) are built exactly as the
core builds them, ``cls(PluginContext)`` then ``await start()``, and fed
RequestInfo / Caller / Outcome / UsageRecord objects.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import random
import sqlite3
import time

import pytest

from apertis_plugins.channel_router import ChannelRouter
from apertis_plugins.keys_auth import KeysAuth
from apertis_plugins.sqlite_meter import SqliteMeter
from apertis_proxy.gateway.upstream_errors import classify
from apertis_proxy.plugin_api import (CAUSE_TRANSIENT, Caller, Outcome, PluginContext, Reject, RequestInfo,
                                      UsageRecord)
from apertis_proxy.store import schema
from apertis_proxy.store.channels import add_channel
from apertis_proxy.store.keys import create_key, delete_key, rotate_key

SONNET = "claude-sonnet-4-5-20250929"
HAIKU = "claude-haiku-4-5-20251001"
OPUS = "claude-opus-4-5-20251101"
ANYONE = Caller(key_id=None, key_name="anyone")


# -- helpers ---------------------------------------------------------------------

@pytest.fixture
def db(tmp_path):
    """(path, sync connection) of a fresh gateway database: what the CLI writes with."""
    path = str(tmp_path / "gateway.db")
    conn = schema.connect(path)
    yield path, conn
    conn.close()


def context(name: str, db_path: str, workers: int = 1, **options) -> PluginContext:
    return PluginContext(name=name, options=options, db_path=db_path,
                         log=logging.getLogger(f"test.plugin.{name}"), workers=workers)


@contextlib.asynccontextmanager
async def running(plugin):
    await plugin.start()
    try:
        yield plugin
    finally:
        await plugin.close()


def request(model: str | None = SONNET, headers: dict | None = None, body: dict | None = None,
            request_id: str = "req_test") -> RequestInfo:
    if body is None and model is not None:
        body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    return RequestInfo(method="POST", path="/v1/messages", query="", headers=headers or {},
                       body=body, model=model, stream=False, client="127.0.0.1:5000",
                       request_id=request_id)


_request_ids = (f"req_unit_{n}" for n in range(10**9))


def with_key(plain: str, model: str | None = SONNET) -> RequestInfo:
    return request(model, headers={"x-api-key": plain}, request_id=next(_request_ids))


def usage(cost: float = 0.0, input_tokens: int = 0, output_tokens: int = 0) -> UsageRecord:
    return UsageRecord(request_id="req_x", started_at=time.time(), endpoint="/v1/messages",
                       status=200, input_tokens=input_tokens, output_tokens=output_tokens, cost=cost)


@dataclasses.dataclass
class Admitted:
    """A request the keys plugin admitted, ended as the gateway ends one: release(), then finish()."""

    auth: KeysAuth
    caller: Caller
    request_id: str

    async def end(self, record: UsageRecord | None = None) -> None:
        record = record or usage()
        record.request_id = self.request_id
        await self.auth.release(self.caller, record)
        await self.auth.finish(self.caller, record)
        await self.auth.limiter.drain()     # a reservation without a slot is released after the answer


async def admit(auth: KeysAuth, plain: str, model: str | None = SONNET) -> Admitted:
    """The key checked, then the request admitted, as the gateway asks once it is routed."""
    req = with_key(plain, model)
    return Admitted(auth, await auth.admit(req, await auth.authenticate(req)), req.request_id)


async def rejected(auth: KeysAuth, req: RequestInfo) -> Reject:
    with pytest.raises(Reject) as info:
        await auth.admit(req, await auth.authenticate(req))
    return info.value


async def eventually(predicate, timeout: float = 5.0):
    """Wait for a background task's effect (not a timing assertion: only a bound)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- keys: who is calling ---------------------------------------------------------

async def test_key_accepted_as_x_api_key_and_as_bearer_token(db):
    path, conn = db
    key_id, plain = create_key(conn, "alice")
    async with running(KeysAuth(context("keys", path))) as auth:
        for headers in ({"x-api-key": plain}, {"authorization": f"Bearer {plain}"},
                        {"authorization": f"bearer  {plain} "}):
            caller = await auth.authenticate(request(headers=headers))
            assert (caller.key_id, caller.key_name, caller.models) == (key_id, "alice", None)
            await auth.finish(caller, usage())


async def test_missing_and_unknown_keys_are_401_without_echoing_the_key(db):
    path, _ = db
    async with running(KeysAuth(context("keys", path))) as auth:
        missing = await rejected(auth, request(headers={}))
        assert (missing.status, missing.error_type) == (401, "authentication_error")
        assert "x-api-key" in missing.message
        wrong = "sk-apx-not-a-real-key-0123456789"
        for headers in ({"x-api-key": wrong}, {"authorization": f"Bearer {wrong}"},
                        {"authorization": f"Basic {wrong}"}):
            err = await rejected(auth, request(headers=headers))
            assert (err.status, err.error_type) == (401, "authentication_error")
            assert wrong not in err.message


async def test_on_unknown_defer_lets_the_next_auth_plugin_decide(db):
    path, conn = db
    _, plain = create_key(conn, "alice")
    async with running(KeysAuth(context("keys", path, on_unknown="defer"))) as auth:
        assert await auth.authenticate(request(headers={})) is None
        assert await auth.authenticate(with_key("sk-apx-unknown")) is None
        assert (await auth.authenticate(with_key(plain))).key_name == "alice"


async def test_disabled_and_expired_keys_are_401_saying_why(db):
    path, conn = db
    _, disabled = create_key(conn, "gone")
    conn.execute("UPDATE keys SET enabled = 0 WHERE name = 'gone'")
    _, expired = create_key(conn, "old", expires_at=time.time() - 5)
    _, valid = create_key(conn, "fresh", expires_at=time.time() + 3600)
    async with running(KeysAuth(context("keys", path))) as auth:
        err = await rejected(auth, with_key(disabled))
        assert (err.status, err.error_type) == (401, "authentication_error")
        assert "disabled" in err.message
        err = await rejected(auth, with_key(expired))
        assert (err.status, err.error_type) == (401, "authentication_error")
        assert "expired" in err.message
        assert (await auth.authenticate(with_key(valid))).key_name == "fresh"


# -- keys: model allow-list --------------------------------------------------------

async def test_allowed_models_match_catalogue_aliases_both_ways(db):
    path, conn = db
    _, by_alias = create_key(conn, "alias-listed", models=["claude-sonnet-4.5"])
    _, by_id = create_key(conn, "id-listed", models=[SONNET])
    async with running(KeysAuth(context("keys", path))) as auth:
        for plain in (by_alias, by_id):
            for model in (SONNET, "claude-sonnet-4.5", "claude-sonnet-4-5"):
                caller = await auth.authenticate(with_key(plain, model))
                assert caller.may_use(SONNET) and caller.may_use("claude-sonnet-4.5")
                await auth.finish(caller, usage())
        err = await rejected(auth, with_key(by_alias, "claude-opus-4.5"))
        assert (err.status, err.error_type) == (403, "permission_error")
        assert "claude-opus-4.5" in err.message and "claude-sonnet-4.5" in err.message
        # Requests without a model (GET /v1/models) are not filtered here.
        caller = await auth.authenticate(with_key(by_alias, None))
        assert not caller.may_use(OPUS)


async def test_channel_alias_resolving_to_an_allowed_model_is_admitted(db):
    path, conn = db
    add_channel(conn, "cheap", "http://127.0.0.1:1", "sk-up", aliases={"fast": HAIKU})
    _, plain = create_key(conn, "haiku-only", models=["claude-haiku-4.5"])
    async with running(KeysAuth(context("keys", path))) as auth:
        caller = await auth.authenticate(with_key(plain, "fast"))
        assert caller.key_name == "haiku-only"
        err = await rejected(auth, with_key(plain, "slow"))
        assert err.status == 403


# -- keys: quotas --------------------------------------------------------------------

async def test_cost_quota_is_settled_after_the_call_then_enforced(db):
    path, conn = db
    key_id, plain = create_key(conn, "budget", quota_cost=0.01)
    async with running(KeysAuth(context("keys", path))) as auth:
        await (await admit(auth, plain)).end(usage(cost=0.006, input_tokens=100, output_tokens=20))
        # 0.006 < 0.01: still admitted
        await (await admit(auth, plain)).end(usage(cost=0.006, input_tokens=100, output_tokens=20))
        err = await rejected(auth, with_key(plain))
        assert (err.status, err.error_type) == (402, "billing_error")
        assert err.headers["x-should-retry"] == "false"
        assert "quota" in err.message and "$0.01" in err.message
        row = conn.execute("SELECT cost, tokens FROM key_spend WHERE key_id = ?", (key_id,)).fetchone()
        assert row["cost"] == pytest.approx(0.012) and row["tokens"] == 240
        await auth.refresh()
        err = await rejected(auth, with_key(plain))      # still over after re-reading the table
        assert err.status == 402


async def test_a_deleted_keys_last_request_is_not_charged_to_the_key_that_reuses_its_id(db):
    """A request of a deleted key that ends after a new key was created must not spend the new key's quota nor
    free one of its concurrency slots (the store never gives a new key a deleted key's id)."""
    path, conn = db
    create_key(conn, "keeper")
    old_id, old_plain = create_key(conn, "temp", concurrency=5)
    async with running(KeysAuth(context("keys", path))) as auth:
        in_flight = await admit(auth, old_plain)
        delete_key(conn, "temp")
        new_id, new_plain = create_key(conn, "newbie", quota_cost=0.001, concurrency=1)
        assert new_id != old_id
        await auth.refresh()
        held = await admit(auth, new_plain)                          # newbie's one slot
        await in_flight.end(usage(cost=0.5, input_tokens=1000, output_tokens=100))
        err = await rejected(auth, with_key(new_plain))             # the slot is still held, by newbie
        assert err.status == 429, err.message
        await held.end()
        again = await admit(auth, new_plain)                         # and no spend was charged to it
        assert again.caller.key_name == "newbie"
        await again.end()
        await auth.refresh()
    row = conn.execute("SELECT cost FROM key_spend WHERE key_id = ?", (new_id,)).fetchone()
    assert row is None or row["cost"] == 0


async def test_a_request_in_flight_across_a_rotation_is_charged_and_frees_its_slot(db):
    """Rotation keeps the key: a request admitted with the old secret finishes on the same key state."""
    path, conn = db
    key_id, old_plain = create_key(conn, "alice", concurrency=1)
    async with running(KeysAuth(context("keys", path))) as auth:
        in_flight = await admit(auth, old_plain)
        new_plain, _ = rotate_key(conn, "alice", 3600)
        await auth.refresh()
        err = await rejected(auth, with_key(new_plain))              # the one slot is still held
        assert err.status == 429, err.message
        await in_flight.end(usage(cost=0.25, input_tokens=10, output_tokens=5))
        again = await admit(auth, new_plain)                         # the slot came back
        assert (again.caller.key_id, again.caller.key_name) == (key_id, "alice")
        await again.end()
        await auth.refresh()
    row = conn.execute("SELECT cost, tokens FROM key_spend WHERE key_id = ?", (key_id,)).fetchone()
    assert (row["cost"], row["tokens"]) == (0.25, 15)


async def test_token_quota_counts_every_kind_of_token(db):
    path, conn = db
    _, plain = create_key(conn, "tokens", quota_tokens=1000)
    async with running(KeysAuth(context("keys", path))) as auth:
        record = usage(input_tokens=400, output_tokens=300)
        record.cache_read_input_tokens = 200
        await (await admit(auth, plain)).end(record)                 # 900 of 1000
        record = usage(output_tokens=50)
        record.cache_creation_input_tokens = 50
        await (await admit(auth, plain)).end(record)                 # 1000 of 1000
        err = await rejected(auth, with_key(plain))
        assert (err.status, err.error_type) == (402, "billing_error")
        assert "1000 of 1000 tokens" in err.message


async def test_spend_survives_restart_and_other_workers_spend_is_seen(db):
    path, conn = db
    key_id, plain = create_key(conn, "shared", quota_cost=1.0)
    async with running(KeysAuth(context("keys", path))) as auth:
        await (await admit(auth, plain)).end(usage(cost=0.25))
    # Settled in the store: a new process starts from it.
    async with running(KeysAuth(context("keys", path, poll_interval=0.05))) as auth:
        assert auth.by_id[key_id].spent_cost == pytest.approx(0.25)
        await (await admit(auth, plain)).end()
        # Another worker settles its spend into the same table: the next admission sees it.
        conn.execute("UPDATE key_spend SET cost = cost + 0.75 WHERE key_id = ?", (key_id,))
        err = await rejected(auth, with_key(plain))
        assert err.status == 402


async def test_a_burst_overspends_a_token_quota_by_at_most_one_request(db):
    """Reserve-then-settle: 300 concurrent requests near the end of a quota; each reserves its bound
    (body bytes + max_tokens), so the quota is overshot by at most one request, which ran alone."""
    path, conn = db
    quota, per_request = 1000, 10
    key_id, plain = create_key(conn, "racy", quota_tokens=quota)
    conn.execute("INSERT INTO key_spend (key_id, cost, tokens) VALUES (?, 0, ?)", (key_id, 900))
    rng = random.Random(7)
    spent = 900                      # what the test itself settled
    in_flight = most_in_flight = 0
    statuses = collections.Counter()

    async def one(auth):
        nonlocal spent, in_flight, most_in_flight
        await asyncio.sleep(rng.random() * 0.02)
        while True:         # retrying 429s, as the SDKs do
            try:
                admitted = await admit(auth, plain)
                break
            except Reject as err:
                statuses[err.status] += 1
                assert err.status in (402, 429)
                if err.status == 402:
                    return
                assert int(err.headers["retry-after"]) >= 1
                await asyncio.sleep(0.005)
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await asyncio.sleep(rng.random() * 0.02)
        in_flight -= 1
        spent += per_request
        await admitted.end(usage(output_tokens=per_request))

    async with running(KeysAuth(context("keys", path, poll_interval=0.01))) as auth:
        await asyncio.gather(*(one(auth) for _ in range(300)))
    assert statuses[402] > 0 and statuses[429] > 0, (statuses, most_in_flight, spent)
    assert most_in_flight > 1
    assert quota <= spent <= quota + per_request
    row = conn.execute("SELECT tokens FROM key_spend WHERE key_id = ?", (key_id,)).fetchone()
    assert row["tokens"] == spent


# -- keys: rate and concurrency limits ------------------------------------------------

async def test_requests_per_minute_limit_is_429_with_retry_after(db):
    path, conn = db
    key_id, plain = create_key(conn, "slow", rpm=3)
    async with running(KeysAuth(context("keys", path))) as auth:
        for _ in range(3):
            await (await admit(auth, plain)).end()
        err = await rejected(auth, with_key(plain))
        assert (err.status, err.error_type) == (429, "rate_limit_error")
        assert 1 <= int(err.headers["retry-after"]) <= 60
        assert "3 requests per minute" in err.message
        # Refused requests do not use up the window; a key with only a rate holds nothing while it runs.
        count = conn.execute("SELECT COUNT(*) FROM admission_times WHERE key_id = ?", (key_id,)).fetchone()[0]
        assert count == 3
        assert conn.execute("SELECT COUNT(*) FROM admissions").fetchone()[0] == 0


async def test_limits_hold_across_worker_processes_sharing_the_store(db):
    """Two plugin instances (two worker processes) on one store share one window and one set of slots."""
    path, conn = db
    _, plain = create_key(conn, "split", rpm=5, concurrency=2)
    async with running(KeysAuth(context("keys", path, workers=2))) as one, \
            running(KeysAuth(context("keys", path, workers=2))) as two:
        first = await admit(one, plain)
        second = await admit(two, plain)
        for auth in (one, two):
            err = await rejected(auth, with_key(plain))
            assert err.status == 429 and "concurrency" in err.message
        await first.end()
        await second.end()
        await (await admit(two, plain)).end()
        await (await admit(one, plain)).end()
        await (await admit(two, plain)).end()           # the fifth in the minute
        for auth in (one, two):
            err = await rejected(auth, with_key(plain))
            assert err.status == 429 and "5 requests per minute" in err.message


async def test_a_quota_reservation_is_released_after_the_answer_a_slot_before(db):
    """release() waits for the store only when the request holds a concurrency slot; a reservation alone is
    turned into the exact cost just after (the bound, an upper bound, is held a moment longer)."""
    path, conn = db
    quota_id, quota_only = create_key(conn, "budget-only", quota_cost=1.0)
    slot_id, with_slot = create_key(conn, "one-at-a-time", concurrency=1)
    async with running(KeysAuth(context("keys", path))) as auth:
        request = await admit(auth, quota_only)
        record = dataclasses.replace(usage(cost=0.25, output_tokens=10), request_id=request.request_id)
        await auth.release(request.caller, record)
        assert auth.limiter._releasing                       # under way, not awaited
        await auth.limiter.drain()
        assert conn.execute("SELECT cost FROM key_spend WHERE key_id = ?", (quota_id,)).fetchone()[0] == 0.25
        assert conn.execute("SELECT COUNT(*) FROM admissions WHERE key_id = ?", (quota_id,)).fetchone()[0] == 0
        request = await admit(auth, with_slot)
        await auth.release(request.caller, dataclasses.replace(usage(), request_id=request.request_id))
        assert not auth.limiter._releasing                   # done before release() returned
        assert conn.execute("SELECT COUNT(*) FROM admissions WHERE key_id = ?", (slot_id,)).fetchone()[0] == 0


async def test_concurrency_limit_counts_requests_in_flight_until_release(db):
    path, conn = db
    key_id, plain = create_key(conn, "narrow", concurrency=2)
    async with running(KeysAuth(context("keys", path))) as auth:
        first = await admit(auth, plain)
        second = await admit(auth, plain)
        err = await rejected(auth, with_key(plain))
        assert (err.status, err.error_type) == (429, "rate_limit_error")
        assert err.headers["retry-after"] == "1"
        await auth.release(first.caller, dataclasses.replace(usage(), request_id=first.request_id))
        third = await admit(auth, plain)                 # release() alone gave the slot back
        await first.end()
        await second.end()
        await third.end()
        assert conn.execute("SELECT COUNT(*) FROM admissions WHERE key_id = ?", (key_id,)).fetchone()[0] == 0


async def test_a_killed_process_frees_its_slots_when_its_lease_runs_out(db):
    path, conn = db
    _, plain = create_key(conn, "leased", concurrency=1)
    async with running(KeysAuth(context("keys", path, limits_lease_seconds=0.6))) as survivor:
        doomed = KeysAuth(context("keys", path, limits_lease_seconds=0.6))
        await doomed.start()
        await admit(doomed, plain)                       # its one slot, never released
        # Killed: it stops renewing its lease and never hands it back.
        doomed.limiter._task.cancel()
        err = await rejected(survivor, with_key(plain))
        assert err.status == 429
        admitted = await eventually(lambda: _try_admit(survivor, plain), timeout=5.0)
        await admitted.end()
        await doomed.limiter.admissions.close()
        await doomed.store.close()


async def _try_admit(auth: KeysAuth, plain: str):
    try:
        return await admit(auth, plain)
    except Reject:
        return None


# -- keys: CLI edits -------------------------------------------------------------------

async def test_cli_edits_are_picked_up_without_restart(db):
    path, conn = db
    async with running(KeysAuth(context("keys", path, poll_interval=0.02))) as auth:
        _, plain = create_key(conn, "late")              # as `keys create` would
        caller = await eventually(lambda: auth.by_hash and _try(auth, plain))
        assert caller.key_name == "late"
        conn.execute("UPDATE keys SET enabled = 0 WHERE name = 'late'")   # `keys disable`
        await eventually(lambda: not auth.by_id[caller.key_id].enabled)
        err = await rejected(auth, with_key(plain))
        assert "disabled" in err.message


async def _try(auth: KeysAuth, plain: str):
    try:
        return await auth.authenticate(with_key(plain))
    except Reject:
        return None


# -- channels: order ---------------------------------------------------------------------

def make_channels(conn, *specs, **common) -> dict[str, int]:
    """specs: (name, priority, weight[, models]) -> ids by name."""
    ids = {}
    for name, priority, weight, *models in specs:
        ids[name] = add_channel(conn, name, f"http://127.0.0.1:9/{name}", f"sk-up-{name}",
                                priority=priority, weight=weight,
                                models=models[0] if models else None, **common)
    return ids


async def test_priority_tiers_come_first_and_every_member_is_a_candidate(db):
    path, conn = db
    make_channels(conn, ("primary", 10, 1), ("spare-a", 0, 1), ("spare-b", 0, 1), ("last", -5, 1))
    async with running(ChannelRouter(context("channels", path, max_attempts=4, seed=1))) as router:
        for _ in range(50):
            names = [c.name for c in await router.route(request(), ANYONE)]
            assert names[0] == "primary" and names[3] == "last"
            assert sorted(names[1:3]) == ["spare-a", "spare-b"]


async def test_weighted_choice_inside_a_tier(db):
    path, conn = db
    make_channels(conn, ("light", 0, 1), ("heavy", 0, 3), ("zero", 0, 0))
    async with running(ChannelRouter(context("channels", path, max_attempts=3, seed=1234))) as router:
        firsts = collections.Counter()
        draws = 4000
        for _ in range(draws):
            order = [c.name for c in await router.route(request(), ANYONE)]
            firsts[order[0]] += 1
            assert order[2] == "zero"           # weight 0: only after the weighted ones
        assert firsts["zero"] == 0
        assert 0.70 < firsts["heavy"] / draws < 0.80      # expected 0.75
        assert 0.20 < firsts["light"] / draws < 0.30      # expected 0.25


async def test_max_attempts_cuts_the_list(db):
    path, conn = db
    make_channels(conn, *((f"ch{i}", 0, 1) for i in range(5)))
    async with running(ChannelRouter(context("channels", path, max_attempts=2))) as router:
        assert len(await router.route(request(), ANYONE)) == 2
    async with running(ChannelRouter(context("channels", path))) as router:
        assert len(await router.route(request(), ANYONE)) == 3        # the default


async def test_only_channels_serving_the_model_for_this_caller(db):
    path, conn = db
    make_channels(conn, ("haiku", 0, 1, [HAIKU]), ("sonnet", 0, 1, ["claude-sonnet-4.5"]),
                  ("any", 0, 1))
    conn.execute("UPDATE channels SET aliases = ? WHERE name = 'any'",
                 (json.dumps({"fast": HAIKU}),))
    haiku_only = Caller(key_id=1, key_name="k", models=frozenset({"claude-haiku-4.5", HAIKU,
                                                                  "claude-haiku-4-5"}))
    async with running(ChannelRouter(context("channels", path, max_attempts=5))) as router:
        names = {c.name for c in await router.route(request("claude-haiku-4.5"), ANYONE)}
        assert names == {"haiku", "any"}
        names = {c.name for c in await router.route(request(SONNET), ANYONE)}
        assert names == {"sonnet", "any"}
        assert await router.route(request(SONNET), haiku_only) == []
        fast = await router.route(request("fast"), haiku_only)
        assert [c.name for c in fast] == ["any"] and fast[0].upstream_model("fast") == HAIKU
        ids = [m.id for m in router.models(haiku_only)]
        assert ids == [HAIKU, "fast"] or ids == ["fast", HAIKU]
        everything = {m.id for m in router.models(ANYONE)}
        assert {OPUS, SONNET, HAIKU, "fast"} <= everything


# -- channels: failover health ----------------------------------------------------------------

def outcome(channel, status=None, error_type=None, message="", retry_after=None, ok=False, error_code=None):
    """The Outcome the gateway reports, its cause decided as the gateway decides it."""
    cause = None if ok else (classify(status, error_type, error_code, message) if status and status >= 400
                             else CAUSE_TRANSIENT)
    return Outcome(channel=channel, ok=ok, status=status, error_type=error_type, message=message,
                   retry_after=retry_after, error_code=error_code, cause=cause)


async def test_failing_channel_cools_down_to_the_end_of_the_list(db):
    path, conn = db
    make_channels(conn, ("a", 10, 1), ("b", 0, 1))
    async with running(ChannelRouter(context("channels", path))) as router:
        a, b = await router.route(request(), ANYONE)
        assert (a.name, b.name) == ("a", "b")
        router.feedback(outcome(a, 500, "api_error"))
        assert [c.name for c in await router.route(request(), ANYONE)] == ["b", "a"]
        router.feedback(outcome(a, ok=True, status=200))          # it answered again
        assert [c.name for c in await router.route(request(), ANYONE)] == ["a", "b"]
        router.feedback(outcome(b, 503, "overloaded_error"))
        router.feedback(outcome(a, None, "timeout"))
        # Everyone cools down: an outage, refused with the first return as retry-after.
        with pytest.raises(Reject) as refused:
            await router.route(request(), ANYONE)
        assert (refused.value.status, refused.value.error_type) == (503, "overloaded_error")
        assert refused.value.headers["retry-after"] == "5"          # b's overload cooldown


async def test_disabled_channels_are_an_outage_unless_state_binds_the_request(db):
    path, conn = db
    make_channels(conn, ("revoked", 0, 1, [SONNET]), ("other", 0, 1, [HAIKU]))
    async with running(ChannelRouter(context("channels", path))) as router:
        (revoked,) = await router.route(request(), ANYONE)
        router.feedback(outcome(revoked, 401, "authentication_error", message="invalid x-api-key"))
        with pytest.raises(Reject) as refused:
            await router.route(request(), ANYONE)
        assert (refused.value.status, refused.value.error_type) == (503, "api_error")
        # A thread or file on that account: no channel (the gateway's 404, on which the SDK starts over).
        bound = dataclasses.replace(request(), account=revoked.account)
        assert await router.route(bound, ANYONE) == []
        assert await router.route(request("claude-opus-5-5"), ANYONE) == []     # no channel serves it at all


async def test_cooldown_ends_after_retry_after(db):
    path, conn = db
    make_channels(conn, ("a", 10, 1), ("b", 0, 1))
    async with running(ChannelRouter(context("channels", path))) as router:
        a, b = await router.route(request(), ANYONE)
        router.feedback(outcome(a, 429, "rate_limit_error", retry_after=0.5))
        assert router.is_cooling(a)
        await eventually(lambda: not router.is_cooling(a))
        assert [c.name for c in await router.route(request(), ANYONE)] == ["a", "b"]


async def test_cooldown_lengths_follow_retry_after_then_the_defaults(db):
    path, conn = db
    make_channels(conn, ("a", 0, 1))
    options = dict(cooldown_overloaded=2, max_cooldown=120)
    async with running(ChannelRouter(context("channels", path, **options))) as router:
        (a,) = await router.route(request(), ANYONE)
        assert router.cooldown_for(outcome(a, 429, "rate_limit_error")) == 30
        assert router.cooldown_for(outcome(a, 429, "rate_limit_error", retry_after=7)) == 7
        assert router.cooldown_for(outcome(a, 529, "overloaded_error")) == 2
        assert router.cooldown_for(outcome(a, 500, "api_error")) == 10
        assert router.cooldown_for(outcome(a, None, "connect_error")) == 15
        assert router.cooldown_for(outcome(a, 503, "api_error", retry_after=9999)) == 120
        assert router.cooldown_for(outcome(a, 400, "invalid_request_error")) is None
        router.feedback(outcome(a, 400, "invalid_request_error"))
        assert not router.is_cooling(a)            # the request's fault, not the channel's


async def test_overload_never_disables_a_channel(db):
    path, conn = db
    ids = make_channels(conn, ("busy", 0, 1))
    async with running(ChannelRouter(context("channels", path))) as router:
        (busy,) = await router.route(request(), ANYONE)
        for _ in range(20):
            router.feedback(outcome(busy, 529, "overloaded_error", message="Overloaded"))
        with pytest.raises(Reject) as refused:     # resting, not disabled: an overload, retried later
            await router.route(request(), ANYONE)
        assert (refused.value.status, refused.value.error_type) == (503, "overloaded_error")
        assert [c.name for c in router.channels] == ["busy"]
    assert conn.execute("SELECT enabled FROM channels WHERE id = ?", (ids["busy"],)).fetchone()[0] == 1


@pytest.mark.parametrize("status,error_type,message", [
    (401, "authentication_error", "invalid x-api-key"),
    (403, "permission_error", "This organization has been disabled.")])
async def test_a_refused_credential_disables_the_channel_with_the_reason(db, status, error_type, message):
    path, conn = db
    ids = make_channels(conn, ("revoked", 10, 1), ("good", 0, 1))
    async with running(ChannelRouter(context("channels", path, poll_interval=0.02))) as router:
        revoked, _ = await router.route(request(), ANYONE)
        router.feedback(outcome(revoked, status, error_type, message=message))
        assert [c.name for c in await router.route(request(), ANYONE)] == ["good"]
        row = await eventually(lambda: conn.execute(
            "SELECT enabled, disabled_reason, disabled_at FROM channels WHERE id = ? AND enabled = 0",
            (ids["revoked"],)).fetchone())
        assert row["disabled_reason"].startswith(f"upstream {status} {error_type}: {message} at ")
        assert abs(row["disabled_at"] - time.time()) < 60
        # Our own write bumped the revision; the reload keeps it out.
        await router.refresh()
        assert [c.name for c in await router.route(request(), ANYONE)] == ["good"]
        conn.execute("UPDATE channels SET enabled = 1, disabled_reason = NULL WHERE name = 'revoked'")
        await eventually(lambda: len(router.channels) == 2)


async def test_a_403_about_the_request_neither_disables_nor_cools_the_channel(db):
    path, conn = db
    ids = make_channels(conn, ("a", 10, 1), ("b", 0, 1))
    async with running(ChannelRouter(context("channels", path))) as router:
        a, _ = await router.route(request(), ANYONE)
        router.feedback(outcome(a, 403, "permission_error",
                                message="Your API key does not have permission to use the specified resource."))
        assert [c.name for c in await router.route(request(), ANYONE)] == ["a", "b"]
        assert not router.is_cooling(a)
    assert conn.execute("SELECT enabled FROM channels WHERE id = ?", (ids["a"],)).fetchone()[0] == 1


@pytest.mark.parametrize("code", ["contract_spend_limit_reached", "enforced_spend_limit_reached",
                                  "ramp_limit_exceeded"])
async def test_a_spend_or_ramp_limit_rests_the_channel_for_long(db, code):
    path, conn = db
    make_channels(conn, ("a", 10, 1), ("b", 0, 1))
    async with running(ChannelRouter(context("channels", path, max_cooldown=60))) as router:
        a, _ = await router.route(request(), ANYONE)
        limited = outcome(a, 429, "rate_limit_error", retry_after=5, error_code=code)
        assert router.cooldown_for(limited) == 3600
        assert router.cooldown_for(outcome(a, 429, "rate_limit_error", retry_after=5)) == 5
        router.feedback(limited)
        assert [c.name for c in await router.route(request(), ANYONE)] == ["b", "a"]


# -- channels: affinity ----------------------------------------------------------------------

async def test_session_header_keeps_a_session_on_one_channel_while_healthy(db):
    path, conn = db
    make_channels(conn, *((f"ch{i}", 0, 1) for i in range(4)))
    async with running(ChannelRouter(context("channels", path, seed=3))) as router:
        session = {"x-claude-code-session-id": "5f0c3e9e-session"}
        first = (await router.route(request(headers=session), ANYONE))[0]
        for _ in range(30):
            assert (await router.route(request(headers=session), ANYONE))[0].id == first.id
        # Without the header the choice varies.
        assert len({(await router.route(request(), ANYONE))[0].id for _ in range(60)}) > 1
        # The pinned channel fails: the session moves on and stays on the new one.
        router.feedback(outcome(first, 500, "api_error"))
        moved = (await router.route(request(headers=session), ANYONE))[0]
        assert moved.id != first.id
        for _ in range(10):
            assert (await router.route(request(headers=session), ANYONE))[0].id == moved.id


async def test_after_a_failover_the_session_stays_on_the_channel_that_served_it(db, monkeypatch):
    import dataclasses
    from apertis_plugins import channel_router

    # Outcome.request_id links an attempt to its request; stand in for it
    # while the contract does not define it yet.
    if "request_id" in Outcome.__dataclass_fields__:
        outcome_type = Outcome
    else:
        @dataclasses.dataclass(frozen=True, slots=True)
        class outcome_type(Outcome):
            request_id: str = ""
        monkeypatch.setattr(channel_router, "OUTCOME_HAS_REQUEST_ID", True)
    path, conn = db
    make_channels(conn, *((f"ch{i}", 0, 1) for i in range(5)))
    async with running(ChannelRouter(context("channels", path, seed=5, max_attempts=5))) as router:
        session = {"x-claude-code-session-id": "failover-session"}
        first, second, *_ = await router.route(request(headers=session, request_id="req_1"), ANYONE)
        router.feedback(outcome_type(channel=first, ok=False, status=500, error_type="api_error",
                                     request_id="req_1"))
        router.feedback(outcome_type(channel=second, ok=True, status=200, request_id="req_1"))
        for i in range(10):
            chosen = await router.route(request(headers=session, request_id=f"req_{i + 2}"), ANYONE)
            assert chosen[0].id == second.id


async def test_metadata_user_id_is_a_session_too_and_sessions_are_per_key(db):
    path, conn = db
    make_channels(conn, *((f"ch{i}", 0, 1) for i in range(6)))
    async with running(ChannelRouter(context("channels", path, seed=11))) as router:
        def by_user(user):
            return request(body={"model": SONNET, "max_tokens": 1, "messages": [],
                                 "metadata": {"user_id": user}})
        alice = Caller(key_id=1, key_name="alice")
        pinned = {(await router.route(by_user(f"user-{i}"), alice))[0].id for i in range(12)}
        assert len(pinned) > 1                      # different users spread out
        first = (await router.route(by_user("user-0"), alice))[0].id
        for _ in range(20):
            assert (await router.route(by_user("user-0"), alice))[0].id == first
        # The same user id under another key is another session.
        others = {(await router.route(by_user("user-0"), Caller(key_id=k, key_name=f"k{k}")))[0].id
                  for k in range(2, 20)}
        assert len(others) > 1


async def test_affinity_map_is_bounded(db):
    path, conn = db
    make_channels(conn, ("a", 0, 1), ("b", 0, 1))
    options = dict(affinity_max_sessions=10)
    async with running(ChannelRouter(context("channels", path, **options))) as router:
        for i in range(100):
            await router.route(request(headers={"x-claude-code-session-id": f"s{i}"}), ANYONE)
        assert len(router.affinity) == 10


async def test_new_channels_from_the_cli_are_routed_to(db):
    path, conn = db
    async with running(ChannelRouter(context("channels", path, poll_interval=0.02))) as router:
        assert await router.route(request(), ANYONE) == []
        make_channels(conn, ("new", 0, 1))
        await eventually(lambda: router.channels)
        assert [c.name for c in await router.route(request(), ANYONE)] == ["new"]


# -- meter ----------------------------------------------------------------------------------

def full_record(i: int = 0) -> UsageRecord:
    return UsageRecord(
        request_id=f"req_{i:024x}", started_at=1_760_000_000.5 + i, endpoint="/v1/messages",
        client="127.0.0.1:40000", key_id=3, key_name="alice", channel_id=7, channel_name="main",
        requested_model="claude-sonnet-4.5", upstream_model=SONNET, stream=True, status=200,
        error_type=None, interrupted=True, input_tokens=25 + i, output_tokens=15,
        cache_read_input_tokens=100, cache_creation_input_tokens=30,
        cache_creation_5m_input_tokens=10, cache_creation_1h_input_tokens=20,
        server_tool_use={"web_search_requests": 2}, ttfb_ms=12.5, duration_ms=345.25,
        upstream_request_id="req_upstream_1", attempts=2, cost=0.00123,
        attempt_log=[{"channel": "spare", "channel_id": 6, "outcome": "overloaded", "status": 529,
                      "error_type": "overloaded_error", "upstream_request_id": "req_upstream_0"},
                     {"channel": "main", "channel_id": 7, "outcome": "ok", "status": 200,
                      "error_type": None, "upstream_request_id": "req_upstream_1"}],
        prices={"input": 3.0, "output": 15.0, "cache_write_5m": 3.75, "cache_write_1h": 6.0,
                "cache_read": 0.3},
        reached_upstream=True)


def ledger(conn) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM usage ORDER BY id").fetchall()


async def test_meter_writes_every_field(db):
    path, conn = db
    record = full_record()
    async with running(SqliteMeter(context("sqlite", path))) as meter:
        await meter.record(record)
        failed = UsageRecord(request_id="req_fail", started_at=1.0, endpoint="/v1/messages",
                             status=529, error_type="overloaded_error")
        await meter.record(failed)
    rows = ledger(conn)
    assert len(rows) == 2
    row = dict(rows[0])
    expected = record.as_dict()
    expected["ts"] = expected.pop("started_at")
    expected["stream"], expected["interrupted"] = 1, 1
    for name in ("server_tool_use", "prices", "attempt_log"):
        assert json.loads(row.pop(name)) == expected.pop(name)
    expected.pop("reached_upstream")       # no column for it in the ledger
    expected.pop("iterations")             # nor for this one: it is in the cost
    assert {k: row[k] for k in expected} == expected
    row = dict(rows[1])
    assert (row["status"], row["error_type"], row["stream"], row["server_tool_use"],
            row["prices"], row["input_tokens"]) == (529, "overloaded_error", 0, None, None, 0)


async def test_meter_batches_by_size_and_flushes_the_rest_on_close(db):
    path, conn = db
    meter = SqliteMeter(context("sqlite", path, batch_size=5, flush_interval=600))
    async with running(meter):
        for i in range(5):
            await meter.record(full_record(i))
        await eventually(lambda: len(ledger(conn)) == 5)   # the size triggered a write
        for i in range(5, 8):
            await meter.record(full_record(i))
        assert meter.pending == 3 and len(ledger(conn)) == 5   # below the size: waits
    assert [r["request_id"] for r in ledger(conn)] == [f"req_{i:024x}" for i in range(8)]


@pytest.mark.parametrize("count", [1, 63, 64, 65, 129, 500])
async def test_meter_writes_batches_of_any_size_in_order(db, count):
    """Rows go out in multi-row statements of 64 plus single rows for the rest:
    every size around those boundaries lands whole, in order, field for field."""
    path, conn = db
    meter = SqliteMeter(context("sqlite", path, batch_size=100_000, flush_interval=600))
    async with running(meter):
        records = [full_record(i) for i in range(count)]
        records[count // 2].error_type = "overloaded_error"   # a NULL column that is not NULL
        for record in records:
            await meter.record(record)
        assert await meter.flush() and meter.pending == 0
        rows = ledger(conn)
    assert len(rows) == count == meter.written
    for record, row in zip(records, rows):
        assert (row["request_id"], row["input_tokens"], row["error_type"], row["ts"]) == (
            record.request_id, record.input_tokens, record.error_type, record.started_at)
        assert json.loads(row["prices"]) == record.prices


async def test_meter_writes_each_rows_own_prices(db):
    """Rows in a batch carry different prices (or none), and a prices dict the
    caller changes in place after it was written is written anew."""
    path, conn = db
    meter = SqliteMeter(context("sqlite", path, batch_size=100_000, flush_interval=600))
    haiku = {"input": 1.0, "output": 5.0, "cache_write_5m": 1.25, "cache_write_1h": 2.0, "cache_read": 0.1}
    async with running(meter):
        records = [full_record(i) for i in range(70)]
        for i, record in enumerate(records):
            if i % 3 == 1:
                record.prices = dict(haiku)
            elif i % 7 == 5:
                record.prices = None
        for record in records:
            await meter.record(record)
        assert await meter.flush()
        expected = [None if r.prices is None else dict(r.prices) for r in records]
        shared = records[-1].prices      # the last one written
        later = full_record(70)
        later.prices = shared
        shared["output"] = 99.0         # the same dict object, new content
        await meter.record(later)
        assert await meter.flush()
        rows = ledger(conn)
    assert len(rows) == 71
    for i, (want, row) in enumerate(zip(expected + [later.prices], rows)):
        got = None if row["prices"] is None else json.loads(row["prices"])
        assert got == want, i
    assert json.loads(rows[-1]["prices"])["output"] == 99.0


async def test_meter_flushes_on_its_interval(db):
    path, conn = db
    async with running(SqliteMeter(context("sqlite", path, flush_interval=0.02))) as meter:
        await meter.record(full_record(1))
        await eventually(lambda: len(ledger(conn)) == 1)
        assert meter.pending == 0


async def test_meter_write_failures_are_retried_not_raised(db):
    path, conn = db
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON usage"
                 " BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    meter = SqliteMeter(context("sqlite", path, flush_interval=0.01))
    async with running(meter):
        for i in range(3):
            await meter.record(full_record(i))       # never raises
        await eventually(lambda: meter._failures >= 2)
        assert meter.pending == 3 and ledger(conn) == []
        conn.execute("DROP TRIGGER refuse")
        await eventually(lambda: len(ledger(conn)) == 3)
    assert sorted(r["request_id"] for r in ledger(conn)) == [f"req_{i:024x}" for i in range(3)]


async def test_a_row_sqlite_cannot_store_is_dropped_loudly_and_the_ledger_goes_on(db, caplog):
    """A row the ledger refuses (a NULL in a NOT NULL column) fails the whole multi-row INSERT. Retried with its
    batch, such a row would stop the ledger for good (every later row joining the failing batch); instead the
    batch is written row by row, the bad row logged whole with its request id and left out, the rest kept."""
    path, conn = db
    meter = SqliteMeter(context("sqlite", path, batch_size=100_000, flush_interval=600))
    async with running(meter):
        records = [full_record(i) for i in range(5)]
        records[2].endpoint = None                      # the ledger's endpoint column is NOT NULL
        for record in records:
            await meter.record(record)
        with caplog.at_level(logging.ERROR, logger="apertis_proxy.store.ledger"):
            assert await meter.flush()
        assert [r["request_id"] for r in ledger(conn)] == [records[i].request_id for i in (0, 1, 3, 4)]
        assert meter.rejected == 1 and meter.pending == 0 and meter.written == 4
        assert records[2].request_id in caplog.text and "IntegrityError" in caplog.text
        await meter.record(full_record(5))              # and the ledger goes on
        assert await meter.flush() and len(ledger(conn)) == 5


async def test_a_refusing_database_keeps_every_row_even_when_the_error_is_not_operational(db):
    """A trigger refusing every INSERT raises IntegrityError, not OperationalError: it is the database, not the
    rows, when no row at all can be written, so nothing is dropped and the batch is retried."""
    path, conn = db
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON usage BEGIN SELECT RAISE(ABORT, 'no'); END")
    meter = SqliteMeter(context("sqlite", path, batch_size=100_000, flush_interval=600))
    async with running(meter):
        for i in range(3):
            await meter.record(full_record(i))
        assert not await meter.flush()
        assert meter.pending == 3 and meter.rejected == 0
        conn.execute("DROP TRIGGER refuse")
        assert await meter.flush() and len(ledger(conn)) == 3


def test_channel_serves_every_name_of_a_listed_model():
    """Channel.serves is what any router plugin calls (the example plugin does): a channel listing one name of a
    model serves its other names too, as the first-party router always did with its own helper."""
    from apertis_proxy.plugin_api import Channel
    aliases = {"claude-haiku-4.5": HAIKU, "claude-haiku-4-5": HAIKU, "fast": HAIKU}
    listed_short = Channel(id=1, name="eu", base_url="http://x", api_key="k",
                           models=frozenset({"claude-haiku-4.5"}), aliases=aliases)
    listed_dated = Channel(id=2, name="us", base_url="http://x", api_key="k", models=frozenset({HAIKU}),
                           aliases=aliases)
    for channel in (listed_short, listed_dated):
        for name in ("claude-haiku-4.5", "claude-haiku-4-5", HAIKU, "fast"):
            assert channel.serves(name), (channel.name, name)
        assert not channel.serves(SONNET) and not channel.serves("claude-sonnet-4.5")
    assert Channel(id=3, name="any", base_url="http://x", api_key="k").serves("anything")


def test_a_meter_failing_in_sent_or_checkpoint_is_contained_and_the_other_meters_get_theirs(caplog):
    from apertis_proxy.plugin_host import PluginHost

    class Failing:
        async def record(self, record): ...

        def sent(self, record):
            raise RuntimeError("sent broke")

        def checkpoint(self, record):
            raise RuntimeError("checkpoint broke")

    class Keeping:
        def __init__(self):
            self.calls = []

        async def record(self, record): ...

        def sent(self, record):
            self.calls.append(("sent", record.request_id))

        def checkpoint(self, record):
            self.calls.append(("checkpoint", record.request_id))

    keeping = Keeping()
    host = PluginHost([], [], [("failing", Failing()), ("keeping", keeping), ("plain", object())])
    assert host.checkpoints
    rec = full_record(1)
    with caplog.at_level(logging.ERROR):
        host.sent(rec)
        host.checkpoint(rec)
    assert keeping.calls == [("sent", rec.request_id), ("checkpoint", rec.request_id)]
    assert "failing failed in sent()" in caplog.text and "failing failed in checkpoint()" in caplog.text
    assert not PluginHost([], [], [("plain", object())]).checkpoints


async def test_a_request_admitted_alone_whose_usage_is_unknown_counts_its_bound(db, monkeypatch):
    """While the store is away (another connection holds SQLite's write lock) a key admits alone, within its
    share; a request of it cut before any usage was reported (cost unknown) counts its reserved bound in the
    key's spend once the store is back, not $0."""
    from apertis_proxy.store import admissions
    monkeypatch.setattr(admissions, "LOCK_WAIT", 0.3)       # the store counts as away after 0.3 s, not 10
    path, conn = db
    key_id, plain = create_key(conn, "outage", quota_cost=10.0)
    async with running(KeysAuth(context("keys", path, limits_on_store_down="share", poll_interval=0.05))) as auth:
        await (await admit(auth, plain)).end()          # the store seen once
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            cut = await admit(auth, plain)              # admitted alone: the store did not answer
            assert cut.caller.data.get("alone")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        record = usage()
        record.cost, record.interrupted, record.status, record.reached_upstream = None, True, 499, True
        assert record.usage_unknown
        await cut.end(record)

        async def settled() -> bool:
            row = conn.execute("SELECT cost FROM key_spend WHERE key_id = ?", (key_id,)).fetchone()
            return row is not None and row["cost"] > 0
        await eventually(settled)
        # At least the bound's output: max_tokens 16 at Sonnet 4.5's $15 per million output tokens.
        spent = conn.execute("SELECT cost FROM key_spend WHERE key_id = ?", (key_id,)).fetchone()["cost"]
        assert spent >= 16 * 15e-6
