"""Prometheus metrics of one app server, in a registry of its own.

The app server counts per request (aiohttp's own cost dwarfs it): requests by
route and status, re-logins (a request that carried a session cookie and was
told to log in: the bug this lab is about), every session store call with its
latency and errors, and the numbers a store keeps itself (`SessionStore.stats()`
and `.timings`: the cluster's replication, Redis' round trips), read at scrape time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable, Mapping, Set
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lbsession.appserver.stores.base import SessionStore, Store
from lbsession.errors import StoreUnavailable

# Set by a handler that asked the user to log in without a 401 to show for it (a WebSocket's 4401).
ASKED_TO_LOG_IN = web.RequestKey("lbsession_asked_to_log_in", bool)

if TYPE_CHECKING:
    from lbsession.appserver.config import AppServerConfig

T = TypeVar("T")

# Store calls take ~10 µs in memory and ~0.2-2 ms over Redis; a failover retries for seconds.
STORE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SCRAPE_STORE_TIMEOUT_S = 1.0  # a scrape must not hang for the Redis store's whole retry window


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """The registry in Prometheus' text exposition format."""
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class InstrumentedStore(SessionStore):
    """A store that counts and times every call of the one it wraps (lifecycle stays with the caller)."""

    name = "instrumented"

    def __init__(self, inner: SessionStore, metrics: AppMetrics) -> None:
        self.inner = inner
        self._metrics = metrics

    async def load(self, session_id: str, ttl_s: float | None = None) -> dict[str, Any] | None:
        return await self._timed("load", self.inner.load(session_id, ttl_s))

    async def save(self, session_id: str, changed: Mapping[str, Any], removed: Set[str], ttl_s: float) -> None:
        await self._timed("save", self.inner.save(session_id, changed, removed, ttl_s))

    async def delete(self, session_id: str) -> None:
        await self._timed("delete", self.inner.delete(session_id))

    async def count(self) -> int:
        return await self._timed("count", self.inner.count())

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        except Exception:
            self._metrics.store_errors.labels(self._metrics.server, self.inner.name, op).inc()
            raise
        finally:
            self._metrics.store_ops.labels(self._metrics.server, self.inner.name, op).inc()
            self._metrics.store_seconds.labels(self._metrics.server, self.inner.name, op).observe(
                time.perf_counter() - started
            )


class AppMetrics:
    """The metrics of one app server: a middleware, an instrumented store, and `GET /metrics`."""

    def __init__(self, config: AppServerConfig, store: Store) -> None:
        self.server = config.id
        self.cookie_name = config.session.cookie_name
        self.raw_store = store
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lbsession_app_requests", "Requests answered", ["server", "route", "method", "status"], registry=registry
        )
        self.relogins = Counter(
            "lbsession_app_relogins",
            "Requests that carried a session cookie and were told to log in (401, or a browser's 302 to /login)",
            ["server"],
            registry=registry,
        )
        self.store_ops = Counter(
            "lbsession_store_operations", "Session store calls", ["server", "backend", "op"], registry=registry
        )
        self.store_errors = Counter(
            "lbsession_store_errors", "Session store calls that failed", ["server", "backend", "op"], registry=registry
        )
        self.store_seconds = Histogram(
            "lbsession_store_operation_seconds",
            "Session store call latency",
            ["server", "backend", "op"],
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        by_backend = ["server", "backend"]
        self.sessions = Gauge("lbsession_app_sessions", "Live sessions in the store", by_backend, registry=registry)
        self.store_up = Gauge("lbsession_store_up", "1 if the store answered at scrape", by_backend, registry=registry)
        # A client-side store makes no call to time: it counts its seals and openings in stats().
        self.store: Store = InstrumentedStore(store, self) if isinstance(store, SessionStore) else store
        self._watch_store(store)

    def _watch_store(self, store: Store) -> None:
        """The store's own numbers: the latencies it times itself, and its counters at scrape time."""
        histograms = {
            name: Histogram(name, text, ["server"], buckets=buckets,
                            registry=self.registry).labels(self.server)
            for name, (text, buckets) in store.timings.items()
        }  # fmt: skip
        if histograms:
            store.report_timings(lambda name, seconds: histograms[name].observe(seconds))
        self.registry.register(StoreCollector(self.server, store))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count every request by route and status, and the re-logins among them."""
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self._count(request, exc.status, exc.headers.get("Location"))
            raise
        except Exception:
            self._count(request, 500, None)  # aiohttp answers an unhandled exception with a 500
            raise
        self._count(request, response.status, response.headers.get("Location"))
        return response

    def _count(self, request: web.Request, status: int, location: str | None) -> None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"  # bounded cardinality
        self.requests.labels(self.server, route, request.method, str(status)).inc()
        asked_to_log_in = status == 401 or (status == 302 and location == "/login") or ASKED_TO_LOG_IN in request
        if asked_to_log_in and self.cookie_name in request.cookies:
            self.relogins.labels(self.server).inc()

    async def handle(self, request: web.Request) -> web.Response:
        """`GET /metrics`: refresh the session count, then expose everything."""
        backend = self.raw_store.name
        if not isinstance(self.raw_store, SessionStore):  # a client-side store holds no sessions to count
            return metrics_response(self.registry)
        try:
            async with asyncio.timeout(SCRAPE_STORE_TIMEOUT_S):
                self.sessions.labels(self.server, backend).set(await self.raw_store.count())
            self.store_up.labels(self.server, backend).set(1)
        except (StoreUnavailable, TimeoutError):
            self.store_up.labels(self.server, backend).set(0)
        return metrics_response(self.registry)


class StoreCollector(Collector):
    """The numbers a store keeps itself (`SessionStore.stats()`), as Prometheus families, at scrape time."""

    def __init__(self, server: str, store: Store) -> None:
        self.server = server
        self.store = store

    def collect(self) -> Iterable[Metric]:
        """One family per stat name; a stat with labels (peers by state) adds one sample to its family."""
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for stat in self.store.stats():
            family = families.get(stat.name)
            if family is None:
                kind = CounterMetricFamily if stat.kind == "counter" else GaugeMetricFamily
                family = families[stat.name] = kind(stat.name, stat.help, labels=["server", *dict(stat.labels)])
            family.add_metric([self.server, *dict(stat.labels).values()], stat.value)
        yield from families.values()
