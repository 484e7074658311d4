"""The headers a request carries upstream: the channel's credential replaces the client's, the answer is asked
for uncompressed (its usage is read from it), and the cache of credential lines stays bounded when channel keys
rotate."""
from __future__ import annotations

from apertis_proxy.gateway import headers
from apertis_proxy.plugin_api import Channel


def channel(key: str, auth_header: str = "x-api-key") -> Channel:
    return Channel(id=1, name="main", base_url="https://api.anthropic.com", api_key=key, auth_header=auth_header)


CLIENT = [(b"x-api-key", b"sk-apx-client"), (b"authorization", b"Bearer sk-apx-client"), (b"accept-encoding", b"gzip"),
          (b"anthropic-version", b"2026-10-21"), (b"content-type", b"application/json"),
          (b"connection", b"keep-alive, x-drop-me"), (b"x-drop-me", b"1"), (b"anthropic-beta", b"b1")]


def test_the_channel_credential_replaces_the_clients():
    out = headers.upstream_headers(CLIENT, channel("sk-ant-upstream"), b"api.anthropic.com", "2023-06-01", 42)
    assert out == [(b"host", b"api.anthropic.com"), (b"x-api-key", b"sk-ant-upstream"),
                   (b"anthropic-version", b"2023-06-01"), (b"accept-encoding", b"identity"), (b"content-length", b"42"),
                   (b"content-type", b"application/json"), (b"anthropic-beta", b"b1")]
    bearer = headers.upstream_headers(CLIENT, channel("sk-ant-upstream", "authorization"), b"h", "2023-06-01", 0)
    assert [h for h in bearer if h[0] in (b"x-api-key", b"authorization")] == [
        (b"authorization", b"Bearer sk-ant-upstream")]


def test_rotated_keys_do_not_pile_up_in_the_credential_cache():
    limit = headers._CREDENTIALS_MAX
    try:
        for i in range(3 * limit):
            key = f"sk-ant-rotated-{i}"
            out = headers.upstream_headers([], channel(key), b"h", "2023-06-01", 0)
            assert (b"x-api-key", key.encode()) in out          # every answer still right
            assert len(headers._CREDENTIALS) <= limit
        assert ("sk-ant-rotated-0", "x-api-key", "2023-06-01") not in headers._CREDENTIALS
    finally:
        headers._CREDENTIALS.clear()                            # later tests start from an empty cache
