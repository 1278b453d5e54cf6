"""Soak and scale: long runs and many connections, with every process's memory printed.

    python benchmarks/soak.py soak [--users 200] [--duration 300] [--stores local,redis,cluster]
    python benchmarks/soak.py idle [--connections 10000]
    python benchmarks/soak.py overload [--connections 2000] [--max-connections 500]

`soak` runs a population through a real lab (`lbsession run`, so the balancer and every
app server are processes of their own) for each store and prints requests, errors,
re-logins and the resident memory of every process at the start and at the end: a leak
shows as a climb. Users log out and in again every 50 requests, so sessions are created
and destroyed all along, as in life. `idle` holds many keep-alive connections open on the
balancer and prints its memory per connection. `overload` opens more connections than the
balancer admits and counts how many were shed with a 503 rather than queued.

Everything goes to 127.0.0.1, is bounded in count and time, and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp


def rss_mib(pid: int) -> float:
    """The resident memory of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Lab:
    """`lbsession run` as a subprocess, with the pids of everything it started."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.info: dict[str, Any] = {}
        self.process: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> Lab:
        ready = Path(tempfile.mkdtemp(prefix="lbsession-soak-")) / "ready.json"
        argv = [sys.executable, "-m", "lbsession", "--log-level", "warning", "run", "--port", "0", "--admin-port", "0"]
        command = [*argv, "--ready-file", str(ready), *self.args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)  # noqa: ASYNC220 - starting does not block
        async with asyncio.timeout(60):
            while not ready.exists():
                if self.process.poll() is not None:
                    raise SystemExit(f"error: lbsession run exited with status {self.process.returncode}")
                await asyncio.sleep(0.1)
        self.info = json.loads(ready.read_text())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(asyncio.to_thread(self.process.wait), 30)
        except TimeoutError:
            self.process.kill()

    def pids(self) -> dict[str, int]:
        """Every process of the lab: the balancer (the `run` process), app servers, Redis."""
        assert self.process is not None
        pids = {"balancer": self.process.pid}
        pids.update({s["id"]: s["pid"] for s in self.info["servers"]})
        redis = self.info.get("redis") or {}
        pids.update({n["name"]: n["pid"] for n in redis.get("nodes", []) + redis.get("sentinels", [])})
        return pids


def count_error(tally: Counter[str], status: int, body: bytes) -> None:
    """Count a 5xx, by status and the first words of its reason, so a soak says what went wrong."""
    if status >= 500:
        tally["errors"] += 1
        tally[f"error: {status} {body[:80].decode(errors='replace').strip()}"] += 1


async def user_loop(lb: str, name: str, stop_at: float, tally: Counter[str]) -> None:
    """One virtual user: log in, read and write, log out and in again every 50 requests."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        while time.monotonic() < stop_at:
            async with http.post(lb + "/login", json={"username": name}) as r:
                tally["requests"] += 1
                count_error(tally, r.status, await r.read())
            for n in range(50):
                if time.monotonic() >= stop_at:
                    return
                try:
                    method, path = ("POST", "/cart") if n % 10 == 9 else ("GET", "/me")
                    async with http.request(method, lb + path, json={"item": "x"} if method == "POST" else None) as r:
                        body = await r.read()
                        tally["requests"] += 1
                        count_error(tally, r.status, body)
                        tally["relogins"] += r.status == 401
                except aiohttp.ClientError as exc:
                    tally["errors"] += 1
                    tally[f"error: {type(exc).__name__}"] += 1
            async with http.post(lb + "/logout") as r:
                tally["requests"] += 1


async def soak(store: str, users: int, duration_s: float) -> None:
    """One soak run against one store; prints its figures."""
    strategy = "sticky-cookie" if store == "local" else "round-robin"
    async with Lab("--strategy", strategy, "--backend", store) as lab:
        tally: Counter[str] = Counter()
        warm_up = min(10.0, duration_s / 5)
        loops = [user_loop(lab.info["lb"], f"user{n}", time.monotonic() + duration_s, tally) for n in range(users)]
        running = asyncio.gather(*loops)
        await asyncio.sleep(warm_up)  # measure memory once every user is in and caches are warm
        before = {name: rss_mib(pid) for name, pid in lab.pids().items()}
        # Mid-run too: stores keep deleted sessions' tombstones for a while (the cluster: 60 s), so a
        # store grows to a plateau first; a leak is what still grows between the middle and the end.
        await asyncio.sleep(max(0.0, duration_s / 2 - warm_up))
        middle = {name: rss_mib(pid) for name, pid in lab.pids().items()}
        await running
        after = {name: rss_mib(pid) for name, pid in lab.pids().items()}
    print(f"\n{store} ({strategy}), {users} users, {duration_s:g} s: {tally['requests']} requests, "
          f"{tally['errors']} errors, {tally['relogins']} re-logins")  # fmt: skip
    for kind, count in sorted(tally.items()):
        if kind.startswith("error: "):
            print(f"  {count} x {kind.removeprefix('error: ')}")
    print(f"  {'process':<14}{'RSS start MiB':>14}{'middle':>8}{'end':>8}{'middle to end':>15}")
    for name in before:
        growth = after[name] - middle[name]
        print(f"  {name:<14}{before[name]:14.1f}{middle[name]:8.1f}{after[name]:8.1f}{growth:+15.1f}")


async def hold_connections(url: str, count: int) -> list[asyncio.StreamWriter]:
    """Open `count` keep-alive connections, one request each, and keep them open."""
    host, port = url.removeprefix("http://").split(":")
    writers = []
    for batch in range(0, count, 500):  # in batches, so the listen backlog is never overrun
        opened = await asyncio.gather(
            *(asyncio.open_connection(host, int(port)) for _ in range(min(500, count - batch)))
        )
        for _, writer in opened:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for reader, _ in opened:
            await reader.readuntil(b"\r\n\r\n")
        writers += [writer for _, writer in opened]
    return writers


async def idle(connections: int) -> None:
    """The balancer's memory with many idle keep-alive connections."""
    async with Lab("--servers", "1") as lab:
        pid = lab.pids()["balancer"]
        before = rss_mib(pid)
        writers = await hold_connections(lab.info["lb"], connections)
        held = rss_mib(pid)
        for writer in writers:
            writer.close()
    per_connection = (held - before) * 1024 / connections
    print(f"\n{connections} idle keep-alive connections held by the balancer: RSS {before:.1f} MiB -> {held:.1f} MiB "
          f"({per_connection:.1f} KiB per connection; target < 200 MB in all)")  # fmt: skip


async def overload(connections: int, max_connections: int) -> None:
    """More clients than the balancer admits: the excess must get a 503 at once, not a queue."""
    async with Lab("--servers", "1", "--max-connections", str(max_connections)) as lab:
        host, port = lab.info["lb"].removeprefix("http://").split(":")
        statuses: dict[int, int] = {}

        async def one() -> tuple[asyncio.StreamWriter, int]:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /me HTTP/1.1\r\nHost: x\r\n\r\n")
            status = int((await reader.readline()).split()[1])
            return writer, status

        started = time.monotonic()
        results = []
        for batch in range(0, connections, 500):
            results += await asyncio.gather(*(one() for _ in range(min(500, connections - batch))))
        elapsed = time.monotonic() - started
        for writer, status in results:
            statuses[status] = statuses.get(status, 0) + 1
            writer.close()
    print(f"\n{connections} concurrent clients, max_connections {max_connections}: {statuses} in {elapsed:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("soak")
    one.add_argument("--users", type=int, default=200)
    one.add_argument("--duration", type=float, default=300.0, help="seconds per store (default 300)")
    one.add_argument("--stores", default="local,redis,cluster")
    many = sub.add_parser("idle")
    many.add_argument("--connections", type=int, default=10_000)
    flood = sub.add_parser("overload")
    flood.add_argument("--connections", type=int, default=2000)
    flood.add_argument("--max-connections", type=int, default=500)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        if args.what == "soak":
            for store in args.stores.split(","):
                asyncio.run(soak(store, args.users, args.duration))
        elif args.what == "idle":
            asyncio.run(idle(args.connections))
        else:
            asyncio.run(overload(args.connections, args.max_connections))


if __name__ == "__main__":
    main()
