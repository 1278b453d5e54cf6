"""The upstreams behind the balancer: their health, their counters and their idle connections.

Health follows HAProxy's `option httpchk`: an active check (by default `GET
/healthz`, passing on 200-399, with the method, path, Host header and statuses
configurable) every `interval_s`; a server is marked down after `fall`
consecutive failures and up again after `rise` consecutive successes, and the
log line and `/status` say why it went down (the status, a timeout, a refused
connection). A failed connect marks it down at once (passive check, HAProxy's
`observe layer4`), so one client's failed request spares the next ones the
wait for the active check. With active checks off, that passive check is the
only one: a server it took out is tried again after `interval_s`, as nginx
does after `fail_timeout`.

When every server fails its check, requests still go to all of them (nginx's
choice, not HAProxy's 503): `all_down` in `/status` says so, and the log says
it once when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from lbsession.balancer.config import HealthConfig, UpstreamConfig
from lbsession.errors import ConfigError, ServerIdInUse
from lbsession.settings import parse_http_url

if TYPE_CHECKING:
    from lbsession.balancer.proxy import UpstreamConnection

log: Final = logging.getLogger(__name__)


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
        "last_check_at",
        "last_check_ok",
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
        self.last_check: str | None = None  # the last active check's result: "status 200", "timeout after 1 s"
        self.last_check_ok: bool | None = None
        self.last_check_at: float | None = None
        self.last_error: str | None = None  # why it last went down (an active or a passive check)
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
            "down_reason": None if self.healthy else self.last_error,
            "last_check": None
            if self.last_check is None
            else {"ok": self.last_check_ok, "result": self.last_check, "at": self.last_check_at},
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
        self._passing = health.statuses()
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
        self._retry_timers: dict[str, asyncio.TimerHandle] = {}  # passive only: when a downed server is tried again
        self.all_down_since: float | None = None  # when every upstream last began to fail its check
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
        self._cancel_retry_timer(server_id)
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
        self._health, self._passing = health, health.statuses()
        for upstream in self.upstreams.values():
            if health.active:  # the active checks decide again
                self._cancel_retry_timer(upstream.server_id)
            elif not upstream.healthy:  # passive only from now on: nothing else would bring it back
                self._schedule_retry(upstream)

    def mark_down(self, upstream: Upstream, error: str) -> None:
        """Passive health: a failed connect takes the upstream out of rotation at once."""
        upstream.last_error = error
        if upstream.healthy:
            upstream.healthy = False
            upstream._streak = 0
            upstream.close_idle()
            self._changed(upstream, "down", f"{error} (passive check)")
        if not self._health.active:
            self._schedule_retry(upstream)

    def _schedule_retry(self, upstream: Upstream) -> None:
        if upstream.server_id not in self._retry_timers:
            loop = asyncio.get_running_loop()
            self._retry_timers[upstream.server_id] = loop.call_later(self._health.interval_s, self._retry, upstream)

    def _retry(self, upstream: Upstream) -> None:
        """Passive only: back into rotation, so the next request finds out whether it is up (nginx's fail_timeout)."""
        self._retry_timers.pop(upstream.server_id, None)
        if self.upstreams.get(upstream.server_id) is upstream and not upstream.healthy:
            upstream.healthy = True
            self._changed(upstream, "up", f"tried again after {self._health.interval_s:g} s (passive check only)")

    def _cancel_retry_timer(self, server_id: str) -> None:
        timer = self._retry_timers.pop(server_id, None)
        if timer is not None:
            timer.cancel()

    def _changed(self, upstream: Upstream, what: str, why: str | None = None) -> None:
        upstream.changed_at = time.time()
        self.healthy = tuple(u for u in self.upstreams.values() if u.healthy and not u.drained)
        self.candidates = self.healthy or tuple(self.upstreams.values())
        if what == "down":
            log.warning("upstream %s (%s): down: %s", upstream.server_id, upstream.url, why)
        else:
            log.info("upstream %s (%s): %s%s", upstream.server_id, upstream.url, what, f": {why}" if why else "")
        self._note_all_down()
        if self._on_change is not None:
            self._on_change(upstream, what)

    def _note_all_down(self) -> None:
        """Log once when every upstream starts failing its check, and once when one passes again."""
        all_down = bool(self.upstreams) and not any(u.healthy for u in self.upstreams.values())
        if all_down and self.all_down_since is None:
            self.all_down_since = time.time()
            reasons = "; ".join(f"{u.server_id}: {u.last_error}" for u in self.upstreams.values())
            log.error(
                "every upstream fails its health check (%s): routing to all %d of them anyway, as nginx does, "
                "until one passes",
                reasons,
                len(self.upstreams),
            )
        elif not all_down and self.all_down_since is not None:
            lasted_s = time.time() - self.all_down_since
            self.all_down_since = None
            up = ", ".join(u.server_id for u in self.upstreams.values() if u.healthy) or "none (the pool is empty)"
            log.warning(
                "upstreams pass their health check again after %.1f s with all down: routing to %s", lasted_s, up
            )

    def status(self) -> dict[str, Any]:
        """The health checks and whether every upstream fails them, for `/status`."""
        health = self._health
        all_down = self.all_down_since is not None
        return {
            "checks": "active" if health.active else "passive only",
            "check": health.describe() if health.active else None,
            "all_down": all_down,
            "all_down_since": self.all_down_since,
            "explanation": (
                "every upstream fails its health check, so requests go to all of them (as nginx does) "
                "until one passes; see each server's down_reason"
            )
            if all_down
            else None,
        }

    # ------------------------------------------------------------------ active checks

    async def start(self) -> None:
        """Start the active health checks (they wait while `active` is off)."""
        # The checks are off the data path, where aiohttp's convenience is worth its cost.
        self._client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        self._task = asyncio.create_task(self._check_forever(), name="health-checks")

    async def stop(self) -> None:
        """Stop the checks and close every pooled connection."""
        for server_id in list(self._drain_timers):
            self._cancel_drain_timer(server_id)
        for server_id in list(self._retry_timers):
            self._cancel_retry_timer(server_id)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        for upstream in self.upstreams.values():
            upstream.close_idle()

    async def _check_forever(self) -> None:
        while True:
            if self._health.active:
                await asyncio.gather(*(self.check(u) for u in list(self.upstreams.values())))
            await asyncio.sleep(self._health.interval_s)

    async def check(self, upstream: Upstream) -> bool:
        """Run one active check of `upstream` and apply rise/fall; True if its status is one expected."""
        ok, result = await self._probe(upstream)
        upstream.last_check, upstream.last_check_ok, upstream.last_check_at = result, ok, time.time()
        if upstream.server_id not in self.upstreams:
            return ok  # removed while the check was running
        if ok == upstream.healthy:
            upstream._streak = 0
            return ok
        upstream._streak += 1
        needed = self._health.rise if ok else self._health.fall
        if upstream._streak >= needed:
            upstream._streak = 0
            upstream.healthy = ok
            in_a_row = f"{needed} check{'s' if needed > 1 else ''} in a row"
            if not ok:
                upstream.last_error = result
                upstream.close_idle()
            self._changed(upstream, "up" if ok else "down", f"{result}, {in_a_row}")
        return ok

    async def _probe(self, upstream: Upstream) -> tuple[bool, str]:
        """Ask `upstream` once, as configured: (passed, what happened in a few words)."""
        assert self._client is not None, "start() the pool first"
        health = self._health
        headers = {"Host": health.host} if health.host else None
        timeout = aiohttp.ClientTimeout(total=health.timeout_s)
        try:
            async with self._client.request(
                health.method, upstream.url + health.path, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                if response.status not in self._passing:
                    return False, f"status {response.status} (expected {health.expect})"
                if response.content_type == "application/json" and (response.content_length or 0) < 65536:
                    with contextlib.suppress(ValueError, aiohttp.ClientError):
                        upstream.last_health = await response.json()
                return True, f"status {response.status}"
        except TimeoutError:
            return False, f"timeout after {health.timeout_s:g} s"
        except aiohttp.ClientConnectorError as exc:
            if exc.os_error.errno == errno.ECONNREFUSED:
                return False, "connection refused"
            return False, f"cannot connect: {exc.os_error.strerror or exc.os_error}"
        except aiohttp.ServerDisconnectedError:
            return False, "connection closed without an answer"
        except aiohttp.ClientResponseError as exc:  # not HTTP: aiohttp's parser refused the answer
            return False, f"invalid response: {exc.message}"
        except (aiohttp.ClientError, OSError) as exc:
            return False, f"{type(exc).__name__}: {exc}".strip(": ")
