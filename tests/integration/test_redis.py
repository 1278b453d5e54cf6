"""The seed's third fix, on real processes and a real Redis: shared sessions, and Redis' own death."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from lbsession.lab.topology import Topology
from tests.integration.conftest import logged_in_users

pytestmark = pytest.mark.integration


async def test_round_robin_with_redis_keeps_everyone_logged_in_on_every_server(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="redis")
    alice = users(lab.lb.url)
    await alice.login("alice")

    replies = [await alice.me() for _ in range(9)]

    assert [r.status for r in replies] == [200] * 9
    assert {r.body["user"] for r in replies} == {"alice"}
    assert {r.server for r in replies} == set(lab.servers)  # answered by every server, all logged in


async def test_a_killed_app_server_logs_nobody_out(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="redis")
    people = await logged_in_users(lab, users, 6)

    await lab.kill_server("was-2")
    replies = [await p.me() for p in people for _ in range(3)]

    assert all(r.status == 200 for r in replies), replies
    assert "was-2" not in {r.server for r in replies}


async def test_a_server_added_at_run_time_serves_logged_in_users_with_nothing_reconfigured(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="redis")
    people = await logged_in_users(lab, users, 4)
    before = {s.server_id: (s.pid, lab.server_argv(s), lab.server_environ(s)) for s in lab.servers.values()}

    new = await lab.add_server()
    replies = [await p.me() for p in people for _ in range(4)]

    assert all(r.status == 200 for r in replies), replies
    assert new.server_id in {r.server for r in replies}  # the newcomer knew them at once
    after = {
        sid: (lab.servers[sid].pid, lab.server_argv(s), lab.server_environ(s))
        for sid, s in lab.servers.items()
        if sid in before
    }
    assert after == before  # same processes, same command lines and config: the others were not touched


@pytest.mark.parametrize(
    ("persist", "status"),
    [
        (False, 401),  # the seed's warning: the session server's memory was every session
        (True, 200),  # an append-only file brings them back with it
    ],
)
async def test_a_restarted_redis_logs_everyone_out_unless_it_persists(start_lab, users, persist, status):
    lab: Topology = await start_lab("round-robin", backend="redis", redis_server={"persist": persist})
    people = await logged_in_users(lab, users, 5)

    await lab.redis.kill_primary()
    await lab.redis.restart("redis-1")
    replies = [await p.me() for p in people]

    assert [r.status for r in replies] == [status] * len(people)


async def test_redis_down_for_good_is_a_503_with_the_reason_never_a_401(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="redis", app={"redis": {"retry_s": 0.5}})
    people = await logged_in_users(lab, users, 3)

    await lab.redis.kill_primary()
    replies = [await p.me() for p in people for _ in range(2)]

    assert [r.status for r in replies] == [503] * len(replies), replies
    for reply in replies:
        assert reply.body["error"] == "session store unavailable"
        assert "redis" in reply.body["reason"]


async def test_redis_ha_primary_killed_under_load_costs_a_stall_not_a_login(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="redis", redis_server={"ha": True})
    people = await logged_in_users(lab, users, 12)
    results: list[tuple[int, float]] = []  # (status, seconds) of every request
    killed = asyncio.Event()
    done = asyncio.Event()

    async def browse(person) -> None:
        while not done.is_set():
            started = time.monotonic()
            reply = await person.me()
            results.append((reply.status, time.monotonic() - started))

    async def fault() -> None:
        # Let traffic flow, kill the primary, and stop once traffic has flowed again after failover.
        await _requests_seen(results, 50)
        await lab.redis.kill_primary()
        killed.set()
        mark = len(results)
        await _until_fast_again(results, mark)
        done.set()

    await asyncio.wait_for(asyncio.gather(fault(), *(browse(p) for p in people)), timeout=60)

    statuses = [status for status, _ in results]
    stall = max(seconds for _, seconds in results)
    print(f"\nredis HA failover: {len(results)} requests, longest stall {stall:.2f} s, statuses {set(statuses)}")
    assert killed.is_set()
    assert statuses.count(401) == 0, "a user was asked to log in again during the failover"
    assert not [s for s in statuses if s >= 500], "a 5xx during the failover"
    assert 0.5 < stall < 5.0  # a real pause (Sentinel's down-after is 1 s), bounded by the store's retry


async def _requests_seen(results: list, count: int) -> None:
    while len(results) < count:
        await asyncio.sleep(0.01)


async def _until_fast_again(results: list, mark: int) -> None:
    """Wait until, after `mark`, 100 requests in a row completed quickly (the failover is over)."""
    while True:
        recent = results[mark:][-100:]
        if len(recent) == 100 and all(seconds < 0.2 for _, seconds in recent):
            return
        await asyncio.sleep(0.05)


async def test_a_configured_redis_url_reaches_the_servers_but_never_their_command_lines(start_lab, users, redis_server):
    # The session's Redis has no password; one in the URL is sent with AUTH only if the server asks.
    url = f"redis://:not-on-any-command-line@127.0.0.1:{redis_server.port}/0"
    lab: Topology = await start_lab("round-robin", backend="redis", app={"redis": {"url": url}})
    assert lab.redis is None  # the lab used the configured Redis rather than starting one
    people = await logged_in_users(lab, users, 3)

    replies = [await p.me() for p in people for _ in range(3)]

    assert all(r.status == 200 for r in replies), replies
    for server in lab.servers.values():
        argv = " ".join(lab.server_argv(server))
        assert "not-on-any-command-line" not in argv
        assert "not-on-any-command-line" not in Path(f"/proc/{server.pid}/cmdline").read_text()
