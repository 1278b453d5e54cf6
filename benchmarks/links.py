"""What the lab's links cost when no fault is set: one lab with links, one without, the same load.

A real lab each (`lbsession.lab.topology.Topology`, backend redis, round-robin,
3 app servers): the balancer in this process, the app servers, Redis and (with
links) the links process as children. One user logs in, then wrk repeats
GET /me with that user's cookie: through the balancer to an app server, which
reads the session from Redis, so with links each request crosses two relays.

    python benchmarks/links.py                       # about 1 minute
    python benchmarks/links.py --duration 5 --connections 20 --rounds 3

CPU per request: utime + stime of every process of the lab (this process, the
app servers, Redis, the links process), from /proc, over the measured run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from lbsession.config import load_config
from lbsession.lab.bench import cpu_seconds, parse_wrk
from lbsession.lab.topology import Topology

HEALTH = {"interval_s": 3600.0, "timeout_s": 2.0, "rise": 1, "fall": 1}  # checked once: SCANs would be counted


async def start_lab(links: str, log_dir: Path) -> Topology:
    """A lab with (`on`) or without (`off`) links."""
    config = load_config(
        overrides={
            "servers": 3,
            "links": links,
            "balancer": {"port": 0, "admin_port": 0, "strategy": "round-robin", "health": HEALTH},
            "app": {"backend": "redis"},
        },
        environ={},
    )
    topology = Topology(config, log_dir=log_dir)
    await topology.start()
    return topology


def lab_pids(topology: Topology) -> tuple[int, ...]:
    """Every process of the lab, this one included."""
    info = topology.ready_info()
    pids = [os.getpid(), *(s["pid"] for s in info["servers"])]
    pids += [n["pid"] for n in (info["redis"] or {}).get("nodes", [])]
    if info["links"]:
        pids.append(info["links"]["pid"])
    return tuple(pid for pid in pids if pid)


async def session_cookie(lb_url: str) -> str:
    """Log one user in; the Cookie header that is that user."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(lb_url + "/login", json={"username": "bench"}) as response:
            assert response.status == 200, response.status
        return "; ".join(f"{m.key}={m.value}" for m in jar)


async def measure(topology: Topology, connections: int, duration_s: int) -> dict[str, Any]:
    """One wrk run of GET /me; req/s, p50, p99, errors and the lab's CPU per request."""
    assert topology.lb is not None
    cookie = await session_cookie(topology.lb.url)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "-H", f"Cookie: {cookie}",
            topology.lb.url + "/me"]  # fmt: skip
    pids = lab_pids(topology)
    before = cpu_seconds(pids)
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    after = cpu_seconds(pids)
    load = parse_wrk(out.decode())
    return {
        "requests": load.requests,
        "rps": round(load.rps),
        "p50_ms": load.p50_ms,
        "p99_ms": load.p99_ms,
        "errors": load.errors,
        "cpu_us_per_request": round((after - before) * 1e6 / max(1, load.requests), 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds of each measured wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=20, help="wrk connections (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each lab, taking turns (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="lbsession-links-bench-"))
    labs: dict[str, Topology] = {}
    try:
        for links in ("off", "on"):
            labs[links] = await start_lab(links, log_dir / links)
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for links, topology in labs.items():
                await measure(topology, args.connections, 1)  # warm-up: pools filled, caches warm
                runs[links].append(await measure(topology, args.connections, args.duration))
    finally:
        for topology in labs.values():
            await topology.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    print(f"GET /me, backend redis, 3 servers, wrk -c{args.connections} -d{args.duration}s, median of {args.rounds}")
    print(f"{'links':<6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'errors':>8}   req/s of each run")
    for links, rows in runs.items():
        median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        each = "-".join(str(r["rps"]) for r in rows)
        print(f"{links:<6}{median['rps']:>9.0f}{median['p50_ms']:>9.2f}{median['p99_ms']:>9.2f}"
              f"{median['cpu_us_per_request']:>12.1f}{median['errors']:>8.0f}   {each}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
