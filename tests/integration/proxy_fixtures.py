"""What the proxy tests stand on: upstreams started in-process, a raw HTTP client, and their teardown.

- `echo_app`: a real aiohttp server that answers every request with what it
  received (method, target, headers in order, body digest, the balancer's
  source port), so a test reads what the proxy forwarded from the response.
- `RawUpstream`: an asyncio server whose answers a test writes byte by byte,
  for the cases aiohttp will not produce (trailers, early close, silence, bodies
  after a HEAD response, HTTP/1.0 close-delimited bodies). It records every byte
  each connection received, and `strict_requests` re-parses them as a strict
  origin server would.
- `RawClient` and `read_response`: one TCP connection to the balancer and a
  minimal response reader, for pipelining, malformed requests and half-close.
- `ProxyLab`: starts all of the above on port 0 and stops each one through an
  AsyncExitStack, so they stop even when the test fails.

Every read is bounded by `asyncio.timeout`; nothing waits by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from lbsession.balancer.balancer import LoadBalancer
from lbsession.config import BalancerConfig, HealthConfig, LimitsConfig, UpstreamConfig

READ_TIMEOUT_S = 5.0  # a bound on every wait; a passing test never comes near it
MIB = 1024 * 1024
HEALTHZ_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def payload(size: int) -> bytes:
    """`size` reproducible pseudo-random bytes: no repeating pattern to hide a lost or doubled block."""
    return random.Random(size).randbytes(size)


def sha256(data: bytes) -> str:
    """The hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def free_port() -> int:
    """A local port with nothing listening on it (bound, read back, closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_response(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    """A complete HTTP/1.1 response with a Content-Length body; `headers` are extra CRLF-ended lines."""
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


# --------------------------------------------------------------------------- the aiohttp echo upstream


def echo_app(server_id: str) -> web.Application:
    """An app server that reports what it received; `/bytes/{n}` sends `payload(n)` instead."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def send_bytes(request: web.Request) -> web.Response:
        return web.Response(body=payload(int(request.match_info["n"])), content_type="application/octet-stream")

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return web.json_response(
            {
                "server": server_id,
                "method": request.method,
                "target": request.path_qs,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
                "body_len": len(body),
                "body_sha256": sha256(body),
                "peer_port": peer[1] if peer else None,
            }
        )

    app = web.Application(client_max_size=64 * MIB)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/bytes/{n}", send_bytes)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def header_values(echoed: Mapping[str, Any], name: str) -> list[str]:
    """Every value of header `name` (case-insensitive) in an echo response, in order."""
    return [v for k, v in echoed["headers"] if k.lower() == name.lower()]


# --------------------------------------------------------------------------- the raw upstream


@dataclass
class Exchange:
    """One request a RawUpstream read: its head, and the streams to answer it on."""

    head: bytes  # request line and headers, without the blank line
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    number: int  # 1 for the first request on its connection
    peer_port: int

    @property
    def target(self) -> str:
        """The request target, e.g. `/a?b`."""
        return self.head.split(b" ", 2)[1].decode()


Respond = Callable[[Exchange], Awaitable[bool]]  # answer one request; True to read another on the connection


@dataclass
class RawUpstream:
    """An HTTP/1.1 upstream whose bytes the test writes itself; `/healthz` is answered for it."""

    respond: Respond
    exchanges: list[Exchange] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set when a request's connection ends
    wire: dict[int, bytearray] = field(default_factory=dict)  # every byte received, by the balancer's port
    ended: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # done when that connection ends
    url: str = ""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> str:
        """Listen on a free port; return the upstream URL."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        """Stop listening and end every connection still open."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()  # wakes a handler waiting on its reader with EOF
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        port = writer.get_extra_info("peername")[1]
        received = self.wire[port] = bytearray()
        ended = self.ended[port] = asyncio.get_running_loop().create_future()
        feed = reader.feed_data  # a tap: this runs before the transport delivers its first byte

        def record(data: bytes) -> None:
            received.extend(data)
            feed(data)

        reader.feed_data = record  # type: ignore[method-assign]
        try:
            if await self._serve_requests(reader, writer):
                self.closed.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.set()  # the balancer (or stop()) closed the connection mid-request
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._writers.discard(writer)
            self._tasks.discard(task)
            ended.set_result(None)

    def requests_wire(self) -> list[bytes]:
        """What each connection that carried a request (not just a health check) received."""
        return [bytes(data) for data in self.wire.values() if data and not data.startswith(b"GET /healthz ")]

    async def _serve_requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer requests until `respond` says stop or the peer closes; True if any was not /healthz."""
        for number in range(1, 1000):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return number > 1
            if head.startswith(b"GET /healthz "):
                writer.write(HEALTHZ_OK)
                return False
            exchange = Exchange(head[:-4], reader, writer, number, writer.get_extra_info("peername")[1])
            self.exchanges.append(exchange)
            if not await self.respond(exchange):
                return True
            await writer.drain()
        return True


async def read_body(exchange: Exchange) -> bytes:
    """The Content-Length body of the request in `exchange`."""
    for line in exchange.head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return await exchange.reader.readexactly(int(value))
    return b""


async def read_framed_body(exchange: Exchange) -> bytes:
    """The request body in `exchange` as it came, by Content-Length or chunked (trailers included)."""
    if re.search(rb"\r\ntransfer-encoding:[ \t]*chunked", exchange.head, re.I):
        raw, _ = await _read_chunked(exchange.reader)
        return raw
    return await read_body(exchange)


# --------------------------------------------------------------------------- a strict re-parse

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_STRICT_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) (/[\x21-\x7e]*|\*) HTTP/1\.1")
_VCHARS = rb"[\x21-\x7e\x80-\xff]+"
_STRICT_FIELD = re.compile(rb"(" + _TCHAR + rb"+):[ \t]*((?:" + _VCHARS + rb"(?:[ \t]+" + _VCHARS + rb")*)?)[ \t]*")
_STRICT_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]+)?")
_STRICT_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;" + _TCHAR + rb"+(?:=" + _TCHAR + rb"+)?)*\r\n")
_NEVER_FORWARDED = {b"connection", b"keep-alive", b"proxy-connection", b"upgrade", b"te"}


@dataclass
class StrictRequest:
    """One request as a strict HTTP/1.1 origin server read it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # (lower-case name, value)
    body: bytes  # as on the wire (chunk framing included)
    complete: bool = True  # False: the connection ended inside this request's body

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header `name` (lower-case)."""
        return [v for n, v in self.headers if n == name]


class _Cut(Exception):
    """The bytes ended inside a body."""


def strict_requests(wire: bytes, cut_ok: bool = False) -> list[StrictRequest]:
    """Parse `wire` as a strict origin server would, to the last byte; AssertionError at the first doubt.

    Origin-form (or `*`) targets, HTTP/1.1, CRLF lines, exactly one valid Host, no hop-by-hop
    header, and one unambiguous framing per request: what a balancer must send whatever it got.
    With `cut_ok`, the last request may end inside its body (the balancer abandoned it): it is
    returned with `complete` False.
    """
    requests, pos = [], 0
    while pos < len(wire):
        end = wire.find(b"\r\n\r\n", pos)
        assert end >= 0, f"an unfinished head: {wire[pos:]!r}"
        line, *lines = wire[pos:end].split(b"\r\n")
        match = _STRICT_REQUEST_LINE.fullmatch(line)
        assert match is not None, f"request line {line!r}"
        fields = [_STRICT_FIELD.fullmatch(field_line) for field_line in lines]
        assert all(fields), f"a header line that is not name: value in {lines!r}"
        request = StrictRequest(
            match.group(1), match.group(2), [(f.group(1).lower(), f.group(2)) for f in fields if f], b""
        )
        hosts, lengths, codings = (request.values(n) for n in (b"host", b"content-length", b"transfer-encoding"))
        assert len(hosts) == 1 and _STRICT_HOST.fullmatch(hosts[0]), f"Host {hosts!r}"
        assert not (lengths and codings), "both Content-Length and Transfer-Encoding"
        assert len(lengths) <= 1 and all(v.isdigit() for v in lengths), f"Content-Length {lengths!r}"
        assert [c.lower() for c in codings] in ([], [b"chunked"]), f"Transfer-Encoding {codings!r}"
        assert not _NEVER_FORWARDED & {n for n, _ in request.headers}, "a hop-by-hop header was forwarded"
        pos = end + 4
        requests.append(request)
        try:
            if codings:
                request.body, pos = _strict_chunked(wire, pos)
            else:
                size = int(lengths[0]) if lengths else 0
                if pos + size > len(wire):
                    raise _Cut
                request.body, pos = wire[pos : pos + size], pos + size
        except _Cut:
            assert cut_ok, "the bytes ended inside a body"
            request.complete = False
            break
    return requests


def _strict_chunked(wire: bytes, pos: int) -> tuple[bytes, int]:
    start = pos
    while True:
        match = _STRICT_CHUNK.match(wire, pos)
        if match is None and wire.find(b"\r\n", pos) < 0:
            raise _Cut
        assert match is not None, f"chunk size line {wire[pos : pos + 40]!r}"
        size = int(match.group(1), 16)
        pos = match.end()
        if not size:
            break
        if pos + size + 2 > len(wire):
            raise _Cut
        assert wire[pos + size : pos + size + 2] == b"\r\n", "chunk data not followed by CRLF"
        pos += size + 2
    while True:  # the trailer section, up to its blank line
        end = wire.find(b"\r\n", pos)
        if end < 0:
            raise _Cut
        line, pos = wire[pos:end], end + 2
        if not line:
            return wire[start:pos], pos
        assert _STRICT_FIELD.fullmatch(line), f"trailer line {line!r}"


# --------------------------------------------------------------------------- the raw client


@dataclass
class Response:
    """A response as a RawClient read it."""

    status: int
    head: bytes  # status line and headers as received, without the blank line
    headers: list[tuple[str, str]]  # (lower-case name, value), in order
    body: bytes  # decoded
    raw_body: bytes  # as on the wire, chunk framing and trailers included

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lower-case), or None."""
        return next((v for k, v in self.headers if k == name), None)


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> Response:
    """Read one response (a 1xx included) framed as RFC 9112 §6.3 says, from `reader`."""
    head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
    status_line, *lines = head.split(b"\r\n")
    status = int(status_line.split(b" ")[1])
    headers = [
        (n.strip().lower().decode(), v.strip().decode("latin-1")) for n, _, v in (ln.partition(b":") for ln in lines)
    ]
    response = Response(status, head, headers, b"", b"")
    if method == "HEAD" or status < 200 or status in (204, 304):
        return response
    if (response.header("transfer-encoding") or "").rpartition(",")[2].strip().lower() == "chunked":  # the final coding
        response.raw_body, response.body = await _read_chunked(reader)
    elif response.header("content-length") is not None:
        response.body = response.raw_body = await reader.readexactly(int(response.header("content-length") or 0))
    else:
        response.body = response.raw_body = await reader.read()  # delimited by close
    return response


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    raw, decoded = [], []
    while True:
        line = await reader.readuntil(b"\r\n")
        raw.append(line)
        size = int(line.split(b";")[0], 16)
        if not size:
            break
        data = await reader.readexactly(size + 2)
        raw.append(data)
        decoded.append(data[:-2])
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":  # trailer section
        raw.append(line)
    raw.append(line)
    return b"".join(raw), b"".join(decoded)


class RawClient:
    """One TCP connection to the balancer, written and read byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        """Write `data` as it is."""
        self.writer.write(data)

    async def response(self, method: str = "GET") -> Response:
        """The next response on the connection."""
        async with asyncio.timeout(READ_TIMEOUT_S):
            return await read_response(self.reader, method)

    async def request(self, target: str = "/", method: str = "GET", headers: str = "Host: lb.test\r\n") -> Response:
        """Send a body-less HTTP/1.1 request and read its response."""
        self.send(f"{method} {target} HTTP/1.1\r\n{headers}\r\n".encode())
        return await self.response(method)

    async def read_to_eof(self) -> bytes:
        """Everything until the balancer closes the connection."""
        async with asyncio.timeout(READ_TIMEOUT_S):
            return await self.reader.read()

    async def close(self) -> None:
        """Close the connection."""
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def get(target: str, host: str = "lb.test", extra: str = "") -> bytes:
    """A body-less HTTP/1.1 GET request."""
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


# --------------------------------------------------------------------------- wiring it together


class ProxyLab:
    """Starts upstreams, a balancer and clients for one test, and stops them all at its end."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack

    async def echo(self, server_id: str = "echo") -> str:
        """Start an aiohttp echo upstream; return its URL."""
        runner = web.AppRunner(echo_app(server_id), access_log=None)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def raw(self, respond: Respond) -> RawUpstream:
        """Start a raw upstream answering with `respond`."""
        upstream = RawUpstream(respond)
        await upstream.start()
        self._stack.push_async_callback(upstream.stop)
        return upstream

    async def balancer(
        self,
        upstreams: Mapping[str, str],
        *,
        strategy: str = "round-robin",
        trusted_proxies: tuple[str, ...] = (),
        **limits: Any,
    ) -> LoadBalancer:
        """Start a LoadBalancer on free ports in front of `upstreams` (server_id -> URL)."""
        config = BalancerConfig(
            port=0,
            admin_port=0,
            strategy=strategy,  # type: ignore[arg-type]
            upstreams=tuple(UpstreamConfig(i, u) for i, u in upstreams.items()),
            trusted_proxies=trusted_proxies,
            # One active check at start, then none: the tests drive health through the data path.
            health=HealthConfig(interval_s=3600, timeout_s=1.0),
            limits=LimitsConfig(**limits),
        )
        lb = LoadBalancer(config)
        self._stack.push_async_callback(lb.stop, 1.0)
        await lb.start()
        return lb

    async def client(self, lb: LoadBalancer) -> RawClient:
        """A raw connection to the balancer's public listener."""
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        client = RawClient(reader, writer)
        self._stack.push_async_callback(client.close)
        return client

    async def session(self) -> aiohttp.ClientSession:
        """An aiohttp client session, closed at the end of the test."""
        return await self._stack.enter_async_context(aiohttp.ClientSession())
