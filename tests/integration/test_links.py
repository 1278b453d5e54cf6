"""The lab's links: a real TCP relay between real sockets, and each fault's effect measured on them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from lbsession.lab.link_service import LinkRegistry, LinkService
from lbsession.lab.links import CHUNK_BYTES, QUEUE_CHUNKS, Link, LinkError, parse_faults

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _digest_then_send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to the client's half-close, answer the digest, then 3 MB of our own, then close."""
    data = await reader.read()
    writer.write(hashlib.sha256(data).digest() + len(data).to_bytes(8, "big"))
    writer.write(bytes(range(256)) * (3 * 4096))
    await writer.drain()
    writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()


@pytest.fixture
async def relay() -> AsyncIterator[Callable[[Handler], Awaitable[Link]]]:
    """Start a target server with `handler` and a link in front of it; both stopped at the end."""
    started: list[tuple[asyncio.Server, Link]] = []

    async def start(handler: Handler) -> Link:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        link = Link("t", "test", "target", "127.0.0.1", server.sockets[0].getsockname()[1])
        await link.start()
        started.append((server, link))
        return link

    yield start
    for server, link in started:
        await link.stop()
        server.close()


async def _connect(link: Link) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", link.listen_port)


async def _echoes(link: Link, message: bytes) -> bool:
    """True when a new connection through `link` echoes `message` back."""
    reader, writer = await _connect(link)
    writer.write(message)
    echoed = await reader.readexactly(len(message))
    writer.close()
    return echoed == message


async def _until(check: Callable[[], bool]) -> None:
    while not check():  # the relay's counters are the fact waited for
        await asyncio.sleep(0.01)


async def test_bytes_exact_both_ways_with_half_close(relay: Any) -> None:
    link = await relay(_digest_then_send)
    reader, writer = await _connect(link)
    payload = os.urandom(5_000_003)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()  # half-close: the answer must still come back
    answer = await reader.read()
    writer.close()
    assert answer[:32] == hashlib.sha256(payload).digest()
    assert int.from_bytes(answer[32:40], "big") == len(payload)
    assert answer[40:] == bytes(range(256)) * (3 * 4096)
    await _until(lambda: link.counters["downstream"].bytes == len(answer))
    assert link.counters["upstream"].bytes == len(payload)
    await _until(lambda: link.describe()["connections"]["open"] == 0)  # closed once both directions ended
    assert link.describe()["connections"] == {"total": 1, "open": 0, "target_refused": 0}


async def test_many_connections_at_once_each_get_their_own_bytes(relay: Any) -> None:
    link = await relay(_echo)

    async def one(index: int) -> bytes:
        reader, writer = await _connect(link)
        message = f"connection {index} ".encode() * 200
        writer.write(message)
        writer.write_eof()
        echoed = await reader.read()
        writer.close()
        return echoed if echoed == message else b"mixed up: " + echoed[:40]

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert all(not r.startswith(b"mixed up") for r in results)
    assert link.connections == 200


async def test_backpressure_bounds_what_the_relay_holds(relay: Any) -> None:
    never_read = asyncio.Event()

    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await never_read.wait()
        writer.close()

    link = await relay(stuck)
    _, writer = await _connect(link)
    written, block = 0, b"x" * (1 << 20)
    while True:  # write until the sender is pushed back: a drain that does not complete
        writer.write(block)
        written += len(block)
        try:
            async with asyncio.timeout(1.0):
                await writer.drain()
        except TimeoutError:
            break
        assert written < 256 << 20, "256 MiB accepted by a receiver that reads nothing: no backpressure"
    assert link.counters["upstream"].held <= (QUEUE_CHUNKS + 2) * CHUNK_BYTES  # the queue, one being written, one read
    never_read.set()
    writer.transport.abort()


async def test_latency_is_added_each_way(relay: Any) -> None:
    link = await relay(_echo)
    reader, writer = await _connect(link)

    async def round_trip() -> float:
        started = time.monotonic()
        writer.write(b"ping")
        await reader.readexactly(4)
        return time.monotonic() - started

    await round_trip()
    changes, directions = parse_faults({"latency_ms": 100, "direction": "both"})
    await link.apply(changes, directions)
    slowed = await round_trip()
    # Both directions slowed by 100 ms: at least 200 ms, and not much more on a loaded machine.
    assert 0.2 <= slowed < 0.2 + 0.5
    await link.heal()
    assert await round_trip() < 0.2
    writer.close()


async def test_blackhole_holds_the_bytes_then_heal_releases_them(relay: Any) -> None:
    received = bytearray()

    async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)
        writer.close()

    link = await relay(collect)
    await link.apply(*parse_faults({"blackhole": True, "direction": "upstream"}))
    _, writer = await _connect(link)
    writer.write(b"held back" * 1000)
    await writer.drain()
    await _until(lambda: link.counters["upstream"].held == 9000)
    assert received == b""
    assert link.describe()["state"] == "cut"
    await link.heal()
    await _until(lambda: len(received) == 9000)
    assert bytes(received) == b"held back" * 1000
    writer.close()


async def test_reset_gives_the_peer_a_reset(relay: Any) -> None:
    link = await relay(_echo)
    reader, writer = await _connect(link)
    writer.write(b"hello")
    assert await reader.readexactly(5) == b"hello"
    await link.apply(*parse_faults({"reset": True}))
    with pytest.raises(ConnectionResetError):
        while await reader.read(100):
            pass
    reader, writer = await _connect(link)  # a new connection is reset too, until healed
    with pytest.raises(ConnectionResetError):
        while await reader.read(100):
            pass
    await link.heal()
    assert await _echoes(link, b"again")


async def test_down_refuses_connections_until_healed(relay: Any) -> None:
    link = await relay(_echo)
    await link.apply(*parse_faults({"down": True}))
    with pytest.raises(ConnectionRefusedError):
        await _connect(link)
    await link.heal()
    assert await _echoes(link, b"up")


async def test_a_refusing_target_makes_the_link_refuse_until_it_accepts_again(relay: Any) -> None:
    link = await relay(_echo)
    port = link.target_port
    # The target goes away (a killed server): the link is pointed at a port whose listener closed.
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    link.target_port = target.sockets[0].getsockname()[1]
    target.close()
    await target.wait_closed()
    reader, _ = await _connect(link)
    with contextlib.suppress(ConnectionResetError):
        assert await reader.read() == b""
    await _until(lambda: link.target_refusing)
    with pytest.raises(ConnectionRefusedError):
        await _connect(link)
    link.target_port = port  # the target is back (the fixture's server)
    await _until(lambda: not link.target_refusing)
    assert await _echoes(link, b"back")


def test_fault_requests_are_checked_whole() -> None:
    assert parse_faults({"latency_ms": 200, "jitter_ms": 20, "direction": "both"}) == (
        {"latency_ms": 200, "jitter_ms": 20},
        ("upstream", "downstream"),
    )
    with pytest.raises(LinkError) as caught:
        parse_faults({"latency_ms": -5, "colour": "red", "blackhole": "yes", "direction": "sideways"})
    message = str(caught.value)
    for part in ("latency_ms must be a number", "unknown key 'colour'", "blackhole must be true or false",
                 "direction must be"):  # fmt: skip
        assert part in message
    with pytest.raises(LinkError, match="give a JSON object"):
        parse_faults({})


async def test_the_links_process_api(tmp_path: Path) -> None:
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    service = LinkService(tmp_path / "links.log", secrets.token_urlsafe(16))
    await service.start()
    try:
        port = await service.add("was-1->redis", "was-1", "redis", target.sockets[0].getsockname()[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"through another process")
        assert await reader.readexactly(23) == b"through another process"

        status, answer = await service.call("PUT", "/links/was-1->redis", {"latency_ms": -1})
        assert status == 400 and "latency_ms" in answer["error"]
        status, answer = await service.call("PUT", "/links/nope", {"latency_ms": 1})
        assert status == 404 and "known: was-1->redis" in answer["error"]
        status, answer = await service.call("POST", "/partitions", {"name": "p1", "cut": ["was-1->redis", "nope"]})
        assert status == 400 and "nope" in answer["error"]
        status, answer = await service.call("GET", "/links")
        (link,) = answer["links"]
        assert link["faults"] == {} and link["bytes"] == {"upstream": 23, "downstream": 23}

        status, answer = await service.call("POST", "/partitions", {"name": "p1", "cut": ["was-1->redis"]})
        assert status == 201
        writer.write(b"held")
        await writer.drain()
        status, answer = await service.call("GET", "/links")
        while answer["links"][0]["held"]["upstream"] != 4:  # the relay holds the 4 bytes
            status, answer = await service.call("GET", "/links")
        assert answer["links"][0]["bytes"] == {"upstream": 23, "downstream": 23}
        assert answer["links"][0]["faults"] == {"partitions": ["p1"]}
        status, answer = await service.call("DELETE", "/partitions/p1")
        assert status == 200
        assert await reader.readexactly(4) == b"held"
        writer.close()
    finally:
        await service.stop()
        target.close()


async def test_a_cleared_links_process_has_no_link_or_partition_left(tmp_path: Path) -> None:
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    service = LinkService(tmp_path / "links.log", secrets.token_urlsafe(16))
    await service.start()
    try:
        port = await service.add("was-1->redis", "was-1", "redis", target.sockets[0].getsockname()[1])
        status, _ = await service.call("POST", "/partitions", {"name": "p1", "cut": ["was-1->redis"]})
        assert status == 201
        await service.clear()
        assert await service.call("GET", "/links") == (200, {"links": []})
        assert await service.call("GET", "/partitions") == (200, {"partitions": []})
        with pytest.raises(OSError):  # its listener is closed: the next lab may take the port
            await asyncio.open_connection("127.0.0.1", port)
        assert await service.add("was-1->redis", "was-1", "redis", target.sockets[0].getsockname()[1])  # the name again
    finally:
        await service.stop()
        target.close()


async def _echoes_from(host: str, port: int, message: bytes, listen_host: str = "127.0.2.9") -> bool:
    """True when a connection from source `host` to the shared listener echoes `message` back."""
    reader, writer = await asyncio.open_connection(listen_host, port, local_addr=(host, 0))
    writer.write(message)
    echoed = await reader.readexactly(len(message))
    writer.close()
    return echoed == message


@pytest.fixture
async def local_links() -> AsyncIterator[tuple[LinkRegistry, str]]:
    """A link registry in this process and an echo server's address to point its links at; both stopped."""
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    links = LinkRegistry()
    yield links, f"127.0.0.1:{target.sockets[0].getsockname()[1]}"
    await links.stop()
    target.close()


async def test_links_sharing_a_listener_are_told_apart_by_source_and_faulted_apart(local_links: Any) -> None:
    registry, target_at = local_links
    owner = await registry.create({"name": "sentinels->n", "from": "sentinels", "to": "n", "target": target_at,
                                   "listen": "127.0.2.9:0"})  # fmt: skip
    listen = f"127.0.2.9:{owner.listen_port}"
    replica = await registry.create({"name": "r->n", "from": "r", "to": "n", "target": target_at,
                                     "listen": listen, "sources": ["127.0.3.2"]})  # fmt: skip
    assert await _echoes_from("127.0.0.1", owner.listen_port, b"sentinel")
    assert await _echoes_from("127.0.3.2", owner.listen_port, b"replica")
    assert (owner.connections, replica.connections) == (1, 1)
    assert replica.describe()["listen"] == listen and replica.describe()["sources"] == ["127.0.3.2"]

    await replica.apply(*parse_faults({"down": True}))  # the replica's path refuses; the Sentinels' stays
    assert await _echoes_from("127.0.0.1", owner.listen_port, b"still")
    reader, _ = await asyncio.open_connection("127.0.2.9", owner.listen_port, local_addr=("127.0.3.2", 0))
    with contextlib.suppress(ConnectionResetError):
        assert await reader.read() == b""
    await replica.heal()
    await registry.cut({"name": "p", "cut": ["sentinels->n"]})  # the reverse: Sentinels cut, replica through
    assert await _echoes_from("127.0.3.2", owner.listen_port, b"replica again")
    await registry.heal_partition("p")

    with pytest.raises(LinkError, match="must name its sources"):
        await registry.create({"name": "x", "from": "x", "to": "n", "target": target_at, "listen": listen})
    with pytest.raises(LinkError, match="another link's already"):
        await registry.create({"name": "y", "from": "y", "to": "n", "target": target_at, "listen": listen,
                               "sources": ["127.0.3.2"]})  # fmt: skip


async def test_a_listener_whose_links_all_name_sources_resets_a_stranger(local_links: Any) -> None:
    registry, target_at = local_links
    link = await registry.create({"name": "a->b", "from": "a", "to": "b", "target": target_at,
                                  "listen": "127.0.2.9:0", "sources": ["127.0.5.1"]})  # fmt: skip
    assert await _echoes_from("127.0.5.1", link.listen_port, b"peer")
    reader, _ = await asyncio.open_connection("127.0.2.9", link.listen_port)
    with contextlib.suppress(ConnectionResetError):
        assert await reader.read() == b""
    assert link.unrouted == 1 and link.connections == 1
