"""Another key's file named deep in a valid Messages body is still refused: a tool result may hold a document whose
source is content blocks (`source.type: "content"`), and an image among them may name a file
(`source.type: "file"`).  That file id sits seven levels under a message's content, and the gateway's walk for
file ids must still find it, or the request goes upstream with the channel's key and reads another user's file."""
from __future__ import annotations

import anthropic
import pytest

from tests.support.gateway_requests import HAIKU
from tests.support.rawhttp import RawConnection


def tool_turn(result_content: list) -> dict:
    return {"model": HAIKU, "max_tokens": 64,
            "tools": [{"name": "fetch", "description": "fetch a page", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": "fetch the report"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "fetch",
                                                   "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                              "content": result_content}]}]}


def shallow(file_id: str) -> dict:
    """The file as a document in the tool result: found today."""
    return tool_turn([{"type": "document", "source": {"type": "file", "file_id": file_id}}])


def deep(file_id: str) -> dict:
    """The file as an image inside a document made of content blocks, in the tool result."""
    return tool_turn([{"type": "document", "source": {"type": "content", "content": [
        {"type": "image", "source": {"type": "file", "file_id": file_id}}]}}])


@pytest.mark.parametrize("shape", [shallow, deep], ids=["document-in-tool-result", "image-in-content-document"])
async def test_another_keys_file_named_in_a_tool_result_is_refused(gateway_env, mock_upstream, shape):
    keys = {"alice": gateway_env.add_key("alice"), "bob": gateway_env.add_key("bob")}
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    async with anthropic.AsyncAnthropic(base_url=gateway_env.base_url, api_key=keys["alice"], max_retries=0) as alice:
        uploaded = await alice.beta.files.upload(file=("chart.png", b"\x89PNG\r\n\x1a\n alice's chart", "image/png"))
    sent_before = len(mock_upstream.requests)
    async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
        response = await conn.request("POST", "/v1/messages", {"x-api-key": keys["bob"],
                                                               "anthropic-version": "2023-06-01",
                                                               "anthropic-beta": "files-api-2025-04-14"},
                                      json_body=shape(uploaded.id))
    assert (response.status, response.json().get("error", {}).get("type")) == (404, "not_found_error"), \
        response.body
    assert len(mock_upstream.requests) == sent_before       # a foreign file id never goes upstream
    await gateway_env.stop()
