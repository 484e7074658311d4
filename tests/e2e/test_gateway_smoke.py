"""The shortest end-to-end path: official SDK -> gateway -> mock upstream -> usage row."""
from __future__ import annotations


async def test_sdk_message_through_gateway(gateway, make_sdk):
    sdk = make_sdk("2.x", "async")
    result = await sdk.run("plain", gateway.base_url, gateway.key, text="hello gateway")
    assert "error" not in result, result
    assert "hello gateway" in result["text"]
    upstream = gateway.mock.requests[-1]
    assert upstream.headers["x-api-key"] == "sk-ant-test"        # the channel's key, not the user's
    assert "authorization" not in upstream.headers
    rows = await gateway.usage_rows(1)
    served = gateway.mock.served[-1]["usage"]
    assert rows[0]["key_name"] == "alice" and rows[0]["channel_name"] == "main"
    assert rows[0]["input_tokens"] == served["input_tokens"] > 0
    assert rows[0]["output_tokens"] == served["output_tokens"] > 0
