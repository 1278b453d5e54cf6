"""Replication links between in-process cluster nodes: reconnects, snapshots, big sessions, hostile connections.

The nodes run in the test's own event loop over real localhost sockets, so a test
can flap a link, catch it in the middle of its snapshot and count its tasks.
Every wait is on a condition, with a bound; none sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from lbsession.appserver.cluster import link as link_module
from lbsession.appserver.cluster.link import PeerLink
from lbsession.appserver.cluster.node import MAX_UNAUTHENTICATED
from lbsession.appserver.stores.cluster import ClusterStore
from lbsession.config import ClusterConfig

pytestmark = pytest.mark.integration

SECRET = "links-test-secret-0123456789"
TTL_S = 600.0


class Nodes:
    """Starts cluster nodes on free ports in this loop; `close` stops them all."""

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()

    async def start(self, node_id: str, **config: Any) -> ClusterStore:
        store = ClusterStore(node_id, ClusterConfig(secret=SECRET, port=0, membership="join", **config))
        await store.start()
        self._stack.push_async_callback(store.close)
        return store

    async def pair(self) -> tuple[ClusterStore, ClusterStore]:
        """Node a, and node b joined through it, with a's link to b up."""
        a = await self.start("a")
        b = await self.start("b", join=a.node.address)
        await link_up(a, b)
        return a, b

    async def close(self) -> None:
        await self._stack.aclose()


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    started = Nodes()
    try:
        yield started
    finally:
        await started.close()


async def until(condition: Callable[[], bool], timeout_s: float = 10.0, step_s: float = 0.005) -> bool:
    """Wait until `condition()` holds; False if it still does not after `timeout_s`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(step_s)
            return True
    return False


async def link_up(a: ClusterStore, b: ClusterStore) -> PeerLink:
    """a's link to b, once it is up."""
    assert await until(lambda: b.node.address in a.node.links and a.node.links[b.node.address].state == "up")
    return a.node.links[b.node.address]


async def flap(link: PeerLink, how: Callable[[], object]) -> None:
    """Break the link's connection with `how` and wait until it is up again on a new one."""
    before = link.connections
    how()
    assert await until(lambda: link.connections > before and link.state == "up"), link.as_dict()


async def syncing(link: PeerLink) -> None:
    """Drop the link and return while its new connection streams the snapshot (of at least one session).

    sleep(0), not a pause: the window after a snapshot batch is one turn of the loop.
    """
    link.mark_down("test: reconnect")
    async with asyncio.timeout(10):
        while link.state != "syncing":
            await asyncio.sleep(0)


def heartbeats() -> int:
    """Heartbeat tasks running in this loop, whoever started them."""
    return sum(1 for task in asyncio.all_tasks() if getattr(task.get_coro(), "__qualname__", "").endswith("_heartbeat"))


def sid(label: object) -> str:
    return f"links-{label}".ljust(43, "_")


async def fill(store: ClusterStore, sessions: int, value_chars: int) -> None:
    for n in range(sessions):
        await store.save(sid(n), {"user": f"user{n}", "blob": "x" * value_chars}, set(), TTL_S)


# --------------------------------------------------------------------------- reconnects


async def test_a_flapping_link_keeps_one_heartbeat_per_link(nodes: Nodes) -> None:
    a, b = await nodes.pair()
    link = a.node.links[b.node.address]
    assert heartbeats() == 2  # a's link to b, b's link to a

    for _ in range(3):
        await flap(link, lambda: link.mark_down("test: flap"))
        await flap(link, lambda: (a.node.cut(b.node.address), a.node.heal(b.node.address)))

    assert heartbeats() == 2
    assert link.connections == 7


async def test_a_write_during_the_snapshot_is_queued_and_acked_after_it(nodes: Nodes) -> None:
    a = await nodes.start("a", ack_timeout_s=2.0)  # room for a slow machine: the ack is the point here
    b = await nodes.start("b", join=a.node.address, ack_timeout_s=2.0)
    link = await link_up(a, b)
    await fill(a, 10, 10)

    await syncing(link)
    await a.save(sid("during"), {"user": "alice"}, set(), TTL_S)

    assert await b.load(sid("during")) == {"user": "alice"}  # sync: there before the save returned
    assert a.node.counters["ack_timeouts"] == 0


async def test_writes_during_the_snapshot_to_a_slow_peer_all_reach_it(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await nodes.start("a")
    await fill(a, 3000, 4000)  # 12 MB: far more than the socket buffers hold while the peer does not read
    b = await nodes.start("b", join=a.node.address)
    link = await link_up(a, b)
    before, timeouts_before = link.connections, a.node.counters["ack_timeouts"]

    # From the next connection on, b stops reading at the first snapshot batch until the gate opens:
    # a peer slower than the snapshot, so a's snapshot is still streaming while users write.
    gate, reached = asyncio.Event(), asyncio.Event()
    apply_batch = b.node._on_sessions

    async def slow_apply(channel: Any, message: dict[str, Any]) -> None:
        reached.set()
        await gate.wait()
        apply_batch(channel, message)

    monkeypatch.setattr(b.node, "_on_sessions", slow_apply)
    link.mark_down("test: reconnect")
    await asyncio.wait_for(reached.wait(), timeout=10)

    states: list[str] = []

    async def save(session_id: str) -> None:
        states.append(link.state)  # the state the change is handed to the link in: no await in between
        await a.save(session_id, {"user": "bob"}, set(), TTL_S)

    written = [sid(f"during-{n}") for n in range(50)]  # new sessions: in no snapshot already streaming
    await asyncio.gather(*(save(s) for s in written))
    gate.set()

    assert await until(lambda: link.connections > before and link.state == "up")
    assert await until(lambda: all(b.table.load(s, None) is not None for s in written)), [
        s for s in written if b.table.load(s, None) is None
    ]
    assert set(states) == {"syncing"}
    assert link.connections == before + 1  # acks late behind the snapshot did not drop the link again
    assert a.node.counters["ack_timeouts"] == timeouts_before


async def test_a_backlog_over_its_bound_drops_the_link_and_the_next_snapshot_carries_it(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link_module, "MAX_SYNC_BACKLOG", 5)
    a, b = await nodes.pair()
    link = a.node.links[b.node.address]
    await fill(a, 10, 10)
    before = link.connections

    await syncing(link)
    burst = [sid(f"burst-{n}") for n in range(20)]
    # Straight to the link, with no await in between: all 20 changes arrive within one snapshot.
    futures = [link.send(a.table.write(s, {"user": '"carol"'}, set(), TTL_S)) for s in burst]

    assert [f is not None for f in futures] == [True] * 5 + [False] * 15  # queued up to the bound, then dropped
    results = await asyncio.gather(*(f for f in futures if f is not None), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)  # that connection never came up
    assert await until(lambda: link.connections > before and link.state == "up")
    assert await until(lambda: all(b.table.load(s, None) is not None for s in burst))  # the next snapshot
    assert link.connections == before + 1


# --------------------------------------------------------------------------- frame sizes


async def test_a_change_too_big_for_a_frame_stays_local_and_the_link_stays_up(nodes: Nodes) -> None:
    a, b = await nodes.pair()
    link = a.node.links[b.node.address]
    before = link.connections

    await a.save(sid("big"), {"blob": "x" * (1 << 20)}, set(), TTL_S)
    await a.save(sid("small"), {"user": "alice"}, set(), TTL_S)

    assert await b.load(sid("small")) == {"user": "alice"}  # sync: acked before the save returned
    assert await b.load(sid("big")) is None
    assert a.node.counters["oversize"] == 1
    assert b.node.counters["forged_frames"] == 0
    assert link.state == "up" and link.connections == before


async def test_a_snapshot_of_large_sessions_goes_in_frames_under_the_limit(nodes: Nodes) -> None:
    a = await nodes.start("a")
    await fill(a, 40, 100_000)  # 4 MB: 200 sessions a frame would make one frame four times the limit
    await a.save(sid("huge"), {"blob": "x" * (1 << 20)}, set(), TTL_S)  # over the limit on its own
    b = await nodes.start("b", join=a.node.address)  # pulls a's snapshot before it starts
    await link_up(a, b)  # and a's link to b streams one too

    assert await b.count() == 40
    assert b.node.counters["forged_frames"] == 0
    assert a.node.counters["oversize"] == 2  # the huge session, left out of each of the two snapshots


# --------------------------------------------------------------------------- the listener before authentication


async def test_a_connection_that_never_says_hello_is_closed_within_the_handshake_timeout(nodes: Nodes) -> None:
    a = await nodes.start("a", ack_timeout_s=0.25)
    handshake_timeout_s = 0.25 * 4 + 1.0
    host, _, port = a.node.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        async with asyncio.timeout(handshake_timeout_s + 1.0):
            assert len(await reader.read()) == 4 + 32  # the challenge, then the close
    finally:
        writer.close()
    assert a.node.counters["handshakes_dropped"] == 1


async def test_a_hello_declaring_a_megabyte_is_refused_at_once(nodes: Nodes) -> None:
    a = await nodes.start("a", ack_timeout_s=2.0)  # a 9 s handshake deadline: "at once" is far below it
    host, _, port = a.node.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readexactly(4 + 32)
        writer.write((1 << 20).to_bytes(4, "big"))  # within max_message_bytes, far over a hello
        async with asyncio.timeout(1.0):
            assert await reader.read() == b""
    finally:
        writer.close()
    assert a.node.counters["forged_frames"] == 1


async def test_connections_past_the_unauthenticated_cap_are_closed_and_peers_still_get_in(nodes: Nodes) -> None:
    a = await nodes.start("a", ack_timeout_s=2.0)  # silent connections are not timed out during the test
    host, _, port = a.node.address.rpartition(":")
    silent = [await asyncio.open_connection(host, int(port)) for _ in range(MAX_UNAUTHENTICATED)]
    try:
        for reader, _ in silent:
            await reader.readexactly(4 + 32)  # each got its challenge: it holds a handshake slot
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            async with asyncio.timeout(1.0):
                assert await reader.read() == b""  # closed without a challenge
        finally:
            writer.close()
    finally:
        for _, silent_writer in silent:
            silent_writer.close()
    assert a.node.counters["handshakes_dropped"] == 1

    assert await until(lambda: a.node._unauthenticated == 0)  # the slots are free again
    b = await nodes.start("b", join=a.node.address)
    await link_up(a, b)
