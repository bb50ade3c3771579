"""The client IP: the socket peer unless a proxy header is configured, then counted from the right."""

from __future__ import annotations

import pytest
from django.test import RequestFactory, override_settings

from ops.clientip import client_ip, request_client_ip, scope_client_ip

XFF = "X-Forwarded-For"


def test_no_header_configured_means_the_peer_whatever_the_client_sends():
    assert client_ip("10.0.0.7", {XFF: "6.6.6.6"}) == "10.0.0.7"
    assert client_ip("10.0.0.7", [(b"x-forwarded-for", b"6.6.6.6")]) == "10.0.0.7"
    assert client_ip(None, {}) == ""


@override_settings(CLIENT_IP_HEADER=XFF, CLIENT_IP_TRUSTED_PROXIES=1)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("203.0.113.5", "203.0.113.5"),
        # The proxy appended the address it saw; the client's own left entry is ignored.
        ("6.6.6.6, 203.0.113.5", "203.0.113.5"),
        ("6.6.6.6,203.0.113.5 ", "203.0.113.5"),
        ("2001:DB8::1", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("203.0.113.5:5000", "203.0.113.5"),
        # Malformed: the peer.
        ("", "10.0.0.7"),
        ("unknown", "10.0.0.7"),
        ("6.6.6.6, not-an-ip", "10.0.0.7"),
        ("300.1.1.1", "10.0.0.7"),
    ],
)
def test_configured_header_is_read_from_the_right(value, expected):
    assert client_ip("10.0.0.7", {XFF: value}) == expected
    assert client_ip("10.0.0.7", [(b"host", b"x"), (b"x-forwarded-for", value.encode())]) == expected


@override_settings(CLIENT_IP_HEADER=XFF, CLIENT_IP_TRUSTED_PROXIES=2)
def test_two_proxies_take_the_second_entry_from_the_right():
    assert client_ip("10.0.0.7", {XFF: "6.6.6.6, 203.0.113.5, 10.0.0.3"}) == "203.0.113.5"
    # Fewer entries than proxies: the header is not what the proxies would have written.
    assert client_ip("10.0.0.7", {XFF: "203.0.113.5"}) == "10.0.0.7"


@override_settings(CLIENT_IP_HEADER=XFF)
def test_repeated_header_lines_count_as_one_list():
    headers = [(b"x-forwarded-for", b"6.6.6.6"), (b"X-Forwarded-For", b"203.0.113.5")]
    assert client_ip("10.0.0.7", headers) == "203.0.113.5"


@override_settings(CLIENT_IP_HEADER="X-Real-IP")
def test_another_header_name():
    assert client_ip("10.0.0.7", {"x-real-ip": "203.0.113.9", XFF: "6.6.6.6"}) == "203.0.113.9"
    assert client_ip("10.0.0.7", {XFF: "6.6.6.6"}) == "10.0.0.7"


def test_request_and_scope_use_the_same_rule():
    request = RequestFactory().get("/", REMOTE_ADDR="10.0.0.8", HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.5")
    scope = {
        "type": "websocket",
        "client": ("10.0.0.8", 5555),
        "headers": [(b"x-forwarded-for", b"6.6.6.6, 203.0.113.5")],
    }
    assert request_client_ip(request) == scope_client_ip(scope) == "10.0.0.8"
    with override_settings(CLIENT_IP_HEADER=XFF):
        assert request_client_ip(request) == scope_client_ip(scope) == "203.0.113.5"
    assert scope_client_ip({"type": "websocket", "client": None, "headers": []}) == ""
