"""The seed's second fix, session clustering, on real processes: what it cures and its drawback."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from lbsession.appserver.cluster.protocol import Channel, connection_key
from lbsession.lab.topology import Topology
from tests.integration.conftest import logged_in_users

pytestmark = pytest.mark.integration


async def health(server_url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(server_url + "/healthz") as response:
        return await response.json()


async def test_round_robin_with_a_sync_cluster_keeps_everyone_logged_in(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="cluster")
    people = await logged_in_users(lab, users, 3)

    replies = [await p.me() for p in people for _ in range(6)]

    assert all(r.status == 200 for r in replies), replies
    assert {r.server for r in replies} == set(lab.servers)
    for server in lab.servers.values():
        peers = (await health(server.url))["peers"]
        assert [p["state"] for p in peers] == ["up", "up"]


async def test_a_killed_node_logs_nobody_out_and_catches_up_when_restarted(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="cluster")
    people = await logged_in_users(lab, users, 4)

    await lab.kill_server("was-2")
    during = [await p.me() for p in people for _ in range(3)]
    late = users(lab.lb.url)
    await late.login("late")  # created while was-2 was dead
    await lab.restart_server("was-2")

    assert all(r.status == 200 for r in during), during
    assert (await health(lab.servers["was-2"].url))["sessions"] == 5  # pulled at start, before serving
    for person in [*people, late]:
        # Straight to the restarted node, past the balancer, with the user's session cookie.
        cookies = {"SESSION": person.cookie("SESSION")}
        async with aiohttp.ClientSession(cookies=cookies) as http, http.get(lab.servers["was-2"].url + "/me") as r:
            assert r.status == 200


async def test_static_scale_out_without_editing_the_peer_lists_breaks_replication(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="cluster")
    people = await logged_in_users(lab, users, 3)

    new = await lab.add_server()  # the old nodes' peer lists are deliberately left as they were
    replies = [await p.me() for p in people for _ in range(4)]
    on_new = [r for r in replies if r.server == new.server_id]
    newcomer = users(lab.lb.url)
    while (await newcomer.login("newcomer")).server != new.server_id:
        pass  # round-robin: log in until the new server is the one that created the session
    elsewhere = [await newcomer.me() for _ in range(4)]

    assert on_new and all(r.status == 401 for r in on_new)  # old users are strangers there
    assert all(r.status == 200 for r in replies if r.server != new.server_id)
    assert [r.status for r in elsewhere if r.server != new.server_id] == [401] * 3  # its sessions stay there
    refused = [p for p in (await health(new.url))["peers"] if p["state"] == "refused"]
    assert len(refused) == 3 and "not in this node's peers list" in refused[0]["last_error"]
    for old in ("was-1", "was-2", "was-3"):
        assert (await health(lab.servers[old].url))["counters"]["refused"] >= 1


async def test_join_membership_scale_out_needs_no_edit_and_no_login(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="cluster", app={"cluster": {"membership": "join"}})
    people = await logged_in_users(lab, users, 3)

    new = await lab.add_server()
    replies = [await p.me() for p in people for _ in range(4)]
    newcomer = users(lab.lb.url)
    await newcomer.login("newcomer")
    after = [await newcomer.me() for _ in range(4)]

    assert all(r.status == 200 for r in replies + after), replies + after
    assert new.server_id in {r.server for r in replies}
    for old in ("was-1", "was-2", "was-3"):
        states = {p["address"]: p["state"] for p in (await health(lab.servers[old].url))["peers"]}
        assert states[new.cluster_address] == "up"  # announced to everyone, and linked to through its relay


@pytest.mark.parametrize("replication", ["sync", "async"])
async def test_async_replication_lags_behind_a_fast_user_and_sync_does_not(start_lab, users, replication):
    lab: Topology = await start_lab("round-robin", backend="cluster", app={"cluster": {"replication": replication}})
    relogins = 0
    for n in range(6):
        person = users(lab.lb.url)
        await person.login(f"user{n}")
        reply = await person.me()  # round-robin: the next server, a few milliseconds later
        relogins += reply.status == 401

    if replication == "sync":
        assert relogins == 0
    else:
        assert relogins >= 4, "async replication should lose the race to a user's next request"


async def test_a_forged_or_unlisted_replication_message_is_refused_and_changes_nothing(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="cluster", servers=2)
    await logged_in_users(lab, users, 2)
    target = lab.servers["was-1"]
    before = await health(target.url)

    # 1. No valid tag: a frame forged without the secret.
    reader, writer = await asyncio.open_connection("127.0.0.1", target.cluster_port)
    channel = Channel(reader, writer, 1 << 20)
    await channel.connect(b"not-the-real-secret-at-all")
    channel.send({"type": "hello", "node": "mallory", "addr": lab.servers["was-2"].cluster_address})
    forged = {"sid": "x" * 43, "ttl_ms": 60000, "set": {"user": ['"mallory"', [10**9, "mallory"]]}}
    channel.send({"type": "change", "id": 1, "change": forged})
    assert await closed_by_peer(reader)
    channel.close()

    # 2. A valid secret but an address the node does not list (static membership).
    secret = lab._cluster_secret.encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", target.cluster_port)
    channel = Channel(reader, writer, 1 << 20)
    await channel.connect(secret)
    channel.send({"type": "hello", "node": "stranger", "addr": "127.0.0.1:1"})
    answer = await channel.receive()
    channel.close()

    # 3. A replayed frame: right secret and tag, but on a connection with another challenge.
    reader, writer = await asyncio.open_connection("127.0.0.1", target.cluster_port)
    challenge = (await reader.readexactly(4 + 32))[4:]
    assert connection_key(secret, challenge) != connection_key(secret, b"\0" * 32)
    writer.write(_frame_from_other_connection(secret))
    assert await closed_by_peer(reader)
    writer.close()

    after = await health(target.url)
    assert answer["type"] == "refused"
    assert answer["reason"] == "127.0.0.1:1 is not in this node's peers list (static membership: add it to every node)"
    assert after["counters"]["forged_frames"] == before["counters"]["forged_frames"] + 2
    assert after["counters"]["refused"] == before["counters"]["refused"] + 1
    assert after["sessions"] == before["sessions"]


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True once the other side closed the connection (EOF, or a reset when our bytes went unread)."""
    try:
        async with asyncio.timeout(5):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


def _frame_from_other_connection(secret: bytes) -> bytes:
    """A correctly tagged hello, but for a challenge of all zero bytes: a recorded frame, replayed."""
    import hashlib
    import hmac

    key = connection_key(secret, b"\0" * 32)
    payload = json.dumps({"type": "hello", "node": "x", "addr": "127.0.0.1:1"}).encode()
    tag = hmac.new(key, b"C" + (1).to_bytes(8, "big") + payload, hashlib.sha256).digest()
    return (len(tag + payload)).to_bytes(4, "big") + tag + payload
