"""State one upstream account holds, as the mock keeps it: thread anchors, containers and files. Each MockUpstream is
one account, so an id created on one mock is unknown to another, as it is between two real accounts.

Requests: ``thread: {"type": "continue", "previous_message_id"}`` must name a reply of this account (else 404
``thread_not_found``); ``container`` (an id, or ``{"id"}``) must be one of its containers (else 404); a content block
whose ``source`` (or itself) has a ``file_id`` must name one of its files (else 404 ``not_found_error``). Answers: a
threaded turn's message id becomes a thread anchor; a request with a ``code_execution_*`` tool and no container gets a
new container, reported as ``container`` in the JSON body and in the final ``message_delta``'s ``delta``; a last user
message saying "please refuse" is refused (``stop_reason`` refusal, ``stop_details`` with a fallback credit token of
this account, which a later ``fallback_credit_token`` must name, else 400).
``Files`` serves the account's ``/v1/files``.
"""
from __future__ import annotations

import email
import email.policy
import json
import time
from typing import Any, Optional

from .mock_replies import RequestRejected, new_id


class AccountState:
    def __init__(self) -> None:
        self.threads: set[str] = set()
        self.containers: set[str] = set()
        self.files: dict[str, dict[str, Any]] = {}      # id -> file metadata (with "content" bytes)
        self.credit_tokens: set[str] = set()

    def check_references(self, body: dict) -> None:
        thread = body.get("thread")
        if isinstance(thread, dict) and thread.get("type") == "continue":
            previous = thread.get("previous_message_id")
            if previous not in self.threads:
                raise RequestRejected(404, f"thread: no thread continues from {previous}", "not_found_error",
                                      error_code="thread_not_found")
        container = _container_id(body)
        if container is not None and container not in self.containers:
            raise RequestRejected(404, f"container: {container} not found", "not_found_error")
        token = body.get("fallback_credit_token")
        token = token.get("token") if isinstance(token, dict) else token
        if token is not None and token not in self.credit_tokens:
            raise RequestRejected(400, "fallback_credit_token: the token is invalid or expired")
        for file_id in _file_ids(body.get("messages")):
            if file_id not in self.files:
                raise RequestRejected(404, f"File not found: {file_id}", "not_found_error")

    def container_for(self, body: dict) -> Optional[dict[str, Any]]:
        """The container an answer reports: the request's own, or a new one for a code execution tool."""
        container = _container_id(body)
        if container is None and any(isinstance(t, dict) and str(t.get("type", "")).startswith("code_execution")
                                     for t in body.get("tools") or ()):
            container = new_id("container_")
            self.containers.add(container)
        if container is None:
            return None
        return {"id": container, "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))}

    def refusal_for(self, body: dict) -> Optional[dict[str, Any]]:
        """A refusal's stop_details, with a fallback credit token of this account, when the last user message
        asks to be refused ("please refuse")."""
        messages = body.get("messages") or [{}]
        if "please refuse" not in json.dumps(messages[-1].get("content")):
            return None
        token = new_id("fct_")
        self.credit_tokens.add(token)
        return {"type": "refusal", "category": "general_harms", "explanation": "mock refusal",
                "fallback_credit_token": token}

    def answered(self, body: dict, message_id: str) -> None:
        if isinstance(body.get("thread"), dict):
            self.threads.add(message_id)


def _container_id(body: dict) -> Optional[str]:
    container = body.get("container")
    if isinstance(container, dict):
        container = container.get("id")
    return container if isinstance(container, str) and container else None


def _file_ids(value: Any) -> list[str]:
    found: list[str] = []
    if isinstance(value, list):
        for item in value:
            found += _file_ids(item)
    elif isinstance(value, dict):
        if isinstance(value.get("file_id"), str):
            found.append(value["file_id"])
        for key in ("content", "source"):
            found += _file_ids(value.get(key))
    return found


class Files:
    """``/v1/files`` of one account: upload (multipart, field ``file``), list, metadata, content, delete."""

    PREFIX = "/v1/files"

    def __init__(self, account: AccountState) -> None:
        self.account = account

    def route(self, method: str, path: str) -> Optional[Any]:
        if path == self.PREFIX:
            return {"POST": self._upload, "GET": self._list}.get(method)
        rest = path[len(self.PREFIX) + 1:].split("/") if path.startswith(self.PREFIX + "/") else None
        if rest is None or len(rest) > 2 or (len(rest) == 2 and rest[1] != "content"):
            return None
        if len(rest) == 2:
            return self._content if method == "GET" else None
        return {"GET": self._metadata, "DELETE": self._delete}.get(method)

    def _file(self, request: Any) -> dict[str, Any]:
        file_id = request.path[len(self.PREFIX) + 1:].split("/")[0]
        found = self.account.files.get(file_id)
        if found is None:
            raise RequestRejected(404, f"File not found: {file_id}", "not_found_error")
        return found

    async def _upload(self, conn: Any, request: Any, version: str) -> None:
        ctype = request.headers.get("content-type", "")
        parsed = email.message_from_bytes(f"Content-Type: {ctype}\r\n\r\n".encode() + request.raw_body,
                                          policy=email.policy.HTTP)
        part = next((p for p in parsed.iter_parts() if p.get_param("name", header="content-disposition") == "file"),
                    None) if parsed.is_multipart() else None
        if part is None:
            raise RequestRejected(400, "file: Field required")
        content = part.get_payload(decode=True) or b""
        meta = {"id": new_id("file_"), "type": "file", "filename": part.get_filename() or "upload",
                "mime_type": part.get_content_type(), "size_bytes": len(content),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "downloadable": True}
        self.account.files[meta["id"]] = {**meta, "content": content}
        await conn.send_json(request, 200, meta)

    async def _list(self, conn: Any, request: Any, version: str) -> None:
        data = [_public(f) for f in reversed(self.account.files.values())]
        await conn.send_json(request, 200, {"data": data, "has_more": False,
                                            "first_id": data[0]["id"] if data else None,
                                            "last_id": data[-1]["id"] if data else None})

    async def _metadata(self, conn: Any, request: Any, version: str) -> None:
        await conn.send_json(request, 200, _public(self._file(request)))

    async def _content(self, conn: Any, request: Any, version: str) -> None:
        found = self._file(request)
        await conn.send_raw(request, 200, found["mime_type"], found["content"])

    async def _delete(self, conn: Any, request: Any, version: str) -> None:
        found = self._file(request)
        del self.account.files[found["id"]]
        await conn.send_json(request, 200, {"id": found["id"], "type": "file_deleted"})


def _public(found: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in found.items() if k != "content"}
