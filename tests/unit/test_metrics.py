"""The Prometheus metrics: each app server's own registry, and the balancer's collector."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from lbsession.appserver.app import create_app
from lbsession.appserver.stores import SessionStore
from lbsession.appserver.stores.local import LocalStore
from lbsession.balancer.balancer import LoadBalancer
from lbsession.balancer.metrics import BalancerCollector
from lbsession.config import AppServerConfig, BalancerConfig, UpstreamConfig
from lbsession.errors import StoreUnavailable

UNKNOWN_SESSION = "A" * 43  # a well-formed id that no store holds


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(all_samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in all_samples.items() if n == name and wanted <= ls)


class DownStore(LocalStore):
    """A store that cannot be reached on load, as a dead Redis."""

    name = "down"

    async def load(self, session_id: str, ttl_s: float | None = None) -> dict[str, Any] | None:
        raise StoreUnavailable("connection refused (test double)")

    async def count(self) -> int:
        raise StoreUnavailable("connection refused (test double)")


@pytest.fixture
async def app_client() -> AsyncIterator[Callable[..., Any]]:
    """Start app servers in this process, each with its own registry; all closed at the end."""
    clients: list[TestClient[Any, Any]] = []

    async def make(store: SessionStore, server_id: str = "was-1") -> TestClient[Any, Any]:
        client = TestClient(TestServer(create_app(AppServerConfig(id=server_id), store)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def scrape(client: TestClient[Any, Any]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics and parse it."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(await response.text())


async def test_requests_relogins_and_store_calls_are_counted(app_client: Callable[..., Any]) -> None:
    client = await app_client(LocalStore())
    assert (await client.post("/login", json={"username": "alice"})).status == 200
    assert (await client.get("/me")).status == 200
    client.session.cookie_jar.clear()
    assert (await client.get("/me")).status == 401  # no cookie at all: not a re-login
    assert (await client.get("/me", cookies={"SESSION": UNKNOWN_SESSION})).status == 401  # a re-login
    found = await scrape(client)
    assert value(found, "lbsession_app_requests_total", route="/me", status="200", server="was-1") == 1
    assert value(found, "lbsession_app_requests_total", route="/me", status="401") == 2
    assert value(found, "lbsession_app_requests_total", route="/login", method="POST") == 1
    assert value(found, "lbsession_app_relogins_total", server="was-1") == 1
    assert value(found, "lbsession_store_operations_total", backend="local", op="save") == 1
    assert value(found, "lbsession_store_operations_total", backend="local", op="load") == 2
    assert value(found, "lbsession_store_operation_seconds_count", op="load") == 2
    assert value(found, "lbsession_app_sessions", backend="local") == 1
    assert value(found, "lbsession_store_up") == 1


async def test_store_errors_are_counted_and_the_scrape_still_answers(app_client: Callable[..., Any]) -> None:
    client = await app_client(DownStore())
    response = await client.get("/me", cookies={"SESSION": UNKNOWN_SESSION})
    assert response.status == 503
    found = await scrape(client)
    assert value(found, "lbsession_store_errors_total", backend="down", op="load") == 1
    assert value(found, "lbsession_app_requests_total", route="/me", status="503") == 1
    assert value(found, "lbsession_app_relogins_total") == 0  # a 503 is not a logout
    assert value(found, "lbsession_store_up", backend="down") == 0


async def test_two_app_servers_in_one_process_keep_their_own_counts(app_client: Callable[..., Any]) -> None:
    first, second = await app_client(LocalStore(), "was-1"), await app_client(LocalStore(), "was-2")
    for _ in range(3):
        await first.get("/me")
    await second.get("/me")
    assert value(await scrape(first), "lbsession_app_requests_total", route="/me") == 3
    assert value(await scrape(second), "lbsession_app_requests_total", route="/me", server="was-2") == 1


async def test_unmatched_paths_share_one_label(app_client: Callable[..., Any]) -> None:
    client = await app_client(LocalStore())
    for path in ("/a", "/b", "/c"):
        assert (await client.get(path)).status == 404
    assert value(await scrape(client), "lbsession_app_requests_total", route="unmatched", status="404") == 3


def test_the_balancer_collector_reads_the_balancer_counters() -> None:
    upstreams = (
        UpstreamConfig(id="was-1", url="http://127.0.0.1:9001"),
        UpstreamConfig(id="was-2", url="http://127.0.0.1:9002"),
    )
    lb = LoadBalancer(BalancerConfig(upstreams=upstreams))
    lb.pool.upstreams["was-1"].requests = 5
    lb.pool.upstreams["was-2"].requests = 3
    lb.pool.upstreams["was-2"].healthy = False
    lb.routes["new"], lb.routes["forged-cookie"], lb.retries = 8, 2, 1
    lb.statuses[200], lb.errors[503] = 7, 1
    found = {(s.name, frozenset(s.labels.items())): s.value for m in BalancerCollector(lb).collect() for s in m.samples}
    assert value(found, "lbsession_lb_requests_total") == 8
    assert value(found, "lbsession_lb_requests_total", server="was-1") == 5
    assert value(found, "lbsession_lb_routes_total", reason="new") == 8
    assert value(found, "lbsession_lb_forged_cookies_total") == 2
    assert value(found, "lbsession_lb_retries_total") == 1
    assert value(found, "lbsession_lb_responses_total", status="200", by="upstream") == 7
    assert value(found, "lbsession_lb_responses_total", status="503", by="lb") == 1
    assert value(found, "lbsession_lb_upstream_healthy", server="was-2") == 0
    assert value(found, "lbsession_lb_strategy", strategy="round-robin") == 1
