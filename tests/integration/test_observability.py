"""What the lab shows of itself, on real processes: the event stream, the metrics, the dashboard's routes."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbsession.balancer.events import user_tag
from lbsession.lab.topology import Topology

pytestmark = pytest.mark.integration


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The events of a Server-Sent Events response, decoded."""
    async for line in response.content:
        if line.startswith(b"data: "):
            yield json.loads(line[6:])


async def until_subscribed(lab: Topology, count: int = 1) -> None:
    """Wait until the balancer has `count` event stream viewers (the stream is open)."""
    assert lab.lb is not None
    async with asyncio.timeout(10):
        while lab.lb.events.subscribers < count:
            await asyncio.sleep(0.01)


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of `url`/metrics, by (name, labels), through the Prometheus text parser."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


async def test_every_request_and_server_change_is_on_the_event_stream(start_lab, users) -> None:
    lab: Topology = await start_lab("round-robin")
    assert lab.lb is not None
    async with aiohttp.ClientSession() as http, http.get(lab.admin_url + "/events") as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        await until_subscribed(lab)
        alice = users(lab.lb.url)
        await alice.login("alice")
        replies = [await alice.me() for _ in range(3)]
        events = sse_events(stream)
        seen = [await anext(events) for _ in range(4)]
        await lab.kill_server("was-3")
        async with asyncio.timeout(10):
            change = await anext(e async for e in events if e["type"] == "server")

    login, *reads = seen
    assert (login["method"], login["path"], login["status"], login["user"]) == ("POST", "/login", 200, None)
    cookie = alice.cookie("SESSION")
    assert cookie is not None and all(e["user"] == user_tag(cookie) for e in reads)
    assert cookie not in json.dumps(seen)
    assert [e["status"] for e in reads] == [r.status for r in replies]
    assert [e["server"] for e in reads] == [r.server for r in replies]
    assert {e["strategy"] for e in seen} == {"round-robin"} and {e["reason"] for e in seen} == {"new"}
    assert (change["server"], change["state"], change["healthy"]) == ("was-3", "down", False)


async def test_with_the_cookie_store_a_user_stays_one_user_in_the_events_as_its_cookie_changes(
    start_lab, users
) -> None:
    """The dashboard groups clients by `user`; the cookie store's value changes with each write, its handle not."""
    lab: Topology = await start_lab("round-robin", "cookie")
    assert lab.lb is not None
    async with aiohttp.ClientSession() as http, http.get(lab.admin_url + "/events") as stream:
        await until_subscribed(lab)
        alice = users(lab.lb.url)
        await alice.login("alice")
        cookies = []
        for n in range(3):
            cookies.append(alice.cookie("SESSION"))
            assert (await alice.request("POST", "/cart", json={"item": f"book-{n}"})).status == 200
        assert (await alice.me()).status == 200
        events = sse_events(stream)
        _, *after_login = [await anext(events) for _ in range(5)]
    assert len({*cookies, alice.cookie("SESSION")}) == 4  # a new sealed value after every write
    assert {e["user"] for e in after_login} == {user_tag(cookies[0])}  # and one user throughout
    assert all(c is not None and c.partition(".")[2] not in json.dumps(after_login) for c in cookies)


async def test_a_viewer_that_does_not_read_loses_events_not_requests(start_lab) -> None:
    lab: Topology = await start_lab("round-robin")
    assert lab.lb is not None
    lab.lb.events.queue_size = 64  # so a few hundred requests overflow it
    loop = asyncio.get_running_loop()
    viewer = socket.socket()
    viewer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    viewer.setblocking(False)
    try:
        await loop.sock_connect(viewer, ("127.0.0.1", lab.control.port))
        await loop.sock_sendall(viewer, b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await until_subscribed(lab)

        async def hammer(http: aiohttp.ClientSession) -> list[int]:
            statuses = []
            for _ in range(200):
                async with http.get(lab.lb.url + "/healthz") as response:  # type: ignore[union-attr]
                    statuses.append(response.status)
            return statuses

        async with aiohttp.ClientSession() as http:
            statuses = [s for batch in await asyncio.gather(*(hammer(http) for _ in range(10))) for s in batch]
        assert statuses == [200] * 2000  # the proxy never waited for the viewer
        assert lab.lb.events.dropped > 0
        received = b""
        async with asyncio.timeout(20):
            while b'"type": "dropped"' not in received:
                received += await loop.sock_recv(viewer, 65536)
    finally:
        viewer.close()


async def test_metrics_count_what_went_through(start_lab, users) -> None:
    lab: Topology = await start_lab("round-robin")
    assert lab.lb is not None
    alice = users(lab.lb.url)
    await alice.login("alice")
    replies = [await alice.me() for _ in range(30)]
    refused = sum(1 for r in replies if r.status == 401)

    balancer = await scrape(lab.admin_url)
    servers = [await scrape(s.url) for s in lab.servers.values()]

    assert total(balancer, "lbsession_lb_requests_total") == 31
    assert total(balancer, "lbsession_lb_routes_total", reason="new") == 31
    assert total(balancer, "lbsession_lb_responses_total", status="401", by="upstream") == refused == 20
    assert total(balancer, "lbsession_lb_upstream_healthy") == 3
    assert sum(total(s, "lbsession_app_requests_total", route="/me") for s in servers) == 30
    assert sum(total(s, "lbsession_app_relogins_total") for s in servers) == refused
    assert sum(total(s, "lbsession_store_operations_total", backend="local", op="save") for s in servers) == 1


async def test_a_forged_sticky_cookie_is_counted(start_lab, users) -> None:
    lab: Topology = await start_lab("sticky-cookie")
    assert lab.lb is not None
    mallory = users(lab.lb.url)
    reply = await mallory.request("GET", "/me", headers={"Cookie": "LBSERVER=was-1.forged"})
    assert reply.status == 401
    balancer = await scrape(lab.admin_url)
    assert total(balancer, "lbsession_lb_forged_cookies_total") == 1
    assert total(balancer, "lbsession_lb_strategy", strategy="sticky-cookie") == 1


async def test_cluster_replication_is_measured(start_lab, users) -> None:
    lab: Topology = await start_lab("round-robin", backend="cluster")
    assert lab.lb is not None
    for name in ("alice", "bob", "carol"):
        await users(lab.lb.url).login(name)
    servers = [await scrape(s.url) for s in lab.servers.values()]
    assert sum(total(s, "lbsession_cluster_changes_sent_total") for s in servers) == 6  # 3 writes x 2 peers
    assert sum(total(s, "lbsession_cluster_acks_total") for s in servers) == 6
    assert sum(total(s, "lbsession_cluster_ack_wait_seconds_count") for s in servers) == 3
    assert all(total(s, "lbsession_cluster_peers", state="up") == 2 for s in servers)


async def test_the_dashboard_and_its_demo_users_are_served(start_lab) -> None:
    lab: Topology = await start_lab("sticky-cookie")
    assert lab.lb is not None
    admin = lab.admin_url
    async with aiohttp.ClientSession() as http:
        async with http.get(admin + "/") as page:
            assert page.status == 200 and "/dashboard/dashboard.js" in await page.text()
        for asset in ("dashboard.js", "dashboard.css", "favicon.svg"):
            async with http.get(f"{admin}/dashboard/{asset}") as response:
                assert response.status == 200, asset
        async with http.get(admin + "/dashboard/../routes.py") as response:
            assert response.status in (403, 404)
        async with http.post(admin + "/demo/login", json={"username": "alice"}) as response:
            login = await response.json()
        async with http.post(admin + "/demo/me", json={"username": "alice"}) as response:
            me = await response.json()
        async with http.post(admin + "/demo/me", json={"username": ""}) as response:
            assert response.status == 400
        async with http.post(admin + "/demo/login", data={"username": "csrf"}) as response:
            assert response.status == 415  # a form, as another site could post: refused
    assert (login["status"], me["status"], me["server"]) == (200, 200, login["server"])
    assert me["tag"] is not None and len(me["tag"]) == 8
