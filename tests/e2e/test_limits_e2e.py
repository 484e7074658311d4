"""Per-key limits through the real gateway: requests per minute, concurrency, quotas by cost and by tokens (also
under a parallel burst), expiry, disabling and the model allow-list.

Quotas are settled from the usage upstream reported, so the checks compare what was admitted with the cost and
tokens in the usage rows, which in turn equal what the mock reported (test_ledger_e2e.py checks that part).
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

import anthropic
import pytest

from apertis_proxy import cli
from tests.support.gateway_requests import HAIKU, SONNET, assert_error, message, poll, post
from tests.support.rawhttp import RawConnection, RawResponse, request_bytes

PACED = {"x-mock-scenario": "event-delay=0.03"}      # a stream that stays in flight for about half a second


async def open_stream(env, key: str, headers: Optional[dict] = None) -> tuple[RawConnection, RawResponse]:
    """Start a paced stream and read its head: the request is in flight until the body is read or dropped."""
    conn = await RawConnection.open(env.gateway.host, env.gateway.port)
    await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, **PACED, **(headers or {})},
                                  json_body=message("hold the line", stream=True)))
    return conn, await conn.read_head()


def settled_spend(env, name: str) -> tuple[float, int]:
    rows = env.query("SELECT s.cost, s.tokens FROM key_spend s JOIN keys k ON k.id = s.key_id WHERE k.name = ?",
                     name)
    return (rows[0][0], rows[0][1]) if rows else (0.0, 0)


def row_tokens(row: dict) -> int:
    return (row["input_tokens"] + row["output_tokens"] + row["cache_read_input_tokens"]
            + row["cache_creation_input_tokens"])


# -- rates ---------------------------------------------------------------------------------------------------------

async def test_requests_per_minute_limit_is_429_with_retry_after(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice", rpm=3)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        for _ in range(3):
            await client.messages.create(**message())
        with pytest.raises(anthropic.RateLimitError) as err:
            await client.messages.create(**message())
    assert err.value.body["error"]["type"] == "rate_limit_error"
    assert "3 requests per minute" in err.value.body["error"]["message"]
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    assert len(mock_upstream.requests) == 3


async def test_concurrency_limit_counts_streams_in_flight_and_releases_them(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice", concurrency=2)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    first, head1 = await open_stream(gateway_env, key)
    second, head2 = await open_stream(gateway_env, key)
    assert head1.status == head2.status == 200
    refused = await post(gateway_env, key, message())
    assert_error(refused, 429, "rate_limit_error")
    assert refused.header("retry-after") == "1"
    assert len(mock_upstream.requests) == 2

    second.abort()                                                          # one is abandoned midway ...
    body = b"".join([chunk async for chunk in first.iter_chunks(head1)])   # ... the other ends normally
    assert body.rstrip().endswith(b'data: {"type":"message_stop"}')
    first.close()
    # Both requests ended (rows are written after the slot is released); the abandoned stream holds its slot
    # while the gateway reads it to its end for its usage, as the upstream is still generating it.
    await gateway_env.usage_rows(2)

    again = [await open_stream(gateway_env, key) for _ in range(2)]         # both slots are free again
    assert [head.status for _, head in again] == [200, 200]
    for conn, _ in again:
        conn.abort()


# -- quotas --------------------------------------------------------------------------------------------------------

async def spend_until_refused(env, key: str, limit: int = 60) -> tuple[int, RawResponse]:
    """Send requests (alternately streaming) until one is refused; (requests admitted, the refusal)."""
    for n in range(limit):
        response = await post(env, key, message(f"spend {n}", stream=n % 2 == 1))
        if response.status != 200:
            return n, response
    raise AssertionError(f"the quota never ran out in {limit} requests")


async def test_cost_quota_is_402_once_spent_and_settled_from_real_usage(gateway_env, mock_upstream):
    quota = 0.0003
    key = gateway_env.add_key("alice", quota_cost=quota)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    admitted, refusal = await spend_until_refused(gateway_env, key)
    body = assert_error(refusal, 402, "billing_error")
    assert refusal.header("x-should-retry") == "false" and "quota" in body["error"]["message"]
    assert admitted == len(mock_upstream.served) >= 2

    rows = await gateway_env.usage_rows(admitted)
    costs = [r["cost"] for r in rows]
    assert all(c > 0 for c in costs)
    # Admitted while the settled spend was below the quota, and not one request more.
    assert sum(costs[:-1]) < quota <= sum(costs)
    await poll(lambda: settled_spend(gateway_env, "alice")[0] == pytest.approx(sum(costs), rel=1e-9))

    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as err:
            await client.messages.create(**message())
    assert err.value.status_code == 402 and err.value.body["error"]["type"] == "billing_error"
    assert len(mock_upstream.requests) == admitted


async def test_token_quota_counts_every_kind_of_token(gateway_env, mock_upstream):
    quota = 150
    key = gateway_env.add_key("alice", quota_tokens=quota)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    system = [{"type": "text", "text": "A long cached system prompt. " * 8, "cache_control": {"type": "ephemeral"}}]
    admitted = 0
    while True:     # cache writes first, then cache reads, both count
        response = await post(gateway_env, key, message(f"tokens {admitted}", stream=admitted % 2 == 0,
                                                        system=system))
        if response.status != 200:
            break
        admitted += 1
        assert admitted < 50
    assert_error(response, 402, "billing_error")
    rows = await gateway_env.usage_rows(admitted)
    tokens = [row_tokens(r) for r in rows]
    assert rows[0]["cache_creation_input_tokens"] > 0 and rows[-1]["cache_read_input_tokens"] > 0
    assert sum(tokens[:-1]) < quota <= sum(tokens)
    await poll(lambda: settled_spend(gateway_env, "alice")[1] == sum(tokens))


async def test_a_parallel_burst_overspends_its_quota_by_at_most_one_request(gateway_env, mock_upstream):
    """Clients retrying 429s as the SDKs do: every request ends admitted or 402, and the ledger's spend
    exceeds the quota by less than the costliest single request (reserve-then-settle)."""
    quota, burst, in_flight = 0.0002, 40, 8
    key = gateway_env.add_key("alice", quota_cost=quota)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    gate = asyncio.Semaphore(in_flight)
    slow = {"x-mock-scenario": "first-byte-delay=0.05"}      # keeps every admitted request in flight a while
    busy = []

    async def one(n: int) -> RawResponse:
        async with gate:
            while True:
                response = await post(gateway_env, key, message(f"burst {n}", stream=n % 2 == 0), slow)
                if response.status != 429:
                    return response
                assert_error(response, 429, "rate_limit_error")
                assert int(response.header("retry-after")) >= 1
                busy.append(n)
                await asyncio.sleep(0.01)

    responses = await asyncio.gather(*(one(n) for n in range(burst)))
    admitted = [r for r in responses if r.status == 200]
    for refusal in (r for r in responses if r.status != 200):
        assert_error(refusal, 402, "billing_error")
    assert 2 <= len(admitted) < burst and busy
    rows = await gateway_env.usage_rows(len(admitted))
    assert len(rows) == len(admitted) == len(mock_upstream.served)
    costs = [r["cost"] for r in rows]
    assert sum(costs) < quota + max(costs)
    await poll(lambda: settled_spend(gateway_env, "alice")[0] == pytest.approx(sum(costs), rel=1e-9))
    assert_error(await post(gateway_env, key, message()), 402, "billing_error")


# -- key validity --------------------------------------------------------------------------------------------------

async def test_expired_keys_are_401(gateway_env, mock_upstream):
    expired = gateway_env.add_key("old", expires_at=time.time() - 60)
    expiring = gateway_env.add_key("brief", expires_at=time.time() + 0.5)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    body = assert_error(await post(gateway_env, expired, message()), 401, "authentication_error")
    assert "expired" in body["error"]["message"] and expired not in body["error"]["message"]
    assert (await post(gateway_env, expiring, message())).status == 200
    await asyncio.sleep(max(0.0, gateway_env.query("SELECT expires_at FROM keys WHERE name = 'brief'")[0][0]
                            - time.time()) + 0.05)
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=expiring, max_retries=0) as client:
        with pytest.raises(anthropic.AuthenticationError) as err:
            await client.messages.create(**message())
    assert "expired" in err.value.body["error"]["message"]
    assert len(mock_upstream.requests) == 1


async def test_a_key_disabled_from_the_cli_is_401_without_restart(gateway_env, mock_upstream, capsys):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    assert (await post(gateway_env, key, message())).status == 200
    assert cli.main(["keys", "disable", "alice", "--db", gateway_env.db_path]) == 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while (response := await post(gateway_env, key, message())).status == 200:
        assert loop.time() < deadline, "the disabled key still works"
        await asyncio.sleep(0.05)
    body = assert_error(response, 401, "authentication_error")
    assert "disabled" in body["error"]["message"]
    served = len(mock_upstream.served)
    assert (await post(gateway_env, key, message())).status == 401 and len(mock_upstream.served) == served


async def test_model_allow_list_is_403_for_other_models(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice", models=["claude-haiku-4.5"])
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        for name in ("claude-haiku-4.5", HAIKU, "claude-haiku-4-5"):    # every name of the allowed model
            reply = await client.messages.create(**message(model=name))
            assert reply.model == name
        with pytest.raises(anthropic.PermissionDeniedError) as err:
            await client.messages.create(**message(model=SONNET))
    assert err.value.body["error"]["type"] == "permission_error"
    assert SONNET in err.value.body["error"]["message"]
    assert {r.body["model"] for r in mock_upstream.requests} == {HAIKU}
    streamed = await post(gateway_env, key, message(model="claude-sonnet-4.5", stream=True))
    assert_error(streamed, 403, "permission_error")


async def test_model_listings_give_their_concurrency_slot_back(gateway_env, mock_upstream):
    """GET /v1/models is admitted by the auth plugin like any request, so it calls finish() too: otherwise a key
    with --concurrency N would be locked out (429) after N listings until the server restarted."""
    key = gateway_env.add_key("alice", concurrency=1)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        for _ in range(3):
            listing = await conn.request("GET", "/v1/models", {"x-api-key": key})
            assert listing.status == 200 and listing.json()["data"]
    response = await post(gateway_env, key, message())
    assert response.status == 200, response.body
    assert [r["endpoint"] for r in await gateway_env.usage_rows(1)] == ["/v1/messages"]   # listings: no usage


async def test_an_ended_request_counts_its_exact_cost_in_its_day_until_its_late_ledger_row(gateway_env, mock_upstream):
    """The ledger refuses the request's row for a while (a trigger): the request ended, so its exact cost counts
    in today's quota at once (not its bound, and not in another day), and when the row lands it moves to the spend,
    counted once."""
    key = gateway_env.add_key("daily", quota_cost=1.0, quota_period="day")
    gateway_env.add_channel("main", mock_upstream)
    gateway_env.conn.execute("CREATE TRIGGER held_back BEFORE INSERT ON usage BEGIN SELECT RAISE(ABORT, 'held back');"
                             " END")
    gateway_env.conn.commit()
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        await client.messages.create(**message())
    today = time.strftime("%Y-%m-%d", time.gmtime())
    ended = gateway_env.query("SELECT live, cost, start FROM admissions")
    assert [(r["live"], r["start"]) for r in ended] == [(0, today)]
    sums = gateway_env.query("SELECT start, n, cost FROM admission_ended")
    assert [(r["start"], r["n"], r["cost"]) for r in sums] == [(today, 1, ended[0]["cost"])]
    assert gateway_env.query("SELECT COUNT(*) FROM usage")[0][0] == 0
    gateway_env.conn.execute("DROP TRIGGER held_back")
    gateway_env.conn.commit()
    row, = await gateway_env.usage_rows(1)
    assert row["cost"] == pytest.approx(ended[0]["cost"], rel=1e-12) and row["cost"] > 0
    await poll(lambda: not gateway_env.query("SELECT 1 FROM admissions"))
    spend = gateway_env.query("SELECT start, cost FROM key_period_spend")
    assert [(r["start"], r["cost"]) for r in spend] == [(today, pytest.approx(row["cost"], rel=1e-12))]
    assert tuple(gateway_env.query("SELECT n, cost FROM admission_ended")[0]) == (0, 0)
