"""`diagnostics.previous_message_id` (SDK 2.17, prompt-cache diagnosis): the upstream compares this request's prompt
with the named earlier request's and says why the cache prefix differs, so the id is account-bound state like a
thread's.  The gateway records the answers to requests that ask for diagnosis as owned by their key, refuses an id
the key does not own with the 404 a foreign thread id gets, and sends an owned one to the account that holds it."""
from __future__ import annotations

from tests.support.gateway_requests import message
from tests.support.gateway_requests import post_tagged as post

THREADS_BETA = {"anthropic-beta": "message-threads-2026-08-12"}
DIAGNOSIS_BETA = {"anthropic-beta": "cache-diagnosis-2026-04-07"}


def received(mock, tag: str):
    found = [r for r in mock.requests if r.headers.get("x-test-seq") == tag]
    return found[-1] if found else None


def served_by(mocks, message_id: str) -> str:
    return next(name for name, mock in mocks.items() if any(s["message_id"] == message_id for s in mock.served))


async def test_another_keys_message_id_in_diagnostics_gets_404_and_never_reaches_upstream(gateway_env,
                                                                                          mock_upstream):
    """Bob naming Alice's message id (a threaded turn, a turn that asked for diagnosis) in
    diagnostics.previous_message_id gets 404 not_found_error naming the field, and nothing goes upstream."""
    alice, bob = gateway_env.add_key("alice"), gateway_env.add_key("bob")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    response, _ = await post(gateway_env, alice, message("alice's secret prompt", thread={"type": "create"}),
                             THREADS_BETA)
    assert response.status == 200, response.body
    threaded = response.json()["id"]
    response, _ = await post(gateway_env, alice, message("alice's other prompt", diagnostics={
        "previous_message_id": None}))
    assert response.status == 200, response.body
    diagnosed = response.json()["id"]
    for alices in (threaded, diagnosed):
        response, tag = await post(gateway_env, bob, message("alice's secret prompt?",
                                                             diagnostics={"previous_message_id": alices}))
        assert received(mock_upstream, tag) is None, f"bob's request naming {alices} went upstream"
        assert response.status == 404, response.body
        error = response.json()["error"]
        assert error["type"] == "not_found_error"
        assert error["message"] == f"diagnostics.previous_message_id: {alices} not found"


async def test_a_message_id_the_gateway_never_recorded_is_refused(gateway_env, mock_upstream):
    """The answer to a request without diagnostics is not recorded (no store write), and an id nobody is recorded
    as owning cannot be verified: naming either in diagnostics is refused with 404, also to the key that got it."""
    alice = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    response, _ = await post(gateway_env, alice, message("a plain turn"))
    assert response.status == 200, response.body
    plain = response.json()["id"]
    await gateway_env.gateway.owned.settle()
    assert gateway_env.query("SELECT kind, id FROM owned_state WHERE id = ?", plain) == []
    for unknown in (plain, "msg_01NeverSeenByThisGateway"):
        response, tag = await post(gateway_env, alice, message(diagnostics={"previous_message_id": unknown}))
        assert response.status == 404, response.body
        assert response.json()["error"]["type"] == "not_found_error"
        assert received(mock_upstream, tag) is None


async def test_diagnosis_of_the_keys_own_messages_goes_to_the_account_that_holds_them(gateway_env,
                                                                                     make_mock_upstream):
    """A key asking for diagnosis (the body's `diagnostics`, also with a `null` id) has its answers recorded;
    naming one of them is forwarded unchanged to that message's account, turn after turn."""
    mocks = {"a": await make_mock_upstream(), "b": await make_mock_upstream()}
    key = gateway_env.add_key("alice")
    for name, mock in mocks.items():
        gateway_env.add_channel(name, mock)
    await gateway_env.start(plugin_options={"channels": {"seed": 7}})
    response, _ = await post(gateway_env, key, message("turn 0", diagnostics={"previous_message_id": None}))
    assert response.status == 200, response.body
    previous = response.json()["id"]
    home = served_by(mocks, previous)
    for turn in range(1, 9):
        response, tag = await post(gateway_env, key, message(f"turn {turn}", diagnostics={
            "previous_message_id": previous}), DIAGNOSIS_BETA if turn % 2 else None)
        assert response.status == 200, response.body
        sent = received(mocks[home], tag)
        assert sent is not None, f"turn {turn} left the account holding {previous}"
        assert sent.body["diagnostics"] == {"previous_message_id": previous}
        previous = response.json()["id"]
        assert served_by(mocks, previous) == home
    await gateway_env.gateway.owned.settle()
    rows = gateway_env.query("SELECT owner FROM owned_state WHERE kind = 'message' AND id = ?", previous)
    assert len(rows) == 1


async def test_a_beta_header_alone_records_the_answer(gateway_env, mock_upstream):
    """The cache-diagnosis beta without a `diagnostics` field opts in too: the next turn may name the answer."""
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    response, _ = await post(gateway_env, key, message("first"), DIAGNOSIS_BETA)
    assert response.status == 200, response.body
    response, _ = await post(gateway_env, key, message("second", diagnostics={
        "previous_message_id": response.json()["id"]}), DIAGNOSIS_BETA)
    assert response.status == 200, response.body
