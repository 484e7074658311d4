"""Account-bound state through the real gateway with two channels on two upstream accounts (two MockUpstreams):
threads and containers stay on the account that created them, and only the key that created them can use them."""
from __future__ import annotations

import json

import anthropic
from anthropic import beta_async_tool

from tests.support.gateway_requests import message
from tests.support.gateway_requests import post_tagged as post

THREADS_BETA = {"anthropic-beta": "message-threads-2026-08-12"}


async def two_accounts(gateway_env, make_mock_upstream, **start):
    mocks = {"a": await make_mock_upstream(), "b": await make_mock_upstream()}
    keys = {"alice": gateway_env.add_key("alice"), "bob": gateway_env.add_key("bob")}
    for name, mock in mocks.items():
        gateway_env.add_channel(name, mock)        # one tier, equal weights: a free choice for each request
    await gateway_env.start(plugin_options={"channels": {"seed": 7}}, **start)
    return keys, mocks


def served_by(mocks, message_id: str) -> str:
    return next(name for name, mock in mocks.items() if any(s["message_id"] == message_id for s in mock.served))


async def test_a_thread_continues_on_its_channel_and_is_refused_to_another_key(gateway_env, make_mock_upstream):
    keys, mocks = await two_accounts(gateway_env, make_mock_upstream)
    response, _ = await post(gateway_env, keys["alice"], message(thread={"type": "create"}), THREADS_BETA)
    assert response.status == 200
    previous = response.json()["id"]
    home = served_by(mocks, previous)
    for turn in range(8):
        response, _ = await post(gateway_env, keys["alice"], message(
            f"turn {turn}", thread={"type": "continue", "previous_message_id": previous}), THREADS_BETA)
        assert response.status == 200, response.body
        previous = response.json()["id"]
        assert served_by(mocks, previous) == home
    before = sum(len(m.requests) for m in mocks.values())
    response, _ = await post(gateway_env, keys["bob"], message(
        thread={"type": "continue", "previous_message_id": previous}), THREADS_BETA)
    assert response.status == 404
    error = response.json()["error"]
    assert error["type"] == "not_found_error" and error["details"] == {"error_code": "thread_not_found"}
    assert sum(len(m.requests) for m in mocks.values()) == before      # never sent with the channel's key
    rows = await gateway_env.usage_rows(10)
    assert rows[-1]["status"] == 404 and rows[-1]["key_name"] == "bob"


async def test_a_tool_runner_loop_through_two_channels_stays_on_one(gateway_env, make_mock_upstream):
    keys, mocks = await two_accounts(gateway_env, make_mock_upstream)

    @beta_async_tool
    async def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=keys["alice"],
                                        max_retries=0) as client:
        for run in range(6):
            runner = client.beta.messages.tool_runner(
                model="claude-haiku-4-5-20251001", max_tokens=256, tools=[get_weather],
                messages=[{"role": "user", "content": f"Use the tool: weather in Paris ({run})"}])
            replies = [reply async for reply in runner]
            assert [r.stop_reason for r in replies] == ["tool_use", "end_turn"]
            assert {served_by(mocks, r.id) for r in replies} == {served_by(mocks, replies[0].id)}
    threaded = [r for m in mocks.values() for r in m.requests if isinstance((r.body or {}).get("thread"), dict)]
    assert len(threaded) == 12 and all(r.status == 200 for r in threaded)   # no thread_not_found, no replay
    assert {served_by(mocks, s["message_id"]) for m in mocks.values() for s in m.served} == {"a", "b"}


async def test_a_container_stays_on_its_account_and_with_its_owner(gateway_env, make_mock_upstream):
    keys, mocks = await two_accounts(gateway_env, make_mock_upstream)
    tools = [{"type": "code_execution_20250825", "name": "code_execution"}]
    response, _ = await post(gateway_env, keys["alice"], message(tools=tools, stream=True))
    events = dict(response.sse_events())
    container = json.loads(events["message_delta"])["delta"]["container"]["id"]
    home = served_by(mocks, json.loads(events["message_start"])["message"]["id"])
    for _ in range(6):
        response, _ = await post(gateway_env, keys["alice"], message(tools=tools, container=container))
        assert response.status == 200, response.body
        assert served_by(mocks, response.json()["id"]) == home
    before = sum(len(m.requests) for m in mocks.values())
    response, _ = await post(gateway_env, keys["bob"], message(tools=tools, container={"id": container}))
    assert response.status == 404 and response.json()["error"]["type"] == "not_found_error"
    assert container in response.json()["error"]["message"]
    assert sum(len(m.requests) for m in mocks.values()) == before


async def test_a_threaded_turn_fails_over_only_to_a_channel_of_the_same_account(gateway_env, make_mock_upstream):
    account_a, account_b = await make_mock_upstream(), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("a-main", account_a, priority=2)
    gateway_env.add_channel("b", account_b, priority=1)
    gateway_env.add_channel("a-spare", account_a, priority=0)       # the same account: its threads are here too
    await gateway_env.start()
    response, _ = await post(gateway_env, key, message(thread={"type": "create"}), THREADS_BETA)
    previous = response.json()["id"]
    account_a.fail_next(529)
    response, _ = await post(gateway_env, key, message(
        thread={"type": "continue", "previous_message_id": previous}), THREADS_BETA)
    assert response.status == 200, response.body
    assert [r.status for r in account_a.requests] == [200, 529, 200] and account_b.requests == []
    rows = await gateway_env.usage_rows(2)
    assert (rows[-1]["channel_name"], rows[-1]["attempts"]) == ("a-spare", 2)


async def signing_accounts(gateway_env, make_mock_upstream):
    """Two channels on two accounts, each mock signing thinking blocks with its own key (a block is valid on its
    own account only); the gateway started.  Returns the mocks by channel name and a key."""
    mocks = {name: await make_mock_upstream(api_key=f"sk-ant-account-{name}-0123456789") for name in ("a", "b")}
    key = gateway_env.add_key("alice")
    for name, mock in mocks.items():
        gateway_env.add_channel(name, mock, api_key=mock.api_key)
    await gateway_env.start(plugin_options={"channels": {"seed": 11}})
    return mocks, key


async def test_a_conversation_with_thinking_blocks_stays_on_the_account_that_signed_them(gateway_env,
                                                                                        make_mock_upstream):
    """Each mock signs thinking blocks with its own key, so a block is valid on its own account only."""
    mocks, key = await signing_accounts(gateway_env, make_mock_upstream)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    history = [{"role": "user", "content": "Think about it"}]
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        for turn in range(8):
            params = dict(model="claude-haiku-4-5-20251001", max_tokens=2048, thinking=thinking, messages=history)
            if turn % 2:
                async with client.messages.stream(**params) as stream:
                    reply = await stream.get_final_message()
            else:
                reply = await client.messages.create(**params)
            assert reply.content[0].type == "thinking"
            history += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]},
                        {"role": "user", "content": f"And then? ({turn})"}]
    homes = {name for name, mock in mocks.items() for s in mock.served}
    assert len(homes) == 1                                   # every turn on the account that signed the first
    assert all(r.status == 200 for m in mocks.values() for r in m.requests)


async def test_a_model_that_thinks_unasked_stays_on_the_account_that_signed_its_thinking(gateway_env,
                                                                                         make_mock_upstream):
    """Opus 5.5 thinks by default: streamed turns that never mention `thinking` still pin the account."""
    mocks, key = await signing_accounts(gateway_env, make_mock_upstream)
    history = [{"role": "user", "content": "Think about it"}]
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=key, max_retries=0) as client:
        for turn in range(8):
            async with client.messages.stream(model="claude-opus-5-5", max_tokens=2048, messages=history) as stream:
                reply = await stream.get_final_message()
            assert reply.content[0].type == "thinking"
            history += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]},
                        {"role": "user", "content": f"And then? ({turn})"}]
    homes = {name for name, mock in mocks.items() for s in mock.served}
    assert len(homes) == 1                                   # every turn on the account that signed the first
    assert all(r.status == 200 for m in mocks.values() for r in m.requests)


async def test_a_fallback_credit_token_is_redeemed_on_its_account_by_its_owner(gateway_env, make_mock_upstream):
    keys, mocks = await two_accounts(gateway_env, make_mock_upstream)
    for turn in range(4):
        response, _ = await post(gateway_env, keys["alice"], message("please refuse", stream=bool(turn % 2)))
        assert response.status == 200
        if turn % 2:
            delta = json.loads(dict(response.sse_events())["message_delta"])["delta"]
            token, reply_id = delta["stop_details"]["fallback_credit_token"], None
            home = next(n for n, m in mocks.items() if token in m.account.credit_tokens)
        else:
            token, reply_id = response.json()["stop_details"]["fallback_credit_token"], response.json()["id"]
            home = served_by(mocks, reply_id)
        retried, _ = await post(gateway_env, keys["alice"], message("try again", fallback_credit_token=token))
        assert retried.status == 200, retried.body
        assert served_by(mocks, retried.json()["id"]) == home
    before = sum(len(m.requests) for m in mocks.values())
    stolen, _ = await post(gateway_env, keys["bob"], message("mine now", fallback_credit_token={"token": token}))
    assert stolen.status == 404 and stolen.json()["error"]["type"] == "not_found_error"
    assert sum(len(m.requests) for m in mocks.values()) == before


async def test_ownership_noted_just_before_shutdown_is_written(gateway_env, mock_upstream):
    """An id created as the gateway stops (a file, a batch) keeps its owner: shutdown waits for the write."""
    gateway_env.add_channel("main", mock_upstream)
    gw = await gateway_env.start()
    gw.owned.remember("file", "file_made_at_shutdown", "key:1", "account-a", None)
    await gateway_env.stop()
    rows = gateway_env.query("SELECT owner, account FROM owned_state WHERE id = 'file_made_at_shutdown'")
    assert [tuple(r) for r in rows] == [("key:1", "account-a")]
