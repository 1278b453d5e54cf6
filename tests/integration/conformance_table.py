"""The conformance table of the proxy: exact bytes in, each case judged on what RFC 9110/9112 ask.

Shared by the test suite (tests/integration/test_proxy_conformance.py, against an
in-process balancer) and the side-by-side report (benchmarks/conformance.py, against
`lbsession lb` and HAProxy). Each case names the request a client sends, the response
a scripted raw-socket upstream answers with (often malformed), and a verdict:

- REJECT: the proxy answers the client itself (4xx for a request, 502 for a
  response) and the bad message goes no further;
- SANITISE: the message goes through, rewritten into the one reading both sides share;
- FORWARD: the message goes through unchanged.

`check_case` judges a proxy on (a) what the client got, (b) a strict re-parse of every
byte the upstream got (`strict_requests`), and (c) that no answer reaches the wrong
request: the same client's next request, and another client's, get their own. It
raises AssertionError with a message saying which check failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from tests.integration.proxy_fixtures import (
    READ_TIMEOUT_S,
    Exchange,
    RawClient,
    RawUpstream,
    Respond,
    Response,
    get,
    http_response,
    read_framed_body,
    read_response,
    strict_requests,
)

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
    # Another answer the RFCs allow as well (a report accepts either); the test suite holds lbsession
    # to the first, the one the issue chose.
    alternative: Case | None = None

    @property
    def method(self) -> str:
        return self.request.split(b" ", 1)[0].decode()


def bad_request(id: str, request: bytes, why: str = "") -> Case:
    """A request the balancer must refuse with 400 and close on."""
    return Case(id, request, REJECT, status=400, closes=True)


def cl_and_te(id: str, headers: bytes) -> Case:
    """A request with both Content-Length and Transfer-Encoding: refused here (and by the issue's choice).

    RFC 9112 §6.1 also allows the other answer: read it by Transfer-Encoding, forward it without
    Content-Length, and close the connection after the response.
    """
    request = post(headers, b"0\r\n\r\n")
    alternative = Case(id, request, SANITISE, body=b"ok", closes=True, upstream_lacks=(b"content-length",))
    return dataclasses.replace(bad_request(id, request), alternative=alternative)


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
        alternative=bad_request(  # never forward a disagreement; refusing it is allowed too
            "5-absolute-form-other-host", b"GET http://other.example/whoami HTTP/1.1\r\nHost: t\r\n\r\n"
        ),
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
    dataclasses.replace(
        bad_request("9-bare-lf-only", b"GET / HTTP/1.1\nHost: t\n\n"),
        # RFC 9112 §2.2: a recipient MAY recognise a single LF as a line terminator.
        alternative=Case("9-bare-lf-only", b"GET / HTTP/1.1\nHost: t\n\n", SANITISE, body=b"ok"),
    ),
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
    cl_and_te("cl-te", b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n"),
    cl_and_te("te-cl", b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n"),
    bad_request("te-te-second-bogus", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", b"0\r\n\r\n")),
    bad_request("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n")),
    bad_request("te-chunked-list", post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n")),
    bad_request("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    dataclasses.replace(
        bad_request("te-obs-fold", post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n")),
        # RFC 9112 §5.2: reject it, or replace each obs-fold with a space before reading or forwarding.
        alternative=Case(
            "te-obs-fold",
            post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"),
            SANITISE,
            body=b"ok",
            upstream_has=(b"transfer-encoding: chunked",),
        ),
    ),
    bad_request("te-vertical-tab", post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n")),
    dataclasses.replace(
        bad_request("te-on-http10", b"POST /case HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        # RFC 9112 §6.1: treat the framing as faulty and close "after processing the message".
        alternative=Case(
            "te-on-http10",
            b"POST /case HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            SANITISE,
            body=b"ok",
            closes=True,
        ),
    ),
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


ALL_CASES = CASES + EXTRA_CASES


def scripted(case: Case) -> Respond:
    """How the upstream answers: the case's request with the case's bytes, probes with their own target."""

    async def respond(exchange: Exchange) -> bool:
        if exchange.target.startswith(PROBE):
            exchange.writer.write(http_response(exchange.target.encode()))
            return True
        await read_framed_body(exchange)
        exchange.writer.write(case.response)
        return not case.upstream_closes

    return respond


async def parse_response(raw: bytes, method: str) -> Response:
    """The first response in `raw` (what a client read until the proxy closed)."""
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    try:
        return await read_response(reader, method)
    except (asyncio.IncompleteReadError, ValueError, IndexError):
        raise AssertionError(f"the client got no whole response before the close: {raw[:60]!r}") from None


def lbsession_answer(body: bytes, status: int) -> bool:
    """Whether `body` is lbsession's own error answer: it starts with its status (`502 cannot connect...`)."""
    return body.startswith(f"{status} ".encode())


async def check_case(
    case: Case,
    port: int,
    upstream: RawUpstream,
    *,
    own_answer: Callable[[bytes, int], bool] = lbsession_answer,
    forwarded_headers: bool = True,
    statuses: list[int] | None = None,
) -> None:
    """Send `case` through the proxy on 127.0.0.1:`port`, whose only upstream is `upstream` (answering `scripted`).

    AssertionError says which check failed. `own_answer` recognises the proxy's own error
    answers; without `forwarded_headers`, what a case expects of X-Forwarded-* (lbsession's own
    additions, which no RFC asks for) is not checked. `statuses` gets the status of the
    client's answer, for a report, before it is judged.
    """
    clients: list[RawClient] = []

    async def connect() -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        clients.append(RawClient(reader, writer))
        return clients[-1]

    try:
        other = await connect()  # another client, already served: it may use pooled connections
        warm = await other.request(PROBE + "/warm")
        assert warm.body == PROBE.encode() + b"/warm", f"the warm-up request got {warm.status} {warm.body[:40]!r}"
        client = await connect()
        client.send(case.request)
        await _client_side(case, client, own_answer, [] if statuses is None else statuses)
        _upstream_side(case, upstream, forwarded_headers)
        # (c) nobody gets an answer that is not theirs: the same client carries on in step, or was closed
        if case.closes:
            assert client.reader.at_eof(), "the connection stayed open"
        else:
            same = await client.request(PROBE + "/same")
            assert same.body == PROBE.encode() + b"/same", f"the client's next request got {same.body[:40]!r}"
        got = (await other.request(PROBE + "/other")).body
        assert got == PROBE.encode() + b"/other", f"another client's request got {got[:40]!r}"
        got = (await (await connect()).request(PROBE + "/new")).body
        assert got == PROBE.encode() + b"/new", f"a new client's request got {got[:40]!r}"
    finally:
        for opened in clients:
            await opened.close()


async def _client_side(
    case: Case, client: RawClient, own_answer: Callable[[bytes, int], bool], statuses: list[int]
) -> None:
    """(a) what the client got. Field names compare case-insensitively (RFC 9110 §5.1), values exactly."""
    for status in case.interim:
        got = (await client.response()).status
        assert got == status, f"the client got {got} where a {status} should come first"
    closed = False
    if case.closes:
        raw, closed = await _read_until_close(client.reader)
        response = await parse_response(raw, case.method)
    else:
        response = await client.response(case.method)
    statuses.append(response.status)
    assert response.status == case.status, f"the client got {response.status}, not {case.status}"
    if case.verdict == REJECT:
        assert own_answer(response.body, case.status), f"the {case.status} is not the proxy's own answer"
    if case.body is not None:
        assert response.body == case.body, f"the client got the body {response.body[:40]!r}, not {case.body!r}"
    fields = [_field(line) for line in response.head.split(b"\r\n")[1:]]
    for line in case.client_has:
        assert _field(line) in fields, f"the client's head lacks {line.decode()!r}"
    names = [name for name, _ in fields]
    extra = sorted(set(names) & set(case.client_lacks))
    assert not extra, f"the client's head has {b', '.join(extra).decode()}"
    framing = [n.decode() for n in names if n in (b"content-length", b"transfer-encoding")]
    assert len(framing) <= 1, f"the client got {' and '.join(framing)}: one framing, once"
    if case.verdict == FORWARD:
        final = case.response[case.response.rfind(b"HTTP/1.") :]  # after any 1xx
        sent = final.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
        changed = [line for line in sent if _field(line) not in fields]
        assert not changed, f"forwarded header lines were changed: {changed!r}"
    assert closed or not case.closes, f"the connection stayed open {READ_TIMEOUT_S:g} s after the answer"


def _field(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.lower(), value.strip()


async def _read_until_close(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Everything until the proxy closes, and True; or what came within the bound, and False."""
    data = bytearray()
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        return bytes(data), False
    return bytes(data), True


def _upstream_side(case: Case, upstream: RawUpstream, forwarded_headers: bool) -> None:
    """(b) a strict re-parse of everything the upstream got."""
    refused = case.verdict == REJECT and case.status < 500
    try:
        requests = [r for wire in upstream.requests_wire() for r in strict_requests(wire, cut_ok=refused)]
    except AssertionError as exc:
        raise AssertionError(f"the upstream got a request a strict server refuses: {exc}") from None
    cases = [r for r in requests if not r.target.startswith(PROBE.encode())]
    if refused:  # at most a head whose body then proved bad, and the connection abandoned
        assert [r for r in cases if r.complete] == [], "a refused request reached the upstream"
        return
    assert len(cases) == 1, f"the request reached the upstream {len(cases)} times, not once"
    [seen] = cases
    if case.target is not None:
        assert seen.target == case.target, f"the upstream got the target {seen.target!r}, not {case.target!r}"
    for expected in case.upstream_has:
        name, _, value = expected.partition(b": ")
        if forwarded_headers or not name.startswith(b"x-forwarded-"):
            got = seen.values(name)
            assert got == [value], f"the upstream got {name.decode()}: {got!r}, not {value!r}"
    lacks = (
        set(case.upstream_lacks) if forwarded_headers else {n for n in case.upstream_lacks if b"x-forwarded" not in n}
    )
    extra = sorted({n for n, _ in seen.headers} & lacks)
    assert not extra, f"the upstream got {b', '.join(extra).decode()}"
