"""Backpressure pauses belong to one exchange: they must never outlive it on a pooled connection."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiohttp import web

from lbsession.balancer.balancer import LoadBalancer
from lbsession.config import BalancerConfig, LimitsConfig, UpstreamConfig

pytestmark = pytest.mark.integration

BIG = b"x" * (4 * 1024 * 1024)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return int(head.split(b" ")[1]), await reader.readexactly(length)


async def test_a_slow_reader_leaves_no_paused_connection_in_the_pool():
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=BIG)

    async def small(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/big", big)
    app.router.add_get("/small", small)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream = UpstreamConfig("only", f"http://127.0.0.1:{runner.addresses[0][1]}")
    lb = LoadBalancer(
        BalancerConfig(port=0, admin_port=0, upstreams=(upstream,), limits=LimitsConfig(read_timeout_s=3))
    )
    await lb.start()
    try:
        # A client with a tiny receive window that reads late: the proxy must pause the upstream.
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.setblocking(False)
        await asyncio.get_running_loop().sock_connect(slow, ("127.0.0.1", lb.port))
        reader, writer = await asyncio.open_connection(sock=slow)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            while not any(c.paused_upstream for c in lb.clients):  # the pause happened
                await asyncio.sleep(0.005)
        status, body = await read_response(reader)
        assert (status, len(body)) == (200, len(BIG))
        writer.close()

        # The same (only) pooled upstream connection now serves someone else, at once.
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(2):  # well under the 3 s read timeout a paused connection would hit
            assert await read_response(reader) == (200, b"ok")
        writer.close()
    finally:
        await lb.stop()
        await runner.cleanup()
    assert time.monotonic() - started < 2
    assert lb.errors.get(504, 0) == 0
