"""The floor of a uvloop proxy: a byte relay beside lbsession and HAProxy, CPU per request in one run.

The relay is the least any proxy on uvloop can do per request: it copies bytes
between a client connection and an upstream connection of its own (one per
client, round-robin over the upstreams), parses nothing, pools nothing, times
nothing. What it costs is uvloop's C transport and the kernel's loopback TCP
for the same two reads and two writes per request that lbsession and HAProxy
make; what lbsession costs above it is lbsession's own work.

    python benchmarks/relay_floor.py            # 2 rounds
    python benchmarks/relay_floor.py 3          # 3 rounds, alternating the three targets

It reuses `lbsession bench`'s parts (nginx upstreams, wrk, /proc CPU per request).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import tempfile
from pathlib import Path

import uvloop

from lbsession.lab import bench
from lbsession.lab.process import free_ports, wait_http


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client.upstream_ready(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _Client(asyncio.Protocol):
    ports: itertools.cycle[int]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.upstream: asyncio.Transport | None = None
        self.waiting: list[bytes] = []
        loop = asyncio.get_running_loop()
        connect = loop.create_connection(lambda: _Upstream(self), bench.HOST, next(self.ports))
        self.connecting = loop.create_task(connect)

    def upstream_ready(self, transport: asyncio.Transport) -> None:
        self.upstream = transport
        for data in self.waiting:
            transport.write(data)
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.waiting.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def relay(port: int, upstream_ports: list[int]) -> None:
    """Serve the byte relay on `port` until killed."""
    _Client.ports = itertools.cycle(upstream_ports)
    server = await asyncio.get_running_loop().create_server(_Client, bench.HOST, port)
    await server.serve_forever()


async def measure(rounds: int) -> None:
    params = bench.BenchParams(strategy="round-robin")
    plan, haproxy = bench.plan_for(params)
    if haproxy is None or plan.wrk is None:
        raise SystemExit("error: needs haproxy and wrk (apt-get install haproxy wrk nginx)")
    case = bench.cases_for("round-robin")[0]
    with tempfile.TemporaryDirectory() as folder:
        children = bench.Children(Path(folder))
        try:
            upstreams = await bench.start_upstreams(children, params)
            (port,) = free_ports(1)
            argv = [sys.executable, __file__, "--serve", str(port), *map(str, upstreams.ports)]
            child = children.start("relay", argv)
            await wait_http(child, port, upstreams.path, bench.READY_TIMEOUT_S)
            url = f"http://{bench.HOST}:{port}{upstreams.path}"
            floor = bench.Target("byte relay (uvloop)", url, (child.popen.pid,))
            targets = [
                floor,
                await bench.start_lbsession(children, upstreams, case, "uvloop", params.connections),
                await bench.start_haproxy(children, upstreams, case, haproxy, params.connections),
            ]
            print(f"lbsession build: {targets[1].build}")
            for _ in range(rounds):
                for target in targets:
                    figures = await bench.measure(plan, target, upstreams.pids)
                    print(
                        f"{target.name:24} {figures.load.rps:8.0f} req/s  CPU {figures.cpu_us_per_request:5.1f} µs/req"
                        f"  p99 {figures.load.p99_ms:5.2f} ms"
                    )
        finally:
            await children.stop_all()


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        uvloop.run(relay(int(sys.argv[2]), [int(p) for p in sys.argv[3:]]))
    else:
        asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 2))


if __name__ == "__main__":
    main()
