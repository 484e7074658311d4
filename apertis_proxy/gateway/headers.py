"""Which headers cross the gateway, in each direction."""
from __future__ import annotations

from typing import Optional

from ..http.heads import checked
from ..plugin_api import Channel
from .usage import REDACT_MIN, redact

# Never forwarded upstream: hop-by-hop, framing (we set our own), the client's
# credentials (upstream gets the channel's key, as exactly one credential) and
# the version (upstream gets the channel's).  The client's accept-encoding is
# replaced by `identity` (no field at all would accept any coding): usage has to
# be read from the body.  A compressed request body is decoded here, so
# content-encoding goes too.  Cookies (a session of whatever stands in front of
# the gateway) and where a request came from (clients' addresses are the
# organisation's business, not the provider's) stay here as well.
# The headers that choose who pays (the upstream workspace, the billed user
# profile) are the operator's: a channel may set them, a client may not.
_OPERATOR_HEADERS = ((b"anthropic-workspace-id", "workspace_id"), (b"anthropic-user-profile-id", "user_profile_id"))
_DROP_UPSTREAM = frozenset((
    b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
    b"trailer", b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"content-length",
    b"x-api-key", b"authorization", b"anthropic-version", b"accept-encoding", b"expect",
    b"content-encoding", b"cookie", b"forwarded", b"x-forwarded-for", b"x-forwarded-host",
    b"x-forwarded-proto", b"x-real-ip", b"x-forwarded-port", b"x-forwarded-server", b"x-original-forwarded-for",
    b"true-client-ip", b"cf-connecting-ip", b"x-client-ip", b"via", *(name for name, _ in _OPERATOR_HEADERS),
))

# Forwarded back to the client from an upstream response.  Rate-limit and
# organisation headers describe the shared upstream account, not the caller.
_PASS_DOWN = frozenset((b"content-type", b"content-encoding", b"cache-control", b"retry-after", b"retry-after-ms",
                        b"x-should-retry"))


# (key, auth header, version) -> the two checked header lines they make; saves
# an encode and a check of each per request.  Bounded: keys that were rotated
# or removed must not pile up (nor stay in memory) for the process's life.
_CREDENTIALS: dict[tuple[str, str, str], tuple[tuple[bytes, bytes], tuple[bytes, bytes]]] = {}
_CREDENTIALS_MAX = 256
# An upstream error answer's advice to the client on retrying, passed down as it came.
RETRY_ADVICE = (b"retry-after", b"retry-after-ms", b"x-should-retry")


def _credential_headers(channel: Channel, version: str) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    cache_key = (channel.api_key, channel.auth_header, version)
    pair = _CREDENTIALS.get(cache_key)
    if pair is None:
        # The channel's key and version come from settings, not from a parser: check them.
        key = checked(channel.api_key.encode("latin-1"))
        auth = ((b"authorization", b"Bearer " + key) if channel.auth_header == "authorization"
                else (b"x-api-key", key))
        if len(_CREDENTIALS) >= _CREDENTIALS_MAX:
            _CREDENTIALS.clear()        # the keys still in use come back, one miss each
        pair = _CREDENTIALS[cache_key] = (auth, (b"anthropic-version", checked(version.encode("ascii"))))
    return pair


def upstream_headers(client: list[tuple[bytes, bytes]], channel: Channel, host: bytes,
                     version: str, length: int) -> list[tuple[bytes, bytes]]:
    listed: Optional[set[bytes]] = None
    auth, version_line = _credential_headers(channel, version)
    out: list[tuple[bytes, bytes]] = [(b"host", host), auth, version_line, _IDENTITY,
                                      (b"content-length", b"%d" % length)]
    for name, value in client:
        if name in _DROP_UPSTREAM:
            if name == b"connection":     # every Connection header's names, merged
                tokens = {t.strip().lower() for t in value.split(b",")}
                listed = tokens if listed is None else listed | tokens
            continue
        out.append((name, value))
    if listed:
        # Hop-by-hop names the client listed go from the client's own headers only:
        # never from the gateway's own lines (a client listing x-api-key or
        # content-length would strip the channel's credential or the framing).
        # Names dropped anyway (`keep-alive`, what clients list) are none of the
        # client's headers kept here: only the others need a pass over them.
        listed -= _DROP_UPSTREAM
        if listed:
            out[_OWN:] = [(n, v) for n, v in out[_OWN:] if n not in listed]
    if channel.options:
        for name, option in _OPERATOR_HEADERS:
            value = channel.options.get(option)
            if value:
                out.append((name, checked(str(value).encode("latin-1"))))
    return out


_OWN = 5    # upstream_headers' own lines come first: host, credential, version, accept-encoding, content-length
_IDENTITY = (b"accept-encoding", b"identity")


def downstream_headers(upstream: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], Optional[bytes]]:
    """The answer's headers that go to the client (its request id apart: upstream_request_id), and the content
    coding it names, lower-cased (None: none, or identity)."""
    out = []
    coding = None
    for name, value in upstream:
        if name in _PASS_DOWN:
            out.append((name, value))
            if name == b"content-encoding" and (value := value.strip().lower()) != b"identity":
                coding = value
    return out, coding


def upstream_request_id(value: Optional[bytes], channel_key: Optional[str]) -> Optional[str]:
    """The upstream's `request-id` as the gateway passes it on (`upstream-request-id`) and records it,
    with the channel's key redacted should an upstream put it there (one substring test on every answer:
    redact() itself only for an id holding the key's first characters)."""
    if not value:
        return None
    text = value.decode("latin-1")
    if channel_key and channel_key[:REDACT_MIN] in text:
        return redact(text, channel_key)
    return text


def parse_retry_after(value: Optional[bytes]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: rare from this API, treat as unknown
