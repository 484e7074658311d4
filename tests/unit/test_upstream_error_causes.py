"""Whose fault an upstream error answer is, by status and `details.error_code` (SDK 2.17's typed errors)."""
from __future__ import annotations

import pytest

from apertis_proxy.gateway.upstream_errors import classify, fails_over
from apertis_proxy.plugin_api import CAUSE_REQUEST, CAUSE_TRANSIENT


@pytest.mark.parametrize("status, error_type, code", [
    (529, "overloaded_error", "compaction_unavailable"),
    (503, "api_error", "storage_not_ready"),
    (503, "api_error", "authorization_check_unavailable"),
    (500, "api_error", "file_store_unavailable"),
])
def test_a_server_error_with_a_code_is_transient(status, error_type, code):
    assert classify(status, error_type, code, "try again") == CAUSE_TRANSIENT
    assert fails_over(CAUSE_TRANSIENT)


@pytest.mark.parametrize("status, error_type, code", [
    (404, "not_found_error", "thread_not_found"),
    (400, "invalid_request_error", "compaction_input_too_small"),
    (409, "conflict_error", "file_upload_pending"),
    (422, "api_error", "image_too_large"),
])
def test_a_client_error_about_what_the_request_refers_to_is_the_request_s(status, error_type, code):
    assert classify(status, error_type, code, "about the request") == CAUSE_REQUEST
    assert not fails_over(CAUSE_REQUEST)
