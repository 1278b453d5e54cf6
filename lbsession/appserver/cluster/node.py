"""A cluster node: its replication listener, one outbound link per peer, and membership.

Each node sends its own changes over its outbound links and applies its peers'
changes as they arrive on its listener, answering each with an ack. So every
pair of nodes holds two connections and a write by one of N nodes costs N-1
messages and N-1 acks: the N-squared traffic of session clustering.

Membership `static` is the classic one and the seed's drawback: a node accepts
replication only from the addresses in its `peers` list, so a server added
later is refused by every node whose list was not edited (and the refusal is
logged, which is all the warning anyone gets). Membership `join` is the fix: a
new node names one member, is announced to the others, and everyone links to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lbsession.appserver.cluster.link import PeerLink
from lbsession.appserver.cluster.protocol import Channel, MessageTooLarge, ProtocolError
from lbsession.appserver.cluster.table import SessionTable
from lbsession.appserver.config import ClusterConfig
from lbsession.errors import PeerRefused

log = logging.getLogger(__name__)

# Constants, not settings, while config.py is shared. A snapshot frame stays well under the frame
# limit, so a few large sessions in a batch never push it over (the receiver would close the link).
SNAPSHOT_BATCH_BYTES = 256 * 1024
# Before a peer has authenticated it may cost this node only a little: a hello (or the answer to
# one) is ~150 bytes, and the listener holds at most this many connections that have not sent theirs.
HELLO_MAX_BYTES = 4 * 1024
MAX_UNAUTHENTICATED = 64


class ClusterNode:
    """The replication side of one app server."""

    def __init__(self, node_id: str, config: ClusterConfig, table: SessionTable, secret: bytes) -> None:
        self.node_id = node_id
        self.config = config
        self.table = table
        self._secret = secret
        self.address = f"{config.advertise_host}:{config.port}"
        self.members: set[str] = set(config.peers)  # addresses allowed to replicate to us (static)
        self.links: dict[str, PeerLink] = {}
        self.counters = {
            "changes_sent": 0,
            "acks": 0,
            "ack_timeouts": 0,
            "refused": 0,
            "forged_frames": 0,
            "oversize": 0,  # changes (or snapshot sessions) too large for one frame, kept local
            "handshakes_dropped": 0,  # connections closed before their hello: too slow, or too many at once
        }
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[None], Channel] = {}  # inbound connections being served
        self._unauthenticated = 0  # accepted connections that have not sent their hello yet
        self._queue: list[dict[str, Any]] = []  # async mode: changes waiting for the next flush
        self._flusher: asyncio.Task[None] | None = None
        self.on_ack_wait: Callable[[float], None] | None = None  # metrics: seconds a sync write waited for acks

    async def start(self) -> None:
        """Listen, pull a snapshot from a live peer, then link to every peer."""
        self._server = await asyncio.start_server(self._accept, self.config.host, self.config.port)
        if self.config.port == 0:
            self.address = f"{self.config.advertise_host}:{self._server.sockets[0].getsockname()[1]}"
        seeds = [self.config.join] if self.config.membership == "join" and self.config.join else sorted(self.members)
        for seed in seeds:
            try:
                await self._sync_from(seed)
                break
            except (OSError, ProtocolError, PeerRefused, TimeoutError) as exc:
                # Not fatal: the links' own snapshots catch up later. But a node that starts empty
                # while its peers hold sessions must say why (a wrong secret, a refusing peer).
                log.warning(
                    "cluster: no snapshot from %s (%s: %s); trying the next seed", seed, type(exc).__name__, exc
                )
        for address in sorted(self.members):
            self._link(address)
        # Report ready only once the links are up (peers starting alongside us need a moment),
        # or after a bound, when a peer is really down: a write must not skip a peer that is merely late.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.startup_wait_s):
                await asyncio.gather(*(link.settled.wait() for link in self.links.values()))

    async def stop(self) -> None:
        """Close links and the listener."""
        if self._flusher is not None:
            self._flusher.cancel()
        await asyncio.gather(*(link.stop() for link in self.links.values()))
        if self._server is not None:
            self._server.close()
        # Close, not cancel: a handler then ends on its own, where a cancelled one is logged as
        # an error by asyncio's stream callback (Python 3.11). Cancel only what is still there.
        for channel in list(self._handlers.values()):
            channel.close()
        if self._handlers:
            _, stuck = await asyncio.wait(list(self._handlers), timeout=self.handshake_timeout_s)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)

    async def replicate(self, change: dict[str, Any]) -> None:
        """Send a change to every live peer; in `sync` mode, wait for their acks (bounded).

        In `async` mode the change is queued and sent with the others every
        `async_flush_ms`, as asynchronous replication does to batch its traffic:
        the user is answered at once, and the peers learn of it a little later.
        """
        if self.config.replication == "async":
            self._queue.append(change)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_later())
            return
        futures = {link: f for link in self.links.values() if (f := link.send(change)) is not None}
        # A change sent while its link syncs waits behind the snapshot: a late ack there says
        # nothing about the peer, and dropping the link would only restart the snapshot.
        syncing = {link for link in futures if link.state == "syncing"}
        self.counters["changes_sent"] += len(futures)
        if not futures:
            return
        started = time.monotonic()
        done, late = await asyncio.wait(futures.values(), timeout=self.config.ack_timeout_s)
        if self.on_ack_wait is not None:
            self.on_ack_wait(time.monotonic() - started)
        self.counters["acks"] += sum(1 for f in done if f.exception() is None)
        for link, future in futures.items():
            if future in late:
                future.cancel()
                if link not in syncing:
                    self.counters["ack_timeouts"] += 1
                    link.mark_down(f"no ack within {self.config.ack_timeout_s:g} s")

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.config.async_flush_ms / 1000)
        batch, self._queue = self._queue, []
        for link in self.links.values():
            for change in batch:
                if link.send(change) is not None:
                    self.counters["changes_sent"] += 1

    def cut(self, address: str | None = None) -> list[dict[str, Any]]:
        """Stop replicating to one peer (to all when None): the lab's "cut a cluster peer" fault."""
        return self._set_cut(address, True)

    def heal(self, address: str | None = None) -> list[dict[str, Any]]:
        """Resume replicating to a cut peer (all when None); the reconnect's snapshot catches it up."""
        return self._set_cut(address, False)

    def _set_cut(self, address: str | None, cut: bool) -> list[dict[str, Any]]:
        if address is not None and address not in self.links:
            raise ValueError(f"{address} is not a peer of this node; its peers: {', '.join(self.links) or 'none'}")
        for link in self.links.values():
            if address is None or link.address == address:
                link.set_cut(cut)
        return [link.as_dict() for link in self.links.values()]

    def _link(self, address: str) -> None:
        if address != self.address and address not in self.links:
            self.links[address] = link = PeerLink(self, address)
            link.start()

    # -------------------------------------------------------------- outbound

    async def open_channel(self, address: str, purpose: str) -> Channel:
        """Connect to a peer and introduce ourselves; PeerRefused if it refuses us."""
        host, _, port = address.rpartition(":")
        async with asyncio.timeout(self.handshake_timeout_s):
            source = (self.config.source_host, 0) if self.config.source_host else None
            reader, writer = await asyncio.open_connection(host, int(port), local_addr=source)
            channel = Channel(reader, writer, self.config.max_message_bytes)
            try:
                await channel.connect(self._secret)
                channel.send({"type": "hello", "node": self.node_id, "addr": self.address, "purpose": purpose})
                answer = await channel.receive(HELLO_MAX_BYTES)  # a welcome or a refusal: small too
            except BaseException:
                channel.close()
                raise
        if answer["type"] != "welcome":
            channel.close()
            raise PeerRefused(f"{address} refused us: {answer.get('reason', answer['type'])}")
        return channel

    async def _sync_from(self, seed: str) -> None:
        """Join through `seed` when asked to, and apply its full snapshot (anti-entropy at start)."""
        channel = await self.open_channel(seed, "snapshot")
        try:
            if self.config.membership == "join":
                channel.send({"type": "join", "addr": self.address})
                members = await channel.receive()
                self.members.update(a for a in members.get("members", []) if a != self.address)
            channel.send({"type": "snapshot"})
            applied = 0
            while (message := await channel.receive())["type"] == "sessions":
                for change in message["changes"]:
                    self.table.apply(change)
                    applied += 1
            log.info("cluster node %s synced %d sessions from %s", self.node_id, applied, seed)
        finally:
            channel.close()

    # -------------------------------------------------------------- inbound

    @property
    def handshake_timeout_s(self) -> float:
        """How long either side of a new connection waits for the other's challenge, hello and answer."""
        return self.config.ack_timeout_s * 4 + 1.0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        channel = self._handlers[task] = Channel(reader, writer, self.config.max_message_bytes)
        peer = writer.get_extra_info("peername")
        try:
            if await self._welcome(channel, peer):
                await self._serve(channel)
        except TimeoutError:  # before OSError, its base class: only the handshake has a deadline
            self.counters["handshakes_dropped"] += 1
            log.warning("closed a replication connection from %s: no hello within %g s", peer, self.handshake_timeout_s)
        except ProtocolError as exc:
            self.counters["forged_frames"] += 1
            log.warning("closed a replication connection from %s: %s", peer, exc)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("replication connection from %s ended: %s", peer, exc)
        finally:
            channel.close()
            self._handlers.pop(task, None)

    async def _welcome(self, channel: Channel, peer: Any) -> bool:
        """Challenge a new connection and read its hello, with little time and memory; True if welcome."""
        if self._unauthenticated >= MAX_UNAUTHENTICATED:
            # Counted, logged only in debug: a flood of these must not become a flood of log lines too.
            self.counters["handshakes_dropped"] += 1
            log.debug("closed a replication connection from %s: %d already in handshake", peer, MAX_UNAUTHENTICATED)
            return False
        self._unauthenticated += 1
        try:
            async with asyncio.timeout(self.handshake_timeout_s):
                await channel.accept(self._secret)
                hello = await channel.receive(HELLO_MAX_BYTES)
        finally:
            self._unauthenticated -= 1
        refusal = self._refusal(hello)
        if refusal:
            self.counters["refused"] += 1
            log.warning("refused replication from %s (%s): %s", hello.get("addr"), peer, refusal)
            channel.send({"type": "refused", "reason": refusal})
            await channel.drain()
            return False
        channel.send({"type": "welcome", "node": self.node_id})
        return True

    def _refusal(self, hello: dict[str, Any]) -> str | None:
        if hello["type"] != "hello" or not isinstance(hello.get("addr"), str):
            return "the first message must be hello"
        if self.config.membership == "static" and hello["addr"] not in self.members:
            return f"{hello['addr']} is not in this node's peers list (static membership: add it to every node)"
        return None

    async def _serve(self, channel: Channel) -> None:
        handlers: dict[str, Callable[[Channel, dict[str, Any]], Awaitable[None] | None]] = {
            "change": self._on_change,
            "ping": lambda ch, _: ch.send({"type": "pong"}),
            "snapshot": self._on_snapshot,
            "sessions": self._on_sessions,
            "join": self._on_join,
            "member": lambda _, m: self._add_member(m["addr"]),
        }
        while True:
            message = await channel.receive()
            handler = handlers.get(message["type"])
            if handler is None:
                raise ValueError(f"unknown message type {message['type']!r}")
            result = handler(channel, message)
            if result is not None:
                await result

    def _on_change(self, channel: Channel, message: dict[str, Any]) -> None:
        self.table.apply(message["change"])
        channel.send({"type": "ack", "id": message["id"]})

    def _on_sessions(self, channel: Channel, message: dict[str, Any]) -> None:
        for change in message["changes"]:
            self.table.apply(change)

    async def _on_snapshot(self, channel: Channel, message: dict[str, Any]) -> None:
        await self.send_snapshot(channel)
        channel.send({"type": "snapshot_end"})
        await channel.drain()

    async def send_snapshot(self, channel: Channel) -> None:
        """Stream every session this node knows to a peer, in batches well under the frame limit."""
        limit_bytes = min(SNAPSHOT_BATCH_BYTES, channel.max_frame_bytes // 4)
        batch: list[dict[str, Any]] = []
        batch_bytes = 0
        for change in self.table.snapshot():
            change_bytes = len(json.dumps(change, separators=(",", ":"))) + 1  # ASCII: characters are bytes
            if batch and batch_bytes + change_bytes > limit_bytes:
                await self._send_sessions(channel, batch)
                batch, batch_bytes = [], 0
            batch.append(change)
            batch_bytes += change_bytes
        if batch:
            await self._send_sessions(channel, batch)
        await channel.drain()

    async def _send_sessions(self, channel: Channel, batch: list[dict[str, Any]]) -> None:
        """Send one snapshot batch; a single session too large for a frame is skipped and counted."""
        try:
            channel.send({"type": "sessions", "changes": batch})
        except MessageTooLarge as exc:  # only a batch of one can be over: the others stop at a quarter
            self.counters["oversize"] += 1
            log.warning("cluster session %s left out of a snapshot: %s", batch[0]["sid"], exc)
        if channel.is_closing():  # a long snapshot on a dead connection is wasted work
            raise ConnectionResetError("the connection closed during the snapshot")
        await channel.drain()
        await asyncio.sleep(0)  # the same loop serves users: let them in between batches

    def _on_join(self, channel: Channel, message: dict[str, Any]) -> None:
        newcomer = message["addr"]
        channel.send({"type": "members", "members": sorted(self.members | {self.address})})
        for link in self.links.values():  # announce the newcomer to everyone we replicate to
            link.announce(newcomer)
        self._add_member(newcomer)

    def _add_member(self, address: str) -> None:
        if address != self.address and address not in self.members:
            log.info("cluster member %s joined", address)
            self.members.add(address)
            self._link(address)

    @property
    def bytes_sent(self) -> int:
        """Replication bytes this node has written on its links (the N-squared cost, in bytes)."""
        return sum(link.bytes_sent for link in self.links.values())

    def describe(self) -> dict[str, Any]:
        """The node, its membership and its peers' states, for /healthz and the balancer's /status."""
        return {
            "address": self.address,
            "membership": self.config.membership,
            "replication": self.config.replication,
            "peers": [link.as_dict() for link in self.links.values()],
            "counters": {**self.counters, "bytes_sent": self.bytes_sent},
        }
