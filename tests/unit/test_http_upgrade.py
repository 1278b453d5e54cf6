"""Requests to upgrade (RFC 9110 §7.8) as the proxy's parser reads and rewrites them, and 101 heads."""

from __future__ import annotations

import pytest

from lbsession.balancer.http import HTTPError, parse_request_head, parse_response_head, switch_asked_for

WS = b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 1"


def test_a_websocket_request_keeps_its_upgrade_and_nothing_else_hop_by_hop():
    req = parse_request_head(WS + b"\r\nKeep-Alive: 5")
    assert req.upgrade == b"websocket" and req.keep_alive
    assert req.out == (
        b"GET /ws HTTP/1.1\r\nHost: t\r\nSec-WebSocket-Version: 1\r\nUpgrade: websocket\r\nConnection: Upgrade"
    )


def test_headers_the_connection_header_names_still_go_when_it_asks_to_upgrade():
    req = parse_request_head(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                             b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__")  # fmt: skip
    assert req.upgrade == b"h2c"
    assert b"http2-settings" not in req.out.lower()  # named in Connection: hop-by-hop (RFC 9110 §7.6.1)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket",  # Connection does not name it
        b"GET /ws HTTP/1.0\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket",  # HTTP/1.0: ignored
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade",  # nothing to upgrade to
    ],
)
def test_an_upgrade_that_is_not_asked_for_properly_is_dropped_as_hop_by_hop(head):
    req = parse_request_head(head)
    assert req.upgrade is None
    assert b"upgrade" not in req.out.lower()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (b"\r\nContent-Length: 2", "must not have a body"),
        (b"\r\nTransfer-Encoding: chunked", "must not have a body"),
        (b"\r\nUpgrade: two words", "must list protocols"),
    ],
)
def test_an_upgrade_that_cannot_be_tunnelled_safely_is_refused(extra, message):
    with pytest.raises(HTTPError, match=message) as refused:
        parse_request_head(WS + extra)
    assert refused.value.status == 400


def test_a_101_says_what_it_switches_to_and_only_a_listed_protocol_is_accepted():
    resp = parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: upgrade")
    assert resp.upgrade == b"WebSocket" and b"upgrade" not in resp.out.lower()
    assert switch_asked_for(b"WebSocket", b"websocket")
    assert switch_asked_for(b"h2c", b"websocket, h2c/1")
    assert not switch_asked_for(b"h2c", b"websocket")
