"""The HTTP layer's assumptions about h11, checked against the h11 installed: setup.cfg pins h11 below its next
major version because heads.header_list() reads a private attribute of h11's Headers."""
from __future__ import annotations

import h11

from apertis_proxy.http.heads import header_list

HEAD = b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nX-Api-Key: k\r\nContent-Length: 0\r\n\r\n"


def parsed_headers():
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD)
    event = conn.next_event()
    assert type(event) is h11.Request
    return event.headers


def test_h11_headers_still_hold_the_private_item_list_header_list_reads():
    headers = parsed_headers()
    items = getattr(headers, "_full_items", None)
    assert items is not None, (
        f"h11 {h11.__version__}: Headers._full_items is gone; heads.header_list() now takes the slow public path. "
        "Read what replaced it, then move the h11 pin in setup.cfg and tests/constraints.txt.")
    # (name as sent, lower-case name, value), in order: the shape header_list() unpacks.
    assert [(raw, name, value) for raw, name, value in items] == [
        (b"Host", b"host", b"gw"), (b"X-Api-Key", b"x-api-key", b"k"), (b"Content-Length", b"content-length", b"0")]


def test_header_list_gives_what_h11s_public_interface_gives():
    headers = parsed_headers()
    assert header_list(headers) == list(headers) == [
        (b"host", b"gw"), (b"x-api-key", b"k"), (b"content-length", b"0")]
