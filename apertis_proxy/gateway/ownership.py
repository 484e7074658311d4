"""Account-bound state: threads, containers, files and fallback credit tokens live on the
upstream account that created them and belong to the key that created them; thinking
blocks are valid only on the account that wrote them.

`references(body)` lists the ids a Messages request refers to; `resolve()` checks
them against the owned_state records: an id another key owns is answered 404 in
Anthropic's shape (the id is not disclosed as existing), and a known id pins the
request to its account.  `StateCapture` notes the ids an answer creates (the
message id of a threaded turn, a container, a fallback credit token, the
signatures of its thinking blocks) so the forwarder can record them.  Thinking
blocks are recorded by a fingerprint of their signature and pin a conversation
to its account without an owner check (the signature is the conversation's own).

`diagnostics.previous_message_id` (prompt-cache diagnosis: the upstream compares
this request's prompt with the named one's) is checked like a thread, but only an
id recorded as the caller's passes: the answers to requests asking for diagnosis
(`wants_diagnosis`) are recorded as MESSAGE, and the caller's threaded turns count
too.  Any other id, also one never seen, is answered 404: the gateway cannot tell
whose prompt it names, and the upstream would compare against it.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional

from ..errors import GatewayError
from ..plugin_api import Caller, UsageRecord
from ..store.catalog import ModelEntry
from ..store.owned_state import OwnedState
from .usage import UsageMeter

THREAD, CONTAINER, FILE, BATCH, SKILL, CREDIT = "thread", "container", "file", "batch", "skill", "credit"
THINKING = "thinking"
MESSAGE = "message"     # an answer to a request that asked for prompt-cache diagnosis
DIAGNOSIS_BETA = "cache-diagnosis-"     # anthropic-beta: cache-diagnosis-2026-04-07 (SDK 2.17)
_FIELD = {THREAD: "thread.previous_message_id", CONTAINER: "container", FILE: "file_id",
          CREDIT: "fallback_credit_token", BATCH: "batch", SKILL: "skill_id", THINKING: "thinking.signature",
          MESSAGE: "diagnostics.previous_message_id"}
_MAX_DEPTH = 64         # file ids sit in blocks, in tool results, in sources (of content sources, ...)


def signature_fingerprint(signature: str) -> str:
    return hashlib.sha256(signature.encode("utf-8", "replace")).hexdigest()[:32]


def may_think(body: Any, entry: Optional[ModelEntry]) -> bool:
    """Whether the answer can carry thinking blocks: the request asked for thinking, or left it out
    on a model that thinks by default (catalogue rule `thinks_by_default`; a model the catalogue
    does not know is assumed to)."""
    thinking = body.get("thinking") if isinstance(body, dict) else None
    if isinstance(thinking, dict):
        return thinking.get("type") != "disabled"
    return entry is None or bool(entry.rules.get("thinks_by_default"))


def owner_of(caller: Caller) -> str:
    return f"{caller.key_id}/{caller.key_name}"


def wants_diagnosis(body: Any, headers: Mapping[str, str]) -> bool:
    """Whether a request asks for prompt-cache diagnosis (a `diagnostics` field, also `null`, or the beta):
    its answer's id may be named by the next request, so it is recorded (the others cost no store write)."""
    if isinstance(body, dict) and "diagnostics" in body:
        return True
    beta = headers.get("anthropic-beta")
    return beta is not None and DIAGNOSIS_BETA in beta


def references(body: Any, raw: Optional[bytes] = None) -> list[tuple[str, str]]:
    """(kind, id) of the account-bound state a Messages body refers to.  `raw`, the body's
    bytes, spares the walk through every message's blocks when no file id can be in it."""
    if not isinstance(body, dict):
        return []
    refs: list[tuple[str, str]] = []
    thread = body.get("thread")
    if isinstance(thread, dict) and thread.get("type") == "continue":
        previous = thread.get("previous_message_id")
        if isinstance(previous, str) and previous:
            refs.append((THREAD, previous))
    container = body.get("container")
    if isinstance(container, dict):
        container = container.get("id")
    if isinstance(container, str) and container:
        refs.append((CONTAINER, container))
    token = body.get("fallback_credit_token")
    if isinstance(token, dict):
        token = token.get("token")
    if isinstance(token, str) and token:
        refs.append((CREDIT, token))
    diagnostics = body.get("diagnostics")
    if isinstance(diagnostics, dict):
        named = diagnostics.get("previous_message_id")
        if isinstance(named, str) and named:
            refs.append((MESSAGE, named))
    messages = body.get("messages")
    if isinstance(messages, list):
        if raw is None or may_name_file(raw):
            for message in messages:
                if isinstance(message, dict):
                    _file_ids(message.get("content"), refs, 0)
        _thinking(messages, refs)
    return refs


def may_name_file(raw: bytes) -> bool:
    """Whether JSON bytes may hold a `file_id` key: written plainly, or with a \\u escape
    anywhere (`"file\\u005fid"` parses to the same key)."""
    return raw.find(b'"file_id"') >= 0 or raw.find(b"\\u") >= 0


def _thinking(messages: list, refs: list) -> None:
    """The thinking blocks of the last assistant turn: they pin the conversation's account."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            content = message.get("content")
            for block in content if isinstance(content, list) else ():
                if isinstance(block, dict) and block.get("type") in ("thinking", "redacted_thinking"):
                    signed = block.get("signature") if block["type"] == "thinking" else block.get("data")
                    if isinstance(signed, str) and signed:
                        refs.append((THINKING, signature_fingerprint(signed)))
            return


def _file_ids(value: Any, refs: list, depth: int) -> None:
    if depth > _MAX_DEPTH:
        # Deeper than any block the API takes: refused, never passed with an id not checked.
        raise GatewayError(400, f"messages: content nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, list):
        for item in value:
            _file_ids(item, refs, depth + 1)
    elif isinstance(value, dict):
        file_id = value.get("file_id")
        if isinstance(file_id, str) and file_id:
            refs.append((FILE, file_id))
        for key in ("source", "content"):
            if key in value:
                _file_ids(value[key], refs, depth + 1)


def not_found(kind: str, ident: str) -> GatewayError:
    """The API's own answer for an id this caller cannot use."""
    code = "thread_not_found" if kind == THREAD else None
    return GatewayError(404, f"{_FIELD[kind]}: {ident} not found", "not_found_error", error_code=code)


async def resolve(store: OwnedState, refs: list[tuple[str, str]], caller: Caller) -> Optional[str]:
    """The account the referred state lives on (None: no recorded state); GatewayError 404
    for an id another key owns (for a MESSAGE, one the caller is not recorded as owning),
    400 when the ids live on different accounts."""
    named = [ident for kind, ident in refs if kind == MESSAGE]
    # A message the caller asked diagnosis for counts, and so does a threaded turn of theirs.
    found = await store.find([*refs, *((THREAD, ident) for ident in named)] if named else refs)
    owner = owner_of(caller)
    accounts = set()
    for (kind, ident), owned in found.items():
        if owned.owner != owner and kind != THINKING:
            if named and kind == THREAD and ident in named and (kind, ident) not in refs:
                kind = MESSAGE      # looked up for the diagnostics field only
            raise not_found(kind, ident)
        accounts.add(owned.account)
    for ident in named:
        if (MESSAGE, ident) not in found and (THREAD, ident) not in found:
            raise not_found(MESSAGE, ident)     # never recorded: whose prompt it names is unknown
    if len(accounts) > 1:
        raise GatewayError(400, "the request refers to threads, containers or files of different upstream "
                                "accounts, which no single channel can serve together")
    return accounts.pop() if accounts else None


class StateCapture(UsageMeter):
    """A UsageMeter that also notes the ids an answer creates."""

    __slots__ = ("message_id", "container_id", "credit_token", "signatures", "signature_hook")

    def __init__(self, record: UsageRecord, thinking: bool = False) -> None:
        super().__init__(record)
        # The splicer scans a stream for signatures only when the answer can carry thinking.
        self.signature_hook = self.signature if thinking else None
        self.message_id: Optional[str] = None
        self.container_id: Optional[str] = None
        self.credit_token: Optional[str] = None
        self.signatures: list[str] = []      # fingerprints of the answer's thinking blocks

    def signature(self, signature: str) -> None:
        """A thinking block's signature, from a stream's signature_delta."""
        self.signatures.append(signature_fingerprint(signature))

    def message_start(self, message: Mapping[str, Any]) -> None:
        super().message_start(message)
        self._note(message)

    def message_delta(self, event: Mapping[str, Any]) -> None:
        super().message_delta(event)
        delta = event.get("delta")
        if isinstance(delta, dict):
            self._note(delta)

    def body(self, body: Mapping[str, Any]) -> None:
        super().body(body)
        self._note(body)
        content = body.get("content")
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "thinking" and isinstance(block.get("signature"), str):
                self.signature(block["signature"])
            elif (isinstance(block, dict) and block.get("type") == "redacted_thinking"
                  and isinstance(block.get("data"), str)):
                self.signature(block["data"])

    def _note(self, obj: Mapping[str, Any]) -> None:
        mid = obj.get("id")
        if isinstance(mid, str) and mid.startswith("msg"):
            self.message_id = mid
        container = obj.get("container")
        if isinstance(container, dict) and isinstance(container.get("id"), str):
            self.container_id = container["id"]
        details = obj.get("stop_details")
        if isinstance(details, dict) and isinstance(details.get("fallback_credit_token"), str):
            self.credit_token = details["fallback_credit_token"]
