"""The Python cost of one proxied request, without sockets: both protocols fed in memory.

`lbsession bench` measures the whole balancer process (Python, uvloop and the
kernel's TCP work) under load. This isolates the Python part, which is what a
change to lbsession/balancer/ can move, and is steady enough to compare two
versions of the code:

    python benchmarks/datapath.py                 # round-robin
    python benchmarks/datapath.py sticky-cookie   # any strategy name
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from lbsession.balancer.balancer import LoadBalancer
from lbsession.balancer.compiled import build
from lbsession.balancer.proxy import ClientConnection, UpstreamConnection
from lbsession.config import STRATEGY_NAMES, BalancerConfig, StickyConfig, UpstreamConfig

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 01:10:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)


class MemoryTransport:
    """Just enough of a transport for the protocols: it keeps what they write."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if len(self.written) > 64:
            del self.written[:32]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


async def measure(strategy: str, requests: int = 100_000) -> float:
    """Microseconds of Python per request through `strategy`, one client, three pooled upstreams."""
    upstreams = tuple(UpstreamConfig(id=f"was-{i}", url=f"http://127.0.0.1:{9001 + i}") for i in range(3))
    lb = LoadBalancer(BalancerConfig(strategy=strategy, upstreams=upstreams, sticky=StickyConfig(secret="b" * 32)))
    for upstream in lb.pool.upstreams.values():
        conn = UpstreamConnection(lb, upstream)
        conn.connection_made(MemoryTransport())  # type: ignore[arg-type]
        upstream.idle.append(conn)
    client = ClientConnection(lb)
    client_transport = MemoryTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    request = REQUEST
    started = time.process_time()  # this process's CPU only: a neighbour on a shared machine does not count
    for _ in range(requests):
        client.data_received(request)
        assert client.upstream_conn is not None
        client.upstream_conn.data_received(RESPONSE)
        if strategy == "sticky-cookie" and request is REQUEST:  # come back with the pin, as a browser would
            cookie = client_transport.written[-1].split(b"Set-Cookie: ")[1].split(b";")[0]
            request = REQUEST.replace(b"\r\n\r\n", b"\r\nCookie: " + cookie + b"\r\n\r\n")
    elapsed = time.process_time() - started
    assert client_transport.written[-1].endswith(b"ok\n")
    return elapsed / requests * 1e6


def main() -> None:
    names = sys.argv[1:] or ["round-robin"]
    print(f"build: {build().description}")  # LBSESSION_PURE=1 for the pure one beside it
    for name in names:
        if name not in STRATEGY_NAMES:
            raise SystemExit(f"error: unknown strategy {name!r}; choose from {', '.join(STRATEGY_NAMES)}")
        print(f"{name:<16} {asyncio.run(measure(name)):6.2f} us of Python per proxied request")


if __name__ == "__main__":
    main()
