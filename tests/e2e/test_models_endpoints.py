"""GET /v1/models, GET /v1/models/{id} and POST /v1/messages/count_tokens through the real gateway.

The model list is the gateway's own answer (the catalogue, cut to what the caller's key may use on the channels
that exist); count_tokens is forwarded to a channel with the same auth and aliases as messages, and not billed.
"""
from __future__ import annotations

import asyncio
from typing import Optional

import anthropic

from apertis_proxy import cli
from tests.support.mock_replies import count_input_tokens
from tests.support.mock_upstream import MOCK_API_KEY
from tests.support.rawhttp import RawConnection, RawResponse

HAIKU = "claude-haiku-4-5-20251001"
SONNET = "claude-sonnet-4-6"


async def get(env, key: Optional[str], target: str) -> RawResponse:
    headers = {"x-api-key": key} if key else {}
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("GET", target, headers)


async def count(env, key: str, body: dict) -> RawResponse:
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("POST", "/v1/messages/count_tokens", {"x-api-key": key}, json_body=body)


def catalogue(env, only: Optional[set] = None, lifecycles=("active", "deprecated")) -> list[dict]:
    """The catalogue as /v1/models should list it: newest first, retired models hidden by default."""
    rows = env.query("SELECT id, display_name, created_at, lifecycle, deprecated_at, retires_at, line,"
                     " max_input_tokens, max_tokens, capabilities FROM models ORDER BY created_at DESC, id DESC")
    return [{"type": "model", "id": r["id"], "display_name": r["display_name"], "created_at": r["created_at"],
             "lifecycle": r["lifecycle"], "deprecated_at": r["deprecated_at"], "retires_at": r["retires_at"],
             "line": r["line"], "max_input_tokens": r["max_input_tokens"], "max_tokens": r["max_tokens"],
             "capabilities": r["capabilities"]}
            for r in rows if (only is None or r["id"] in only) and r["lifecycle"] in lifecycles]


async def add_models(env, capsys, *names: str) -> None:
    """More catalogue entries (through the CLI), so that paging has something to page through; returns once
    the running gateway lists them."""
    for name in names:
        assert cli.main(["prices", "set", name, "--input", "1", "--output", "2", "--display-name", name.title(),
                         "--db", env.db_path]) == 0
    capsys.readouterr()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not set(names) <= {m["id"] for m in (await get(env, env.key, "/v1/models?limit=1000")).json()["data"]}:
        assert loop.time() < deadline, "the new models never showed up"
        await asyncio.sleep(0.05)


def settled_spend(env) -> tuple:
    rows = env.query("SELECT tokens, cost FROM key_spend")
    return tuple(rows[0]) if rows else (0, 0.0)


def assert_error(response: RawResponse, status: int, error_type: str) -> None:
    assert response.status == status, response.body
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert body["request_id"] == response.header("request-id")


# -- GET /v1/models ------------------------------------------------------------------------------------------------

async def test_models_lists_the_catalogue_in_anthropics_shape(gateway):
    response = await get(gateway, gateway.key, "/v1/models")
    assert response.status == 200 and response.header("content-type").startswith("application/json")
    page = response.json()
    expected = catalogue(gateway)
    assert page == {"data": expected, "has_more": False, "first_id": expected[0]["id"],
                    "last_id": expected[-1]["id"]}
    assert {HAIKU, SONNET} <= {m["id"] for m in page["data"]}
    one = await get(gateway, gateway.key, f"/v1/models/{SONNET}")
    assert one.status == 200 and one.json() == next(m for m in expected if m["id"] == SONNET)
    assert_error(await get(gateway, gateway.key, "/v1/models/claude-nonexistent-1"), 404, "not_found_error")
    assert gateway.mock.requests == []           # answered by the gateway itself


async def test_models_need_a_valid_key(gateway):
    assert_error(await get(gateway, None, "/v1/models"), 401, "authentication_error")
    assert_error(await get(gateway, "sk-apx-not-a-key", f"/v1/models/{HAIKU}"), 401, "authentication_error")


async def test_models_list_only_what_the_key_may_use_on_existing_channels(gateway_env, mock_upstream):
    haiku_only = gateway_env.add_key("intern", models=["claude-haiku-4.5"])
    anyone = gateway_env.add_key("admin")
    gateway_env.add_channel("main", mock_upstream, models=[SONNET, "claude-haiku-4.5"],
                            aliases={"team-fast": HAIKU})
    await gateway_env.start()

    page = (await get(gateway_env, haiku_only, "/v1/models")).json()
    ids = [m["id"] for m in page["data"]]
    assert HAIKU in ids and SONNET not in ids
    assert (page["first_id"], page["last_id"]) == (ids[0], ids[-1])
    assert_error(await get(gateway_env, haiku_only, f"/v1/models/{SONNET}"), 404, "not_found_error")
    assert (await get(gateway_env, haiku_only, f"/v1/models/{HAIKU}")).status == 200

    page = (await get(gateway_env, anyone, "/v1/models")).json()
    listed = {m["id"]: m for m in page["data"]}
    assert set(listed) == {HAIKU, SONNET, "team-fast"}       # no opus: no channel serves it
    haiku = next(m for m in catalogue(gateway_env) if m["id"] == HAIKU)
    assert listed["team-fast"] == {**haiku, "id": "team-fast"}   # a channel alias shows as its target


async def test_models_pagination(gateway, capsys):
    await add_models(gateway, capsys, "claude-test-alpha-1", "claude-test-beta-1")
    everything = [m["id"] for m in catalogue(gateway)]
    assert len(everything) >= 5
    full = (await get(gateway, gateway.key, "/v1/models?limit=1000")).json()
    assert [m["id"] for m in full["data"]] == everything and not full["has_more"]

    # Forwards with after_id = last_id while has_more, as the SDKs do.
    for limit in (1, 2, 3):
        collected, target = [], f"/v1/models?limit={limit}"
        while True:
            page = (await get(gateway, gateway.key, target)).json()
            ids = [m["id"] for m in page["data"]]
            assert 1 <= len(ids) <= limit and (page["first_id"], page["last_id"]) == (ids[0], ids[-1])
            collected += ids
            if not page["has_more"]:
                break
            target = f"/v1/models?limit={limit}&after_id={page['last_id']}"
        assert collected == everything

    # Backwards with before_id: the page just before it.
    page = (await get(gateway, gateway.key, f"/v1/models?limit=2&before_id={everything[3]}")).json()
    assert [m["id"] for m in page["data"]] == everything[1:3] and page["has_more"]
    page = (await get(gateway, gateway.key, f"/v1/models?limit=2&before_id={everything[1]}")).json()
    assert [m["id"] for m in page["data"]] == everything[:1] and not page["has_more"]
    page = (await get(gateway, gateway.key, f"/v1/models?after_id={everything[-1]}")).json()
    assert page == {"data": [], "has_more": False, "first_id": None, "last_id": None}

    for bad in ("limit=0", "limit=1001", "limit=abc", "after_id=claude-nonexistent-1"):
        assert_error(await get(gateway, gateway.key, f"/v1/models?{bad}"), 400, "invalid_request_error")


async def test_sdk_auto_pagination_with_limit_1_collects_every_model(gateway, sdk, capsys):
    await add_models(gateway, capsys, "claude-test-gamma-1")
    result = await sdk.run("list_models", gateway.base_url, gateway.key, limit=1)
    assert "error" not in result, result
    assert result["ids"] == [m["id"] for m in catalogue(gateway)]


# -- POST /v1/messages/count_tokens --------------------------------------------------------------------------------

async def test_count_tokens_is_forwarded_with_the_channel_key_and_alias(gateway, sdk):
    result = await sdk.run("count_tokens", gateway.base_url, gateway.key, text="How many tokens is this?",
                           model="claude-haiku-4.5")
    assert "error" not in result, result
    upstream = gateway.mock.requests[-1]
    assert upstream.path == "/v1/messages/count_tokens"
    assert upstream.body["model"] == HAIKU                   # the alias resolved, as for messages
    assert upstream.headers["x-api-key"] == MOCK_API_KEY and "authorization" not in upstream.headers
    assert result == {"input_tokens": count_input_tokens(upstream.body)}


async def test_count_tokens_uses_channel_aliases_and_is_not_billed(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice", quota_tokens=10_000)
    gateway_env.add_channel("main", mock_upstream, aliases={"team-fast": HAIKU})
    await gateway_env.start()
    body = {"model": "team-fast", "messages": [{"role": "user", "content": "count me " * 50}],
            "system": "A system prompt to count as well."}
    for _ in range(3):
        response = await count(gateway_env, key, body)
        assert response.status == 200
        assert response.json() == {"input_tokens": count_input_tokens(mock_upstream.requests[-1].body)}
    assert [r.body["model"] for r in mock_upstream.requests] == [HAIKU] * 3
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        billed = await conn.request("POST", "/v1/messages", {"x-api-key": key},
                                    json_body={**body, "max_tokens": 32})
    assert billed.status == 200
    rows = await gateway_env.usage_rows(4)
    for row in rows[:3]:
        assert row["endpoint"] == "/v1/messages/count_tokens" and row["status"] == 200
        assert row["cost"] == 0 and row["input_tokens"] == row["output_tokens"] == 0
    message_row = rows[3]
    assert message_row["endpoint"] == "/v1/messages" and message_row["cost"] > 0
    # The key's settled spend is the message alone.
    expected = (message_row["input_tokens"] + message_row["output_tokens"], message_row["cost"])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while settled_spend(gateway_env) != expected:
        assert loop.time() < deadline, settled_spend(gateway_env)
        await asyncio.sleep(0.02)


async def test_count_tokens_has_the_same_auth_as_messages(gateway_env, mock_upstream):
    key = gateway_env.add_key("intern", models=["claude-haiku-4.5"])
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    body = {"model": SONNET, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(await count(gateway_env, "sk-apx-not-a-key", body), 401, "authentication_error")
    assert_error(await count(gateway_env, key, body), 403, "permission_error")
    assert mock_upstream.requests == []
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        counted = await client.messages.count_tokens(model=HAIKU, messages=body["messages"])
    assert counted.input_tokens == count_input_tokens(mock_upstream.requests[-1].body) > 0
