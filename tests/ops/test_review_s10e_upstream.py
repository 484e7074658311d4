"""Adversarial review s10e: what a client can make the gateway send upstream, and across keys.

Each test names the attack; a failing one is a defect (see the assertion's message)."""
from __future__ import annotations

from tests.support.gateway_requests import HAIKU, message
from tests.support.gateway_requests import post_tagged as post
from tests.support.rawhttp import RawConnection, request_bytes

OPUS = "claude-opus-5-5"


def received(mock, tag: str):
    found = [r for r in mock.requests if r.headers.get("x-test-seq") == tag]
    return found[-1] if found else None


async def test_a_duplicated_model_key_is_not_forwarded_for_the_upstream_to_read_otherwise(gateway_env,
                                                                                       mock_upstream):
    """JSON with a repeated key: the gateway's parser (orjson) keeps the last `model`, and the body goes
    upstream as the client wrote it whenever nothing was changed.  A parser that keeps the first (many do;
    RFC 8259 leaves it open) runs the other model: a key allowed only Haiku gets Opus, metered and priced
    as Haiku.  The gateway must refuse duplicate keys or forward the body it validated."""
    key = gateway_env.add_key("alice", models=[HAIKU])
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    raw = (b'{"model":"%s","max_tokens":16,"messages":[{"role":"user","content":"hi"}],"model":"%s"}'
           % (OPUS.encode(), HAIKU.encode()))
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, "x-test-seq": "dup-model",
                                                              "content-type": "application/json"}, raw))
        response = await conn.read_response()
    sent = received(mock_upstream, "dup-model")
    both = sent is not None and OPUS.encode() in sent.raw_body
    assert not both, (
        f"a key allowed only {HAIKU} sent a body naming {OPUS} first and {HAIKU} last: the gateway checked "
        f"the last (status {response.status}) and forwarded the raw bytes with both, so an upstream that "
        "reads the first `model` serves the model the key is not allowed (forward.py sends req.body "
        "unchanged when the contract changed nothing)")


async def test_the_clients_cookie_is_not_forwarded_upstream(gateway_env, mock_upstream):
    """A Cookie is the client's credential for whatever sits in front of the gateway (an SSO proxy's
    session cookie, say); upstream gets the channel's credential only.  headers._DROP_UPSTREAM drops
    Authorization, x-api-key and Proxy-Authorization, not Cookie."""
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    response, tag = await post(gateway_env, key, message(), {"cookie": "_oauth2_proxy=SESSION-SECRET-1234"})
    assert response.status == 200, response.body
    sent = received(mock_upstream, tag)
    cookie = sent.headers.get("cookie")
    assert cookie is None, f"the client's Cookie header went upstream with the channel's key: {cookie!r}"


async def test_a_duplicated_thread_key_cannot_smuggle_another_keys_thread_past_the_owner_check(gateway_env,
                                                                                               mock_upstream):
    """The same parser differential against account-bound state: Bob writes `thread` twice, first continuing
    Alice's thread, then `{"type": "create"}`.  The gateway reads the last (a new thread: nothing to check) and
    forwards the raw bytes, so an upstream that keeps the first continues Alice's conversation for Bob."""
    alice, bob = gateway_env.add_key("alice"), gateway_env.add_key("bob")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    beta = {"anthropic-beta": "message-threads-2026-08-12"}
    response, _ = await post(gateway_env, alice, message("alice's conversation", thread={"type": "create"}), beta)
    assert response.status == 200, response.body
    alices = response.json()["id"]
    raw = (b'{"model":"%s","max_tokens":16,"messages":[{"role":"user","content":"go on"}],'
           b'"thread":{"type":"continue","previous_message_id":"%s"},"thread":{"type":"create"}}'
           % (HAIKU.encode(), alices.encode()))
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": bob, "x-test-seq": "dup-thread",
                                                              "content-type": "application/json", **beta}, raw))
        response = await conn.read_response()
    sent = received(mock_upstream, "dup-thread")
    smuggled = sent is not None and alices.encode() in sent.raw_body
    assert not smuggled, (
        f"bob's body naming alice's thread {alices} (then a second `thread` creating one) passed the owner check "
        f"(status {response.status}) and went upstream with alice's id in it")
