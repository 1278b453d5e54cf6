"""The lab's Redis restart under Sentinel: a synced replica, so a second failover loses nothing (issue 14)."""

from __future__ import annotations

import pytest

from lbsession.lab.faults import AdminClient
from lbsession.lab.topology import Topology
from tests.integration.conftest import User, logged_in_users

pytestmark = pytest.mark.integration


async def _status_once_served(person: User) -> int:
    """GET /me until it is not a 503 (a failover in progress): 200, or the 401 of a lost session."""
    while True:
        reply = await person.me()
        if reply.status != 503:
            return reply.status


async def test_kill_restart_kill_again_logs_nobody_out(start_lab, users) -> None:
    # The double-kill defect: a primary restarted as an empty master, then the new primary killed
    # before Sentinel demoted it, made the empty node primary: every user logged out.
    lab: Topology = await start_lab("round-robin", backend="redis", servers=2, redis_server={"ha": True})
    assert lab.redis is not None
    people = await logged_in_users(lab, users, 6)
    admin = AdminClient(lab.admin_url)
    try:
        status, first = await admin.call("POST", "/redis/primary/kill", {})
        assert status == 200
        status, restarted = await admin.call("POST", f"/redis/{first['name']}/restart", {})
        assert status == 200, restarted
        status, topology = await admin.call("GET", "/topology")
        roles = {node["name"]: node["role"] for node in topology["redis"]["nodes"]}
        assert roles[first["name"]] == "slave" and sorted(roles.values()) == ["master", "slave"]

        status, second = await admin.call("POST", "/redis/primary/kill", {})  # at once: no time to settle
        assert status == 200 and second["name"] != first["name"]
        assert [await _status_once_served(p) for p in people] == [200] * len(people)
    finally:
        await admin.close()


async def test_a_restart_asks_for_true_or_false_in_empty(start_lab) -> None:
    lab: Topology = await start_lab("round-robin", backend="redis", servers=1)
    admin = AdminClient(lab.admin_url)
    try:
        status, answer = await admin.call("POST", "/redis/redis-1/restart", {"empty": "yes"})
        assert status == 400 and '"empty" must be true or false' in answer["error"]
    finally:
        await admin.close()
