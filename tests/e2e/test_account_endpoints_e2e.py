"""The API's other endpoints through the real gateway: what acts for the whole upstream account is refused with a 404
in Anthropic's shape and never forwarded with a channel's key; batches and files are scoped to the key that made
them."""
from __future__ import annotations

import gzip
import json
import time
from decimal import Decimal

import anthropic
import pytest

from apertis_proxy import cli
from apertis_proxy.store import channels
from tests.support.rawhttp import RawConnection
from tests.support.metrics import scrape_samples, total, value
from tests.support.gateway_requests import poll


async def request(env, key: str, method: str, target: str, **kw):
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request(method, target, {"x-api-key": key, **kw.pop("headers", {})}, **kw)


@pytest.mark.parametrize("method, target", [
    ("GET", "/v1/organizations/api_keys"), ("POST", "/v1/organizations/invites"),
    ("GET", "/v1/organizations/usage_report/messages?starting_at=2026-12-01T00:00:00Z"),
    ("GET", "/v1/user_profiles"), ("GET", "/v1/compliance/activities"), ("POST", "/v1/agents"),
    ("POST", "/v1/sessions"), ("GET", "/v1/environments"), ("GET", "/v1/skills"), ("GET", "/v1/vaults"),
])
async def test_account_wide_paths_are_refused_and_never_forwarded(gateway, method, target):
    response = await request(gateway, gateway.key, method, target, json_body={} if method == "POST" else None)
    assert response.status == 404
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "not available through this gateway" in body["error"]["message"]
    assert body["request_id"] == response.header("request-id")
    assert gateway.mock.requests == []


async def test_the_current_sdk_gets_a_not_found_error_for_an_account_wide_api(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        with pytest.raises(anthropic.NotFoundError) as err:
            await client.beta.skills.list()
    assert err.value.body["error"]["type"] == "not_found_error"
    assert gateway.mock.requests == []


# -- batches -------------------------------------------------------------------------------------------------------

HAIKU = "claude-haiku-4-5-20251001"
HAIKU_PRICES = {"input": 1.0, "output": 5.0, "cache_read": 0.10, "cache_write_5m": 1.25}


def batch_request(custom_id: str, text: str, **params) -> dict:
    return {"custom_id": custom_id, "params": {"model": HAIKU, "max_tokens": 64,
                                               "messages": [{"role": "user", "content": text}], **params}}


def half_price(usage: dict) -> float:
    """The batch price of one result: half the list rates (USD per million tokens)."""
    return (usage["input_tokens"] * HAIKU_PRICES["input"] + usage["output_tokens"] * HAIKU_PRICES["output"]
            + usage["cache_read_input_tokens"] * HAIKU_PRICES["cache_read"]
            + usage["cache_creation_input_tokens"] * HAIKU_PRICES["cache_write_5m"]) / 1_000_000 * 0.5


async def test_a_batch_is_its_owners_and_its_results_are_billed_once_at_half_price(gateway_env, mock_upstream):
    keys = {"alice": gateway_env.add_key("alice"), "bob": gateway_env.add_key("bob")}
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    clients = {name: anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0)
               for name, key in keys.items()}
    broken_image = {"type": "image", "source": {"type": "bogus"}}   # passes the gateway; upstream errors it
    async with clients["alice"], clients["bob"]:
        batch = await clients["alice"].messages.batches.create(requests=[
            batch_request("one", "first question"), batch_request("two", "second question"),
            {"custom_id": "bad", "params": {"model": HAIKU, "max_tokens": 64,
                                            "messages": [{"role": "user", "content": [broken_image]}]}}])
        bobs = await clients["bob"].messages.batches.create(requests=[batch_request("b", "bob's own")])
        assert batch.results_url == f"{gateway_env.base_url}/v1/messages/batches/{batch.id}/results"
        assert (batch.request_counts.succeeded, batch.request_counts.errored) == (2, 1)

        assert [b.id async for b in clients["alice"].messages.batches.list()] == [batch.id]
        assert [b.id async for b in clients["bob"].messages.batches.list()] == [bobs.id]
        for call in (clients["bob"].messages.batches.retrieve, clients["bob"].messages.batches.cancel):
            with pytest.raises(anthropic.NotFoundError):
                await call(batch.id)
        requests_before = len(mock_upstream.requests)
        with pytest.raises(anthropic.NotFoundError):
            await clients["bob"].messages.batches.delete(batch.id)
        assert len(mock_upstream.requests) == requests_before           # a foreign batch never goes upstream

        results = {r.custom_id: r.result async for r in await clients["alice"].messages.batches.results(batch.id)}
        again = [r async for r in await clients["alice"].messages.batches.results(batch.id)]
    assert {k: r.type for k, r in results.items()} == {"one": "succeeded", "two": "succeeded", "bad": "errored"}
    assert len(again) == 3
    usages = [r.message.usage.model_dump() for r in results.values() if r.type == "succeeded"]
    # two creates, two lists, three refusals, and twice a retrieve plus the results
    rows = [r for r in await gateway_env.usage_rows(11) if r["endpoint"] == "/v1/messages/batches"]
    assert len(rows) == 11
    billed = [r for r in rows if r["cost"] > 0]
    assert len(billed) == 1 and billed[0]["key_name"] == "alice"       # the first results fetch, once
    assert billed[0]["cost"] == pytest.approx(sum(half_price(u) for u in usages), abs=1e-12)
    assert billed[0]["input_tokens"] == sum(u["input_tokens"] for u in usages)
    assert billed[0]["output_tokens"] == sum(u["output_tokens"] for u in usages)
    prices = json.loads(billed[0]["prices"])        # the whole batch: total, tier, per model counts and cost
    assert prices["service_tier"] == "batch" and float(prices["cost"]) == pytest.approx(billed[0]["cost"], abs=1e-10)
    assert list(prices["models"]) == [HAIKU]
    assert prices["models"][HAIKU]["input_tokens"] == billed[0]["input_tokens"]
    assert prices["models"][HAIKU]["output_tokens"] == billed[0]["output_tokens"]
    assert prices["models"][HAIKU]["cost"] == prices["cost"]
    assert all(r["cost"] == 0 for r in rows if r is not billed[0])


# -- files ---------------------------------------------------------------------------------------------------------

def with_file(file_id: str) -> dict:
    return {"model": HAIKU, "max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": file_id}},
        {"type": "text", "text": "Summarise the file"}]}]}


async def test_files_are_their_uploaders_and_a_message_naming_one_goes_to_its_account(gateway_env,
                                                                                      make_mock_upstream):
    mocks = {"a": await make_mock_upstream(), "b": await make_mock_upstream()}
    keys = {"alice": gateway_env.add_key("alice"), "bob": gateway_env.add_key("bob")}
    for name, mock in mocks.items():
        gateway_env.add_channel(name, mock)
    await gateway_env.start(plugin_options={"channels": {"seed": 3}})
    clients = {name: anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0)
               for name, key in keys.items()}
    async with clients["alice"], clients["bob"]:
        uploaded = await clients["alice"].beta.files.upload(file=("notes.txt", b"the quarterly notes", "text/plain"))
        home = next(name for name, mock in mocks.items() if uploaded.id in mock.account.files)
        assert [f.id async for f in clients["alice"].beta.files.list()] == [uploaded.id]
        assert [f.id async for f in clients["bob"].beta.files.list()] == []
        assert (await clients["alice"].beta.files.retrieve_metadata(uploaded.id)).filename == "notes.txt"
        assert await (await clients["alice"].beta.files.download(uploaded.id)).read() == b"the quarterly notes"
        for _ in range(6):                       # the file exists on one account only: every turn goes there
            reply = await clients["alice"].beta.messages.create(**with_file(uploaded.id))
            assert any(s["message_id"] == reply.id for s in mocks[home].served)
        requests_before = sum(len(m.requests) for m in mocks.values())
        with pytest.raises(anthropic.NotFoundError) as err:
            await clients["bob"].beta.messages.create(**with_file(uploaded.id))
        error = err.value.body["error"]
        assert error["type"] == "not_found_error" and uploaded.id in error["message"]
        for call in (clients["bob"].beta.files.retrieve_metadata, clients["bob"].beta.files.download,
                     clients["bob"].beta.files.delete):
            with pytest.raises(anthropic.NotFoundError):
                await call(uploaded.id)
        assert sum(len(m.requests) for m in mocks.values()) == requests_before   # a foreign id never goes upstream
        assert (await clients["alice"].beta.files.delete(uploaded.id)).id == uploaded.id
        assert [f.id async for f in clients["alice"].beta.files.list()] == []


async def test_an_upload_over_the_body_limit_is_a_413(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(max_body_bytes=64 * 1024)
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as err:
            await client.beta.files.upload(file=("big.bin", b"x" * (128 * 1024), "application/octet-stream"))
    assert err.value.status_code == 413 and err.value.body["error"]["type"] == "request_too_large"
    assert mock_upstream.requests == []


async def test_a_file_id_key_written_with_a_json_escape_is_still_checked(gateway_env, mock_upstream):
    """`"file\\u005fid"` is the key `file_id` once parsed: another key's file named so is still refused."""
    keys = {"alice": gateway_env.add_key("alice"), "bob": gateway_env.add_key("bob")}
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=keys["alice"], max_retries=0) as alice:
        uploaded = await alice.beta.files.upload(file=("notes.txt", b"alice's notes", "text/plain"))
    escaped = json.dumps(with_file(uploaded.id)).replace('"file_id"', '"file\\u005fid"').encode()
    assert json.loads(escaped) == with_file(uploaded.id)
    requests_before = len(mock_upstream.requests)
    response = await request(gateway_env, keys["bob"], "POST", "/v1/messages", body=escaped,
                             headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
    assert response.status == 404 and response.json()["error"]["type"] == "not_found_error"
    assert uploaded.id in response.json()["error"]["message"]
    assert len(mock_upstream.requests) == requests_before


def gzipped_upload(content: bytes) -> tuple[bytes, dict]:
    """A multipart upload of `content`, gzip-compressed, and its headers."""
    boundary = "apertis-test-boundary"
    form = (f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="notes.txt"\r\n'
            f"content-type: text/plain\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return gzip.compress(form), {"content-type": f"multipart/form-data; boundary={boundary}",
                                 "content-encoding": "gzip", "anthropic-version": "2023-06-01"}


async def test_compressed_uploads_and_batch_creates_are_decoded_within_the_body_limit(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(max_body_bytes=64 * 1024)
    body, headers = gzipped_upload(b"the quarterly notes")
    response = await request(gateway_env, key, "POST", "/v1/files", body=body, headers=headers)
    assert response.status == 200
    assert mock_upstream.account.files[response.json()["id"]]["content"] == b"the quarterly notes"

    batch = gzip.compress(json.dumps({"requests": [batch_request("one", "a question")]}).encode())
    response = await request(gateway_env, key, "POST", "/v1/messages/batches", body=batch, headers={
        "content-type": "application/json", "content-encoding": "gzip", "anthropic-version": "2023-06-01"})
    assert response.status == 200 and response.json()["request_counts"]["succeeded"] == 1

    requests_before = len(mock_upstream.requests)
    body, headers = gzipped_upload(b"x" * (128 * 1024))            # small compressed, over the limit decoded
    assert len(body) < 64 * 1024
    response = await request(gateway_env, key, "POST", "/v1/files", body=body, headers=headers)
    assert response.status == 413
    assert response.json()["error"]["details"] == {"error_code": "request_body_too_large_after_decoding"}
    assert len(mock_upstream.requests) == requests_before


async def test_an_item_whose_account_has_no_channel_is_not_found_and_left_out_of_lists(gateway_env,
                                                                                       make_mock_upstream, caplog):
    first, second = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("first", first, priority=1)
    gateway_env.add_channel("second", second, priority=0)
    gateway = await gateway_env.start()
    router = gateway.plugins.routers[0][1]
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        stranded = await client.beta.files.upload(file=("a.txt", b"on the first account", "text/plain"))
        assert stranded.id in first.account.files
        channels.set_channel_enabled(gateway_env.conn, "first", False)
        await poll(lambda: [c.name for c in router.channels] == ["second"])
        served = await client.beta.files.upload(file=("b.txt", b"on the second account", "text/plain"))
        assert served.id in second.account.files
        requests_before = len(first.requests)
        for call in (client.beta.files.retrieve_metadata, client.beta.files.download, client.beta.files.delete):
            with pytest.raises(anthropic.NotFoundError) as err:
                await call(stranded.id)
            assert err.value.body["error"]["type"] == "not_found_error"
        assert [f.id async for f in client.beta.files.list()] == [served.id]
    assert len(first.requests) == requests_before
    assert sum("no enabled channel" in r.getMessage() for r in caplog.records) == 1


async def test_files_calls_report_their_outcome_to_the_router_and_the_metrics(gateway_env, make_mock_upstream):
    first, second = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("first", first, priority=1)
    gateway_env.add_channel("second", second, priority=0)
    gateway = await gateway_env.start()
    first.refuse_connections(2)                   # the first channel cannot be reached: the upload fails over
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        uploaded = await client.beta.files.upload(file=("a.txt", b"notes", "text/plain"))
        assert uploaded.id in second.account.files
        await client.beta.files.retrieve_metadata(uploaded.id)
    [first_id] = gateway_env.query("SELECT id FROM channels WHERE name = 'first'")[0]
    assert first_id in gateway.plugins.routers[0][1].cool_until          # the refused channel rests
    await gateway_env.usage_rows(2)
    samples = await scrape_samples(gateway_env.base_url)
    assert value(samples, "apertis_upstream_attempts_total", channel="first", outcome="refused") == 1
    assert value(samples, "apertis_upstream_attempts_total", channel="second", outcome="ok") == 2
    assert total(samples, "apertis_upstream_attempts_total", outcome="abandoned") == 0


def batch_of(*params: dict) -> dict:
    return {"requests": [{"custom_id": f"r{i}", "params": {"model": HAIKU, "max_tokens": 64, "messages": [
        {"role": "user", "content": "a question"}], **p}} for i, p in enumerate(params)]}


@pytest.mark.parametrize("params, status, error_type, named", [
    ({"temperature": 5}, 400, "invalid_request_error", "requests[1].params.temperature"),
    ({"billing_policy": {"type": "billing_policy", "bill_to": "org"}}, 400, "invalid_request_error",
     "requests[1].params.billing_policy.bill_to"),
    ({"model": "claude-sonnet-4-5-20250929"}, 404, "not_found_error", "requests[1].params.model"),
    ({"model": "claude-opus-9"}, 400, "invalid_request_error", "requests[1].params.model"),
    ({"model": "claude-sonnet-5-5"}, 403, "permission_error", "requests[1].params.model"),
])
async def test_each_batch_request_is_held_to_the_messages_rules(gateway_env, mock_upstream, params, status,
                                                                error_type, named):
    key = gateway_env.add_key("alice", models=[HAIKU, "claude-sonnet-4-5-20250929", "claude-opus-9"])
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    response = await request(gateway_env, key, "POST", "/v1/messages/batches", json_body=batch_of({}, params),
                             headers={"anthropic-version": "2023-06-01"})
    assert response.status == status, response.body
    error = response.json()["error"]
    assert error["type"] == error_type and error["message"].startswith(named)
    assert mock_upstream.requests == []
    [row] = await gateway_env.usage_rows(1)
    assert (row["status"], row["cost"]) == (status, 0)


async def test_a_batch_naming_another_keys_file_is_refused(gateway_env, mock_upstream):
    keys = {"alice": gateway_env.add_key("alice"), "bob": gateway_env.add_key("bob")}
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=keys["alice"], max_retries=0) as alice:
        uploaded = await alice.beta.files.upload(file=("notes.txt", b"alice's notes", "text/plain"))
    requests_before = len(mock_upstream.requests)
    response = await request(gateway_env, keys["bob"], "POST", "/v1/messages/batches",
                             json_body={"requests": [{"custom_id": "x", "params": with_file(uploaded.id)}]},
                             headers={"anthropic-version": "2023-06-01"})
    assert response.status == 404 and response.json()["error"]["type"] == "not_found_error"
    assert response.json()["error"]["message"].startswith(f"requests[0].params.file_id: {uploaded.id}")
    assert len(mock_upstream.requests) == requests_before


async def test_a_retired_model_in_a_batch_goes_to_its_successor(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    response = await request(gateway_env, key, "POST", "/v1/messages/batches",
                             json_body=batch_of({"model": "claude-sonnet-4.5"}),
                             headers={"anthropic-version": "2023-06-01"})
    assert response.status == 200
    assert "-> claude-sonnet-5-5" in response.header("apertis-model-redirected")
    assert mock_upstream.requests[-1].body["requests"][0]["params"]["model"] == "claude-sonnet-5-5"


@pytest.mark.parametrize("quota", [{"quota_cost": 25.0}, {"quota_tokens": 50}])
async def test_a_key_with_a_quota_may_not_create_batches(gateway_env, mock_upstream, quota):
    key = gateway_env.add_key("capped", **quota)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        with pytest.raises(anthropic.PermissionDeniedError) as err:
            await client.messages.batches.create(requests=[batch_request("one", "a question")])
    error = err.value.body["error"]
    assert error["type"] == "permission_error" and "quota" in error["message"]
    assert mock_upstream.requests == []


async def test_batch_results_are_priced_as_of_the_batch_creation(gateway_env, mock_upstream):
    """A price change between a batch's creation and its results fetch does not reprice it."""
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        batch = await client.messages.batches.create(requests=[batch_request("one", "first question"),
                                                               {"custom_id": "two", "params": {
                                                                   "model": "claude-sonnet-5-5", "max_tokens": 64,
                                                                   "messages": [{"role": "user", "content": "hi"}]}}])
        yesterday = time.time() - 86_400
        mock_upstream.batches.batches[batch.id]["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                              time.gmtime(yesterday))
        today = time.strftime("%Y-%m-%d", time.gmtime())
        assert cli.main(["prices", "set", HAIKU, "--input", "100", "--output", "500", "--from", today,
                         "--db", gateway_env.db_path]) == 0
        results = [r async for r in await client.messages.batches.results(batch.id)]
    usages = {r.custom_id: r.result.message.usage.model_dump() for r in results}
    [billed] = [r for r in await gateway_env.usage_rows(3) if r["cost"]]    # create, retrieve, results
    prices = json.loads(billed["prices"])
    haiku = prices["models"][HAIKU]
    assert float(haiku["cost"]) == pytest.approx(half_price(usages["one"]), abs=1e-12)     # yesterday's price
    assert set(prices["models"]) == {HAIKU, "claude-sonnet-5-5"}
    assert Decimal(prices["cost"]) == Decimal(haiku["cost"]) + Decimal(prices["models"]["claude-sonnet-5-5"]["cost"])
    assert float(prices["cost"]) == pytest.approx(billed["cost"], abs=1e-10)
    assert billed["input_tokens"] == sum(u["input_tokens"] for u in usages.values())


async def test_files_and_batches_count_against_rpm_and_concurrency_listings_do_not(gateway_env, mock_upstream):
    """Requests without a JSON body to files and batches are admitted like messages (and give their concurrency
    slot back); model listings are not limited."""
    key = gateway_env.add_key("alice", rpm=3, concurrency=1)
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    for _ in range(3):      # a concurrency of 1: each must have given its slot back for the next to pass
        body, headers = gzipped_upload(b"notes")
        response = await request(gateway_env, key, "POST", "/v1/files", body=body, headers=headers)
        assert response.status == 200, response.json()
    for _ in range(2):
        assert (await request(gateway_env, key, "GET", "/v1/models")).status == 200
    seen = len(mock_upstream.requests)
    refused = await request(gateway_env, key, "GET", "/v1/files")
    assert refused.status == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert "3 requests per minute" in refused.json()["error"]["message"]
    assert 1 <= int(refused.header("retry-after")) <= 60
    batch = json.dumps({"requests": [batch_request("one", "a question")]}).encode()
    refused = await request(gateway_env, key, "POST", "/v1/messages/batches", body=batch,
                            headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
    assert refused.status == 429
    assert len(mock_upstream.requests) == seen
