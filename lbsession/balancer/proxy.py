"""The proxy's data path: two asyncio Protocols, one per side of each exchange.

Why raw protocols rather than aiohttp's server and client: a request through
aiohttp's server plus its client costs about 104 µs of CPU on the reference
machine; callbacks on bytes cost about 15 µs, in the range of HAProxy (14 µs).
So nothing here awaits on the hot path: a request whose upstream has an idle
pooled connection is parsed, routed, rewritten and written in one callback.
Only a fresh upstream connect runs as a task.

    client ──► ClientConnection ──(head rewritten, body streamed)──► UpstreamConnection ──► app server
           ◄──                  ◄──(head rewritten, body streamed)──                     ◄──

A ClientConnection handles one request at a time; later pipelined requests
wait in its buffer and are answered in order (RFC 9112 §9.3.2). Backpressure
is the transports' own: when one side's write buffer is full, the other side
stops reading.

A request that asks to switch protocols (`Connection: Upgrade` + `Upgrade`, a
WebSocket) is routed like any other, but goes on an upstream connection of its
own that is closed after the answer, never pooled; on a 101 both connections
leave these protocols for a Tunnel (lbsession.balancer.tunnel).

Timeouts use the balancer's coarse clock (updated by its sweeper a few times a
second, as HAProxy's `now_ms`), so no timer is armed per request.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, cast

from lbsession.balancer.http import (
    ChunkedScanner,
    HTTPError,
    RequestHead,
    ResponseHead,
    error_response,
    parse_request_head,
    parse_response_head,
    response_has_body,
    switch_asked_for,
)
from lbsession.balancer.strategies.base import RequestFacts, Route, parse_cookie_header
from lbsession.balancer.tunnel import Tunnel
from lbsession.errors import NoHealthyUpstream

if TYPE_CHECKING:
    from lbsession.balancer.balancer import LoadBalancer
    from lbsession.balancer.upstream import Upstream

# Client connection states.
_HEAD: Final = 0  # reading the next request head
_CONNECT: Final = 1  # routed, opening a connection to the upstream; client bytes wait in the buffer
_BODY: Final = 2  # streaming the request body to the upstream
_WAIT: Final = 3  # request sent, response still coming; further client bytes are pipelined requests
_CLOSED: Final = 4

# Upstream connection states.
_IDLE: Final = 0  # pooled, no exchange
_RESP_HEAD: Final = 1  # waiting for the response head
_RESP_BODY: Final = 2  # streaming the response body to the client
_TUNNELLED: Final = 3  # switched protocols: its transport belongs to a Tunnel now

_PIPELINE_HIGH_WATER: Final = 256 * 1024  # stop reading a client that sends this far ahead
# The methods a proxy may send again after a failure (RFC 9110 §9.2.2); never POST, PATCH or an unknown one.
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
OVERLOADED: Final = error_response(
    503, "the balancer is at its connection limit; retry shortly", close=True, extra=b"Retry-After: 1\r\n"
)


def strip_cookies(cookie: bytes, names: tuple[bytes, ...]) -> bytes:
    """The Cookie header without the balancer's own cookies (the app server never sees them)."""
    kept = [p for p in cookie.split(b";") if p.partition(b"=")[0].strip() not in names]
    return b";".join(kept).strip()


class ClientConnection(asyncio.Protocol):
    """One client's connection to the balancer's public listener."""

    def __init__(self, lb: LoadBalancer) -> None:
        self.lb = lb
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.forwarded_tail = b""
        self.state = _HEAD
        self.pending = b""  # bytes received but not yet handled
        self.deadline = 0.0
        self.head_started = False
        self.head_scanned = 0  # how far the buffered, incomplete head was searched already
        self.req: RequestHead | None = None
        self.facts: RequestFacts | None = None
        self.route: Route | None = None
        self.upstream_head = b""
        self.upstream_conn: UpstreamConnection | None = None
        self.own: UpstreamConnection | None = None  # the idle connection of our last exchange (see _take_conn)
        self.served = False  # a response was relayed: from now on pooled connections may be used
        self.body_left = 0
        self.scanner: ChunkedScanner | None = None
        self.request_done = True
        self.retried = False  # tried once more on another upstream after a failed connect
        self.resent = False  # resent once on a fresh connection after a stale pooled one
        self.reading_paused = False
        self.half_closed = False
        self.paused_upstream: UpstreamConnection | None = None  # whose reading our full buffer paused
        self.paused_by_upstream = False  # our reading paused because the upstream's buffer is full
        self._cookie_header: bytes | None = None
        self._cookie_dict: dict[str, str] = {}
        self._cookie_stripped: bytes | None = None

    # -------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "unknown"
        # The same for every request of this connection, so built once (see LoadBalancer.upstream_head).
        self.forwarded_tail = b"\r\nX-Forwarded-For: %s\r\nX-Forwarded-Proto: http" % self.client_ip.encode()
        self.deadline = self.lb.clock + self.lb.limits.idle_timeout_s
        if len(self.lb.clients) + len(self.lb.tunnels) >= self.lb.limits.max_connections:
            self.lb.shed += 1  # overloaded: say so at once; a queue would only make everyone wait
            self.state = _CLOSED
            transport.write(OVERLOADED)  # type: ignore[attr-defined]
            transport.close()
            return
        self.lb.clients.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lb.clients.discard(self)
        self._drop_own()
        if self.state == _CLOSED:
            return
        self.state = _CLOSED
        conn, self.upstream_conn = self.upstream_conn, None
        if conn is not None:  # an exchange was under way: its upstream connection is in an unknown state
            conn.abandon()
        self._release_route()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _BODY:
            self._forward_body(data)
            return
        if state == _CLOSED:
            return
        self.pending = self.pending + data if self.pending else data
        if state == _HEAD:
            self._next_request()
        elif len(self.pending) > _PIPELINE_HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        # A client may half-close after its last request and still read the answer.
        self.half_closed = True
        if self.state in (_BODY, _CONNECT) and not self.request_done:
            # The rest of the body can never arrive: end the exchange now rather than at a timeout.
            conn, self.upstream_conn = self.upstream_conn, None
            if conn is not None:
                conn.abandon()
            self._release_route()
            self._refuse(400, "the client closed its side before the request body was complete")
        return self.state not in (_HEAD, _CLOSED)  # False: nothing in flight, let asyncio close the transport

    def pause_writing(self) -> None:
        # The client reads slower than the upstream sends: stop reading the upstream. Remember which
        # connection, since the exchange may end (and the connection be pooled) before we resume.
        conn = self.upstream_conn
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.pause_reading()
            self.paused_upstream = conn

    def resume_writing(self) -> None:
        conn, self.paused_upstream = self.paused_upstream, None
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.resume_reading()

    # -------------------------------------------------------------- requests

    def _cookies(self, header: bytes) -> dict[str, str]:
        """The parsed Cookie header; a browser sends the same one again and again, so the last is kept."""
        if header != self._cookie_header:
            self._cookie_header = header
            self._cookie_dict = parse_cookie_header(header.decode("latin-1"))
            self._cookie_stripped = None
        return self._cookie_dict

    def stripped_cookie(self, header: bytes, private: tuple[bytes, ...]) -> bytes:
        """The Cookie header without the balancer's own cookies (kept for as long as the header repeats)."""
        if header != self._cookie_header or self._cookie_stripped is None:
            self._cookies(header)
            self._cookie_stripped = strip_cookies(header, private)
        return self._cookie_stripped

    def _next_request(self) -> None:
        """Parse and dispatch as many buffered requests as can be answered now."""
        limits = self.lb.limits
        while self.state == _HEAD and self.pending:
            data = self.pending
            if data[:2] == b"\r\n":  # RFC 9112 §2.2: ignore blank lines before a request line
                data = self.pending = data.lstrip(b"\r\n")
                self.head_scanned = 0
            # Search on from where the last, partial, look stopped: a head trickled in byte by byte
            # must not be rescanned from its start each time (quadratic work for the event loop).
            scanned = self.head_scanned
            end = data.find(b"\r\n\r\n", scanned)
            if end < 0 or end > limits.max_head_bytes:
                self.head_scanned = max(0, len(data) - 3)
                if len(data) > limits.max_head_bytes:
                    self._refuse(431, f"request head larger than {limits.max_head_bytes} bytes")
                elif data.find(b"\n\n", scanned) >= 0 or data.find(b"\n\r\n", scanned) >= 0:
                    # A head ended by bare LFs: it will never end with CRLF CRLF, so say so now rather
                    # than at the header timeout (RFC 9112 §2.2 lets us refuse bare LF).
                    self._refuse(400, "malformed head: lines must end with CRLF, not a bare LF")
                elif data and not self.head_started:
                    self.head_started = True
                    self.deadline = self.lb.clock + limits.header_timeout_s
                return
            self.head_scanned = 0
            try:
                req = parse_request_head(data[:end])
                if req.content_length > limits.max_body_bytes:
                    raise HTTPError(413, f"request body larger than {limits.max_body_bytes} bytes")
            except HTTPError as exc:
                self._refuse(exc.status, exc.reason)
                return
            self.pending = data[end + 4 :]
            self.head_started = False
            self._dispatch(req)

    def _dispatch(self, req: RequestHead) -> None:
        lb = self.lb
        cookie = req.cookie
        client_ip = lb.client_address(self.client_ip, req) if req.forwarded else self.client_ip
        if cookie is None:
            facts = RequestFacts(client_ip, None, req)
        else:
            facts = RequestFacts(client_ip, None, req, self._cookies(cookie))
        self.req, self.facts, self.retried, self.resent = req, facts, False, False
        self.request_done = not req.chunked and req.content_length == 0
        self.body_left = req.content_length
        self.scanner = ChunkedScanner(lb.limits.max_body_bytes) if req.chunked else None
        try:
            route = lb.strategy.choose(facts, lb.pool.candidates)
        except NoHealthyUpstream as exc:
            self._reply(503, str(exc))
            return
        self.upstream_head = lb.upstream_head(req, self)
        self._start_exchange(route)

    def _start_exchange(self, route: Route) -> None:
        # A strategy returns one of the pool's candidates: an Upstream, whose counters are native fields.
        upstream = cast("Upstream", route.upstream)
        self.route = route
        upstream.in_flight += 1
        upstream.requests += 1
        self.lb.routes[route.reason] += 1
        # An upgrade goes on a connection of its own: whatever the answer, that connection is closed
        # after it (a 101 makes it a tunnel), never pooled for someone else.
        conn = self._take_conn(upstream) if self.req.upgrade is None else None  # type: ignore[union-attr]
        if conn is not None:
            self._send(conn, reused=True)
        else:
            self.state = _CONNECT
            self.lb.spawn(self._connect(upstream))

    def _take_conn(self, upstream: Upstream) -> UpstreamConnection | None:
        """An open idle connection to `upstream` this request may use, or None to connect.

        HAProxy's `http-reuse safe`: the first request of a client connection never goes on a
        connection that carried someone else's exchange, and later ones take our own connection
        back first. Bytes a broken server sends late (a body after a 204 or a HEAD answer) then
        reach at worst the client that caused them, and an idle connection that receives any byte
        is closed (UpstreamConnection.data_received).
        """
        conn = self.own
        if conn is not None:
            self.own = None
            conn = conn.reclaim(self, upstream)
            if conn is not None:
                return conn
        if self.served:
            return upstream.take_idle()
        return upstream.take_unused()

    def _drop_own(self) -> None:
        conn, self.own = self.own, None
        if conn is not None:
            conn.release(self)

    async def _connect(self, upstream: Upstream) -> None:
        try:
            conn = await self.lb.open_upstream(upstream)
        except OSError as exc:  # refused, unreachable or timed out (TimeoutError is an OSError)
            self.lb.pool.mark_down(upstream, f"connect failed: {exc or type(exc).__name__}")
            self._release_route()
            if self.state != _CLOSED:
                self._retry_elsewhere(f"cannot connect to {upstream.server_id}")
                self._read_next()
            return
        if self.state == _CLOSED:
            conn.close()
            return
        self._send(conn, reused=False)

    def _retry_elsewhere(self, why: str) -> None:
        """Nothing reached the upstream: try once more on another one (HAProxy's `retries 1` + redispatch)."""
        if self.retried or self.facts is None:
            self._reply(502, why)
            return
        self.retried = True
        self.lb.retries += 1
        try:
            route = self.lb.strategy.choose(self.facts, self.lb.pool.candidates)
        except NoHealthyUpstream as exc:
            self._reply(503, f"{why}, and {exc}")
            return
        self._start_exchange(Route(route.upstream, "retried", route.set_cookie))

    def _send(self, conn: UpstreamConnection, reused: bool) -> None:
        self.upstream_conn = conn
        conn.attach(self, reused)
        conn.transport.write(self.upstream_head)  # type: ignore[union-attr]
        if self.request_done:
            self.state = _WAIT
            return
        self.state = _BODY
        if self.reading_paused:  # paused while connecting; the rest of the body is needed now
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        data, self.pending = self.pending, b""
        if data:
            self._forward_body(data)

    def _forward_body(self, data: bytes) -> None:
        conn = self.upstream_conn
        if conn is None:  # the exchange ended early (the upstream answered or failed before the body was in)
            return
        if self.scanner is not None:
            try:
                used = self.scanner.feed(data)
            except HTTPError as exc:
                conn.abandon()
                self.upstream_conn = None
                self._release_route()
                self._reply(exc.status, exc.reason, close=True)
                return
            done = self.scanner.done
        else:
            used = min(len(data), self.body_left)
            self.body_left -= used
            done = not self.body_left
        if used:
            conn.transport.write(data if used == len(data) else data[:used])  # type: ignore[union-attr]
            conn.deadline = self.lb.clock + self.lb.limits.read_timeout_s
        if done:
            self.request_done = True
            self.state = _WAIT
            if used < len(data):
                self.pending = data[used:]
                if len(self.pending) > _PIPELINE_HIGH_WATER:
                    self.reading_paused = True
                    self.transport.pause_reading()  # type: ignore[union-attr]

    # -------------------------------------------------------------- called by the upstream side

    def hand_over(self) -> bytes:
        """The exchange became a tunnel: let go of the connection; return the bytes read ahead of the switch.

        The route goes with it, its upstream's in-flight count included: the tunnel releases it.
        """
        self.lb.clients.discard(self)
        self._drop_own()
        self.state = _CLOSED
        self.upstream_conn = self.route = self.paused_upstream = None
        data, self.pending = self.pending, b""
        return data

    def response_done(self, keep_alive: bool) -> None:
        """The upstream's response was fully relayed; go on with the next request or close."""
        self.upstream_conn = None
        self.served = True
        self._release_route()
        if not (keep_alive and self.request_done) or self.half_closed or self.state == _CLOSED:
            self._close()
            return
        self.state = _HEAD
        self.deadline = self.lb.clock + self.lb.limits.idle_timeout_s
        self._read_next()

    def _read_next(self) -> None:
        """If the exchange is over, resume reading and answer any request already pipelined."""
        if self.state != _HEAD:
            return
        if self.reading_paused or self.paused_by_upstream:  # a pause of the last exchange ends with it
            self.reading_paused = self.paused_by_upstream = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.pending:
            self._next_request()

    def upstream_failed(self, conn: UpstreamConnection, head_sent: bool, status: int, why: str) -> None:
        """The upstream connection broke or timed out during this exchange."""
        self.upstream_conn = None
        route = self.route
        self._release_route()
        if head_sent:
            # Part of the response is already out: the only honest signal left is to close.
            self._close()
            return
        req = self.req
        # A sent body is gone; and a proxy must not retry a non-idempotent request (RFC 9110 §9.2.2).
        resendable = req is not None and not req.chunked and not req.content_length and req.method in _IDEMPOTENT
        if status == 502 and conn.reused and not conn.got_bytes and resendable and not self.resent:
            # A pooled keep-alive connection the server had just closed: nothing was processed,
            # so resend on a fresh connection to the same server (what browsers do too).
            # A separate budget from the retry elsewhere: if the server has in fact died, the fresh
            # connect fails too, and that request still deserves its try on another server.
            self.resent = True
            self.lb.retries += 1
            assert route is not None
            self._start_exchange(Route(route.upstream, "retried", route.set_cookie))
            return
        self._reply(status, why, server_id=route.upstream.server_id if route is not None else None)
        self._read_next()

    # -------------------------------------------------------------- endings

    def _release_route(self) -> None:
        if self.route is not None:
            cast("Upstream", self.route.upstream).in_flight -= 1
            self.route = None

    def _reply(self, status: int, reason: str, close: bool = False, server_id: str | None = None) -> None:
        """Answer the current request from the balancer itself (502/503/504, 4xx)."""
        self.lb.errors[status] = self.lb.errors.get(status, 0) + 1
        if self.lb.events.active:
            self.lb.events.request_answered(self, status, "lb", server_id)
        req = self.req
        close = close or not self.request_done or req is None or not req.keep_alive or self.half_closed
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(error_response(status, reason, close=close))
        if close:
            self._close()
        else:
            self.state = _HEAD
            self.deadline = self.lb.clock + self.lb.limits.idle_timeout_s

    def _refuse(self, status: int, reason: str) -> None:
        """Refuse a request that cannot be parsed safely, then close (its end is unknown)."""
        self.req = None
        self._reply(status, reason, close=True)

    def _close(self) -> None:
        self.state = _CLOSED
        self._drop_own()
        if self.transport is not None:
            self.transport.close()  # flushes what was written first

    def check_timeouts(self, now: float) -> None:
        """Called by the sweeper: close idle clients, answer slow heads with 408."""
        if self.state == _HEAD and now > self.deadline:
            if self.pending:
                self._refuse(408, "the request head did not arrive in time")
            else:
                self._close()
        elif self.state == _BODY and self.upstream_conn is not None and now > self.upstream_conn.deadline:
            self.upstream_conn.abandon()
            self.upstream_conn = None
            self._release_route()
            self._refuse(408, "the request body stopped arriving")

    def close_if_idle(self) -> bool:
        """Close the connection if no request is in progress (graceful shutdown); True if closed."""
        if self.state == _HEAD and not self.pending:
            self._close()
            return True
        self.half_closed = True  # finish the exchange in progress, then close
        return self.state == _CLOSED


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection from the balancer to an app server."""

    def __init__(self, lb: LoadBalancer, upstream: Upstream) -> None:
        self.lb = lb
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.owner: ClientConnection | None = None  # the client of the last exchange
        self.used = False  # has carried an exchange
        self.pooled = False  # in upstream.idle (else, when idle, private to its owner)
        self.clean = True  # the last response ended where its own framing said (not a bodiless one)
        self.state = _IDLE
        self.buffer = b""
        self.deadline = 0.0
        self.reused = False
        self.got_bytes = False
        self.body_left = 0
        self.until_close = False
        self.scanner: ChunkedScanner | None = None
        self.keep_alive = True
        self.client_keep = True  # whether the client connection stays open after this response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Not yet attached: give it until the connect timeout, or the sweeper would close it as expired.
        self.deadline = self.lb.clock + self.lb.limits.connect_timeout_s
        self.lb.upstream_conns.add(self)

    def reusable(self) -> bool:
        """True if this pooled connection is open and may carry a new exchange."""
        return self.state == _IDLE and self.transport is not None and not self.transport.is_closing()

    def attach(self, client: ClientConnection, reused: bool) -> None:
        """Start an exchange for `client`."""
        self.client = client
        self.owner = client
        self.used = True
        self.reused = reused
        self.got_bytes = False
        self.state = _RESP_HEAD
        self.buffer = b""
        self.deadline = self.lb.clock + self.lb.limits.read_timeout_s

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.deadline = self.lb.clock + self.lb.limits.read_timeout_s
        if self.state == _RESP_BODY:
            self._relay_body(data)
        elif self.state == _RESP_HEAD:
            self.buffer = self.buffer + data if self.buffer else data
            self._read_head()
        else:  # bytes from an idle connection: the server broke the protocol; never reuse it
            self.close()

    def _read_head(self) -> None:
        client = self.client
        assert client is not None and client.req is not None
        while self.state == _RESP_HEAD:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0 or end > self.lb.limits.max_head_bytes:  # whether it came in pieces or at once
                if len(self.buffer) > self.lb.limits.max_head_bytes:
                    self._fail(502, "the upstream's response head is too large")
                return
            try:
                resp = parse_response_head(self.buffer[:end])
            except HTTPError as exc:
                self._fail(exc.status, exc.reason)
                return
            rest = self.buffer[end + 4 :]
            self.buffer = b""
            if resp.status < 200:
                if resp.status == 101:
                    self._switch(client, resp, rest)
                    return
                if not client.req.http10:  # HTTP/1.0 has no 1xx (RFC 9110 §15.2)
                    client.transport.write(resp.out + b"\r\n\r\n")  # type: ignore[union-attr]
                self.buffer = rest
                continue
            has_body = response_has_body(client.req.method, resp.status)
            if has_body and resp.codings and client.req.http10:
                # Only chunked can be undone for it: a gzip transfer coding has no HTTP/1.0 form.
                self._fail(502, "the upstream used a transfer coding an HTTP/1.0 client cannot read")
                return
            self.clean = has_body
            if rest and not has_body:
                # Bytes after a response that has no body: a broken server. Relaying them would answer
                # the client's next request with this one's leftovers; drop them and the connection.
                resp.keep_alive = False
                rest = b""
            head = self._start_body(client, client.req, resp, has_body)
            if self.body_left or self.scanner is not None or self.until_close:
                if rest:
                    self._relay_body(rest, head)  # one write for the head and what came of the body
                else:
                    client.transport.write(head)  # type: ignore[union-attr]
            else:
                client.transport.write(head)  # type: ignore[union-attr]
                self._finish()

    def _start_body(self, client: ClientConnection, req: RequestHead, resp: ResponseHead, has_body: bool) -> bytes:
        """Set up the relay of the response body; return the head to send the client."""
        decode = has_body and resp.chunked and req.http10  # an HTTP/1.0 client cannot read chunked
        self.until_close = has_body and not resp.chunked and resp.content_length is None
        self.body_left = (resp.content_length or 0) if has_body else 0
        self.scanner = ChunkedScanner(1 << 62, decode=decode) if has_body and resp.chunked else None
        client_keep = req.keep_alive and not self.until_close and not decode and not client.half_closed
        out = resp.without_transfer_encoding() if decode else resp.out
        route = client.route
        if route is not None and route.set_cookie:
            out += b"\r\nSet-Cookie: " + route.set_cookie.encode()
        if req.http10:
            out += b"\r\nConnection: keep-alive" if client_keep else b"\r\nConnection: close"
        elif not client_keep:
            out += b"\r\nConnection: close"
        lb = self.lb
        statuses = lb.statuses
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        if lb.events.active:  # the only cost of the event stream while nobody watches it
            lb.events.request_answered(client, resp.status, "upstream")
        self.state = _RESP_BODY
        self.client_keep = client_keep
        self.keep_alive = resp.keep_alive and not self.until_close and req.upgrade is None
        return out + b"\r\n\r\n"

    def _switch(self, client: ClientConnection, resp: ResponseHead, rest: bytes) -> None:
        """A 101: relay it, then join this connection and the client's into a tunnel (RFC 9110 §15.2.2)."""
        req, route = client.req, client.route
        assert req is not None and route is not None
        if req.upgrade is None:  # the proxy strips Upgrade from other requests: nobody asked for it
            self._fail(502, "the upstream switched protocols unasked")
            return
        if resp.upgrade is None:
            self._fail(502, "the upstream's 101 names no protocol in Upgrade")
            return
        if not switch_asked_for(resp.upgrade, req.upgrade):  # RFC 9110 §7.8: only to a protocol the client listed
            self._fail(502, "the upstream switched to a protocol the client did not ask for")
            return
        head = resp.out
        if route.set_cookie:  # a sticky pin must reach a WebSocket client too: its 101 is the only answer
            head += b"\r\nSet-Cookie: " + route.set_cookie.encode()
        head += b"\r\nUpgrade: " + resp.upgrade + b"\r\nConnection: Upgrade\r\n\r\n"
        lb = self.lb
        lb.statuses[101] = lb.statuses.get(101, 0) + 1
        if lb.events.active:
            lb.events.request_answered(client, 101, "upstream")
        server_paused, client_paused = client.paused_upstream is self, client.paused_by_upstream
        client_ended = client.half_closed
        ahead = client.hand_over()
        lb.upstream_conns.discard(self)
        self.client, self.state = None, _TUNNELLED
        tunnel = Tunnel(lb, route.upstream, client.transport, self.transport)  # type: ignore[arg-type]
        tunnel.start(
            head + rest, ahead, client_ended=client_ended, server_paused=server_paused, client_paused=client_paused
        )

    def _relay_body(self, data: bytes, head: bytes = b"") -> None:
        """Relay body bytes (after `head`, when the head is still to be sent) and finish at the body's end."""
        client = self.client
        assert client is not None and client.transport is not None
        if self.until_close:
            client.transport.write(head + data)
            return
        scanner = self.scanner
        if scanner is not None:
            try:
                used = scanner.feed(data, status=502)
            except HTTPError:
                if head:  # nothing was sent yet: the client can still get a clean 502
                    self.state = _RESP_HEAD
                self._fail(502, "the upstream sent a malformed chunked body")
                return
            if scanner.decoded is not None:
                client.transport.write(head + b"".join(scanner.decoded))
                scanner.decoded.clear()
            else:
                client.transport.write(head + data if used == len(data) else head + data[:used])
            done = scanner.done
        else:
            used = min(len(data), self.body_left)
            client.transport.write(head + data if used == len(data) else head + data[:used])
            self.body_left -= used
            done = not self.body_left
        if done:
            if used < len(data):
                self.keep_alive = False  # bytes past the response's end: not a connection to reuse
            self._finish()

    def _finish(self) -> None:
        client = self.client
        assert client is not None
        self.client = None
        self.state = _IDLE
        if client.paused_upstream is self:  # paused for this client's sake: never pool it paused
            client.paused_upstream = None
            self.transport.resume_reading()  # type: ignore[union-attr]
        if (
            self.keep_alive
            and client.request_done
            and self.upstream.healthy
            and self.upstream.server_id in self.lb.pool.upstreams
        ):
            self.deadline = self.lb.clock + self.lb.limits.pool_idle_s
            # After a bodiless response the server may still send a body it thinks it owes: such a
            # connection stays private to its client (closed when the client moves on), never pooled.
            if self.clean:
                self.pooled = True
                self.upstream.idle.append(self)
            client.own = self
        else:
            self.close()
        client.response_done(self.client_keep)

    def _fail(self, status: int, why: str) -> None:
        client = self.client
        head_sent = self.state == _RESP_BODY
        self.client = None
        self.state = _IDLE
        self.close()
        if client is not None:
            client.upstream_failed(self, head_sent, status, why)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lb.upstream_conns.discard(self)
        if self.client is None:
            if self in self.upstream.idle:
                self.upstream.idle.remove(self)
            self.pooled = False
            return
        if self.state == _RESP_BODY and self.until_close:
            self.client_keep = False
            self._finish()  # a close-delimited body ends here, as it should
            return
        self._fail(502, f"{self.upstream.server_id} closed the connection before the response was complete")

    def pause_writing(self) -> None:
        # The upstream reads the request body slower than the client sends it: stop reading the client.
        client = self.client
        if client is not None and client.transport is not None:
            client.transport.pause_reading()
            client.paused_by_upstream = True

    def resume_writing(self) -> None:
        client = self.client
        if client is not None and client.transport is not None and client.paused_by_upstream:
            client.paused_by_upstream = False
            if not client.reading_paused:
                client.transport.resume_reading()

    def check_timeouts(self, now: float) -> None:
        """Called by the sweeper: 504 for a silent upstream, close idle pooled connections."""
        if now <= self.deadline:
            return
        if self.state == _IDLE:
            self.close()
        elif self.client is not None and self.client.state != _BODY:
            self._fail(504, f"{self.upstream.server_id} did not answer within {self.lb.limits.read_timeout_s:g} s")

    def reclaim(self, client: ClientConnection, upstream: Upstream) -> UpstreamConnection | None:
        """This connection, if it is still idle and `client`'s, for its next request to `upstream`."""
        if self.owner is not client or self.state != _IDLE or self.transport is None or self.transport.is_closing():
            return None
        if self.upstream is not upstream:
            if not self.pooled:
                self.close()  # private: it never serves another client
            return None
        if self.pooled:
            self.pooled = False
            self.upstream.unpool(self)
        return self

    def release(self, client: ClientConnection) -> None:
        """`client` no longer needs this idle connection: close it if it was private to that client."""
        if self.owner is client and self.state == _IDLE and not self.pooled:
            self.close()

    def abandon(self) -> None:
        """The client went away mid-exchange: this connection's state is unknown, so close it."""
        self.client = None
        self.state = _IDLE
        self.close()

    def close(self) -> None:
        """Close the connection (pooled or not)."""
        if self.transport is not None:
            self.transport.close()
