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
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lbsession.appserver.cluster.protocol import Channel, ProtocolError
from lbsession.appserver.cluster.table import SessionTable
from lbsession.config import ClusterConfig

log = logging.getLogger(__name__)

SNAPSHOT_BATCH = 200  # sessions per snapshot frame, to stay under the frame size limit


class PeerLink:
    """This node's outbound connection to one peer: sends changes, collects acks, heartbeats."""

    def __init__(self, node: ClusterNode, address: str) -> None:
        self.node = node
        self.address = address
        self.state = "connecting"  # connecting | up | down | refused
        self.last_error: str | None = None
        self._channel: Channel | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._next_id = 0
        self._last_heard = 0.0
        self._task: asyncio.Task[None] | None = None
        self.settled = asyncio.Event()  # set once the link is up or the peer refused us
        self._retired_bytes = 0
        self.cut = False  # the lab's "cut a peer" fault: changes are not sent here (heartbeats still are)

    def start(self) -> None:
        """Keep a connection to the peer open, reconnecting with backoff, until `stop`."""
        self._task = asyncio.create_task(self._run(), name=f"cluster-link-{self.address}")

    async def stop(self) -> None:
        """Close the link."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._lost("stopped")

    def send(self, change: dict[str, Any]) -> asyncio.Future[None] | None:
        """Send a change; a future resolved by the peer's ack, or None when the link is not up."""
        if self.cut or self.state != "up" or self._channel is None:
            return None
        self._next_id += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        self._channel.send({"type": "change", "id": self._next_id, "change": change})
        return future

    def announce(self, address: str) -> None:
        """Tell the peer about a new member (join membership)."""
        if self.state == "up" and self._channel is not None:
            self._channel.send({"type": "member", "addr": address})

    def mark_down(self, why: str) -> None:
        """Give up on a slow or silent peer; the link reconnects in the background."""
        log.warning("cluster peer %s is down: %s", self.address, why)
        self.last_error = why
        if self._channel is not None:
            self._channel.close()  # the reader sees the close and reconnects

    @property
    def bytes_sent(self) -> int:
        """Bytes written on this link, over all its connections."""
        return self._retired_bytes + (self._channel.bytes_sent if self._channel is not None else 0)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                self._channel = await self.node.open_channel(self.address, "replicate")
                # Anti-entropy: whatever the peer missed while this link was down, it gets now
                # (a merge is idempotent, so sending what it already has costs only bytes).
                await self.node.send_snapshot(self._channel)
                self.state, self.last_error, delay = "up", None, 0.05
                self._last_heard = time.monotonic()
                self.settled.set()
                log.info("cluster link to %s is up", self.address)
                await asyncio.gather(self._read_acks(), self._heartbeat())
            except PermissionError as exc:  # the peer refused us: not in its list
                self.state, self.last_error = "refused", str(exc)
                self.settled.set()
                log.warning("cluster peer %s refused this node: %s", self.address, exc)
                delay = 2.0
            except (OSError, ProtocolError, TimeoutError) as exc:
                self.state = "down" if self.state != "connecting" else "connecting"
                self.last_error = f"{type(exc).__name__}: {exc}"
            self._lost(self.last_error or "closed")
            await asyncio.sleep(delay)  # reconnect backoff
            delay = min(delay * 1.5, 2.0)

    async def _read_acks(self) -> None:
        assert self._channel is not None
        while True:
            message = await self._channel.receive()
            self._last_heard = time.monotonic()
            if message["type"] == "ack":
                future = self._pending.pop(message.get("id", -1), None)
                if future is not None and not future.done():
                    future.set_result(None)

    async def _heartbeat(self) -> None:
        interval = self.node.config.heartbeat_s
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - self._last_heard > 3 * interval:
                raise TimeoutError(f"no answer to heartbeats for {3 * interval:g} s")
            assert self._channel is not None
            self._channel.send({"type": "ping"})

    def _lost(self, why: str) -> None:
        if self._channel is not None:
            self._retired_bytes += self._channel.bytes_sent
            self._channel.close()
            self._channel = None
        if self.state == "up":
            self.state = "down"
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError(why))
                future.exception()  # retrieved: nobody may be waiting (async mode)
        self._pending.clear()

    def as_dict(self) -> dict[str, Any]:
        """The link as /healthz shows it."""
        return {"address": self.address, "state": self.state, "last_error": self.last_error, "cut": self.cut}

    def set_cut(self, cut: bool) -> None:
        """Stop (or resume) sending changes to this peer: the lab's network partition of one direction."""
        healed = self.cut and not cut
        self.cut = cut
        if healed and self._channel is not None:
            # Reconnect: a new link starts with a snapshot, so anti-entropy fills the gap the cut left.
            self._channel.close()


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
        self.counters = {"changes_sent": 0, "acks": 0, "ack_timeouts": 0, "refused": 0, "forged_frames": 0}
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
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
            with contextlib.suppress(OSError, ProtocolError, PermissionError, TimeoutError):
                await self._sync_from(seed)
                break
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
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

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
                self.counters["ack_timeouts"] += 1
                future.cancel()
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
        """Connect to a peer and introduce ourselves; PermissionError if it refuses us."""
        host, _, port = address.rpartition(":")
        async with asyncio.timeout(self.config.ack_timeout_s * 4 + 1.0):
            reader, writer = await asyncio.open_connection(host, int(port))
            channel = Channel(reader, writer, self.config.max_message_bytes)
            try:
                await channel.connect(self._secret)
                channel.send({"type": "hello", "node": self.node_id, "addr": self.address, "purpose": purpose})
                answer = await channel.receive()
            except BaseException:
                channel.close()
                raise
        if answer["type"] != "welcome":
            channel.close()
            raise PermissionError(f"{address} refused us: {answer.get('reason', answer['type'])}")
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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        channel = Channel(reader, writer, self.config.max_message_bytes)
        peer = writer.get_extra_info("peername")
        try:
            await channel.accept(self._secret)
            hello = await channel.receive()
            refusal = self._refusal(hello)
            if refusal:
                self.counters["refused"] += 1
                log.warning("refused replication from %s (%s): %s", hello.get("addr"), peer, refusal)
                channel.send({"type": "refused", "reason": refusal})
                await channel.drain()
                return
            channel.send({"type": "welcome", "node": self.node_id})
            await self._serve(channel)
        except ProtocolError as exc:
            self.counters["forged_frames"] += 1
            log.warning("closed a replication connection from %s: %s", peer, exc)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("replication connection from %s ended: %s", peer, exc)
        finally:
            channel.close()
            self._handlers.discard(task)

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
        """Stream every session this node knows to a peer, in bounded batches."""
        batch: list[dict[str, Any]] = []
        for change in self.table.snapshot():
            batch.append(change)
            if len(batch) >= SNAPSHOT_BATCH:
                channel.send({"type": "sessions", "changes": batch})
                batch = []
                await channel.drain()
        if batch:
            channel.send({"type": "sessions", "changes": batch})
        await channel.drain()

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
