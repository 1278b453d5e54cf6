"""HTTP/1.1 conformance of the proxy: exact bytes in, each case judged on what RFC 9110/9112 ask.

A real balancer stands in front of a scripted raw-socket upstream that records every
byte it receives. Each case of the table names the request a client sends, the
response the upstream answers with (often malformed), and a verdict:

- REJECT: the balancer answers the client itself (4xx for a request, 502 for a
  response) and the bad message goes no further;
- SANITISE: the message goes through, rewritten into the one reading both sides share;
- FORWARD: the message goes through unchanged.

Every case is judged on (a) what the client got, (b) a strict re-parse of every byte
the upstream got (`strict_requests`), and (c) that no answer reaches the wrong
request: the same client's next request, and another client's, get their own.
The scenarios that need two clients or a warm pool (late bytes after a bodiless
response, retries) are tests of their own below the table.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.integration.proxy_fixtures import (
    Exchange,
    ProxyLab,
    RawUpstream,
    Response,
    get,
    http_response,
    read_framed_body,
    read_response,
    strict_requests,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

REJECT, SANITISE, FORWARD = "reject", "sanitise", "forward"
OK = http_response(b"ok")
CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"
PROBE = "/probe"  # requests the upstream answers with their own target, to check (c)


@dataclass(frozen=True)
class Case:
    """One row of the table: the bytes on both sides and what must come of them."""

    id: str
    request: bytes
    verdict: str
    response: bytes = OK  # the upstream's answer to the case's request
    status: int = 200  # what the client must get
    body: bytes | None = None  # the decoded body the client must get
    client_has: tuple[bytes, ...] = ()  # header lines the client's head must contain
    client_lacks: tuple[bytes, ...] = ()  # header names (lower-case) it must not contain
    upstream_has: tuple[bytes, ...] = ()  # "name: value" (lower-case name) the upstream must have got
    upstream_lacks: tuple[bytes, ...] = ()  # header names (lower-case) the upstream must not have got
    target: bytes | None = None  # the target the upstream must have got
    interim: tuple[int, ...] = ()  # 1xx responses the client must get first
    closes: bool = False  # the balancer must close the client connection after its answer
    upstream_closes: bool = False  # the upstream closes after its answer (a close-delimited body)
    limits: tuple[tuple[str, int], ...] = ()

    @property
    def method(self) -> str:
        return self.request.split(b" ", 1)[0].decode()


def bad_request(id: str, request: bytes, why: str = "") -> Case:
    """A request the balancer must refuse with 400 and close on."""
    return Case(id, request, REJECT, status=400, closes=True)


def bad_response(id: str, response: bytes, request: bytes = get("/case")) -> Case:
    """A response the balancer must not relay: the client gets a 502 instead."""
    return Case(id, request, REJECT, response=response, status=502)


def post(headers: bytes, body: bytes) -> bytes:
    """A POST /case with `headers` (CRLF-ended lines) and `body` as they are."""
    return b"POST /case HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n" + body


def chunked_post(body: bytes, extra: bytes = b"") -> bytes:
    """A chunked POST with `body` as its (raw) chunked body."""
    return b"POST /case HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n" + extra + b"\r\n" + body


BIG_RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 40_000 + b"\r\nContent-Length: 2\r\n\r\nok"

CASES = [
    # 2. Content-Length with Transfer-Encoding: Transfer-Encoding wins, Content-Length goes (RFC 9112 §6.3 rule 3).
    Case(
        "2-cl-and-chunked-response",
        get("/case"),
        SANITISE,
        response=b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO,
        body=b"hello",
        client_has=(b"Transfer-Encoding: chunked",),
        client_lacks=(b"content-length",),
    ),
    Case(
        "2-cl-and-chunked-response-to-http10",
        b"GET /case HTTP/1.0\r\nHost: t\r\n\r\n",
        SANITISE,
        response=b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO,
        body=b"hello",  # not "hel": the Content-Length does not survive the decoding
        client_lacks=(b"content-length", b"transfer-encoding"),
        closes=True,
    ),
    Case(
        "2-cl-and-identity-response",
        get("/case"),
        SANITISE,
        response=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabcdef",
        body=b"abcdef",  # not chunked as the final coding: delimited by close (RFC 9112 §6.3 rule 4)
        client_lacks=(b"content-length",),
        closes=True,
        upstream_closes=True,
    ),
    # 4. HTTP/1.0 without a single header line: not keep-alive (RFC 9112 §9.3).
    Case(
        "4-http10-no-header-lines",
        b"GET / HTTP/1.0\r\n\r\n",
        SANITISE,
        body=b"ok",
        client_has=(b"Connection: close",),
        closes=True,
    ),
    # 5. The absolute-form's authority wins over Host (RFC 9112 §3.2.2); the origin server gets the origin-form.
    Case(
        "5-absolute-form-other-host",
        b"GET http://other.example/whoami HTTP/1.1\r\nHost: t\r\n\r\n",
        SANITISE,
        body=b"ok",
        target=b"/whoami",
        upstream_has=(b"host: other.example", b"x-forwarded-host: other.example"),
    ),
    Case(
        "5-absolute-form-empty-path",
        b"GET http://t:8080?q=1 HTTP/1.1\r\nHost: t:8080\r\n\r\n",
        SANITISE,
        body=b"ok",
        target=b"/?q=1",
        upstream_has=(b"host: t:8080", b"x-forwarded-host: t:8080"),
    ),
    bad_request("5-absolute-form-userinfo", b"GET http://user@t/ HTTP/1.1\r\nHost: t\r\n\r\n"),
    bad_request("5-absolute-form-other-scheme", b"GET ftp://t/ HTTP/1.1\r\nHost: t\r\n\r\n"),
    # 6. Chunked as the final coding means chunked framing (RFC 9112 §6.3 rule 4), whatever comes before it.
    Case(
        "6-gzip-chunked-response",
        get("/case"),
        FORWARD,
        response=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + CHUNKED_HELLO,
        body=b"hello",
        client_has=(b"Transfer-Encoding: gzip, chunked",),
    ),
    bad_response(
        "6-gzip-chunked-response-to-http10",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + CHUNKED_HELLO,
        request=b"GET /case HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
    ),
    bad_response(
        "6-chunked-twice",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    # 7. The response-head limit holds for a head that arrives whole.
    Case(
        "7-response-head-over-limit-in-one-write",
        get("/case"),
        REJECT,
        response=BIG_RESPONSE_HEAD,
        status=502,
        limits=(("max_head_bytes", 32768),),
    ),
    # 8. A chunk-size line that is not `hex *(BWS ; ext)` is refused, on either side (RFC 9112 §7.1.1).
    bad_response(
        "8-chunk-ext-with-bare-cr", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n"
    ),
    bad_response(
        "8-chunk-size-trailing-space", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n"
    ),
    bad_request("8-request-chunk-size-trailing-space", chunked_post(b"5 \r\nhello\r\n0\r\n\r\n")),
    bad_request("8-request-chunk-ext-with-bare-cr", chunked_post(b"5;a\rb\r\nhello\r\n0\r\n\r\n")),
    Case(
        "8-chunk-extensions-pass",
        get("/case"),
        FORWARD,
        response=b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 ; a = "b c"\r\nhello\r\n0\r\n\r\n',
        body=b"hello",
    ),
    # 9. Smaller ones.
    bad_request("9-bare-lf-only", b"GET / HTTP/1.1\nHost: t\n\n"),
    bad_request("9-authority-form-outside-connect", b"GET t:80 HTTP/1.1\r\nHost: t\r\n\r\n"),
    bad_request("9-asterisk-form-outside-options", b"GET * HTTP/1.1\r\nHost: t\r\n\r\n"),
    Case(
        "9-http10-without-host",
        b"GET /case HTTP/1.0\r\nUser-Agent: nc\r\n\r\n",
        SANITISE,
        body=b"ok",
        upstream_has=(b"host: ",),  # the empty value RFC 9112 §3.2 asks for, not an invented name
        upstream_lacks=(b"x-forwarded-host",),
        closes=True,
    ),
    bad_request("9-host-with-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
    bad_request("9-host-with-path", b"GET / HTTP/1.1\r\nHost: t/evil\r\n\r\n"),
    bad_request("9-host-with-userinfo", b"GET / HTTP/1.1\r\nHost: user@t\r\n\r\n"),
    Case(
        "9-trailer-request",
        chunked_post(b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n", extra=b"Trailer: X-Sum\r\n"),
        FORWARD,
        body=b"ok",
        upstream_has=(b"trailer: X-Sum",),
    ),
    Case(
        "9-trailer-response",
        get("/case"),
        FORWARD,
        response=b"HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
        body=b"hello",
        client_has=(b"Trailer: X-Sum",),
    ),
]


EXTRA_CASES = [
    # Request smuggling: CL.TE, TE.CL and TE.TE, each refused before anything reaches the upstream.
    bad_request("cl-te", post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")),
    bad_request("te-cl", post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"0\r\n\r\n")),
    bad_request("te-te-second-bogus", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", b"0\r\n\r\n")),
    bad_request("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n")),
    bad_request("te-chunked-list", post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n")),
    bad_request("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    bad_request("te-obs-fold", post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n")),
    bad_request("te-vertical-tab", post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n")),
    bad_request("te-on-http10", b"POST /case HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    Case("te-tab-and-case", post(b"Transfer-Encoding:\tChunked \r\n", CHUNKED_HELLO), SANITISE, body=b"ok"),
    # Content-Length: identical repeats folded into one (RFC 9110 §8.6), anything else refused.
    Case(
        "cl-repeated",
        post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
        SANITISE,
        body=b"ok",
        upstream_has=(b"content-length: 5",),
    ),
    bad_request("cl-differing", post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!")),
    bad_request("cl-plus-sign", post(b"Content-Length: +5\r\n", b"hello")),
    bad_request("cl-hex", post(b"Content-Length: 0x5\r\n", b"hello")),
    Case(
        "cl-repeated-response",
        get("/case"),
        SANITISE,
        response=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        body=b"ok",
    ),
    bad_response("cl-differing-response", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!"),
    bad_response("cl-negative-response", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
    # 1xx before the final response: relayed to an HTTP/1.1 client (RFC 9110 §15.2).
    Case(
        "100-before-final",
        get("/case"),
        FORWARD,
        response=b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
        interim=(100,),
        body=b"ok",
    ),
    Case(
        "103-early-hints",
        get("/case"),
        FORWARD,
        response=b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + OK,
        interim=(103,),
        body=b"ok",
    ),
    bad_response("101-unasked", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
    # Upgrade (RFC 9110 §7.8): tunnelled only when Connection names it, on HTTP/1.1, without a body
    # (tests/integration/test_tunnels.py follows a real switch); otherwise a hop-by-hop header like any other.
    bad_request("upgrade-with-body", post(b"Connection: Upgrade\r\nUpgrade: ws\r\nContent-Length: 2\r\n", b"hi")),
    Case(
        "upgrade-not-in-connection",
        get("/case", extra="Upgrade: websocket\r\n"),
        SANITISE,
        body=b"ok",
        upstream_lacks=(b"upgrade",),
    ),
    Case(
        "upgrade-on-http10",
        b"GET /case HTTP/1.0\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        SANITISE,
        body=b"ok",
        upstream_lacks=(b"upgrade",),
        closes=True,
    ),
    # Fields a response's Connection header names are hop-by-hop (RFC 9110 §7.6.1): never relayed.
    Case(
        "response-connection-names-a-field",
        get("/case"),
        SANITISE,
        response=b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-End: 2\r\n"
        b"Content-Length: 2\r\n\r\nok",
        body=b"ok",
        client_has=(b"X-End: 2",),
        client_lacks=(b"x-hop", b"connection"),
    ),
    bad_response(
        "response-connection-names-the-framing",
        b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok",
    ),
    # Bodiless responses with a stray body: the client gets the head alone, the stray bytes nobody.
    Case("204-stray-body", get("/case"), SANITISE, response=b"HTTP/1.1 204 No Content\r\n\r\nstray", status=204),
    Case(
        "304-stray-body",
        get("/case"),
        SANITISE,
        response=b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nstray",
        status=304,
        client_has=(b"Content-Length: 5",),
    ),
    Case(
        "head-stray-body",
        b"HEAD /case HTTP/1.1\r\nHost: t\r\n\r\n",
        SANITISE,
        response=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray",
        body=b"",
        client_has=(b"Content-Length: 5",),
    ),
]


@pytest.fixture
async def lab() -> AsyncIterator[ProxyLab]:
    async with contextlib.AsyncExitStack() as stack:
        yield ProxyLab(stack)


def scripted(case: Case) -> RawUpstream:
    """An upstream answering the case's request with the case's bytes, and probes with their target."""

    async def respond(exchange: Exchange) -> bool:
        if exchange.target.startswith(PROBE):
            exchange.writer.write(http_response(exchange.target.encode()))
            return True
        await read_framed_body(exchange)
        exchange.writer.write(case.response)
        return not case.upstream_closes

    return RawUpstream(respond)


async def parse_response(raw: bytes, method: str) -> Response:
    """The first response in `raw` (what a client read until the balancer closed)."""
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return await read_response(reader, method)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES + EXTRA_CASES])
async def test_conformance(lab: ProxyLab, case: Case) -> None:
    upstream = scripted(case)
    await upstream.start()
    lab._stack.push_async_callback(upstream.stop)
    lb = await lab.balancer({"raw": upstream.url}, **dict(case.limits))
    other = await lab.client(lb)  # another client, already served: it may use pooled connections
    assert (await other.request(PROBE + "/warm")).body == PROBE.encode() + b"/warm"
    client = await lab.client(lb)
    client.send(case.request)

    # (a) what the client got
    for status in case.interim:
        assert (await client.response()).status == status
    if case.closes:
        response = await parse_response(await client.read_to_eof(), case.method)
    else:
        response = await client.response(case.method)
    assert response.status == case.status, response.head
    if case.verdict == REJECT:
        assert response.body.startswith(f"{case.status} ".encode()), "the balancer's own answer"
    if case.body is not None:
        assert response.body == case.body
    lines = response.head.split(b"\r\n")[1:]
    for line in case.client_has:
        assert line in lines, response.head
    names = [line.partition(b":")[0].lower() for line in lines]
    assert not set(names) & set(case.client_lacks), response.head
    framing = [n for n in names if n in (b"content-length", b"transfer-encoding")]
    assert len(framing) <= 1, "the client must get one framing, once"
    if case.verdict == FORWARD:
        final = case.response[case.response.rfind(b"HTTP/1.") :]  # after any 1xx
        scripted_head = final.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
        assert all(line in lines for line in scripted_head), "a forwarded header was changed"

    # (b) a strict re-parse of everything the upstream got
    refused = case.verdict == REJECT and case.status < 500
    requests = [r for wire in upstream.requests_wire() for r in strict_requests(wire, cut_ok=refused)]
    cases = [r for r in requests if not r.target.startswith(PROBE.encode())]
    if refused:  # at most a head whose body then proved bad, and the connection abandoned
        assert [r for r in cases if r.complete] == [], "a refused request reached the upstream"
    else:
        assert len(cases) == 1, "the request reached the upstream once"
        [seen] = cases
        if case.target is not None:
            assert seen.target == case.target
        for expected in case.upstream_has:
            name, _, value = expected.partition(b": ")
            assert seen.values(name) == [value], seen.headers
        assert not {n for n, _ in seen.headers} & set(case.upstream_lacks), seen.headers

    # (c) nobody gets an answer that is not theirs: the same client carries on in step, or was closed
    if case.closes:
        assert client.reader.at_eof()
    else:
        assert (await client.request(PROBE + "/same")).body == PROBE.encode() + b"/same"
    assert (await other.request(PROBE + "/other")).body == PROBE.encode() + b"/other"
    assert (await (await lab.client(lb)).request(PROBE + "/new")).body == PROBE.encode() + b"/new"


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
