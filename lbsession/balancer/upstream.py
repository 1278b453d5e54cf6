"""The upstreams behind the balancer: their health, their counters and their idle connections.

Health follows HAProxy's model: an active `GET /healthz` every `interval_s`; a
server is marked down after `fall` consecutive failures and up again after
`rise` consecutive successes. A failed connect marks it down at once (passive
check, HAProxy's `observe layer4`), so one client's failed request spares the
next ones the wait for the active check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import aiohttp

from lbsession.balancer.config import HealthConfig, UpstreamConfig
from lbsession.errors import ConfigError, ServerIdInUse
from lbsession.settings import parse_http_url

if TYPE_CHECKING:
    from lbsession.balancer.proxy import UpstreamConnection

log = logging.getLogger(__name__)


class Upstream:
    """One app server as the balancer sees it."""

    __slots__ = (
        "_streak",
        "changed_at",
        "drained",
        "draining",
        "healthy",
        "host",
        "idle",
        "in_flight",
        "last_check",
        "last_error",
        "last_health",
        "port",
        "requests",
        "server_id",
        "url",
    )  # fmt: skip

    def __init__(self, server_id: str, url: str) -> None:
        self.server_id = server_id
        self.url = url
        self.host, self.port = parse_http_url(url)
        self.healthy = True  # assumed up until a check says otherwise, as HAProxy does at start
        self.draining = False
        self.drained = False  # drained past its timeout: out of the rotation, pinned clients too
        self.in_flight = 0
        self.requests = 0
        self.idle: list[UpstreamConnection] = []  # keep-alive connections ready for reuse, newest last
        self._streak = 0  # consecutive check results against the current state
        self.last_check: str | None = None
        self.last_error: str | None = None
        self.last_health: Any = None  # the JSON the server's last health check answered
        self.changed_at = time.time()

    def take_idle(self) -> UpstreamConnection | None:
        """An idle pooled connection that is still open, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            conn.pooled = False
            if conn.reusable():
                return conn
        return None

    def take_unused(self) -> UpstreamConnection | None:
        """An idle connection that never carried an exchange (opened ahead of need), or None.

        A client connection's first request may only take one of these. Used connections are
        pooled at the end of the list, so unused ones, pooled before any traffic, are at its start.
        """
        idle = self.idle
        if idle and not idle[0].used and idle[0].reusable():
            conn = idle.pop(0)
            conn.pooled = False
            return conn
        return None

    def unpool(self, conn: UpstreamConnection) -> None:
        """Take `conn` out of the idle list (its owner reclaims it; usually it is the last one)."""
        idle = self.idle
        if idle and idle[-1] is conn:
            idle.pop()
        elif conn in idle:
            idle.remove(conn)

    def close_idle(self) -> None:
        """Close every pooled connection (the server left or went down)."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.pooled = False
            conn.close()

    def as_dict(self) -> dict[str, Any]:
        """The upstream's state for the admin API."""
        return {
            "id": self.server_id,
            "url": self.url,
            "healthy": self.healthy,
            "draining": self.draining,
            "drained": self.drained,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "idle_connections": len(self.idle),
            "last_error": self.last_error,
            "changed_at": self.changed_at,
            "health": self.last_health,
        }


class UpstreamPool:
    """The ordered set of upstreams, and the tuple of healthy ones that strategies route over."""

    def __init__(
        self,
        upstreams: Iterable[UpstreamConfig],
        health: HealthConfig,
        on_change: Callable[[Upstream, str], None] | None = None,
    ) -> None:
        self._health = health
        self._on_change = on_change
        self.upstreams: dict[str, Upstream] = {}
        self.healthy: tuple[Upstream, ...] = ()  # rebuilt only on change: strategies may cache by identity
        # What strategies route over: the healthy upstreams or, when none is, all of them. Like nginx
        # (and unlike HAProxy), a shared outage such as the session store's is then answered by the
        # app servers with their own reason (503 "session store unavailable"), and a Redis failover
        # is a delay rather than a window in which the balancer refuses everyone.
        self.candidates: tuple[Upstream, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._client: aiohttp.ClientSession | None = None  # created in start(), inside the running loop
        self._drain_timers: dict[str, asyncio.TimerHandle] = {}
        for upstream in upstreams:
            self.add(upstream.id, upstream.url)

    def add(self, server_id: str, url: str) -> Upstream:
        """Add an upstream; ServerIdInUse if the id is taken, ConfigError if the URL is not http://host:port."""
        if server_id in self.upstreams:
            raise ServerIdInUse(f"server id {server_id!r} is already in use; choose another id")
        try:
            upstream = Upstream(server_id, url)
        except ValueError as exc:
            raise ConfigError(f"url: {exc}") from None
        self.upstreams[server_id] = upstream
        self._changed(upstream, "added")
        return upstream

    def remove(self, server_id: str) -> Upstream:
        """Take an upstream out; in-flight requests finish, pooled connections close."""
        upstream = self.upstreams.pop(server_id)
        self._cancel_drain_timer(server_id)
        upstream.healthy = False
        upstream.close_idle()
        self._changed(upstream, "removed")
        return upstream

    def drain(self, server_id: str, draining: bool = True, timeout_s: float | None = None) -> Upstream:
        """Stop (or resume) sending new clients to an upstream.

        Its pinned clients still reach it, as with HAProxy's drain, until `timeout_s`; then it
        leaves the rotation and they are redispatched. Requests in flight always finish.
        """
        upstream = self.upstreams[server_id]
        upstream.draining = draining
        upstream.drained = False
        self._cancel_drain_timer(server_id)
        if draining and timeout_s is not None:
            timer = asyncio.get_running_loop().call_later(timeout_s, self._drain_expired, upstream)
            self._drain_timers[server_id] = timer
        self._changed(upstream, "draining" if draining else "undrained")
        return upstream

    def _drain_expired(self, upstream: Upstream) -> None:
        self._drain_timers.pop(upstream.server_id, None)
        if self.upstreams.get(upstream.server_id) is upstream and upstream.draining:
            upstream.drained = True
            upstream.close_idle()
            self._changed(upstream, "drained")

    def _cancel_drain_timer(self, server_id: str) -> None:
        timer = self._drain_timers.pop(server_id, None)
        if timer is not None:
            timer.cancel()

    def set_health(self, health: HealthConfig) -> None:
        """Use new health-check settings from the next check on (a config reload)."""
        self._health = health

    def mark_down(self, upstream: Upstream, error: str) -> None:
        """Passive health: a failed connect takes the upstream out of rotation at once."""
        upstream.last_error = error
        if upstream.healthy:
            upstream.healthy = False
            upstream._streak = 0
            upstream.close_idle()
            self._changed(upstream, "down")

    def _changed(self, upstream: Upstream, what: str) -> None:
        upstream.changed_at = time.time()
        self.healthy = tuple(u for u in self.upstreams.values() if u.healthy and not u.drained)
        self.candidates = self.healthy or tuple(self.upstreams.values())
        log.info("upstream %s (%s): %s", upstream.server_id, upstream.url, what)
        if self._on_change is not None:
            self._on_change(upstream, what)

    # ------------------------------------------------------------------ active checks

    async def start(self) -> None:
        """Start the active health checks."""
        # The checks are off the data path, where aiohttp's convenience is worth its cost.
        timeout = aiohttp.ClientTimeout(total=self._health.timeout_s)
        self._client = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True))
        self._task = asyncio.create_task(self._check_forever(), name="health-checks")

    async def stop(self) -> None:
        """Stop the checks and close every pooled connection."""
        for server_id in list(self._drain_timers):
            self._cancel_drain_timer(server_id)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        for upstream in self.upstreams.values():
            upstream.close_idle()

    async def _check_forever(self) -> None:
        while True:
            await asyncio.gather(*(self.check(u) for u in list(self.upstreams.values())))
            await asyncio.sleep(self._health.interval_s)

    async def check(self, upstream: Upstream) -> bool:
        """Run one active check of `upstream` and apply rise/fall; True if it answered 2xx."""
        assert self._client is not None, "start() the pool first"
        try:
            async with self._client.get(upstream.url + self._health.path) as response:
                ok = 200 <= response.status < 300
                upstream.last_check = f"HTTP {response.status}"
                if response.content_type == "application/json" and (response.content_length or 0) < 65536:
                    with contextlib.suppress(ValueError):
                        upstream.last_health = await response.json()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ok = False
            upstream.last_check = f"{type(exc).__name__}: {exc}".strip(": ")
        if upstream.server_id not in self.upstreams:
            return ok  # removed while the check was running
        if ok == upstream.healthy:
            upstream._streak = 0
            return ok
        upstream._streak += 1
        if upstream._streak >= (self._health.rise if ok else self._health.fall):
            upstream._streak = 0
            upstream.healthy = ok
            if not ok:
                upstream.last_error = upstream.last_check
                upstream.close_idle()
            self._changed(upstream, "up" if ok else "down")
        return ok
