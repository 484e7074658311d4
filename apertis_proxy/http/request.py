"""What the HTTP layer hands to the application: one parsed request."""
from __future__ import annotations

from typing import Optional


class Request:
    """One complete HTTP request (head and body), as parsed by h11."""

    # `request_id` is set only on a head handed to check_head() (see protocol.py): the id a refusal
    # of it is sent with.  A complete request's id is its responder's.
    __slots__ = ("method", "target", "path", "query", "headers", "body", "client", "http_version", "request_id",
                 "ascii_headers")

    def __init__(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
                 client: str, http_version: bytes, ascii_headers: bool = False) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.headers = headers          # [(lower-case name, value)], as h11 gives them
        self.body = body
        self.client = client
        self.http_version = http_version
        # Every name and value is ASCII (the fast head parser accepts no other byte): decoded as
        # UTF-8, the codec decode() takes without an argument to parse, they give the same text.
        self.ascii_headers = ascii_headers

    def header(self, name: bytes) -> Optional[bytes]:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_map(self) -> dict[str, str]:
        """Lower-case names -> values; repeated headers joined with ', '."""
        headers = self.headers
        if self.ascii_headers:
            out = {k.decode(): v.decode() for k, v in headers}
        else:
            out = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        if len(out) == len(headers):
            return out
        out = {}        # a name repeated: its values joined, in order
        for k, v in headers:
            key = k.decode("latin-1")
            val = v.decode("latin-1")
            out[key] = out[key] + ", " + val if key in out else val
        return out
