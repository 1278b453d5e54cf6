"""Prometheus metrics of the balancer, in a registry of its own, read at scrape time.

The counters are those the balancer keeps anyway (`LoadBalancer.routes`,
`.statuses`, each upstream's `.requests`): the data path does no work for
Prometheus. So the balancer gives requests by server, by route reason and by
status as three families; the server x status breakdown of the proxied
responses is each app server's own `lbsession_app_requests_total`
(lbsession.appserver.metrics).

A registry per balancer, never the global one, so tests can run several in one process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lbsession.balancer.balancer import LoadBalancer


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """The registry in Prometheus' text exposition format."""
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


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
        tunnels = GaugeMetricFamily(
            "lbsession_lb_tunnels", "Open WebSocket/Upgrade tunnels, by upstream", labels=["server"]
        )
        for server_id, count in lb.tunnel_status()["by_server"].items():
            tunnels.add_metric([server_id], count)
        yield tunnels
        yield CounterMetricFamily("lbsession_lb_tunnels_opened", "Upgrade tunnels opened", value=lb.tunnels_opened)
        yield CounterMetricFamily(
            "lbsession_lb_tunnel_timeouts", "Tunnels closed after tunnel_timeout_s of silence", value=lb.tunnel_timeouts
        )
        yield GaugeMetricFamily(
            "lbsession_lb_all_upstreams_down",
            "1 while every upstream fails its health check (requests then go to all of them)",
            value=1 if lb.pool.all_down_since is not None else 0,
        )
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
