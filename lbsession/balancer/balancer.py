"""The load balancer: its listeners, its upstream pool, its strategy and its counters.

Lifecycle as aiohttp's web_runner: `await lb.start()` binds (port 0 allowed;
the bound ports are read back into `lb.port` and `lb.admin_port`) and
`await lb.stop()` stops accepting, lets in-flight requests finish within a
deadline, and closes everything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from lbsession.balancer.compiled import build
from lbsession.balancer.config import BalancerConfig
from lbsession.balancer.events import EventBus
from lbsession.balancer.proxy import ClientConnection, UpstreamConnection
from lbsession.balancer.strategies import STRATEGIES, Strategy, create_strategy
from lbsession.balancer.strategies.base import ROUTE_REASONS
from lbsession.balancer.tunnel import Tunnel
from lbsession.balancer.upstream import Upstream, UpstreamPool

if TYPE_CHECKING:
    from aiohttp import web

    from lbsession.balancer.http import RequestHead

log: Final = logging.getLogger(__name__)


class LoadBalancer:
    """A reverse proxy that routes each request to an upstream chosen by a strategy."""

    def __init__(self, config: BalancerConfig) -> None:
        config = _with_sticky_secret(config)
        self.config = config
        self.limits = config.limits
        self.strategy: Strategy = create_strategy(config)
        self.events = EventBus()  # the admin's /events and dashboard; idle unless someone subscribes
        self.pool = UpstreamPool(config.upstreams, config.health, on_change=self.events.server_changed)
        self.clock = time.monotonic()  # coarse "now", advanced by the sweeper
        self.clients: set[ClientConnection] = set()
        self.upstream_conns: set[UpstreamConnection] = set()
        self.tunnels: set[Tunnel] = set()  # upgraded connections (WebSockets), each a client and an upstream
        self.tunnels_opened = 0
        self.tunnel_timeouts = 0  # tunnels closed for silence (limits.tunnel_timeout_s)
        self.routes: dict[str, int] = dict.fromkeys(ROUTE_REASONS, 0)
        self.statuses: dict[int, int] = {}  # responses relayed from upstreams, by status
        self.errors: dict[int, int] = {}  # responses the balancer made itself, by status
        self.retries = 0
        self.shed = 0  # connections refused with a 503 at the connection limit
        self.started_at = time.time()
        self.port = config.port
        self.admin_port = config.admin_port
        self.admin_extensions: list[Callable[[web.Application], None]] = []  # route installers, e.g. the dashboard
        self._private_cookies: tuple[bytes, ...] = ()
        self._trusted = [ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._use_strategy(self.strategy)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, admin: bool = True) -> None:
        """Bind the public listener (and the admin one, unless `admin` is False) and start health checks.

        Without its own admin listener the balancer is driven by whoever embeds it: the lab's
        control listener serves the same routes (lbsession.balancer.admin.add_admin_routes).
        """
        loop = asyncio.get_running_loop()
        self.clock = loop.time()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), self.config.host, self.config.port, backlog=1024
        )
        # Read untyped: uvloop's Server gives a list where asyncio's type says tuple, and the compiled
        # build (lbsession.balancer.compiled) checks every value against its declared type.
        server: Any = self._server
        self.port = server.sockets[0].getsockname()[1]
        await self.pool.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="lb-sweeper")
        if admin:
            await self._start_admin()
        log.info("balancing on %s, strategy %s, %s", self.url, self.strategy.name, build().description)

    async def _start_admin(self) -> None:
        from aiohttp import web

        from lbsession.balancer.admin import create_admin_app  # aiohttp stays off the data path's imports

        self._admin_runner = web.AppRunner(create_admin_app(self), access_log=None)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, self.config.admin_host, self.config.admin_port)
        await site.start()
        self.admin_port = self._admin_runner.addresses[0][1]
        log.info("admin API on %s", self.admin_url)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; let in-flight requests finish for up to `grace_s`; close everything."""
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace_s
        # Poll, during shutdown only: each turn also asks idle clients to close.
        while any(not c.close_if_idle() for c in list(self.clients)) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()
        for tunnel in list(self.tunnels):  # a WebSocket has no idle moment to wait for: its peers reconnect
            tunnel.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *(t for t in [self._sweeper] if t), return_exceptions=True)
        await self.pool.stop()
        for conn in list(self.upstream_conns):
            conn.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        """The public URL clients use."""
        return f"http://{_url_host(self.config.host)}:{self.port}"

    @property
    def admin_url(self) -> str:
        """The admin API's URL."""
        return f"http://{_url_host(self.config.admin_host)}:{self.admin_port}"

    # ------------------------------------------------------------------ runtime changes

    def set_strategy(self, name: str) -> None:
        """Switch the routing strategy at run time (sticky pins are honoured only by sticky-cookie)."""
        self._use_strategy(create_strategy(self.config, name))

    def reload(self, config: BalancerConfig) -> list[str]:
        """Apply a new, already validated config; return the changes that need a restart instead.

        Upstreams, the strategy and its settings, health checks, limits and trusted proxies
        change at once (requests in flight finish as they began); listeners stay as they are.
        """
        if config.sticky.secret is None:  # keep the random key of this run: a new one would void every pin
            sticky = dataclasses.replace(config.sticky, secret=self.config.sticky.secret)
            config = dataclasses.replace(config, sticky=sticky)
        fixed = ("host", "port", "admin_host", "admin_port", "admin_allow", "admin_token")
        needs_restart = [key for key in fixed if getattr(config, key) != getattr(self.config, key)]
        config = dataclasses.replace(config, **{key: getattr(self.config, key) for key in fixed})
        wanted = {u.id: u.url for u in config.upstreams}
        for server_id, upstream in list(self.pool.upstreams.items()):
            if wanted.get(server_id) != upstream.url:
                self.pool.remove(server_id)
        for server_id, url in wanted.items():
            if server_id not in self.pool.upstreams:
                self.pool.add(server_id, url)
        self.pool.set_health(config.health)
        self.config, self.limits = config, config.limits
        self._trusted = [ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies]
        self._use_strategy(create_strategy(config))
        return needs_restart

    def _use_strategy(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.events.strategy_changed(strategy.name)
        self._private_cookies = tuple(n.encode() for n in strategy.private_cookies)

    # ------------------------------------------------------------------ used by the proxy

    def client_address(self, peer_ip: str, req: RequestHead) -> str:
        """The client's address: the socket's, or X-Forwarded-For's when the peer is a trusted proxy."""
        if not self._trusted or not self._is_trusted(peer_ip):
            return peer_ip
        # Walk right to left past our own proxies; the first untrusted hop is the client.
        for hop in reversed(_forwarded_for(req).decode("latin-1").split(",")):
            hop = hop.strip()
            if hop and not self._is_trusted(hop):
                return hop
        return peer_ip

    def _is_trusted(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self._trusted)

    def upstream_head(self, req: RequestHead, client: ClientConnection) -> bytes:
        """The request head as the upstream gets it: hop-by-hop gone, LB cookie gone, X-Forwarded-* set."""
        out = req.out
        cookie = req.cookie
        # find(), not `in`: `bytes in bytes` builds and drops a TypeError on every call (see http.py).
        private = self._private_cookies
        if cookie is not None and private and any(cookie.find(n + b"=") >= 0 for n in private):
            out = req.without_cookie_lines()
            stripped = client.stripped_cookie(cookie, self._private_cookies)
            if stripped:
                out += b"\r\nCookie: " + stripped
        forwarded = client.forwarded_tail
        if req.forwarded and self._trusted and self._is_trusted(client.client_ip):
            forwarded = self._forwarded_by_proxy(req, client.client_ip)
        if req.host is None:
            # An HTTP/1.0 request without Host: its target URI has no authority, and then an HTTP/1.1
            # client (which the balancer is, upstream) must send Host with an empty value (RFC 9112
            # §3.2), rather than invent a name. No X-Forwarded-Host either: the client sent none.
            return b"%s%s\r\nHost: \r\n\r\n" % (out, forwarded)
        return b"%s%s\r\nX-Forwarded-Host: %s\r\n\r\n" % (out, forwarded, req.host)

    def _forwarded_by_proxy(self, req: RequestHead, peer_ip: str) -> bytes:
        """X-Forwarded-For/-Proto when the peer is a trusted proxy: its chain, extended by its address."""
        chain = _forwarded_for(req)
        forwarded_for = chain + b", " + peer_ip.encode() if chain else peer_ip.encode()
        proto = next((value for name, value in req.forwarded if name == b"x-forwarded-proto"), b"http")
        return b"\r\nX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s" % (forwarded_for, proto)

    async def open_upstream(self, upstream: Upstream) -> UpstreamConnection:
        """A fresh connection to `upstream`; OSError (TimeoutError included) if it cannot be had."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.limits.connect_timeout_s):
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(self, upstream), upstream.host, upstream.port
            )
        return conn

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine as a task the balancer keeps a reference to and cancels at stop."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep_forever(self) -> None:
        limits = self.limits
        shortest = min(
            limits.read_timeout_s, limits.header_timeout_s, limits.idle_timeout_s, limits.pool_idle_s,
            limits.tunnel_timeout_s,
        )  # fmt: skip
        tick = min(1.0, max(0.05, shortest / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = self.clock = loop.time()
            for client in list(self.clients):
                client.check_timeouts(now)
            for conn in list(self.upstream_conns):
                conn.check_timeouts(now)
            for tunnel in list(self.tunnels):
                tunnel.check_timeout(now)

    # ------------------------------------------------------------------ reporting

    def status(self) -> dict[str, Any]:
        """The balancer's state and counters, as the admin API's `GET /status` returns them."""
        return {
            "strategy": self.strategy.name,
            "build": build().description,  # "compiled (mypyc 1.x)" or "pure Python (why)"
            "strategy_settings": self.strategy.describe(),  # e.g. the sticky mode, the balance factor
            "strategy_counters": self.strategy.counters(),  # e.g. bounded loads' audit of its decisions
            "strategies": list(STRATEGIES),  # what PUT /strategy accepts
            "url": self.url,
            "uptime_s": round(time.time() - self.started_at, 3),
            "servers": [u.as_dict() for u in self.pool.upstreams.values()],
            "health": self.pool.status(),
            "connections": {"clients": len(self.clients), "upstream": len(self.upstream_conns)},
            "tunnels": self.tunnel_status(),
            "counters": {
                "requests": sum(self.routes.values()) - self.routes["retried"],
                "routes": dict(self.routes),
                "forged_cookies": self.routes["forged-cookie"],
                "expired_cookies": self.routes["expired-cookie"],
                "redispatches": self.routes["redispatched"],
                "retries": self.retries,
                "shed_connections": self.shed,
                "responses": {str(k): v for k, v in sorted(self.statuses.items())},
                "lb_errors": {str(k): v for k, v in sorted(self.errors.items())},
            },
        }

    def tunnel_status(self) -> dict[str, Any]:
        """Open WebSocket/Upgrade tunnels, by server, and how many were opened and timed out."""
        by_server = dict.fromkeys(self.pool.upstreams, 0)
        for tunnel in self.tunnels:
            server_id = tunnel.upstream.server_id
            by_server[server_id] = by_server.get(server_id, 0) + 1
        return {
            "open": len(self.tunnels),
            "by_server": by_server,
            "opened": self.tunnels_opened,
            "timed_out": self.tunnel_timeouts,
        }


def _forwarded_for(req: RequestHead) -> bytes:
    """Every X-Forwarded-For line as one list, in order (RFC 9110 §5.3: repeated lines are one field)."""
    return b", ".join(value for name, value in req.forwarded if name == b"x-forwarded-for")


def _with_sticky_secret(config: BalancerConfig) -> BalancerConfig:
    """The config with a sticky secret: the configured one, or a random one for this run.

    Drawn once here rather than by each new sticky strategy, so switching strategies back and
    forth or reloading the config keeps every client's pin valid for as long as the balancer runs.
    """
    if config.sticky.secret is not None:
        return config
    if config.strategy == "sticky-cookie":
        log.warning(
            "no sticky secret: signing %s cookies with a random key, so they will not survive a "
            "restart of the balancer; to keep them set --sticky-secret, balancer.sticky.secret in "
            "the config file, or LBSESSION_BALANCER__STICKY__SECRET",
            config.sticky.cookie_name,
        )
    secret = secrets.token_urlsafe(32)
    return dataclasses.replace(config, sticky=dataclasses.replace(config.sticky, secret=secret))


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
