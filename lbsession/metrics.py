"""Prometheus metrics of the balancer and of the app servers, each in a registry of its own.

The balancer's are read at scrape time from the counters it keeps anyway
(`LoadBalancer.routes`, `.statuses`, each upstream's `.requests`): the data path
does no work for Prometheus. So the balancer gives requests by server, by route
reason and by status as three families; the server x status breakdown of the
proxied responses is each app server's own `lbsession_app_requests_total`.

The app servers count per request (aiohttp's own cost dwarfs it): requests by
route and status, re-logins (a request that carried a session cookie and was
told to log in: the bug this lab is about), every session store call with its
latency and errors, and, for the cluster store, replication counters and the
time a write waited for its peers' acks.

A registry per balancer and per app server, never the global one, so tests can
run several in one process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Set
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lbsession.appserver.stores.base import SessionStore
from lbsession.errors import StoreUnavailable

if TYPE_CHECKING:
    from lbsession.balancer.balancer import LoadBalancer
    from lbsession.config import AppServerConfig

T = TypeVar("T")

# Store calls take ~10 µs in memory and ~0.2-2 ms over Redis; a failover retries for seconds.
STORE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
SCRAPE_STORE_TIMEOUT_S = 1.0  # a scrape must not hang for the Redis store's whole retry window


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """The registry in Prometheus' text exposition format."""
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


# --------------------------------------------------------------------------- the balancer


class BalancerCollector(Collector):
    """The balancer's counters and upstream states, read when Prometheus scrapes."""

    def __init__(self, lb: LoadBalancer) -> None:
        self.lb = lb

    def collect(self) -> Iterable[Metric]:
        """Every balancer metric family, built from the balancer's current counters."""
        yield from self._traffic()
        yield from self._upstreams()
        yield from self._stream()

    def _traffic(self) -> Iterable[Metric]:
        lb = self.lb
        requests = CounterMetricFamily(
            "lbsession_lb_requests", "Requests sent to each upstream (retries included)", labels=["server"]
        )
        for upstream in lb.pool.upstreams.values():
            requests.add_metric([upstream.server_id], upstream.requests)
        routes = CounterMetricFamily("lbsession_lb_routes", "Routing decisions by reason", labels=["reason"])
        for reason, count in lb.routes.items():
            routes.add_metric([reason], count)
        responses = CounterMetricFamily(
            "lbsession_lb_responses",
            "Responses by status; by=upstream relayed, by=lb made by the balancer itself",
            labels=["status", "by"],
        )
        for by, statuses in (("upstream", lb.statuses), ("lb", lb.errors)):
            for status, count in sorted(statuses.items()):
                responses.add_metric([str(status), by], count)
        yield requests
        yield routes
        yield responses
        forged, redispatched = lb.routes["forged-cookie"], lb.routes["redispatched"]
        yield CounterMetricFamily("lbsession_lb_forged_cookies", "Sticky cookies that failed to verify", value=forged)
        yield CounterMetricFamily("lbsession_lb_redispatches", "Pinned clients re-pinned elsewhere", value=redispatched)
        yield CounterMetricFamily("lbsession_lb_retries", "Requests retried on another connection", value=lb.retries)
        connections = GaugeMetricFamily("lbsession_lb_connections", "Open connections", labels=["side"])
        connections.add_metric(["client"], len(lb.clients))
        connections.add_metric(["upstream"], len(lb.upstream_conns))
        yield connections
        yield _info("lbsession_lb_strategy", "The routing strategy in use", "strategy", lb.strategy.name)

    def _upstreams(self) -> Iterable[Metric]:
        helps = {
            "healthy": "1 if the upstream passes its health check",
            "draining": "1 if the upstream takes no new clients",
            "in_flight": "Requests in progress",
            "sessions": "Sessions the server reported in its last health check",
        }
        families = {k: GaugeMetricFamily(f"lbsession_lb_upstream_{k}", h, labels=["server"]) for k, h in helps.items()}
        for upstream in self.lb.pool.upstreams.values():
            labels = [upstream.server_id]
            families["healthy"].add_metric(labels, 1 if upstream.healthy else 0)
            families["draining"].add_metric(labels, 1 if upstream.draining else 0)
            families["in_flight"].add_metric(labels, upstream.in_flight)
            health = upstream.last_health
            if isinstance(health, dict) and isinstance(health.get("sessions"), int):
                families["sessions"].add_metric(labels, health["sessions"])
        yield from families.values()

    def _stream(self) -> Iterable[Metric]:
        events = self.lb.events
        yield GaugeMetricFamily("lbsession_lb_event_subscribers", "Event stream viewers", value=events.subscribers)
        yield CounterMetricFamily("lbsession_lb_events_published", "Events published", value=events.published)
        yield CounterMetricFamily(
            "lbsession_lb_events_dropped", "Events dropped because a viewer read too slowly", value=events.dropped
        )


def _info(name: str, documentation: str, label: str, value: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    family.add_metric([value], 1)
    return family


def balancer_metrics_handler(lb: LoadBalancer) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The admin API's `GET /metrics` for `lb`, with a registry of its own."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(BalancerCollector(lb))

    async def handle(request: web.Request) -> web.Response:
        return metrics_response(registry)

    return handle


# --------------------------------------------------------------------------- the app servers


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

    def __init__(self, config: AppServerConfig, store: SessionStore) -> None:
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
        self.store = InstrumentedStore(store, self)
        self._watch_store(store)

    def _watch_store(self, store: SessionStore) -> None:
        """Store-specific metrics: the cluster's replication, Redis round trips."""
        node = getattr(store, "node", None)
        if node is not None and hasattr(node, "on_ack_wait"):
            ack_wait = Histogram(
                "lbsession_cluster_ack_wait_seconds",
                "Time a sync write waited for every live peer's ack",
                ["server"],
                buckets=ACK_BUCKETS,
                registry=self.registry,
            ).labels(self.server)
            node.on_ack_wait = ack_wait.observe
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
        asked_to_log_in = status == 401 or (status == 302 and location == "/login")
        if asked_to_log_in and self.cookie_name in request.cookies:
            self.relogins.labels(self.server).inc()

    async def handle(self, request: web.Request) -> web.Response:
        """`GET /metrics`: refresh the session count, then expose everything."""
        backend = self.raw_store.name
        try:
            async with asyncio.timeout(SCRAPE_STORE_TIMEOUT_S):
                self.sessions.labels(self.server, backend).set(await self.raw_store.count())
            self.store_up.labels(self.server, backend).set(1)
        except (StoreUnavailable, TimeoutError):
            self.store_up.labels(self.server, backend).set(0)
        return metrics_response(self.registry)


class StoreCollector(Collector):
    """Counters a store keeps itself (cluster replication, Redis round trips), read at scrape time."""

    def __init__(self, server: str, store: SessionStore) -> None:
        self.server = server
        self.store = store

    def collect(self) -> Iterable[Metric]:
        """The store's own counters, as Prometheus counters."""
        facts = self.store.describe()
        if "round_trips" in facts:
            trips = facts["round_trips"]
            yield _counter("lbsession_redis_round_trips", "Round trips to Redis, retries included", self.server, trips)
        counters = facts.get("counters")
        if not isinstance(counters, dict):
            return
        help_texts = {
            "changes_sent": "Changes sent to peers (one per peer per write)",
            "acks": "Acks received from peers",
            "ack_timeouts": "Peers that did not ack in time and were marked down",
            "refused": "Replication connections refused (not in the static peers list)",
            "forged_frames": "Replication frames that failed authentication",
            "bytes_sent": "Replication bytes written to peers",
            "oversize": "Changes or sessions too big for one replication frame, kept local",
            "handshakes_dropped": "Replication connections closed before authenticating (timeout or too many)",
        }  # fmt: skip
        for key, text in help_texts.items():
            if isinstance(counters.get(key), int):
                yield _counter(f"lbsession_cluster_{key}", text, self.server, counters[key])
        peers = GaugeMetricFamily("lbsession_cluster_peers", "Links to peers by state", labels=["server", "state"])
        states = [peer.get("state", "unknown") for peer in facts.get("peers", [])]
        for state in sorted(set(states)):
            peers.add_metric([self.server, state], states.count(state))
        yield peers


def _counter(name: str, documentation: str, server: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["server"])
    family.add_metric([server], value)
    return family
