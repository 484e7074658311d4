"""Per-key limits exact across worker processes and hosts (issue 18), with real processes: `serve --workers 2` on one
SQLite file, and two gateway processes ("hosts") sharing PostgreSQL.

- A quota (USD, or tokens) under 200 concurrent requests of a known cost: the ledger's spend is at most the quota
  plus the largest single request's cost, every 200 is one successful ledger row, every other answer a 402
  billing_error or a 429 with retry-after, and many requests were admitted at once (not one at a time).
- `--rpm 60` under 150 requests spread over 20 s across two hosts: exactly 60 are admitted.
- `--concurrency 5` under 50 slow streams across two hosts: the upstream never has more than 5 at once, and once
  they end 5 new ones are admitted at once (no slot leaked).
- A host killed with kill -9 while holding the 5 slots: the other host refuses a 6th at first, and admits 5 new
  streams once the dead host's lease ran out, without operator action.

The mock upstream runs in the test's event loop; costs are known in advance (tests/support/limits_load.py).
"""
from __future__ import annotations

import asyncio
import random

import pytest

from tests.support.limits_load import (MOCK_API_KEY, MODEL, REQUEST_COST, REQUEST_TOKENS, Answer, CountingUpstream,
                                       Hosts, OpenStream, cli_ok, costed_body, costed_headers, create_key,
                                       key_spend, ledger_with, refusal_problem, reserved_bound, row_tokens, send,
                                       setup_store)
from tests.support.processes import wait_for

LEASE = 3                   # seconds: [limits] lease_seconds of every gateway here under load
KILL_LEASE = 1.5            # and of the kill test's hosts (lightly loaded): the time a dead host holds its slots
PACED = "event-delay=0.03"  # a stream of 15 events, about 0.45 s in flight


def quick(n: int, *, stream: bool = False) -> dict:
    return {"model": MODEL, "max_tokens": 16, "stream": stream,
            "messages": [{"role": "user", "content": f"request {n}"}]}


def assert_refusals(answers: list[Answer]) -> None:
    problems = [p for p in map(refusal_problem, (a for a in answers if a.status != 200)) if p]
    assert not problems, f"{len(problems)} bad refusals, e.g. {problems[:3]}"


async def topology(kind: str, request, tmp_path, mock: CountingUpstream, *limits: str) -> tuple[str, str, Hosts]:
    """(store URL, key, started gateways): `workers` is `serve --workers 2` on a SQLite file, `hosts` two gateway
    processes on a PostgreSQL database."""
    db = request.getfixturevalue("pg_url") if kind == "hosts" else str(tmp_path / "gateway.db")
    key = await asyncio.to_thread(setup_store, db, mock, "alice", *limits)
    if kind == "hosts":
        return db, key, await Hosts.postgres(db, tmp_path, lease_seconds=LEASE)
    return db, key, await Hosts.workers(db, tmp_path, lease_seconds=LEASE)


# -- quotas --------------------------------------------------------------------------------------------------------

QUOTAS = {"usd": ("1", 1.0), "tokens": ("200000tokens", 200_000)}
BURST = 200


@pytest.mark.parametrize("quota_kind", ["usd", "tokens"])
@pytest.mark.parametrize("kind", ["workers", "hosts"])
async def test_a_quota_holds_under_a_concurrent_burst(kind, quota_kind, request, tmp_path):
    flag, quota = QUOTAS[quota_kind]
    # The premise: what a request costs is within the bound the gateway reserves for it.
    assert reserved_bound(costed_body(BURST)) >= (REQUEST_COST, REQUEST_TOKENS)
    async with CountingUpstream() as mock:
        db, key, hosts = await topology(kind, request, tmp_path, mock, "--quota", flag)
        async with hosts:
            # Every admitted request stays in flight 0.3 s at the upstream: the burst overlaps.
            slow = costed_headers("first-byte-delay=0.3")
            answers = await asyncio.gather(*(send(hosts.port(n), key, costed_body(n, stream=n % 2 == 1), slow)
                                             for n in range(BURST)))
            ok = [a for a in answers if a.status == 200]
            assert all(a.complete for a in ok), [a for a in ok if not a.complete][:3]
            assert_refusals(answers)
            assert 2 <= len(ok) < BURST
            assert len(mock.requests) == len(mock.served) == len(ok)     # nothing refused reached the upstream
            # Many were admitted together: the reserved bounds (~$0.0203 / ~4150 tokens each) let ~49 in at once.
            assert mock.max_in_flight >= 2, "the requests were admitted one at a time"

            # Then one at a time on every process until the quota says 402: near its end a request is admitted
            # alone even if its bound does not fit, so one more may get through.  (A 429 here can only be a
            # reservation not yet settled: try again.)
            for port in hosts.ports:
                for n in range(20):
                    answer = await send(port, key, costed_body(BURST + n), costed_headers())
                    assert answer.status == 200 or refusal_problem(answer) is None, answer
                    if answer.status == 200:
                        assert answer.complete
                        ok.append(answer)
                    elif answer.status == 402:
                        break
                    else:
                        await asyncio.sleep(0.2)
                else:
                    raise AssertionError(f"port {port} never said 402 after the burst spent the quota")
            assert len(mock.served) == len(ok)

            rows = await ledger_with(db, "alice", len(ok))
            successes = [r for r in rows if r["status"] == 200]
            assert len(successes) == len(ok)
            if quota_kind == "usd":
                assert all(r["cost"] == pytest.approx(REQUEST_COST, rel=1e-9) for r in successes)
                spent = [float(r["cost"] or 0) for r in rows]
            else:
                assert all(row_tokens(r) == REQUEST_TOKENS for r in successes)
                spent = [row_tokens(r) for r in rows]
            # The guarantee: at most the quota plus the largest single request.
            assert sum(spent) <= quota + max(spent) + 1e-9, (sum(spent), len(ok), mock.max_in_flight)
            assert sum(spent) >= quota          # the 402s say it is spent
            # The key's settled spend comes to exactly what its ledger rows cost.
            index = 0 if quota_kind == "usd" else 1
            await wait_for(lambda: _spend_is(db, index, sum(spent)), 10.0, "key_spend to equal the ledger")


async def test_a_quota_holds_for_a_channel_alias(tmp_path):
    """A name only a channel knows (`fast` -> the Haiku id) is bounded at the model it goes to upstream, not at
    $0 for a name without a price: a burst stays within the quota plus one request."""
    db = str(tmp_path / "gateway.db")
    quota = 0.2                                         # about ten requests' worth
    async with CountingUpstream() as mock:
        def store() -> str:
            cli_ok("channels", "add", "main", "--base-url", mock.base_url, "--api-key", MOCK_API_KEY,
                   "--alias", f"fast={MODEL}", "--db", db)
            return create_key(db, "alice", "--quota", str(quota))
        key = await asyncio.to_thread(store)
        async with await Hosts.workers(db, tmp_path, lease_seconds=LEASE) as hosts:
            slow = costed_headers("first-byte-delay=0.3")
            answers = await asyncio.gather(*(send(hosts.port(n), key, {**costed_body(n), "model": "fast"}, slow)
                                             for n in range(60)))
            ok = [a for a in answers if a.status == 200]
            assert_refusals(answers)
            assert 2 <= len(ok) < 60 and mock.max_in_flight >= 2
            rows = await ledger_with(db, "alice", len(ok))
            spent = sum(float(r["cost"] or 0) for r in rows)
            assert all(r["cost"] == pytest.approx(REQUEST_COST, rel=1e-9) for r in rows if r["status"] == 200)
            assert spent <= quota + REQUEST_COST + 1e-9, (spent, len(ok))


async def _spend_is(db: str, index: int, expected: float) -> bool:
    return (await asyncio.to_thread(key_spend, db, "alice"))[index] == pytest.approx(expected, rel=1e-9)


# -- requests per minute -------------------------------------------------------------------------------------------

async def test_rpm_is_exact_across_two_hosts(pg_url, tmp_path):
    requests, spread = 150, 20.0
    async with CountingUpstream() as mock:
        key = await asyncio.to_thread(setup_store, pg_url, mock, "alice", "--rpm", "60")
        async with await Hosts.postgres(pg_url, tmp_path, lease_seconds=LEASE) as hosts:
            loop = asyncio.get_running_loop()
            start = loop.time()
            sent = []
            for n in range(requests):
                await asyncio.sleep(max(0.0, start + n * spread / requests - loop.time()))
                sent.append(asyncio.create_task(send(hosts.port(n), key, quick(n, stream=n % 3 == 0))))
            answers = await asyncio.gather(*sent)
            assert loop.time() - start < 60, "the requests did not all fall within one minute"
            ok = [a for a in answers if a.status == 200]
            assert len(ok) == 60, [a.status for a in answers]
            assert all(a.complete for a in ok)
            refused = [a for a in answers if a.status != 200]
            assert all(a.status == 429 for a in refused), [a for a in refused if a.status != 429][:3]
            assert_refusals(refused)
            assert all(1 <= int(a.headers["retry-after"]) <= 60 for a in refused)
            assert len(mock.requests) == 60
            rows = await ledger_with(pg_url, "alice", 60)
            assert sum(1 for r in rows if r["status"] == 200) == 60


# -- concurrency ---------------------------------------------------------------------------------------------------

async def test_concurrency_is_exact_across_two_hosts_and_no_slot_leaks(pg_url, tmp_path):
    streams, limit = 50, 5
    async with CountingUpstream() as mock:
        key = await asyncio.to_thread(setup_store, pg_url, mock, "alice", "--concurrency", str(limit))
        async with await Hosts.postgres(pg_url, tmp_path, lease_seconds=LEASE) as hosts:
            refused: list[Answer] = []

            async def stream_until_admitted(n: int) -> Answer:
                """One slow stream, sent again (to the other host, by turns) while it is refused."""
                jitter = random.Random(n)
                for attempt in range(400):
                    answer = await send(hosts.port(n + attempt), key, quick(n, stream=True),
                                        {"x-mock-scenario": PACED})
                    if answer.status == 200:
                        return answer
                    refused.append(answer)
                    await asyncio.sleep(0.2 + 0.2 * jitter.random())
                raise AssertionError(f"stream {n} was never admitted")

            answers = await asyncio.gather(*(stream_until_admitted(n) for n in range(streams)))
            assert all(a.complete for a in answers)
            assert len(mock.served) == streams and all(s["completed"] for s in mock.served)
            assert mock.max_in_flight == limit, mock.max_in_flight     # reached, never exceeded
            assert refused and all(a.status == 429 for a in refused), [a for a in refused if a.status != 429][:3]
            assert_refusals(refused)

            # They all ended: the 5 slots are free, 5 new streams are admitted at once, a 6th is not.
            mock.reset_max()
            again = await asyncio.gather(*(OpenStream.open(hosts.port(n), key, quick(n, stream=True),
                                                           {"x-mock-scenario": "event-delay=0.15"})
                                           for n in range(limit)))
            try:
                assert [s.status for s in again] == [200] * limit
                sixth = [await send(port, key, quick(99)) for port in hosts.ports]
                assert [a.status for a in sixth] == [429] * len(hosts.ports), sixth
                assert_refusals(sixth)
                assert all(a.complete for a in [await s.finish() for s in again])
            finally:
                for s in again:
                    s.abort()
            assert mock.max_in_flight == limit


async def test_a_host_killed_holding_slots_frees_them_when_its_lease_runs_out(pg_url, tmp_path):
    limit = 5
    async with CountingUpstream() as mock:
        key = await asyncio.to_thread(setup_store, pg_url, mock, "alice", "--concurrency", str(limit))
        async with await Hosts.postgres(pg_url, tmp_path, lease_seconds=KILL_LEASE) as hosts:
            a, b = hosts.processes
            # Host a holds the 5 slots with streams that would last about 30 s.
            held = await asyncio.gather(*(OpenStream.open(a.port, key, quick(n, stream=True),
                                                          {"x-mock-scenario": "event-delay=2"})
                                          for n in range(limit)))
            try:
                assert [s.status for s in held] == [200] * limit
                assert mock.in_flight == limit
                before = await send(b.port, key, quick(10))
                assert before.status == 429 and refusal_problem(before) is None, before

                await asyncio.to_thread(a.kill)                  # SIGKILL: no chance to give anything back
                after = await send(b.port, key, quick(11))
                assert after.status == 429 and refusal_problem(after) is None, after
            finally:
                for s in held:
                    s.abort()

            # No operator action: the dead host's lease runs out and its slots come back.
            statuses: list[int] = []

            async def admitted() -> bool:
                answer = await send(b.port, key, quick(12))
                statuses.append(answer.status)
                assert answer.status in (200, 429), answer
                return answer.status == 200
            await wait_for(admitted, 3 * KILL_LEASE + 10, "host b to admit a request once host a's lease ran out",
                           interval=0.25)

            mock.reset_max()
            fresh = await asyncio.gather(*(OpenStream.open(b.port, key, quick(n, stream=True),
                                                           {"x-mock-scenario": "event-delay=0.15"})
                                           for n in range(limit)))
            try:
                assert [s.status for s in fresh] == [200] * limit
                sixth = await send(b.port, key, quick(99))
                assert sixth.status == 429 and refusal_problem(sixth) is None, sixth
                assert all(a.complete for a in [await s.finish() for s in fresh])
            finally:
                for s in fresh:
                    s.abort()
            assert mock.max_in_flight == limit
