"""HTTP/1.1 conformance of the proxy: the case table against a real in-process balancer, and the scenarios
that need two clients or a warm pool (retries, late bytes after a bodiless response, pipelining).

The table, its scripted upstream and its judge live in tests/integration/conformance_table.py, which
benchmarks/conformance.py also runs against `lbsession lb` and HAProxy side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.integration.conformance_table import ALL_CASES, Case, check_case, scripted
from tests.integration.proxy_fixtures import (
    Exchange,
    ProxyLab,
    get,
    http_response,
    read_framed_body,
    strict_requests,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture
async def lab() -> AsyncIterator[ProxyLab]:
    async with contextlib.AsyncExitStack() as stack:
        yield ProxyLab(stack)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in ALL_CASES])
async def test_conformance(lab: ProxyLab, case: Case) -> None:
    upstream = await lab.raw(scripted(case))
    lb = await lab.balancer({"raw": upstream.url}, **dict(case.limits))
    await check_case(case, lb.port, upstream)


# --------------------------------------------------------------------------- 3. retries


@pytest.mark.parametrize(
    ("method", "resent"),
    [("POST", False), ("PATCH", False), ("LOCK", False), ("PUT", True), ("DELETE", True), ("GET", True)],
)
async def test_only_an_idempotent_request_is_sent_again(lab: ProxyLab, method: str, resent: bool) -> None:
    async def warm_then_hang_up(exchange: Exchange) -> bool:
        if exchange.number > 1:
            return False  # read it, then close without a word
        exchange.writer.write(http_response(exchange.target.encode()))
        return True

    upstream = await lab.raw(warm_then_hang_up)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    assert (await client.request("/warm")).body == b"/warm"  # the pool is warm: the next goes on that connection
    client.send(f"{method} /x HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n".encode())
    response = await client.response()
    received = [(e.head.split(b" ")[0].decode(), e.number) for e in upstream.exchanges[1:]]
    if resent:  # nothing was processed on a stale keep-alive connection: a fresh one may try again
        assert (response.status, response.body) == (200, b"/x")
        assert received == [(method, 2), (method, 1)]
    else:  # RFC 9110 §9.2.2: a proxy MUST NOT automatically retry a non-idempotent request
        assert response.status == 502
        assert received == [(method, 2)]
        assert lb.retries == 0
    assert (await client.request("/after")).body == b"/after"  # and the 502 is the only answer


# --------------------------------------------------------------------------- 1. late bytes on a pooled connection

LATE = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nPOISONED"


@pytest.mark.parametrize(
    ("method", "answer", "late"),
    [
        pytest.param("GET", b"HTTP/1.1 204 No Content\r\n\r\n", LATE, id="204-then-a-response"),
        pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n", b"POISONED", id="head-then-its-body"),
    ],
)
@pytest.mark.parametrize("other_served", [False, True], ids=["other-first-request", "other-later-request"])
async def test_late_bytes_never_reach_another_client(
    lab: ProxyLab, method: str, answer: bytes, late: bytes, other_served: bool
) -> None:
    bodiless: list[Exchange] = []

    async def late_bytes(exchange: Exchange) -> bool:
        if exchange.target == "/a":
            exchange.writer.write(answer)
            bodiless.append(exchange)
        else:
            if exchange.target == "/b":  # the upstream's late bytes for /a go out as /b arrives, on /a's connection
                bodiless[0].writer.write(late)
                await bodiless[0].writer.drain()
            exchange.writer.write(http_response(exchange.target.encode()))
        return True

    upstream = await lab.raw(late_bytes)
    lb = await lab.balancer({"raw": upstream.url})
    first, other = await lab.client(lb), await lab.client(lb)
    if other_served:  # a later request of a client may use pooled connections, never this one
        assert (await other.request("/warm")).body == b"/warm"
    assert (await first.request("/a", method=method)).status == int(answer.split(b" ")[1])
    response = await other.request("/b")
    assert (response.status, response.body) == (200, b"/b")
    # The connection that got bytes while idle is closed, never reused: the first client's next
    # request gets its own answer too.
    async with asyncio.timeout(5):
        await upstream.ended[bodiless[0].peer_port]
    assert (await first.request("/c")).body == b"/c"


# --------------------------------------------------------------------------- pipelining with bodies


async def test_pipelined_requests_with_bodies_reach_the_upstream_delimited(lab: ProxyLab) -> None:
    async def echo_body(exchange: Exchange) -> bool:
        body = await read_framed_body(exchange)
        exchange.writer.write(http_response(exchange.target.encode() + b" " + body))
        return True

    upstream = await lab.raw(echo_body)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    smuggled = get("/smuggled")  # a whole request as a body: it must stay a body
    chunked = b"4\r\nab\r\n\r\n0\r\nX-Sum: 1\r\n\r\n"
    client.send(
        b"POST /one HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
        + b"POST /two HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        + get("/three")
        + b"POST /four HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
    )
    answers = [(await client.response()).body for _ in range(4)]
    assert answers == [b"/one " + smuggled, b"/two " + chunked, b"/three ", b"/four "]
    requests = [r for wire in upstream.requests_wire() for r in strict_requests(wire)]
    assert [(r.method, r.target, r.body) for r in requests] == [
        (b"POST", b"/one", smuggled),
        (b"POST", b"/two", chunked),
        (b"GET", b"/three", b""),
        (b"POST", b"/four", b""),
    ]
