"""The proxy's correctness, end to end: a real LoadBalancer in front of real upstreams on free ports.

Normal traffic goes through aiohttp (client and echo server); the cases that
need exact bytes (pipelining, malformed requests, half-close, trailers, early
closes, HTTP/1.0) use raw sockets on either side. Timeout tests set their
limit to a fraction of a second and measure it; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from lbsession.balancer.balancer import LoadBalancer
from lbsession.balancer.strategies.base import RequestFacts, Route, Strategy, UpstreamView
from lbsession.config import STRATEGY_NAMES
from tests.integration.proxy_fixtures import (
    MIB,
    Exchange,
    ProxyLab,
    Response,
    free_port,
    get,
    header_values,
    http_response,
    payload,
    read_body,
    sha256,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]


@pytest.fixture
async def lab() -> AsyncIterator[ProxyLab]:
    async with contextlib.AsyncExitStack() as stack:
        yield ProxyLab(stack)


async def echo_balancer(lab: ProxyLab, **kwargs: Any) -> LoadBalancer:
    """A balancer in front of one aiohttp echo upstream called `echo`."""
    return await lab.balancer({"echo": await lab.echo()}, **kwargs)


def echoed(response: Response) -> dict[str, Any]:
    """The echo upstream's report in a RawClient response."""
    return json.loads(response.body)  # type: ignore[no-any-return]


async def elapsed_s(awaitable: Any) -> tuple[Any, float]:
    """Await `awaitable`; return its result and how long it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await awaitable
    return result, loop.time() - start


class RecordingStrategy(Strategy):
    """Another strategy, remembering the client address of every request it routed."""

    name = "recording"

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.client_ips: list[str] = []

    def choose(self, facts: RequestFacts, upstreams: Sequence[UpstreamView]) -> Route:
        self.client_ips.append(facts.client_ip)
        return self.inner.choose(facts, upstreams)


# --------------------------------------------------------------------------- bodies


async def test_chunked_request_body_arrives_intact(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    parts = [payload(100_000), b"x", payload(3), payload(70_000)]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    session = await lab.session()
    async with session.post(lb.url + "/upload", data=body()) as response:
        assert response.status == 200
        seen = await response.json()
    assert header_values(seen, "Transfer-Encoding") == ["chunked"]
    assert seen["body_sha256"] == sha256(b"".join(parts))


async def test_chunked_response_with_trailer_passes_through_unchanged(lab: ProxyLab) -> None:
    wire = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n"

    async def chunked(exchange: Exchange) -> bool:
        exchange.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n")
        exchange.writer.write(wire[:9])  # two writes split inside a chunk: the scanner may get it in pieces
        await exchange.writer.drain()
        exchange.writer.write(wire[9:])
        return True

    upstream = await lab.raw(chunked)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    first = await client.request("/one")
    second = await client.request("/two")  # the connection is still in step after the trailer
    for response in (first, second):
        assert response.status == 200
        assert response.header("transfer-encoding") == "chunked"
        assert response.raw_body == wire
        assert response.body == b"hello world"
    assert [e.number for e in upstream.exchanges] == [1, 2]


async def test_ten_megabyte_request_body(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab, read_timeout_s=5.0)  # a stalled upload fails in seconds, not 30
    data = payload(10 * MIB)
    session = await lab.session()
    async with session.post(lb.url + "/upload", data=io.BytesIO(data)) as response:
        assert response.status == 200
        seen = await response.json()
    assert (seen["body_len"], seen["body_sha256"]) == (len(data), sha256(data))


async def test_ten_megabyte_response_body(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    session = await lab.session()
    async with session.get(lb.url + f"/bytes/{10 * MIB}") as response:
        assert response.status == 200
        body = await response.read()
    assert sha256(body) == sha256(payload(10 * MIB))


# --------------------------------------------------------------------------- connections


async def test_sequential_requests_reuse_one_upstream_connection(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    client = await lab.client(lb)
    ports = set()
    for i in range(5):
        response = await client.request(f"/seq/{i}")
        assert response.status == 200
        assert echoed(response)["target"] == f"/seq/{i}"
        ports.add(echoed(response)["peer_port"])
    assert len(ports) == 1
    assert len(lb.upstream_conns) == 1
    assert lb.status()["servers"][0]["idle_connections"] == 1


async def test_pipelined_requests_are_answered_in_order(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    client = await lab.client(lb)
    client.send(b"".join(get(f"/p/{i}") for i in range(5)))
    targets = [echoed(await client.response())["target"] for _ in range(5)]
    assert targets == [f"/p/{i}" for i in range(5)]


async def test_pipeline_beyond_the_read_ahead_limit_is_answered_in_order(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    client = await lab.client(lb)
    padding = "X-Pad: " + "p" * 200 + "\r\n"
    client.send(b"".join(get(f"/p/{i}", extra=padding) for i in range(1500)))  # ~350 KB: reading pauses
    for i in range(1500):
        assert echoed(await client.response())["target"] == f"/p/{i}"


async def test_pipelined_request_bodies_are_delimited(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    client = await lab.client(lb)
    client.send(
        b"POST /sized HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + get("/last")
    )
    seen = [echoed(await client.response()) for _ in range(3)]
    assert [(s["target"], s["body_sha256"]) for s in seen] == [
        ("/sized", sha256(b"hello")),
        ("/chunked", sha256(b"abc")),
        ("/last", sha256(b"")),
    ]


async def test_pipelined_request_after_a_balancer_error_is_answered(lab: ProxyLab) -> None:
    async def drop_or_answer(exchange: Exchange) -> bool:
        if exchange.target == "/drop":
            return False  # close without a word
        exchange.writer.write(http_response(exchange.target.encode()))
        return True

    upstream = await lab.raw(drop_or_answer)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    client.send(get("/drop") + get("/after"))
    first = await client.response()
    second = await client.response()
    assert first.status == 502
    assert (second.status, second.body) == (200, b"/after")


async def test_client_half_close_still_gets_the_whole_response(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    client = await lab.client(lb)
    client.send(get(f"/bytes/{MIB}"))
    client.writer.write_eof()
    response = await client.response()
    assert response.status == 200
    assert response.body == payload(MIB)
    assert response.header("connection") == "close"
    assert await client.read_to_eof() == b""


async def test_stale_pooled_connection_is_retried_on_a_fresh_one(lab: ProxyLab) -> None:
    async def one_per_connection(exchange: Exchange) -> bool:
        if exchange.number > 1:
            return False  # the keep-alive race: the server closes as the next request arrives
        exchange.writer.write(http_response(exchange.target.encode()))
        return True

    upstream = await lab.raw(one_per_connection)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    assert (await client.request("/1")).body == b"/1"
    assert (await client.request("/2")).body == b"/2"
    assert lb.retries == 1
    assert lb.routes["retried"] == 1
    assert [(e.target, e.number) for e in upstream.exchanges] == [("/1", 1), ("/2", 2), ("/2", 1)]


async def test_stale_pooled_connection_with_a_request_body(lab: ProxyLab) -> None:
    async def one_per_connection(exchange: Exchange) -> bool:
        if exchange.number > 1:
            return False
        exchange.writer.write(http_response(await read_body(exchange)))
        return True

    upstream = await lab.raw(one_per_connection)
    lb = await lab.balancer({"raw": upstream.url}, read_timeout_s=0.5)
    client = await lab.client(lb)
    client.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nfirst")
    assert (await client.response()).body == b"first"
    client.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nsecond")
    response = await client.response()
    # The body went to the closed connection and is gone: a resend would be a head without its body.
    assert response.status == 502
    assert lb.retries == 0


# --------------------------------------------------------------------------- headers


HOP_BY_HOP_REQUEST = (
    "Host: shop.example\r\n"
    "Connection: Foo, keep-alive\r\n"
    "Foo: bar\r\n"
    "Keep-Alive: timeout=5\r\n"
    "TE: trailers\r\n"
    "Upgrade: websocket\r\n"
    "Proxy-Connection: keep-alive\r\n"
    "X-End-To-End: kept\r\n"
    "X-Forwarded-For: 198.51.100.9, 203.0.113.7\r\n"
    "X-Forwarded-Proto: https\r\n"
    "X-Forwarded-Host: evil.example\r\n"
)


async def test_hop_by_hop_headers_are_removed_and_forwarding_headers_replaced(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    recorder = lb.strategy = RecordingStrategy(lb.strategy)
    client = await lab.client(lb)
    seen = echoed(await client.request("/h", headers=HOP_BY_HOP_REQUEST))
    names = {name.lower() for name, _ in seen["headers"]}
    assert not names & {"connection", "foo", "keep-alive", "te", "upgrade", "proxy-connection"}
    assert header_values(seen, "X-End-To-End") == ["kept"]
    # Not a trusted proxy: the client's own forwarding headers are replaced, not believed.
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    assert header_values(seen, "X-Forwarded-Host") == ["shop.example"]
    assert recorder.client_ips == ["127.0.0.1"]


async def test_trusted_proxy_forwarded_for_is_appended_and_routes_on_the_client(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab, trusted_proxies=("127.0.0.0/8",))
    recorder = lb.strategy = RecordingStrategy(lb.strategy)
    client = await lab.client(lb)
    seen = echoed(await client.request("/h", headers=HOP_BY_HOP_REQUEST))
    assert header_values(seen, "X-Forwarded-For") == ["198.51.100.9, 203.0.113.7, 127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["https"]
    assert header_values(seen, "X-Forwarded-Host") == ["shop.example"]
    # Trusted hops are skipped from the right; the first untrusted one is the client.
    await client.request("/h", headers="Host: a\r\nX-Forwarded-For: 203.0.113.8, 127.0.0.2\r\n")
    await client.request("/h", headers="Host: a\r\n")
    assert recorder.client_ips == ["203.0.113.7", "203.0.113.8", "127.0.0.1"]


# --------------------------------------------------------------------------- failing upstreams


async def test_silent_upstream_gets_504_after_read_timeout(lab: ProxyLab) -> None:
    async def silent(exchange: Exchange) -> bool:
        await exchange.reader.read()  # until the balancer gives up and closes
        return False

    upstream = await lab.raw(silent)
    lb = await lab.balancer({"slow": upstream.url}, read_timeout_s=0.5)
    client = await lab.client(lb)
    client.send(get("/"))
    response, waited_s = await elapsed_s(client.response())
    assert response.status == 504
    assert response.header("content-type") == "text/plain; charset=utf-8"
    assert response.body == b"504 Gateway Timeout: slow did not answer within 0.5 s\n"
    assert 0.3 < waited_s < 1.5
    async with asyncio.timeout(2):
        await upstream.closed.wait()


async def test_dead_upstream_is_marked_down_and_the_request_retried(lab: ProxyLab) -> None:
    lb = await lab.balancer({"dead": f"http://127.0.0.1:{free_port()}", "live": await lab.echo("live")})
    session = await lab.session()
    async with session.get(lb.url + "/x") as response:
        assert response.status == 200
        assert (await response.json())["server"] == "live"
    assert lb.retries == 1
    assert lb.routes["retried"] == 1
    dead = lb.pool.upstreams["dead"]
    assert not dead.healthy
    assert (dead.last_error or "").startswith("connect failed")
    assert lb.pool.healthy == (lb.pool.upstreams["live"],)


async def test_all_upstreams_dead_gives_502_naming_the_last_one_tried(lab: ProxyLab) -> None:
    lb = await lab.balancer({"d1": f"http://127.0.0.1:{free_port()}", "d2": f"http://127.0.0.1:{free_port()}"})
    client = await lab.client(lb)
    first = await client.request("/")
    assert first.status == 502
    assert first.body == b"502 Bad Gateway: cannot connect to d2\n"
    assert lb.pool.healthy == ()
    # With none healthy the balancer still tries them all (UpstreamPool.candidates), one retry each time.
    second = await client.request("/")
    assert second.status == 502
    assert second.body.startswith(b"502 Bad Gateway: cannot connect to d")
    assert lb.errors == {502: 2}


async def test_no_upstream_left_gives_503(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    lb.pool.remove("echo")
    client = await lab.client(lb)
    response = await client.request("/")
    assert response.status == 503
    assert response.body == b"503 Service Unavailable: no healthy upstream accepts new clients\n"
    client.send(get("/") * 2000)  # answered from the balancer alone, still one at a time, in order
    for _ in range(2000):
        assert (await client.response()).status == 503


async def test_upstream_closing_mid_response_closes_the_client(lab: ProxyLab) -> None:
    async def truncated(exchange: Exchange) -> bool:
        exchange.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        return False

    upstream = await lab.raw(truncated)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    client.send(get("/"))
    received = await client.read_to_eof()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 100" in head
    assert body == b"0123456789"  # what arrived, then the close: never a 502 glued on


async def hang_up(exchange: Exchange) -> bool:
    """Close the connection without answering."""
    return False


async def test_upstream_closing_before_answering_gives_502(lab: ProxyLab) -> None:
    upstream = await lab.raw(hang_up)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    response = await client.request("/")
    assert response.status == 502
    assert b"closed the connection before the response was complete" in response.body
    assert lb.pool.upstreams["raw"].healthy  # it accepted the connection: not a reason to mark it down


# --------------------------------------------------------------------------- refused requests


BIG_HEAD = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 2000  # over max_head_bytes=1024
REFUSED = [
    pytest.param(BIG_HEAD + b"\r\n\r\n", 431, "head larger", id="head-too-big"),
    pytest.param(BIG_HEAD, 431, "head larger", id="head-too-big-unfinished"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1048577\r\n\r\n", 413, "body larger", id="body-too-big"
    ),
    pytest.param(b"GET /\r\nHost: a\r\n\r\n", 400, "malformed request line", id="no-version"),
    pytest.param(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed request line", id="double-space"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400, "malformed request line", id="http2-version"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "request smuggling",
        id="cl-and-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
        "conflicting Content-Length",
        id="two-content-lengths",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", 400, "Content-Length", id="cl-list"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
        "Transfer-Encoding: chunked",
        id="gzip-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "Transfer-Encoding: chunked",
        id="te-twice",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "malformed header line", id="space-before-colon"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n", 400, "malformed header line", id="obs-fold"
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\nX-B: 2\r\n\r\n", 400, "malformed header line", id="bare-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400, "exactly one Host", id="no-host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "exactly one Host", id="two-hosts"),
]


@pytest.mark.parametrize(("request_bytes", "status", "reason"), REFUSED)
async def test_unsafe_request_is_refused_and_the_connection_closed(
    lab: ProxyLab, request_bytes: bytes, status: int, reason: str
) -> None:
    upstream = await lab.raw(hang_up)
    lb = await lab.balancer({"raw": upstream.url}, max_head_bytes=1024, max_body_bytes=MIB)
    client = await lab.client(lb)
    client.send(request_bytes)
    response = await client.response()
    assert response.status == status
    assert reason.encode() in response.body
    assert response.header("connection") == "close"
    assert await client.read_to_eof() == b""
    assert lb.errors == {status: 1}
    assert upstream.exchanges == []


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="not-hex"),
        pytest.param(b"5\r\nhello!\r\n0\r\n\r\n", id="data-longer-than-size"),
        pytest.param(b"5\nhello\r\n0\r\n\r\n", id="bare-lf"),
        pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="negative"),
    ],
)
async def test_bad_chunked_request_body_is_refused(lab: ProxyLab, chunks: bytes) -> None:
    async def swallow(exchange: Exchange) -> bool:
        await exchange.reader.read()
        return False

    upstream = await lab.raw(swallow)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    client.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    response = await client.response()
    assert response.status == 400
    assert b"chunk" in response.body
    assert await client.read_to_eof() == b""
    async with asyncio.timeout(2):
        await upstream.closed.wait()  # the half-sent request is abandoned, never completed


# --------------------------------------------------------------------------- responses without a body


async def bodiless(exchange: Exchange) -> bool:
    """HEAD, 204 and 304 answers that announce a size but (rightly) send no body."""
    answers = {
        "/head": b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n",
        "/no-content": b"HTTP/1.1 204 No Content\r\n\r\n",
        "/not-modified": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 11\r\n\r\n',
    }
    exchange.writer.write(answers.get(exchange.target) or http_response(exchange.target.encode()))
    return True


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [("HEAD", "/head", 200), ("GET", "/no-content", 204), ("GET", "/not-modified", 304)],
)
async def test_bodiless_response_keeps_the_connection_usable(
    lab: ProxyLab, method: str, target: str, status: int
) -> None:
    upstream = await lab.raw(bodiless)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    first = await client.request(target, method=method)
    assert first.status == status
    after = await client.request("/after")
    assert (after.status, after.body) == (200, b"/after")
    assert len({e.peer_port for e in upstream.exchanges}) == 1


async def test_bytes_after_a_bodiless_response_never_reach_the_next_request(lab: ProxyLab) -> None:
    async def head_with_body(exchange: Exchange) -> bool:
        if exchange.target == "/head":  # a broken app server: a body after a HEAD response
            exchange.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            return True
        exchange.writer.write(http_response(exchange.target.encode()))
        return True

    upstream = await lab.raw(head_with_body)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    client.send(b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n" + get("/b") + get("/c"))
    assert (await client.response("HEAD")).status == 200
    assert (await client.response()).body == b"/b"
    assert (await client.response()).body == b"/c"


# --------------------------------------------------------------------------- Expect and HTTP/1.0


async def test_expect_100_continue(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    client = await lab.client(lb)
    client.send(b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = await client.response()
    assert interim.status == 100
    client.send(b"hello")
    final = await client.response()
    assert final.status == 200
    assert echoed(final)["body_sha256"] == sha256(b"hello")
    assert (await client.request("/next")).status == 200


async def chunked_with_trailer(exchange: Exchange) -> bool:
    """A chunked response with a trailer, after an unasked-for 100 Continue."""
    exchange.writer.write(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-App: 1\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    return True


async def test_http10_client_gets_a_decoded_chunked_response_and_a_close(lab: ProxyLab) -> None:
    upstream = await lab.raw(chunked_with_trailer)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    client.send(b"GET /old HTTP/1.0\r\n\r\n")
    received = await client.read_to_eof()
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"  # HTTP/1.0 has no 1xx: the 100 is not relayed (RFC 9110 §15.2)
    assert b"X-App: 1" in lines
    assert b"Connection: close" in lines
    assert not [ln for ln in lines if ln.lower().startswith((b"transfer-encoding", b"content-length"))]
    assert body == b"hello world"
    # An empty Host, as RFC 9112 §3.2 asks when the target has no authority; no invented `localhost`.
    assert b"Host: " in upstream.exchanges[0].head.split(b"\r\n")


async def test_http10_keep_alive_client_keeps_its_connection(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    client = await lab.client(lb)
    for target in ("/a", "/b"):
        client.send(f"GET {target} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
        response = await client.response()
        assert response.header("connection") == "keep-alive"
        assert echoed(response)["target"] == target


async def test_close_delimited_upstream_response(lab: ProxyLab) -> None:
    async def http10_upstream(exchange: Exchange) -> bool:
        exchange.writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        return False

    upstream = await lab.raw(http10_upstream)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    response = await client.request("/")
    assert response.head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.header("connection") == "close"
    assert response.body == b"until the end"  # read to EOF: the client connection closed after it


# --------------------------------------------------------------------------- client timeouts


async def test_unfinished_head_gets_408_after_the_header_timeout(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab, header_timeout_s=0.3)
    client = await lab.client(lb)
    client.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Half: ")
    response, waited_s = await elapsed_s(client.response())
    assert response.status == 408
    assert 0.15 < waited_s < 1.5
    assert await client.read_to_eof() == b""


async def test_idle_keep_alive_client_is_closed_after_the_idle_timeout(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab, idle_timeout_s=0.3)
    client = await lab.client(lb)
    assert (await client.request("/")).status == 200
    rest, waited_s = await elapsed_s(client.read_to_eof())
    assert rest == b""
    assert 0.15 < waited_s < 1.5
    assert lb.errors == {}  # closed quietly: there was no request to answer


# --------------------------------------------------------------------------- admin API


async def test_admin_status_shape(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    session = await lab.session()
    async with session.get(lb.url + "/x") as response:
        assert response.status == 200
    async with session.get(lb.admin_url + "/status") as response:
        status = await response.json()
    assert status["strategy"] == "round-robin"
    assert status["url"] == lb.url
    assert isinstance(status["uptime_s"], float)
    [server] = status["servers"]
    assert server.keys() == {
        "id", "url", "healthy", "draining", "drained", "in_flight", "requests", "idle_connections", "last_error",
        "down_reason", "last_check", "changed_at", "health",
    }  # fmt: skip
    assert server["last_check"]["ok"] is True and server["down_reason"] is None
    assert status["health"]["checks"] == "active" and status["health"]["all_down"] is False
    assert (server["id"], server["healthy"], server["requests"], server["in_flight"]) == ("echo", True, 1, 0)
    counters = status["counters"]
    assert counters["requests"] == 1
    assert counters["routes"]["new"] == 1
    assert counters["responses"] == {"200": 1}
    assert counters["lb_errors"] == {}
    assert counters["retries"] == 0
    assert status["connections"].keys() == {"clients", "upstream"}


async def test_admin_add_server(lab: ProxyLab) -> None:
    lb = await lab.balancer({"a": await lab.echo("a")})
    session = await lab.session()
    url_b = await lab.echo("b")
    async with session.post(lb.admin_url + "/servers", json={"id": "b", "url": url_b}) as response:
        assert response.status == 201
        assert (await response.json())["id"] == "b"
    async with session.post(lb.admin_url + "/servers", json={"id": "b", "url": url_b}) as response:
        assert response.status == 409
        assert "already in use" in (await response.json())["error"]
    async with session.post(lb.admin_url + "/servers", json={"id": "c", "url": "ftp://127.0.0.1:1"}) as response:
        assert response.status == 400
        assert "must start with http://" in (await response.json())["error"]
    async with session.post(lb.admin_url + "/servers", json={}) as response:
        assert response.status == 400
        assert "POST /topology/servers starts one" in (await response.json())["error"]  # the lab's own add
    async with session.post(
        lb.admin_url + "/servers", data=b"{not json", headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
        assert "not valid JSON" in (await response.json())["error"]
    served = set()
    for _ in range(4):
        async with session.get(lb.url + "/") as response:
            served.add((await response.json())["server"])
    assert served == {"a", "b"}


async def test_admin_drain_sends_no_new_clients(lab: ProxyLab) -> None:
    lb = await lab.balancer({"a": await lab.echo("a"), "b": await lab.echo("b")})
    session = await lab.session()

    async def serving() -> list[str]:
        servers = []
        for _ in range(4):
            async with session.get(lb.url + "/") as response:
                servers.append((await response.json())["server"])
        return servers

    async with session.post(lb.admin_url + "/servers/a/drain", json={}) as response:
        assert response.status == 200
        assert (await response.json())["draining"] is True
    assert await serving() == ["b"] * 4
    async with session.post(lb.admin_url + "/servers/a/drain", json={"draining": False}) as response:
        assert response.status == 200
    assert sorted(await serving()) == ["a", "a", "b", "b"]
    async with session.post(lb.admin_url + "/servers/zz/drain", json={}) as response:
        assert response.status == 404


async def test_admin_drain_all_gives_503(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    session = await lab.session()
    async with session.post(lb.admin_url + "/servers/echo/drain", json={}) as response:
        assert response.status == 200
    async with session.get(lb.url + "/") as response:
        assert response.status == 503
        assert "no healthy upstream" in await response.text()


async def test_admin_remove_server(lab: ProxyLab) -> None:
    lb = await lab.balancer({"a": await lab.echo("a"), "b": await lab.echo("b")})
    session = await lab.session()
    async with session.delete(lb.admin_url + "/servers/zz", json={}) as response:
        assert response.status == 404
        assert "known: a, b" in (await response.json())["error"]
    async with session.delete(lb.admin_url + "/servers/a", json={}) as response:
        assert response.status == 200
    assert list(lb.pool.upstreams) == ["b"]
    for _ in range(3):
        async with session.get(lb.url + "/") as response:
            assert (await response.json())["server"] == "b"


async def test_admin_switch_strategy(lab: ProxyLab) -> None:
    lb = await echo_balancer(lab)
    session = await lab.session()
    async with session.put(lb.admin_url + "/strategy", json={"strategy": "least-conn"}) as response:
        assert response.status == 200
        assert await response.json() == {"strategy": "least-conn"}
    assert lb.strategy.name == "least-conn"
    async with session.put(lb.admin_url + "/strategy", json={"strategy": "random"}) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert all(name in error for name in STRATEGY_NAMES)
    assert lb.strategy.name == "least-conn"
