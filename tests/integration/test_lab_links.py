"""The links of a running lab: in every path by default, faulted and healed through the admin API."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lbsession.lab.faults import AdminClient
from lbsession.lab.forks import ForkedProcess, Forks
from lbsession.lab.link_service import LinkService
from lbsession.lab.topology import Topology
from tests.integration.conftest import lab_config
from tests.integration.test_cluster import health

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


def _session_at(lab: Topology, users: Any, server_id: str, cookie: str) -> Any:
    """A user asking `server_id` directly with the session cookie `cookie`."""
    user = users(lab.servers[server_id].url)
    user.http.cookie_jar.update_cookies({"SESSION": cookie})
    return user


async def test_cluster_replication_runs_on_a_link_per_peer_pair_that_a_partition_cuts(start_lab, users) -> None:
    lab: Topology = await start_lab("round-robin", backend="cluster", servers=3)
    admin = AdminClient(lab.admin_url)
    try:
        _, answer = await admin.call("GET", "/links")
        peers = {link["name"]: link for link in answer["links"] if link["from"].startswith("was-")
                 and link["to"].startswith("was-")}  # fmt: skip
        assert sorted(peers) == [f"was-{a}->was-{b}" for a in (1, 2, 3) for b in (1, 2, 3) if a != b]
        assert peers["was-1->was-2"]["listen"] == lab.servers["was-2"].cluster_address
        assert peers["was-1->was-2"]["sources"] == ["127.0.5.1"]
        assert all(link["connections"]["total"] >= 1 for link in peers.values())  # every node dialled every peer

        status, _ = await admin.call("POST", "/partitions", {"name": "p", "cut": ["was-1->was-2", "was-2->was-1"]})
        assert status == 201
        alice = users(lab.servers["was-1"].url)
        await alice.login("alice")
        cookie = alice.cookie("SESSION")
        assert cookie is not None
        assert (await _session_at(lab, users, "was-3", cookie).me()).status == 200  # was-1 -> was-3 is intact
        at_was2 = _session_at(lab, users, "was-2", cookie)
        assert (await at_was2.me()).status == 401  # the partition held the change
        assert (await admin.call("DELETE", "/partitions/p", {}))[0] == 200
        while (await at_was2.me()).status != 200:  # the reconnect's snapshot brings it over
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def test_a_server_added_to_a_static_cluster_gets_links_its_peers_never_dial(start_lab, users) -> None:
    lab: Topology = await start_lab("round-robin", backend="cluster", servers=2)
    admin = AdminClient(lab.admin_url)
    try:
        new = await lab.add_server()
        while {p["state"] for p in (await health(new.url))["peers"]} != {"refused"}:  # not in their lists (C8)
            await asyncio.sleep(0.05)
        _, answer = await admin.call("GET", "/links")
        links = {link["name"]: link for link in answer["links"]}
        for old in ("was-1", "was-2"):
            assert links[f"{new.server_id}->{old}"]["connections"]["total"] >= 1  # it dials them: refused
            assert links[f"{old}->{new.server_id}"]["connections"]["total"] == 0  # they never dial it
    finally:
        await admin.close()


async def test_labs_in_turn_share_a_links_process_and_a_warm_parent_and_keep_nothing_of_each_other(
    tmp_path: Path,
) -> None:
    links = LinkService(tmp_path / "links.log", secrets.token_urlsafe(16))
    forks = Forks(tmp_path / "forks.log")
    try:
        seen: list[set[str]] = []
        for run in range(2):
            config = lab_config("round-robin", "redis", servers=2)
            async with Topology(config, log_dir=tmp_path / f"lab{run}", links=links, forks=forks) as lab:
                admin = AdminClient(lab.admin_url)
                try:
                    assert all(s["healthy"] for s in (await admin.status())["servers"])
                    names = {link["name"] for link in (await links.call("GET", "/links"))[1]["links"]}
                    assert all(isinstance(s.process.popen, ForkedProcess) for s in lab.servers.values())  # type: ignore[union-attr]
                    restarted = await lab.restart_server("was-1")  # during a run: spawned, as a fault always was
                    assert isinstance(restarted.process.popen, subprocess.Popen)  # type: ignore[union-attr]
                    assert all(s["healthy"] for s in (await admin.status())["servers"])
                finally:
                    await admin.close()
            seen.append(names)
            assert (await links.call("GET", "/links"))[1]["links"] == []  # cleared as the lab stopped
        assert seen[0] == seen[1] and "lb->was-1" in seen[0]  # the same links each time, none left over
        assert links.running and forks.running
    finally:
        await forks.stop()
        await links.stop()
