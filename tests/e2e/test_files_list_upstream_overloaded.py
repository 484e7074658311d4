"""The files list fetches each of the key's files from its account. When that account answers one of those fetches
with a transient error (529 overloaded, 429), the list cannot say what it holds: answering 200 without the file,
`has_more` false, tells a client (a sync, a clean-up) the file is gone when it is not. A file the account no longer
has (404) is rightly left out."""
from __future__ import annotations

import pytest

from tests.support.rawhttp import RawConnection
from tests.support.scripted_channel import json_response

BOUNDARY = "apertisboundary"
UPLOAD = (f"--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
          f"content-type: text/plain\r\n\r\nhello\r\n--{BOUNDARY}--\r\n").encode()
BETA = {"anthropic-beta": "files-api-2025-04-14"}


def meta(file_id: str) -> dict:
    return {"id": file_id, "type": "file", "filename": "a.txt", "mime_type": "text/plain", "size_bytes": 5,
            "created_at": "2026-12-01T00:00:00Z", "downloadable": False}


def error(status: int, error_type: str) -> bytes:
    return json_response(status, {"type": "error", "error": {"type": error_type, "message": "busy"}}, b"Error")


@pytest.mark.parametrize("status, error_type", [(529, "overloaded_error"), (429, "rate_limit_error")])
async def test_a_transient_error_fetching_one_file_does_not_answer_a_list_without_it(scripted, status, error_type):
    await scripted.start()
    async with await RawConnection.open(scripted.gateway.host, scripted.gateway.port) as conn:
        for file_id in ("file_a", "file_b"):
            scripted.channel.queue([json_response(200, meta(file_id))])
            uploaded = await conn.request("POST", "/v1/files", {
                "x-api-key": scripted.key, "content-type": f"multipart/form-data; boundary={BOUNDARY}", **BETA},
                UPLOAD)
            assert uploaded.status == 200, uploaded.body
        # newest first: file_b's fetch succeeds, file_a's (the last) meets the transient error
        scripted.channel.queue([json_response(200, meta("file_b"))], [error(status, error_type)])
        listed = await conn.request("GET", "/v1/files", {"x-api-key": scripted.key, **BETA})
    ids = [f["id"] for f in listed.json().get("data", [])] if listed.status == 200 else None
    assert listed.status != 200 or "file_a" in ids, (listed.status, listed.body)
