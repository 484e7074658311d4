"""Browser pages on other origins (CORS): a preflight's answer, and the headers that let a page read an answer.

`@anthropic-ai/sdk` in a browser (`dangerouslyAllowBrowser: true`) sends headers of its own, so the browser first
asks with a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`), unauthenticated, and then
hands a page the answer only when `access-control-allow-origin` names the page's origin.  `[server] cors_origins`
says which origins may: `["*"]` any, `[]` none (preflights are then routed like any request, and get 405).
The origin is echoed rather than answered with `*`, so every such answer varies by `Origin`.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    from ..http.responder import Responder

ANY_ORIGIN = "*"
# A serialized origin as browsers send it: scheme://host[:port], or "null" (a sandboxed or file: page).
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/?#,@]+|null")
# A header list every item of which is a token (RFC 9110): echoed as a preflight's allowed headers.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_TOKEN_LIST = re.compile(_TOKEN + rb"(?:[ \t]*,[ \t]*" + _TOKEN + rb")*")

_VARY = (b"vary", b"origin")
_MAX_AGE = (b"access-control-max-age", b"600")      # seconds a browser may reuse a preflight's answer
# The answer headers a page's script may read beyond the safelisted ones: the ids and the retry advice the SDK
# reads.  (Rate-limit headers describe the shared upstream account and are not passed down: see headers.py.)
_EXPOSE = (b"access-control-expose-headers", b"request-id, upstream-request-id, retry-after, retry-after-ms, "
                                             b"x-should-retry")
# The headers @anthropic-ai/sdk sends: allowed when a preflight's own list is not a plain list of names.
_SDK_HEADERS = (b"access-control-allow-headers",
                b"accept, anthropic-beta, anthropic-dangerous-direct-browser-access, anthropic-version, "
                b"authorization, content-type, x-api-key, x-stainless-arch, x-stainless-helper, "
                b"x-stainless-helper-method, x-stainless-lang, x-stainless-os, x-stainless-package-version, "
                b"x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout")


def is_origin(value: str) -> bool:
    """`value` is a serialized origin ("https://app.example.com", "http://localhost:5173", "null")."""
    return _ORIGIN.fullmatch(value) is not None


class Cors:
    """Which origins' pages may call the API, and the headers that tell their browsers so."""

    __slots__ = ("_any", "_origins")

    def __init__(self, origins: Iterable[str]) -> None:
        origins = set(origins)
        self._any = ANY_ORIGIN in origins
        # Browsers send scheme and host in lower case.
        self._origins = frozenset(o.lower() for o in origins if o != ANY_ORIGIN)

    @classmethod
    def configured(cls, origins: list[str]) -> Optional[Cors]:
        """The policy `[server] cors_origins` sets; None when the list is empty (CORS off)."""
        return cls(origins) if origins else None

    def allows(self, origin: str) -> bool:
        return origin in self._origins or (self._any and is_origin(origin))

    def mark(self, resp: Responder, origin: str) -> None:
        """Let a page from `origin` read the answer `resp` will send, whatever it is, when the origin is allowed."""
        if self.allows(origin):
            resp.extra_headers = [(b"access-control-allow-origin", origin.encode("latin-1")), _VARY, _EXPOSE]

    def answer_preflight(self, resp: Responder, origin: str, methods: bytes, requested: Optional[bytes]) -> None:
        """204 to an allowed origin's preflight: `methods` are what its path serves; the headers it asked
        for (`requested`) are allowed as asked when they are a list of names, else the SDK's."""
        resp.send(204, [(b"access-control-allow-origin", origin.encode("latin-1")),
                        (b"access-control-allow-methods", methods), _allowed_headers(requested), _MAX_AGE, _VARY],
                  b"")


def _allowed_headers(requested: Optional[bytes]) -> tuple[bytes, bytes]:
    """The preflight's `access-control-request-headers` as asked when it is a list of names (an echo cannot
    smuggle anything else into the answer), else the headers the SDK sends."""
    if requested is not None:
        requested = requested.strip(b" \t")
        if _TOKEN_LIST.fullmatch(requested):
            return (b"access-control-allow-headers", requested)
    return _SDK_HEADERS
