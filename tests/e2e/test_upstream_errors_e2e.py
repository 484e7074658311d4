"""Upstream error answers through the real gateway: the body reaches the client intact (its
`error.details.error_code` and `request_id`, which SDK 2.17 types its errors by), without the channel's key, and
its cause decides failover, cooldown and disabling."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.support.gateway_requests import channels_list, message, poll
from tests.support.gateway_requests import post_tagged as post

CHANNEL_KEY = "sk-ant-api03-" + "Zq7xK2mP9vL4nR8tW1yB3cD5f"   # 42 characters, as a channel key may be


def router_of(env):
    return env.gateway.plugins.routers[0][1]


async def two_channels(gateway_env, make_mock_upstream, **first_kw):
    first, second = await make_mock_upstream(**first_kw), await make_mock_upstream()
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("first", first, priority=1, **({"api_key": first_kw["api_key"]}
                                                           if "api_key" in first_kw else {}))
    gateway_env.add_channel("second", second, priority=0)
    await gateway_env.start()
    return key, first, second


async def test_the_sdk_gets_the_upstream_error_with_its_error_code(sdk, gateway):
    scenario = "status=404; error-type=not_found_error; error-code=thread_not_found; message=no such thread"
    result = await sdk.run("plain", gateway.base_url, gateway.key, headers={"x-mock-scenario": scenario})
    error = result["error"]
    assert error["status"] == 404 and error["type"] == "not_found_error"
    assert error["body"]["error"]["details"] == {"error_code": "thread_not_found"}
    assert error["body"]["error"]["message"] == "no such thread"
    assert error["body"]["request_id"] == gateway.mock.requests[-1].request_id    # upstream's, kept
    if sdk.generation == "2.x":
        assert error["class"] == "ThreadNotFoundError" and error["error_code"] == "thread_not_found"
    [row] = await gateway.usage_rows(1)
    assert (row["status"], row["error_type"]) == (404, "not_found_error")


@pytest.mark.parametrize("status, error_type, code", [
    (400, "invalid_request_error", "thread_unsupported_request"),
    (404, "not_found_error", "file_expired"),
    (400, "invalid_request_error", "thread_fingerprint_mismatch"),
    (409, "conflict_error", "skill_name_taken"),
])
async def test_a_client_caused_error_code_is_answered_not_failed_over(gateway_env, make_mock_upstream,
                                                                      status, error_type, code):
    key, first, second = await two_channels(gateway_env, make_mock_upstream)
    first.fail_next(status, error_type=error_type, error_code=code)
    response, _ = await post(gateway_env, key, message())
    assert response.status == status
    assert response.json()["error"]["details"] == {"error_code": code}
    assert second.requests == []
    assert not router_of(gateway_env).cool_until      # not the channel's failure


async def test_a_403_about_the_request_is_answered_and_disables_nothing(gateway_env, make_mock_upstream, capsys):
    """A model or beta the upstream account may not use: the client learns it; no channel is disabled (it used
    to disable this channel and, through failover, every other one)."""
    key, first, second = await two_channels(gateway_env, make_mock_upstream)
    first.fail_next(403, error_type="permission_error")
    response, _ = await post(gateway_env, key, message())
    assert response.status == 403 and response.json()["error"]["type"] == "permission_error"
    assert second.requests == []
    await asyncio.sleep(0.2)                          # a disable would be written in the background
    assert [r[0] for r in gateway_env.query("SELECT enabled FROM channels ORDER BY id")] == [1, 1]
    assert " yes " in channels_list(gateway_env.db_path, capsys)["first"]
    response, _ = await post(gateway_env, key, message())
    assert response.status == 200 and len(first.served) == 1


@pytest.mark.parametrize("code", ["contract_spend_limit_reached", "enforced_spend_limit_reached",
                                  "ramp_limit_exceeded"])
async def test_a_spend_or_ramp_limit_fails_over_and_rests_the_channel_for_long(gateway_env, make_mock_upstream,
                                                                              code):
    key, first, second = await two_channels(gateway_env, make_mock_upstream)
    first.fail_next(429, error_code=code, retry_after=1)
    response, _ = await post(gateway_env, key, message())
    assert response.status == 200 and len(second.served) == 1
    [first_id] = gateway_env.query("SELECT id FROM channels WHERE name = 'first'")[0]
    assert router_of(gateway_env).cool_until[first_id] - time.monotonic() > 3000   # not the 1 s retry-after
    assert gateway_env.query("SELECT enabled FROM channels WHERE name = 'first'")[0][0] == 1


async def test_an_account_out_of_credit_fails_over_and_rests_the_channel_for_long(gateway_env, make_mock_upstream):
    """The API refuses an account without credit with a 400 invalid_request_error: the account's fault, not the
    request's, so the next channel serves it and the empty one rests."""
    key, first, second = await two_channels(gateway_env, make_mock_upstream)
    first.fail_next(400, error_type="invalid_request_error",
                    message="Your credit balance is too low to access the Anthropic API. "
                            "Please go to Plans & Billing to upgrade or purchase credits.")
    response, _ = await post(gateway_env, key, message())
    assert response.status == 200 and len(second.served) == 1
    [first_id] = gateway_env.query("SELECT id FROM channels WHERE name = 'first'")[0]
    assert router_of(gateway_env).cool_until[first_id] - time.monotonic() > 3000
    response, _ = await post(gateway_env, key, message())
    assert response.status == 200 and len(second.served) == 2 and len(first.requests) == 1


@pytest.mark.parametrize("status, error_type", [(504, "timeout_error"), (529, "overloaded_error"),
                                                (500, "api_error")])
async def test_retryable_errors_still_fail_over(gateway_env, make_mock_upstream, status, error_type):
    key, first, second = await two_channels(gateway_env, make_mock_upstream)
    first.fail_next(status, error_type=error_type)
    response, _ = await post(gateway_env, key, message())
    assert response.status == 200 and [r.status for r in first.requests] == [status]
    assert len(second.served) == 1


@pytest.mark.parametrize("status", [500, 401])
async def test_a_key_quoted_late_in_a_long_message_is_redacted_whole(gateway_env, make_mock_upstream, caplog,
                                                                    capsys, status):
    """The key at character 465 of the message: the key is redacted before the message is cut (cutting first
    would leave 35 of its 42 characters for the client, the log and the disable reason)."""
    quoting = await make_mock_upstream(api_key=CHANNEL_KEY)
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("quoting", quoting, api_key=CHANNEL_KEY)
    await gateway_env.start()
    quoting.fail_next(status, message="x" * 465 + CHANNEL_KEY + " was sent")
    with caplog.at_level(logging.DEBUG):
        response, _ = await post(gateway_env, key, message())
        if status == 401:
            await poll(lambda: gateway_env.query("SELECT enabled FROM channels")[0][0] == 0)
    leaks = [CHANNEL_KEY[:n] for n in range(12, len(CHANNEL_KEY) + 1)]
    reason = channels_list(gateway_env.db_path, capsys)["quoting"]
    for text in (response.body.decode(), caplog.text, reason):
        assert not any(leak in text for leak in leaks)
    if status == 500:
        assert response.status == 500
        assert response.json()["error"]["message"] == "x" * 465 + "[redacted] was sent"
    else:
        assert response.status == 502 and "upstream 401" in reason


async def test_a_529_compaction_unavailable_is_transient_and_fails_over(gateway_env, make_mock_upstream):
    """SDK 2.17 `_error_classes.py` maps (529, "compaction_unavailable") to CompactionUnavailableError, an
    OverloadedError documented as "could not be completed for a transient server reason. Retry the request.":
    the next channel serves it (a 4xx with a `compaction_` code is the request's and would not fail over)."""
    key, first, second = await two_channels(gateway_env, make_mock_upstream)
    first.fail_next(529, error_type="overloaded_error", error_code="compaction_unavailable")
    response, _ = await post(gateway_env, key, message())
    assert [r.status for r in first.requests] == [529]
    assert response.status == 200 and len(second.served) == 1, (
        f"a transient 529 compaction_unavailable from the first channel was not failed over: the client got "
        f"{response.status} {response.body[:160]!r} and the second channel received {len(second.requests)} requests")


async def test_a_529_compaction_unavailable_rests_the_channel_like_any_overload(gateway_env, make_mock_upstream):
    """The channel that answered it rests like one answering a plain 529 overloaded_error."""
    key, first, second = await two_channels(gateway_env, make_mock_upstream)
    router = gateway_env.gateway.plugins.routers[0][1]
    first.fail_next(529, error_type="overloaded_error", error_code="compaction_unavailable")
    await post(gateway_env, key, message())
    [first_id] = gateway_env.query("SELECT id FROM channels WHERE name = 'first'")[0]
    assert router.cool_until.get(first_id, 0) > time.monotonic(), (
        "a channel answering 529 compaction_unavailable (transient overload) was given no cooldown")
