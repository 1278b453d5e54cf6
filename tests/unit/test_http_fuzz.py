"""Property tests of the proxy's HTTP/1.1 framing: whatever the bytes, a refusal or a safe parse.

A reverse proxy must never disagree with the server behind it about where a request
ends (RFC 9112 §11.2, request smuggling). So for any head: either it is refused with a
4xx, or what is forwarded has exactly one unambiguous framing and no stray line breaks.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lbsession.balancer.http import ChunkedScanner, HTTPError, parse_request_head, parse_response_head
from tests.fuzzing import FUZZ_COUNTS

TOKEN = st.text(
    alphabet="!#$%&'*+-.^_`|~abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=12
)
NASTY = st.sampled_from(
    ["", " ", "\t", "\r", "\n", "\r\n", "\x00", "\x7f", "\xff", ":", ";", ",", "0", "-1", "+5", "0x10"]
)
FRAMING = st.sampled_from(
    ["Content-Length", "content-length", "Transfer-Encoding", "transfer-encoding", "Host", "Connection"]
)
VALUES = st.one_of(
    st.sampled_from(
        [
            "chunked",
            "Chunked",
            "gzip, chunked",
            "chunked, gzip",
            "identity",
            "0",
            "5",
            "005",
            "5, 5",
            "99999999999999999",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
    st.text(max_size=8),
)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mostly(good: st.SearchStrategy[str], bad: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """`good` about nine times in ten, else `bad`: mostly well-formed input, so parsing gets deep."""
    return st.integers(0, 9).flatmap(lambda n: bad if n == 0 else good)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """Heads that are mostly well formed, with framing headers and nasty bytes mixed in."""
    method = draw(
        mostly(st.sampled_from(["GET", "POST", "PUT", "HEAD"]), st.one_of(TOKEN, st.sampled_from(["G ET", ""])))
    )
    target = draw(mostly(st.sampled_from(["/", "/a?b=c", "/login"]), st.sampled_from(["*", "/\x00", "/ x", ""])))
    version = draw(
        mostly(
            st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]),
            st.sampled_from(["HTTP/2.0", "http/1.1", "HTTP/1.1 "]),
        )
    )
    lines = [f"{method} {target} {version}"]
    if draw(mostly(st.just("yes"), st.just("no"))) == "yes":
        lines.append("Host: example")
    framing = st.sampled_from([
        "Content-Length: 5", "Content-Length: 0", "content-length:7 ", "Content-Length: 6",
        "Transfer-Encoding: chunked", "transfer-encoding: Chunked", "Transfer-Encoding: gzip, chunked",
    ])  # fmt: skip
    lines += draw(st.lists(framing, max_size=3))  # often one, sometimes a duplicate or a conflicting pair
    for _ in range(draw(st.integers(0, 4))):
        name = draw(mostly(st.one_of(FRAMING, TOKEN), st.sampled_from(["Bad Name", "", "X\x00"])))
        separator = draw(mostly(st.sampled_from([":", ": ", ":\t"]), st.just(" :")))
        suffix = draw(mostly(st.sampled_from(["", " "]), NASTY))
        lines.append(name + separator + draw(VALUES) + suffix)
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


@SETTINGS
@given(request_heads())
def test_any_request_head_is_refused_with_a_4xx_or_forwarded_with_one_framing(head: bytes) -> None:
    FUZZ_COUNTS["request heads (parser)"] += 1
    try:
        req = parse_request_head(head)
    except HTTPError as exc:
        assert 400 <= exc.status < 500
        return
    out = req.out
    assert b"\r\n\r\n" not in out and b"\x00" not in out
    assert not re.search(rb"[^\r]\n|\r[^\n]", out + b"\r\n"), "a bare CR or LF would be forwarded"
    lengths = re.findall(rb"\r\ncontent-length:", out, re.I)
    codings = re.findall(rb"\r\ntransfer-encoding:[ \t]*([^\r]*)", out, re.I)
    assert len(lengths) <= 1, "more than one Content-Length forwarded"
    assert not (lengths and codings), "both Content-Length and Transfer-Encoding forwarded"
    assert all(c.strip().lower() == b"chunked" for c in codings) and len(codings) <= 1
    assert req.chunked == bool(codings)
    assert req.content_length >= 0
    assert not re.search(rb"\r\n(connection|keep-alive|upgrade|te|proxy-connection):", out, re.I)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_request_parser(head: bytes) -> None:
    FUZZ_COUNTS["random request heads (parser)"] += 1
    try:
        parse_request_head(head)
    except HTTPError as exc:
        assert exc.status in (400, 431)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_response_parser(head: bytes) -> None:
    FUZZ_COUNTS["random response heads (parser)"] += 1
    try:
        resp = parse_response_head(head)
    except HTTPError as exc:
        assert exc.status == 502
        return
    assert not re.search(rb"\r\n(connection|keep-alive|upgrade):", resp.out, re.I)


HOP_NAMES = ["Connection", "connection", "CONNECTION", "Keep-Alive", "keep-alive", "TE", "Upgrade", "Proxy-Connection"]
OTHER_NAMES = ["Server", "Date", "Content-Type", "X-Connection", "Connectionx", "ETag", "Set-Cookie"]
FIELD_VALUES = st.sampled_from(
    ["keep-alive", "keep-alive ", "close", "timeout=5", "x", "", "Connection: keep-alive", "a, b"]
)


@st.composite
def response_fields(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Valid header lines of a response, hop-by-hop ones (in any case, repeated or not) among the others."""
    names = st.sampled_from(HOP_NAMES + OTHER_NAMES)
    return draw(st.lists(st.tuples(names, FIELD_VALUES), max_size=8))


@SETTINGS
@given(response_fields())
def test_a_response_loses_exactly_its_hop_by_hop_lines_and_keeps_the_rest_in_order(fields) -> None:
    FUZZ_COUNTS["response heads with hop-by-hop lines"] += 1
    lines = [f"{name}: {value}" for name, value in fields]
    head = "\r\n".join(["HTTP/1.1 200 OK", *lines, "Content-Length: 0"]).encode()
    # The fields a Connection header names are hop-by-hop too (RFC 9110 §7.6.1); "a, b" names a and b.
    named = {t.strip().lower() for n, v in fields if n.lower() == "connection" for t in v.split(",")}
    hop = {n.lower() for n in HOP_NAMES} | (named - {"", "close", "keep-alive", "upgrade"})
    kept = [f"{n}: {v}" for n, v in fields if n.lower() not in hop]
    expected = "\r\n".join(["HTTP/1.1 200 OK", *kept, "Content-Length: 0"]).encode()
    assert parse_response_head(head).out == expected


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A valid chunked body with extensions and trailers, its payload, and bytes after it."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    encoded = b""
    for chunk in chunks:
        extension = draw(st.sampled_from([b"", b";a=b", b" ;x"]))
        encoded += b"%x%s\r\n%s\r\n" % (len(chunk), extension, chunk)
    trailer = draw(st.sampled_from([b"", b"X-Sum: 1\r\n"]))
    return encoded + b"0\r\n" + trailer + b"\r\n", b"".join(chunks)


@SETTINGS
@given(chunked_bodies(), st.binary(max_size=30), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_a_chunked_body_ends_at_the_same_byte_however_it_is_split(body, after, cuts) -> None:
    FUZZ_COUNTS["chunked bodies, split anyhow"] += 1
    encoded, payload = body
    stream = encoded + after
    scanner = ChunkedScanner(limit=1 << 20, decode=True)
    position = 0
    for cut in [*cuts, len(stream)]:
        piece = stream[position : position + cut]
        used = scanner.feed(piece)
        position += used
        if scanner.done or used < len(piece):
            break
    assert scanner.done and position == len(encoded)
    assert b"".join(scanner.decoded or []) == payload


@SETTINGS
@given(st.binary(min_size=1, max_size=200))
def test_a_corrupt_chunked_body_is_refused_never_misread(garbage: bytes) -> None:
    assume(not re.fullmatch(rb"([0-9a-fA-F]+[^\r\n]*\r\n[\s\S]*)", garbage))
    FUZZ_COUNTS["corrupt chunked bodies"] += 1
    scanner = ChunkedScanner(limit=1 << 20)
    try:
        used = scanner.feed(garbage)
    except HTTPError as exc:
        assert exc.status in (400, 413)
        return
    assert used <= len(garbage)


def test_a_connection_header_cannot_strip_the_framing() -> None:
    for named in ("transfer-encoding", "Content-Length", "host"):
        head = f"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, {named}"
        try:
            parse_request_head(head.encode())
        except HTTPError as exc:
            assert exc.status == 400 and "must not name" in exc.reason
        else:
            raise AssertionError(f"Connection: {named} was accepted")


def test_an_http10_status_line_alone_is_forwarded_whole() -> None:
    assert parse_response_head(b"HTTP/1.0 204 No Content").out == b"HTTP/1.1 204 No Content"
    assert parse_response_head(b"HTTP/1.0 204").out == b"HTTP/1.1 204"
