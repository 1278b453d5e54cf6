"""The links of a running lab: in every path by default, faulted and healed through the admin API."""

from __future__ import annotations

import time

import pytest

from lbsession.lab.faults import AdminClient
from lbsession.lab.topology import Topology

pytestmark = pytest.mark.integration


async def test_links_are_in_the_paths_and_a_slowed_store_link_slows_only_its_server(start_lab, users) -> None:
    lab: Topology = await start_lab("round-robin", backend="redis", servers=2)
    admin = AdminClient(lab.admin_url)
    try:
        status, answer = await admin.call("GET", "/links")
        names = {link["name"]: link for link in answer["links"]}
        assert set(names) == {"lb->was-1", "lb->was-2", "was-1->redis-1", "was-2->redis-1"}
        assert lab.lb is not None
        assert lab.lb.pool.upstreams["was-1"].url.endswith(names["lb->was-1"]["listen"])

        user = users(lab.lb.url)
        await user.login("alice")
        status, answer = await admin.call("PUT", "/links/was-1->redis-1", {"latency_ms": 150, "direction": "upstream"})
        assert status == 200 and answer["state"] == "slowed"
        took: dict[str, float] = {}
        for _ in range(4):  # round-robin: two answers from each server
            started = time.monotonic()
            reply = await user.me()
            assert reply.status == 200 and reply.body["user"] == "alice"
            took[reply.server or ""] = time.monotonic() - started
        # A read is one store call: one slowed trip to Redis on was-1, none on was-2.
        assert took["was-1"] >= 0.15 > took["was-2"]

        status, answer = await admin.call("DELETE", "/links/was-1->redis-1", {})
        assert status == 200 and answer["faults"] == {} and answer["state"] == "ok"
    finally:
        await admin.close()


async def test_bad_fault_requests_are_400s_that_change_nothing(start_lab) -> None:
    lab: Topology = await start_lab("round-robin", servers=1)
    admin = AdminClient(lab.admin_url)
    try:
        for body, expected in [
            ({"latency_ms": -1}, "latency_ms must be a number"),
            ({"latency_ms": 100, "colour": "red"}, "unknown key 'colour'"),
            ({"blackhole": "yes"}, "blackhole must be true or false"),
            ({"latency_ms": 100, "direction": "up"}, "direction must be"),
        ]:
            status, answer = await admin.call("PUT", "/links/lb->was-1", body)
            assert status == 400 and expected in answer["error"], answer
        status, answer = await admin.call("PUT", "/links/lb->was-9", {"down": True})
        assert status == 404 and "known: lb->was-1" in answer["error"]
        status, answer = await admin.call("POST", "/partitions", {"name": "p", "cut": ["lb->was-1", "x"]})
        assert status == 400 and "'x'" in answer["error"]
        status, answer = await admin.call("GET", "/links/lb->was-1")
        assert answer["faults"] == {}
        status, answer = await admin.call("GET", "/partitions")
        assert answer == {"partitions": []}
    finally:
        await admin.close()


async def test_a_cut_link_gives_the_balancer_errors_and_heal_brings_the_server_back(start_lab, users) -> None:
    lab: Topology = await start_lab("round-robin", servers=2)
    admin = AdminClient(lab.admin_url)
    try:
        assert lab.lb is not None
        status, _ = await admin.call("PUT", "/links/lb->was-2", {"down": True})
        assert status == 200
        upstream = lab.lb.pool.upstreams["was-2"]
        while upstream.healthy:  # the balancer's own health checks decide
            await lab.lb.pool.check(upstream)
        user = users(lab.lb.url)
        replies = [await user.request("GET", "/healthz") for _ in range(4)]
        assert {r.server for r in replies} == {"was-1"}  # refused by the cut link: was-2 is down for the balancer
        await admin.call("DELETE", "/links/lb->was-2", {})
        await lab.wait_healthy()
        assert upstream.healthy
    finally:
        await admin.close()


async def test_links_off_puts_the_servers_directly_behind_the_balancer(start_lab) -> None:
    lab: Topology = await start_lab("round-robin", servers=1, links="off")
    admin = AdminClient(lab.admin_url)
    try:
        assert lab.lb is not None and lab.lb.pool.upstreams["was-1"].url == lab.servers["was-1"].url
        status, answer = await admin.call("GET", "/links")
        assert status == 409 and "--links off" in answer["error"]
    finally:
        await admin.close()
