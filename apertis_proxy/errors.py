"""Errors the gateway answers itself, in Anthropic's shapes."""
from __future__ import annotations

from typing import Mapping, Optional

import orjson

# Anthropic's status -> error.type table.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "request_too_large",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type_for(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


class GatewayError(Exception):
    """Raised anywhere on the request path to answer with an Anthropic error."""

    def __init__(self, status: int, message: str, error_type: Optional[str] = None,
                 headers: Optional[Mapping[str, str]] = None, *, error_code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type or error_type_for(status)
        self.message = message
        self.headers = dict(headers or {})
        self.error_code = error_code      # sent as error.details.error_code, as the API does


def error_body(error_type: str, message: str, request_id: Optional[str],
               error_code: Optional[str] = None) -> bytes:
    body: dict = {"type": "error", "error": {"type": error_type, "message": message}}
    if error_code:
        body["error"]["details"] = {"error_code": error_code}
    if request_id:
        body["request_id"] = request_id
    return orjson.dumps(body)


def render_error(status: int, message: str, error_type: Optional[str], request_id: str) -> tuple[bytes, bytes]:
    """An error answer's content type and body, for the HTTP layer (http.responder.ErrorRenderer)."""
    return b"application/json", error_body(error_type or error_type_for(status), message, request_id)


def sse_error_event(error_type: str, message: str) -> bytes:
    data = orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})
    return b"event: error\ndata: " + data + b"\n\n"
