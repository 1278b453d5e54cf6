"""This node's outbound link to one peer: a snapshot at every connect, then changes, acks and heartbeats.

A link's states, and what `send` does with a change in each:

    connecting ─┬─> syncing ──> up ──> down ──> syncing ...    refused: the peer does not list us
    down ───────┘   (queued)   (sent)  (None)

A new connection first streams this node's snapshot (anti-entropy: whatever
the peer missed while the link was down). The snapshot copied each session
before it streamed, so a change written meanwhile is queued and sent right
after it; skipping the peer then would lose the change there until the next
reconnect. The queue is bounded: past it the link drops, and the reconnect's
fresh snapshot carries everything it held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from lbsession.appserver.cluster.protocol import Channel, MessageTooLarge, ProtocolError
from lbsession.errors import PeerRefused

if TYPE_CHECKING:
    from lbsession.appserver.cluster.node import ClusterNode

log = logging.getLogger(__name__)

# Messages queued while a snapshot streams. A burst of writes longer than this during one snapshot
# costs less as a fresh snapshot than as a queue. A constant, not a setting: config.py is shared.
MAX_SYNC_BACKLOG = 5000

# connecting: never up yet; syncing: a snapshot streams; up: changes flow; down: lost, reconnecting;
# refused: the peer does not list us (static membership), retried slowly.
LinkState = Literal["connecting", "syncing", "up", "down", "refused"]


class PeerLink:
    """This node's outbound connection to one peer: sends changes, collects acks, heartbeats."""

    def __init__(self, node: ClusterNode, address: str) -> None:
        self.node = node
        self.address = address
        self.state: LinkState = "connecting"
        self.last_error: str | None = None
        self.connections = 0  # how many times the link came up: a flapping link shows here
        self._channel: Channel | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._backlog: list[bytes] = []  # payloads written while the snapshot streams
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
        """Send a change (after the snapshot while syncing); a future resolved by the peer's ack, or None."""
        if self.cut or self.state not in ("up", "syncing"):
            return None
        self._next_id += 1
        message_id = self._next_id
        try:
            taken = self._post({"type": "change", "id": message_id, "change": change})
        except MessageTooLarge as exc:
            # Sent, it would make the peer close the link, and again on every snapshot: keep it local.
            self.node.counters["oversize"] += 1
            log.warning("cluster change of session %s not sent to %s: %s", change.get("sid"), self.address, exc)
            return None
        if not taken:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        return future

    def announce(self, address: str) -> None:
        """Tell the peer about a new member (join membership)."""
        if self.state in ("up", "syncing"):
            self._post({"type": "member", "addr": address})

    def _post(self, message: dict[str, Any]) -> bool:
        """Write a message now (up) or once the snapshot has gone (syncing); False if the link dropped instead."""
        assert self._channel is not None
        payload = self._channel.encode(message)
        if self.state == "up":
            self._channel.send_payload(payload)
        elif len(self._backlog) < MAX_SYNC_BACKLOG:
            self._backlog.append(payload)
        else:
            self.state = "down"  # take no more: the reconnect's snapshot carries these changes
            self.mark_down(f"over {MAX_SYNC_BACKLOG} changes were written during the snapshot")
            return False
        return True

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
                self._channel = channel = await self.node.open_channel(self.address, "replicate")
                await self._sync(channel)
                delay = 0.05
                log.info("cluster link to %s is up", self.address)
                await self._watch(channel)
            except PeerRefused as exc:  # the peer refused us: not in its list
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

    async def _sync(self, channel: Channel) -> None:
        """Stream the snapshot, then the changes written meanwhile; the link is up when this returns."""
        self.state = "syncing"
        # A merge is idempotent, so sending what the peer already has costs only bytes.
        await self.node.send_snapshot(channel)
        if self.state != "syncing" or channel.is_closing():
            raise ConnectionResetError(f"the link closed during its snapshot ({self.last_error or 'by the peer'})")
        backlog, self._backlog = self._backlog, []
        for payload in backlog:  # order does not matter: every attribute merges by its version
            channel.send_payload(payload)
        self.state, self.last_error = "up", None
        self.connections += 1
        self._last_heard = time.monotonic()
        self.settled.set()

    async def _watch(self, channel: Channel) -> None:
        """Read acks and send heartbeats until either fails; neither outlives the other or this connection."""
        tasks = [
            asyncio.create_task(self._read_acks(channel), name=f"cluster-acks-{self.address}"),
            asyncio.create_task(self._heartbeat(channel), name=f"cluster-heartbeat-{self.address}"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises why the connection ended
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_acks(self, channel: Channel) -> None:
        while True:
            message = await channel.receive()
            self._last_heard = time.monotonic()
            if message["type"] == "ack":
                future = self._pending.pop(message.get("id", -1), None)
                if future is not None and not future.done():
                    future.set_result(None)

    async def _heartbeat(self, channel: Channel) -> None:
        interval = self.node.config.heartbeat_s
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - self._last_heard > 3 * interval:
                raise TimeoutError(f"no answer to heartbeats for {3 * interval:g} s")
            channel.send({"type": "ping"})

    def _lost(self, why: str) -> None:
        if self._channel is not None:
            self._retired_bytes += self._channel.bytes_sent
            self._channel.close()
            self._channel = None
        if self.state in ("up", "syncing"):
            self.state = "down"
        self._backlog.clear()  # the next connection's snapshot carries these changes
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
