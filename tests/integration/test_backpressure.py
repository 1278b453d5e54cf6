"""Backpressure pauses belong to one exchange: they must never outlive it on a pooled connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from lbsession.balancer.balancer import LoadBalancer
from lbsession.config import BalancerConfig, LimitsConfig, UpstreamConfig

pytestmark = pytest.mark.integration

BIG = b"x" * (4 * 1024 * 1024)
# More than the transport's 64 KiB high-water mark plus small kernel buffers, less than one read:
# the proxy gets the whole response at once and its own last bytes pause the upstream.
MEDIUM = b"m" * (100 * 1024)
BODIES = {"/big": BIG, "/medium": MEDIUM, "/small": b"ok"}


async def answer(request: web.Request) -> web.Response:
    return web.Response(body=BODIES[request.path])


@contextlib.asynccontextmanager
async def proxied() -> AsyncIterator[LoadBalancer]:
    """One upstream (so every exchange shares its connections) behind a balancer with a 3 s read timeout."""
    app = web.Application()
    for path in BODIES:
        app.router.add_get(path, answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream = UpstreamConfig("only", f"http://127.0.0.1:{runner.addresses[0][1]}")
    lb = LoadBalancer(
        BalancerConfig(port=0, admin_port=0, upstreams=(upstream,), limits=LimitsConfig(read_timeout_s=3))
    )
    await lb.start()
    try:
        yield lb
    finally:
        await lb.stop()
        await runner.cleanup()


async def slow_client(lb: LoadBalancer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a tiny receive window, which reads only when the test says (its reader takes 2 KiB ahead)."""
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    await asyncio.get_running_loop().sock_connect(slow, ("127.0.0.1", lb.port))
    return await asyncio.open_connection(sock=slow, limit=1024)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return int(head.split(b" ")[1]), await reader.readexactly(length)


async def answered_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(2):  # well under the 3 s read timeout a paused connection would hit
        assert await read_response(reader) == (200, b"ok")


async def test_a_slow_reader_leaves_no_paused_connection_in_the_pool():
    async with proxied() as lb:
        reader, writer = await slow_client(lb)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            while not any(c.paused_upstream for c in lb.clients):  # the pause happened
                await asyncio.sleep(0.005)
        status, body = await read_response(reader)
        assert (status, len(body)) == (200, len(BIG))
        writer.close()

        # Another client is answered at once.
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        await answered_at_once(reader, writer)
        writer.close()
    assert lb.errors.get(504, 0) == 0


async def test_a_response_that_ends_while_paused_is_resumed_before_its_connection_is_kept():
    async with proxied() as lb:
        reader, writer = await slow_client(lb)
        async with asyncio.timeout(5):
            while not lb.clients:
                await asyncio.sleep(0.005)
        (client,) = lb.clients
        proxy_side = client.transport.get_extra_info("socket")
        proxy_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel takes little
        writer.write(b"GET /medium HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):  # the exchange is over upstream while the client is still full
            while not (client.upstream_conn is None and client.own is not None):
                await asyncio.sleep(0.005)
        high_water = client.transport.get_write_buffer_limits()[1]
        assert client.transport.get_write_buffer_size() > high_water  # so it ended paused
        kept = client.own
        assert await read_response(reader) == (200, MEDIUM)

        # Its next request takes that connection back (http-reuse safe: our own first): a pause left
        # over from /medium would hold the answer until the read timeout.
        started = time.monotonic()
        await answered_at_once(reader, writer)
        assert lb.upstream_conns == {kept}  # it was that connection, not a new one
        writer.close()
    assert time.monotonic() - started < 2
    assert lb.errors.get(504, 0) == 0
