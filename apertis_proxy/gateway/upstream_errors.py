"""An upstream error answer: what the client gets, and whose fault it was.

The client gets the upstream's own body (redacted), so `error.details.error_code`
and `request_id` reach it: SDK 2.17 builds typed errors from them and its
thread recovery replays on `thread_not_found`.  The cause decides failover and
what the router learns:

  request      the request was at fault (a 4xx about it, any `invalid_request_error`,
               a 4xx with a `thread_*`, `file_*`, `compaction_*`... code, a 403 about a
               model or beta): returned to the client at once, never failed over, no
               cooldown;
  credential   the channel's key itself was refused (401, or a 403 saying so): the
               channel is disabled, the next one is tried;
  exhausted    the channel's account is out of money or ramp (spend-limit 429s, 402, the
               400 `invalid_request_error` saying its credit balance is too low): a long
               cooldown, the next one is tried;
  transient    429, 408, 409, 5xx, 529, `overloaded_error`, `timeout_error`: a short
               cooldown, the next one is tried.  A 5xx is the server's failure whatever
               its code (529 `compaction_unavailable` is an overload: SDK 2.17 makes it
               an OverloadedError to retry).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import orjson

from ..errors import error_type_for
from ..plugin_api import CAUSE_CREDENTIAL, CAUSE_EXHAUSTED, CAUSE_REQUEST, CAUSE_TRANSIENT
from .usage import redact_bytes

# 429s (and 402s) that will not clear in seconds: the account, not the moment.
EXHAUSTED_CODES = frozenset(("contract_spend_limit_reached", "enforced_spend_limit_reached",
                             "ramp_limit_exceeded", "linked_organization_billing_unavailable",
                             "linked_organization_spend_limit_reached"))
# Codes about what the request referred to, in a 4xx answer.
REQUEST_CODE_PREFIXES = ("thread_", "file_", "compaction_", "tool_", "image_", "user_profile_")
# A 403 disables a channel only when its message says the credential itself is refused.
_KEY_REFUSED = re.compile(r"\b(organization|workspace|api key|key)\b[^.]{0,40}\b(is|has been|was)\s+"
                          r"(disabled|revoked|deactivated|archived|suspended)", re.I)
_KEY_REFUSED_CODES = frozenset(("api_key_requester_unconfirmed",))
# An account without prepaid credit is refused with a 400 invalid_request_error and no code:
# "Your credit balance is too low to access the Anthropic API. ..."
_NO_CREDIT = re.compile(r"\bcredit\s+balance\s+is\s+(too\s+)?low\b", re.I)
_TRANSIENT_STATUSES = frozenset((408, 409, 429))
MESSAGE_LIMIT = 500


@dataclass(frozen=True, slots=True)
class UpstreamErrorReply:
    status: int
    error_type: str
    message: str                  # redacted, then cut to MESSAGE_LIMIT: for logs and the router
    error_code: Optional[str]
    cause: str
    body: bytes                   # what the client gets: the upstream body, redacted, or one in its shape


def request_secrets(body: Any) -> list[str]:
    """Secrets a request body carries for the upstream (MCP servers' authorization tokens):
    an error quoting one must not reach a log or a listing."""
    servers = body.get("mcp_servers") if isinstance(body, dict) else None
    if not isinstance(servers, list):
        return []
    return [s["authorization_token"] for s in servers
            if isinstance(s, dict) and isinstance(s.get("authorization_token"), str)]


def read_error(status: int, raw: bytes, secrets: Sequence[Optional[str]]) -> UpstreamErrorReply:
    """Parse an upstream error body (tolerating HTML, nothing, or an SSE `error` event)
    with every one of `secrets` (the channel's key first) redacted."""
    for secret in secrets:
        raw = redact_bytes(raw, secret)
    parsed = _error_object(raw)
    if parsed is None:
        text = raw[:200].decode("utf-8", "replace")
        etype = error_type_for(status)
        message = text.strip() or f"upstream answered {status}"
        body = orjson.dumps({"type": "error", "error": {"type": etype, "message": message}})
        return UpstreamErrorReply(status, etype, message, None, classify(status, etype, None, message), body)
    whole, err = parsed
    etype = err.get("type") if isinstance(err.get("type"), str) else error_type_for(status)
    details = err.get("details")
    code = details.get("error_code") if isinstance(details, dict) else None
    code = code if isinstance(code, str) else None
    message = str(err.get("message", ""))
    cause = classify(status, etype, code, message)
    message = message[:MESSAGE_LIMIT]
    body = raw if whole else orjson.dumps({"type": "error", "error": err})
    return UpstreamErrorReply(status, etype, message, code, cause, body)


def _error_object(raw: bytes) -> Optional[tuple[bool, dict]]:
    """(the body is the error object itself, its `error`); None when there is none."""
    candidates = [(True, raw)]
    if raw.lstrip().startswith((b"event:", b"data:")):
        candidates = [(False, line[5:]) for line in raw.splitlines() if line.startswith(b"data:")]
    for whole, candidate in candidates:
        try:
            obj: Any = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            return whole, obj["error"]
    return None


def classify(status: int, error_type: Optional[str], error_code: Optional[str], message: str) -> str:
    """The cause of an upstream error answer (see the module's docstring)."""
    if error_code in EXHAUSTED_CODES or (status in (400, 402, 403) and _NO_CREDIT.search(message)):
        return CAUSE_EXHAUSTED
    if status == 401:
        return CAUSE_CREDENTIAL
    if status == 403:
        if error_code in _KEY_REFUSED_CODES or (error_code is None and _KEY_REFUSED.search(message)):
            return CAUSE_CREDENTIAL
        return CAUSE_REQUEST
    if error_type == "invalid_request_error" or (
            status < 500 and error_code is not None and error_code.startswith(REQUEST_CODE_PREFIXES)):
        return CAUSE_REQUEST
    if status == 402:
        return CAUSE_EXHAUSTED
    if status == 409 and error_code is not None:     # a name taken, a scan pending: about the request
        return CAUSE_REQUEST
    if status in _TRANSIENT_STATUSES or status >= 500:
        return CAUSE_TRANSIENT
    return CAUSE_REQUEST


def fails_over(cause: str) -> bool:
    """Whether the next channel may be tried (only ever before any byte went out)."""
    return cause != CAUSE_REQUEST
