"""A link: an asyncio TCP relay between two parts of a lab, with faults per direction.

Toxiproxy is the model (its server is in no package registry here), one toxic
for one fault, each set per direction: `upstream` is from -> to (the requests),
`downstream` to -> from (the answers).

    latency_ms, jitter_ms   every chunk delivered that much later (uniform +-jitter), order kept
    bandwidth_kb_s          at most that many kilobytes (1000 bytes) a second
    blackhole               hold every byte (Toxiproxy's `timeout` without its close); heal releases them
    slow_close_ms           the end of a stream (FIN) delayed that long
    reset                   every connection, open or new, answered with a TCP reset (`reset_peer`)
    down                    the listener closed: new connections refused, open ones reset
                            (Toxiproxy's disabled proxy)

Links can share a listener when they are told apart by the client's source
address: after a failover a replica and the Sentinels dial one announced
address, and only the replica binds its own source (`bind-source-addr`). The
first link on an address owns the listener; a link created later on the same
address names its `sources` (client hosts) and is given the connections from
them; the owner takes the rest (or, if it names sources too, resets them). A
shared link that is `down` resets new connections at once rather than closing
the listener its siblings still need.

A link also mirrors its target: when the target refuses a connection (the app
server was killed) the client gets a reset and the link stops listening until
the target accepts again, so the side in front sees a refused connection as it
would without the link, not a connection closed after it was accepted.

Bytes are never buffered without bound: each direction holds at most
`QUEUE_CHUNKS` reads, then stops reading, and TCP's own flow control pushes back
on the sender (a blackholed link fills up, then the sender's writes block).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
QUEUE_CHUNKS = 16  # per direction: at most 1 MiB held by the relay itself
PROBE_S = 0.05  # how often a link whose target refused asks whether it accepts again
CONNECT_TIMEOUT_S = 5.0

Direction = Literal["upstream", "downstream"]
DIRECTIONS: tuple[Direction, ...] = ("upstream", "downstream")
_EOF = b""


class LinkError(ValueError):
    """A fault or a link described wrongly; the message says what and how to fix it."""


class UnknownLink(LinkError):
    """A link or a partition that does not exist (the API's 404)."""


@dataclass
class StreamFaults:
    """The faults of one direction of a link."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_kb_s: float = 0.0  # 0: unlimited
    blackhole: bool = False
    slow_close_ms: float = 0.0

    def active(self) -> dict[str, Any]:
        """The faults set, by name (what the admin API shows)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


STREAM_KEYS = tuple(f.name for f in fields(StreamFaults))
LINK_KEYS = ("down", "reset")
FAULT_KEYS = (*STREAM_KEYS, *LINK_KEYS, "direction")


def parse_faults(body: object) -> tuple[dict[str, Any], tuple[Direction, ...]]:
    """Check a fault request (`{"latency_ms": 200, "direction": "both"}`); LinkError naming every mistake."""
    if not isinstance(body, dict) or not body:
        raise LinkError(f'give a JSON object of faults, e.g. {{"latency_ms": 200}}; keys: {", ".join(FAULT_KEYS)}')
    problems = [f"unknown key {key!r} (known: {', '.join(FAULT_KEYS)})" for key in body if key not in FAULT_KEYS]
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("blackhole", *LINK_KEYS):
            if not isinstance(value, bool):
                problems.append(f"{key} must be true or false, not {value!r}")
            changes[key] = value
        elif key in STREAM_KEYS:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 600_000:
                problems.append(f"{key} must be a number from 0 to 600000, not {value!r}")
            changes[key] = value
    direction = body.get("direction", "both")
    if direction not in ("both", *DIRECTIONS):
        problems.append(f"direction must be upstream, downstream or both, not {direction!r}")
    if problems:
        raise LinkError("; ".join(problems))
    return changes, DIRECTIONS if direction == "both" else (direction,)


@dataclass
class StreamCounters:
    """What one direction of a link carried."""

    bytes: int = 0
    held: int = 0  # read from the sender, not yet written to the receiver


@dataclass
class Link:
    """One relay: listens on `listen_port`, forwards to `target`; its faults; its counters."""

    name: str
    source: str  # the part that connects (`lb`, `was-1`): what the admin API calls `from`
    dest: str  # the part it reaches (`was-1`, `redis`): `to`
    target_host: str
    target_port: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    sources: tuple[str, ...] = ()  # the client hosts this link carries; () = any (see the module docstring)
    faults: dict[Direction, StreamFaults] = field(default_factory=lambda: {d: StreamFaults() for d in DIRECTIONS})
    down: bool = False
    reset: bool = False
    partitions: set[str] = field(default_factory=set)  # the partitions that cut this link
    counters: dict[Direction, StreamCounters] = field(default_factory=lambda: {d: StreamCounters() for d in DIRECTIONS})
    connections: int = 0
    refused: int = 0  # connections reset because the target refused them
    target_refusing: bool = False
    unrouted: int = 0  # connections reset because their source is no link's of this listener
    _owner: Link | None = field(default=None, repr=False)  # the link whose listener this one shares
    _siblings: dict[str, Link] = field(default_factory=dict, repr=False)  # by source host, on the owner
    _server: asyncio.Server | None = field(default=None, repr=False)
    _open: set[_Connection] = field(default_factory=set, repr=False)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    _flowing: dict[Direction, asyncio.Event] = field(default_factory=dict, repr=False)
    _probe: asyncio.Task[None] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind the listener (port 0: the kernel picks; the bound port is kept for every later bind)."""
        for direction in DIRECTIONS:
            self._flowing[direction] = asyncio.Event()
        self._update_flow()
        await self._listen()

    def share(self, sibling: Link) -> None:
        """Give `sibling` this link's listener for the connections from its sources (checked by the caller)."""
        sibling._owner = self
        for host in sibling.sources:
            self._siblings[host] = sibling

    def source_link(self, host: str) -> Link:
        """The link of this listener that carries connections from `host`."""
        return self._siblings.get(host, self)

    @property
    def borrows_listener(self) -> bool:
        """Whether this link uses another link's listener."""
        return self._owner is not None

    @property
    def shared(self) -> bool:
        """Whether this link's listener carries other links too."""
        return self._owner is not None or bool(self._siblings)

    async def stop(self) -> None:
        """Close the listener and reset every open connection."""
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self._unlisten()
        for conn in list(self._open):
            conn.reset()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _listen(self) -> None:
        if self._owner is not None:
            return  # the owner listens
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, self.listen_host, self.listen_port, reuse_address=True, limit=CHUNK_BYTES
            )
            self.listen_port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # the listening socket closes now: a connect is refused from here on

    # ------------------------------------------------------------------ faults

    async def apply(self, changes: dict[str, Any], directions: tuple[Direction, ...]) -> None:
        """Set the faults in `changes` (checked by parse_faults) on `directions`; the others stay."""
        for key, value in changes.items():
            if key in LINK_KEYS:
                setattr(self, key, value)
            else:
                for direction in directions:
                    setattr(self.faults[direction], key, value)
        await self._enforce()

    async def heal(self) -> None:
        """Clear every fault of this link (its partitions stay until they are healed)."""
        self.faults = {d: StreamFaults() for d in DIRECTIONS}
        self.down = self.reset = False
        await self._enforce()

    async def set_partition(self, name: str, cut: bool) -> None:
        """Put this link in partition `name` (cut both ways, bytes held) or take it out."""
        if cut:
            self.partitions.add(name)
        else:
            self.partitions.discard(name)
        await self._enforce()

    async def _enforce(self) -> None:
        self._update_flow()
        if self.down or self.reset:
            for conn in list(self._open):
                conn.reset()
        if self.down and not self.shared:
            await self._unlisten()
        elif not self.target_refusing:
            await self._listen()

    def _update_flow(self) -> None:
        for direction, event in self._flowing.items():
            if self.faults[direction].blackhole or self.partitions:
                event.clear()
            else:
                event.set()

    def describe(self) -> dict[str, Any]:
        """The link as `GET /links` shows it."""
        faults: dict[str, Any] = {d: self.faults[d].active() for d in DIRECTIONS if self.faults[d].active()}
        faults.update({key: True for key in LINK_KEYS if getattr(self, key)})
        if self.partitions:
            faults["partitions"] = sorted(self.partitions)
        return {
            "name": self.name,
            "from": self.source,
            "to": self.dest,
            "listen": f"{self.listen_host}:{self.listen_port}",
            "target": f"{self.target_host}:{self.target_port}",
            **({"sources": list(self.sources)} if self.sources else {}),
            "faults": faults,
            "state": "cut" if self.down or self.reset or self.partitions or self._blackholed() else
                     "slowed" if self._slowed() else "ok",
            "bytes": {d: self.counters[d].bytes for d in DIRECTIONS},
            "held": {d: self.counters[d].held for d in DIRECTIONS},
            "connections": {"total": self.connections, "open": len(self._open), "target_refused": self.refused,
                            **({"unrouted": self.unrouted} if self.unrouted else {})},
            "target_refusing": self.target_refusing,
        }  # fmt: skip

    def _blackholed(self) -> bool:
        return any(self.faults[d].blackhole for d in DIRECTIONS)

    def _slowed(self) -> bool:
        return any(self.faults[d].latency_ms or self.faults[d].bandwidth_kb_s for d in DIRECTIONS)

    # ------------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        host = (writer.get_extra_info("peername") or ("",))[0]
        link = self.source_link(host)
        try:
            if link is self and self.sources and host not in self.sources:
                self.unrouted += 1
                _reset(writer)
                return
            await link._relay(reader, writer)
        except asyncio.CancelledError:
            _reset(writer)  # stopped: asyncio's streams log a handler that ends cancelled as an error
        finally:
            self._handlers.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.reset or self.down:
            _reset(writer)
            return
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                target_reader, target_writer = await asyncio.open_connection(
                    self.target_host, self.target_port, limit=CHUNK_BYTES
                )
        except (OSError, TimeoutError) as exc:
            self.refused += 1
            _reset(writer)
            if isinstance(exc, ConnectionRefusedError):
                await self._mirror_refusal()
            return
        conn = _Connection(self, (reader, writer), (target_reader, target_writer))
        self._open.add(conn)
        try:
            await conn.run()
        finally:
            self._open.discard(conn)

    async def probe_target(self) -> bool:
        """Ask the target now (the lab has just killed it): if it refuses, refuse too; True if it accepts."""
        try:
            _, writer = await asyncio.open_connection(self.target_host, self.target_port)
        except ConnectionRefusedError:
            await self._mirror_refusal()
            return False
        writer.close()
        return True

    async def _mirror_refusal(self) -> None:
        """The target refused: refuse too until it accepts again (see the module docstring)."""
        if self._owner is not None:
            await self._owner._mirror_refusal()  # one target, one listener: the owner refuses for all
            return
        if self.target_refusing:
            return
        self.target_refusing = True
        await self._unlisten()
        self._probe = asyncio.create_task(self._until_target_accepts())

    async def _until_target_accepts(self) -> None:
        while True:
            try:
                _, writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                await asyncio.sleep(PROBE_S)  # polling is the only way to learn that a port opened
                continue
            writer.close()
            break
        self.target_refusing = False
        if not self.down:
            await self._listen()


class _Connection:
    """One client connection and its connection to the target: two pumps, one per direction."""

    def __init__(
        self,
        link: Link,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.link = link
        self.writers = (client[1], target[1])
        self.pumps = (
            _Pump(link, "upstream", client[0], target[1]),
            _Pump(link, "downstream", target[0], client[1]),
        )

    async def run(self) -> None:
        tasks = [asyncio.create_task(task) for pump in self.pumps for task in (pump.read(), pump.write())]
        try:
            await asyncio.gather(*tasks)
        except (ConnectionError, OSError):
            # One side reset (or died): the other gets a reset too, as a direct connection would.
            self.reset()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in self.writers:
                writer.close()
            for pump in self.pumps:
                pump.release()

    def reset(self) -> None:
        """Abort both sides with a TCP reset."""
        for writer in self.writers:
            _reset(writer)


class _Pump:
    """One direction of a connection: a reader that queues chunks, a writer that delivers them when due."""

    def __init__(self, link: Link, direction: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.link, self.direction = link, direction
        self.reader, self.writer = reader, writer
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        self.counters = link.counters[direction]
        self.last_due = 0.0
        self.held = 0
        self.queued = 0  # chunks handed to the writer and not yet delivered
        self.flowing = link._flowing[direction]

    async def read(self) -> None:
        while True:
            chunk = await self.reader.read(CHUNK_BYTES)
            faults = self.link.faults[self.direction]
            if chunk and not self.queued and self.flowing.is_set() and _clear(faults):
                # No fault and nothing queued: deliver at once, without the writer task's hand-off,
                # which is what a link costs when no fault is set (benchmarks/links.py).
                self.writer.write(chunk)
                self.counters.bytes += len(chunk)
                await self.writer.drain()
                continue
            now = time.monotonic()
            delay_ms = faults.latency_ms + random.uniform(-faults.jitter_ms, faults.jitter_ms)
            if not chunk:
                delay_ms = max(delay_ms, faults.slow_close_ms)
            # max(): jitter never reorders bytes, as on a real link (TCP's sequence numbers).
            self.last_due = max(self.last_due, now + max(0.0, delay_ms) / 1000)
            self.held += len(chunk)
            self.counters.held += len(chunk)
            self.queued += 1
            await self.queue.put((self.last_due, chunk))
            if not chunk:
                return

    async def write(self) -> None:
        while True:
            due, chunk = await self.queue.get()
            await self.flowing.wait()  # a blackhole holds here; heal sets it again
            wait_s = due - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)  # the latency fault: delivering later is the point
            if not chunk:
                if self.writer.can_write_eof():
                    self.writer.write_eof()  # half-close: the other direction goes on
                return
            self.writer.write(chunk)
            await self.writer.drain()
            self.held -= len(chunk)
            self.counters.held -= len(chunk)
            self.counters.bytes += len(chunk)
            rate = self.link.faults[self.direction].bandwidth_kb_s
            if rate:
                await asyncio.sleep(len(chunk) / (rate * 1000))  # the bandwidth fault
            self.queued -= 1

    def release(self) -> None:
        """Forget the bytes this pump still held (its connection is gone)."""
        self.counters.held -= self.held
        self.held = 0


def _clear(faults: StreamFaults) -> bool:
    """No fault that delays a chunk (a blackhole is the flow event's; slow_close concerns only the end)."""
    return not (faults.latency_ms or faults.jitter_ms or faults.bandwidth_kb_s)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), not a FIN: SO_LINGER on, timeout 0, then close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
