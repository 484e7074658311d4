"""The JavaScript SDK harness itself (sdk_js.py, js_sdk/runner.mjs): the pinned version is what runs, calls run
concurrently in the one Node process, each auth style sends exactly its credential, and an install is reused."""
from __future__ import annotations

import asyncio
import subprocess

import pytest

from tests.support import sdk_js
from tests.support.mock_upstream import MOCK_API_KEY

needs_node = pytest.mark.skipif(bool(sdk_js.unavailable_reason()), reason=sdk_js.unavailable_reason() or "")


async def test_js_process_runs_calls_concurrently(make_sdk, mock_upstream, js_sdk):
    runner = make_sdk("js", "async")
    results = await asyncio.gather(*[
        runner.run("plain", mock_upstream.base_url, MOCK_API_KEY, text=f"n{i}") for i in range(4)])
    assert js_sdk.version == sdk_js.JS_SDK_VERSION
    assert sorted(r["text"].split()[1] for r in results) == ["n0", "n1", "n2", "n3"]
    for request in mock_upstream.requests:
        assert request.header_values("user-agent") == [f"Anthropic/JS {sdk_js.JS_SDK_VERSION}"]
        assert request.header_values("x-stainless-lang") == ["js"]


async def test_auth_styles_send_exactly_their_credential(make_sdk, mock_upstream):
    """The JS client drops a header given as null: each style sends what sdk_scenarios.client_kwargs describes."""
    runner = make_sdk("js", "async")
    expected = {"default": ([], [f"Bearer {MOCK_API_KEY}"]), "x-api-key": ([MOCK_API_KEY], []),
                "bearer": ([], [f"Bearer {MOCK_API_KEY}"]), "both": ([MOCK_API_KEY], [f"Bearer {MOCK_API_KEY}"]),
                "none": ([], [])}
    for auth, (api_keys, authorizations) in expected.items():
        result = await runner.run("plain", mock_upstream.base_url, MOCK_API_KEY, auth=auth)
        request = mock_upstream.last_request
        assert (request.header_values("x-api-key"), request.header_values("authorization")) == (
            api_keys, authorizations), auth
        assert ("error" in result) == (auth in ("both", "none")), (auth, result)


async def test_unknown_scenario_or_mode_is_a_crash_not_an_outcome(js_sdk):
    if sdk_js.unavailable_reason():
        pytest.skip(sdk_js.unavailable_reason())
    args = {"base_url": "http://127.0.0.1:9", "api_key": "k"}
    with pytest.raises(RuntimeError, match="(?s)JS SDK scenario crashed.*async clients only"):
        await js_sdk.run("sync", "plain", args)
    with pytest.raises(RuntimeError, match="(?s)JS SDK scenario crashed.*no JS scenario"):
        await js_sdk.run("async", "no_such_scenario", args)


@needs_node
def test_an_install_is_reused(monkeypatch):
    target = sdk_js.ensure_installed()

    def no_npm(*args, **kw):
        raise AssertionError(f"reinstalled: {args}")

    monkeypatch.setattr(subprocess, "run", no_npm)
    assert sdk_js.ensure_installed() == target
    # A changed package.json or lock file makes the install stale.
    monkeypatch.setattr(sdk_js, "_source_digest", lambda: "another lock")
    assert not sdk_js._installed(target)
