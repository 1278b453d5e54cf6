"""What each session store costs behind the balancer: throughput, Redis round trips, replication.

Real labs (`lbsession.lab.topology.Topology`: the balancer in this process, the
app servers and Redis as child processes, all on 127.0.0.1) driven by virtual
users: each has its own connection and cookie jar, logs in once, then repeats
one request. The users run in a second process, so the load generator does not
share the balancer's event loop.

    python benchmarks/sessions.py                        # about 2 minutes
    python benchmarks/sessions.py --users 30 --duration 5 --rounds 3 --json sessions.json

1. GET /me through the balancer (round-robin, 3 servers): local, redis, cluster.
2. Redis round trips per GET /me and per POST /cart, from each server's /healthz.
3. POST /cart straight to one server: cluster (sync, async) against local.
4. Replication messages and bytes per write as the cluster grows from 2 to 6 nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from lbsession.config import ClusterConfig, Config, load_config
from lbsession.lab.bench import cpu_seconds, percentile_ms
from lbsession.lab.topology import Topology

# Checked once at start, then never: a check of a redis-backed server runs a SCAN that its
# `round_trips` counter would count, and nothing is killed here, so nothing needs noticing.
HEALTH = {"interval_s": 3600.0, "timeout_s": 2.0, "rise": 1, "fall": 1}
STICKY_SECRET = "benchmark-sticky-secret-0123456789"
CART = {"item": "x"}
# Latency runs log in as a fresh user every 50 writes: the cart, hence each write, stays small
# rather than growing for the whole run. The logins are not measured.
RELOGIN_EVERY = 50
PING_FRAME_BYTES = 4 + 32 + len('{"type":"ping"}')  # a heartbeat: length, HMAC tag, payload


# --------------------------------------------------------------------------- load generator (its own process)


@dataclass(frozen=True)
class Phase:
    """One stretch of identical requests repeated by every virtual user."""

    name: str
    method: str
    path: str
    body: dict[str, str] | None = None
    duration_s: float = 5.0
    warmup_s: float = 1.0
    max_requests: int | None = None  # across all users; None: only the duration bounds it
    relogin_every: int = 0  # log in again as a new user every N requests (not measured)


@dataclass(frozen=True)
class Job:
    """What the generator runs: log `users` in at `base_url`, then the phases in order."""

    base_url: str
    users: int
    phases: tuple[Phase, ...]
    probe_urls: tuple[str, ...] = ()  # servers whose /healthz is read just before and after each phase
    cpu_pids: dict[str, tuple[int, ...]] | None = None  # the lab's processes by role, CPU read around each phase


@dataclass
class PhaseResult:
    """What one phase measured, with the probed servers' /healthz around it."""

    name: str
    requests: int
    elapsed_s: float
    statuses: dict[str, int]
    p50_ms: float
    p99_ms: float
    cpu_s: dict[str, float]  # CPU time of the lab's processes during the phase, by role (balancer, servers, redis)
    generator_cpu_s: float  # CPU time of the load generator itself during the phase
    before: list[dict[str, Any]]
    after: list[dict[str, Any]]

    @property
    def rps(self) -> float:
        """Requests completed per second."""
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


class VirtualUser:
    """One browser: its own keep-alive connection and cookie jar."""

    def __init__(self, base_url: str, name: str) -> None:
        self.base_url = base_url
        self.name = name
        self.logins = 0
        self.http = aiohttp.ClientSession(
            # unsafe=True: keep the cookies of an IP-address host (127.0.0.1), as browsers do.
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=10.0),
        )

    async def login(self) -> None:
        """Log in as a new user name (a new name also empties the session's cart)."""
        self.logins += 1
        body = {"username": f"{self.name}-{self.logins}"}
        async with self.http.post(self.base_url + "/login", json=body) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"login at {self.base_url} answered {response.status}")

    async def send(self, phase: Phase) -> str:
        """Send the phase's request once; the status, or the name of the error."""
        try:
            url = self.base_url + phase.path
            async with self.http.request(phase.method, url, json=phase.body, allow_redirects=False) as response:
                await response.read()
                return str(response.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return type(exc).__name__


async def drive(
    users: list[VirtualUser], phase: Phase, duration_s: float, max_requests: int | None
) -> tuple[list[float], Counter[str], float]:
    """Every user repeats the request until the deadline or the shared bound; (latencies s, statuses, elapsed s)."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    remaining = math.inf if max_requests is None else max_requests
    started = time.perf_counter()
    deadline = started + duration_s

    async def loop(user: VirtualUser) -> None:
        nonlocal remaining
        sent = 0
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            if phase.relogin_every and sent and sent % phase.relogin_every == 0:
                await user.login()
            begun = time.perf_counter()
            status = await user.send(phase)
            latencies.append(time.perf_counter() - begun)
            statuses[status] += 1
            sent += 1

    await asyncio.gather(*(loop(user) for user in users))
    return latencies, statuses, time.perf_counter() - started


async def probe(http: aiohttp.ClientSession, urls: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each server's /healthz, one after the other."""
    out = []
    for url in urls:
        async with http.get(url + "/healthz") as response:
            out.append(await response.json())
    return out


async def run_phase(users: list[VirtualUser], phase: Phase, job: Job, http: aiohttp.ClientSession) -> PhaseResult:
    """Warm up, read the probes, measure, read the probes again."""
    if phase.warmup_s > 0:
        await drive(users, phase, phase.warmup_s, None)
    before = await probe(http, job.probe_urls)
    groups = job.cpu_pids or {}
    cpu_before_s, generator_before_s = {role: cpu_seconds(pids) for role, pids in groups.items()}, time.process_time()
    latencies, statuses, elapsed_s = await drive(users, phase, phase.duration_s, phase.max_requests)
    generator_cpu_s = time.process_time() - generator_before_s
    cpu_s = {role: cpu_seconds(pids) - cpu_before_s[role] for role, pids in groups.items()}
    after = await probe(http, job.probe_urls)
    latencies.sort()
    return PhaseResult(
        phase.name, len(latencies), elapsed_s, dict(statuses),
        percentile_ms(latencies, 50), percentile_ms(latencies, 99), cpu_s, generator_cpu_s, before, after,
    )  # fmt: skip


async def run_job_async(job: Job) -> list[PhaseResult]:
    """Log every user in, run the phases, close every connection."""
    users = [VirtualUser(job.base_url, f"vu{i}") for i in range(job.users)]
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0))
    try:
        await asyncio.gather(*(user.login() for user in users))
        return [await run_phase(users, phase, job, http) for phase in job.phases]
    finally:
        await asyncio.gather(http.close(), *(user.http.close() for user in users))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed, as `lbsession` itself uses (`--loop auto`)."""
    if importlib.util.find_spec("uvloop") is None:
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_job(job: Job) -> list[PhaseResult]:
    """The generator process's entry point, bounded in time whatever the lab does."""
    bound_s = 60.0 + sum(p.duration_s + p.warmup_s for p in job.phases)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(asyncio.wait_for(run_job_async(job), bound_s))


async def generate(pool: ProcessPoolExecutor, job: Job) -> list[PhaseResult]:
    """Run a job in the generator process while this loop keeps serving the balancer."""
    return await asyncio.get_running_loop().run_in_executor(pool, run_job, job)


# --------------------------------------------------------------------------- labs


def lab_config(strategy: str, backend: str, servers: int = 3, replication: str = "sync") -> Config:
    """A lab on free ports, checked once for health, with a fixed sticky secret."""
    balancer = {"port": 0, "admin_port": 0, "strategy": strategy, "health": HEALTH, "sticky": {"secret": STICKY_SECRET}}
    app = {"backend": backend, "cluster": {"replication": replication}}
    return load_config(overrides={"servers": servers, "balancer": balancer, "app": app}, environ={})


@contextlib.asynccontextmanager
async def started_lab(config: Config, log_dir: Path) -> AsyncIterator[Topology]:
    """A started lab, stopped on the way out whatever happens (start stops it itself if it fails)."""
    topology = Topology(config, log_dir=log_dir)
    await topology.start()
    try:
        yield topology
    finally:
        await topology.stop()


def lb_url(topology: Topology) -> str:
    """The balancer's public URL."""
    assert topology.lb is not None, "the lab is started"
    return topology.lb.url


def server_urls(topology: Topology) -> tuple[str, ...]:
    """Every app server's own URL."""
    return tuple(server.url for server in topology.servers.values())


def lab_pids(topology: Topology) -> dict[str, tuple[int, ...]]:
    """The processes doing the lab's work, by role: this one (the balancer), the app servers, Redis."""
    servers = tuple(pid for server in topology.servers.values() if (pid := server.pid) is not None)
    redis = tuple(pid for node in topology.redis.nodes if (pid := node.pid) is not None) if topology.redis else ()
    return {"balancer": (os.getpid(),), "servers": servers, "redis": redis}


def counter(health: dict[str, Any], key: str) -> int:
    """A store counter from /healthz: Redis' `round_trips` at the top, the cluster's under `counters`."""
    return int(health[key] if key in health else health["counters"][key])


def delta(result: PhaseResult, key: str) -> int:
    """How much a counter grew during the phase, summed over the probed servers."""
    return sum(
        counter(after, key) - counter(before, key) for before, after in zip(result.before, result.after, strict=True)
    )


def per_request_us(cpu_s: float, requests: int) -> float:
    """CPU microseconds per request, rounded (0 when there was no request)."""
    return round(cpu_s * 1e6 / requests, 1) if requests else 0.0


def summary(result: PhaseResult) -> dict[str, Any]:
    """The figures of a phase that go in a table and in the JSON."""
    ok = result.statuses.get("200", 0)
    return {
        "requests": result.requests,
        "elapsed_s": round(result.elapsed_s, 3),
        "rps": round(result.rps, 1),
        "p50_ms": round(result.p50_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
        "cpu_us_per_request": per_request_us(sum(result.cpu_s.values()), result.requests),
        "cpu_us_per_request_by_role": {role: per_request_us(s, result.requests) for role, s in result.cpu_s.items()},
        "generator_cpu_us_per_request": per_request_us(result.generator_cpu_s, result.requests),
        "ok_share": round(ok / result.requests, 4) if result.requests else 0.0,
        "statuses": result.statuses,
    }


# --------------------------------------------------------------------------- the four measurements


async def measure_reads(pool: ProcessPoolExecutor, topology: Topology, args: argparse.Namespace) -> dict[str, Any]:
    """1. Every user logged in once, then GET /me through the balancer for the whole phase."""
    phase = Phase("GET /me", "GET", "/me", duration_s=args.duration, warmup_s=args.warmup)
    [result] = await generate(pool, Job(lb_url(topology), args.users, (phase,), cpu_pids=lab_pids(topology)))
    return summary(result)


async def measure_round_trips(
    pool: ProcessPoolExecutor, topology: Topology, args: argparse.Namespace
) -> dict[str, Any]:
    """2. Redis round trips per GET /me and per POST /cart, from /healthz before and after each phase."""
    phases = (
        # No request at all: what reading /healthz costs by itself (its SCAN of the sessions).
        Phase("idle", "GET", "/me", duration_s=0.0, warmup_s=0.0),
        Phase("GET /me", "GET", "/me", duration_s=args.duration, warmup_s=args.warmup),
        Phase("POST /cart", "POST", "/cart", CART, duration_s=args.duration, warmup_s=0.0),
    )
    job = Job(lb_url(topology), args.users, phases, server_urls(topology), lab_pids(topology))
    idle, read, write = await generate(pool, job)
    probe_cost = delta(idle, "round_trips")
    out: dict[str, Any] = {"probe_round_trips": probe_cost}
    for name, result in (("read", read), ("write", write)):
        trips = delta(result, "round_trips") - probe_cost
        out[name] = {
            **summary(result),
            "round_trips": trips,
            "round_trips_per_request": round(trips / result.requests, 4) if result.requests else None,
        }
    return out


async def measure_write_latency(
    pool: ProcessPoolExecutor, topology: Topology, args: argparse.Namespace
) -> dict[str, Any]:
    """3. POST /cart straight to was-1, by users logged in there, bypassing the balancer."""
    phase = Phase(
        "POST /cart direct", "POST", "/cart", CART,
        duration_s=args.duration, warmup_s=args.warmup, relogin_every=RELOGIN_EVERY,
    )  # fmt: skip
    job = Job(topology.servers["was-1"].url, args.latency_users, (phase,), cpu_pids=lab_pids(topology))
    [result] = await generate(pool, job)
    return summary(result)


async def measure_replication(
    pool: ProcessPoolExecutor, nodes: int, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    """4. W writes round-robin through the balancer on an N-node sync cluster; replication counters."""
    phase = Phase("POST /cart", "POST", "/cart", CART, duration_s=60.0, warmup_s=0.0, max_requests=args.writes)
    async with started_lab(lab_config("round-robin", "cluster", nodes), log_dir) as topology:
        job = Job(lb_url(topology), min(args.users, args.writes), (phase,), server_urls(topology))
        [result] = await generate(pool, job)
    writes = result.requests
    if writes == 0:
        raise RuntimeError(f"the {nodes}-node cluster answered no write; see the logs in {log_dir}")
    messages, acks = delta(result, "changes_sent"), delta(result, "acks")
    return {
        "nodes": nodes,
        "writes": writes,
        "ok_share": summary(result)["ok_share"],
        "messages_per_write": round(messages / writes, 3),
        "acks_per_write": round(acks / writes, 3),
        "bytes_per_write": round(delta(result, "bytes_sent") / writes, 1),
        "total_messages_per_write": round((messages + acks) / writes, 3),
        "connections": nodes * (nodes - 1),
        "elapsed_s": round(result.elapsed_s, 3),
        "heartbeat_bytes_per_write_at_most": round(ping_bytes_at_most(result.elapsed_s, nodes) / writes, 1),
    }


def ping_bytes_at_most(elapsed_s: float, nodes: int) -> int:
    """Heartbeat bytes that `bytes_sent` may also count over a window: one ping per link per heartbeat_s."""
    pings_per_link = math.floor(elapsed_s / ClusterConfig().heartbeat_s) + 1
    return pings_per_link * nodes * (nodes - 1) * PING_FRAME_BYTES


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Lab:
    """One lab of measurements 1 to 3, and which of them it serves."""

    name: str
    strategy: str
    backend: str
    replication: str = "sync"
    reads: bool = True
    round_trips: bool = False
    latency: bool = False


LABS = (
    Lab("local round-robin", "round-robin", "local", latency=True),
    Lab("local sticky-cookie", "sticky-cookie", "local"),
    Lab("redis round-robin", "round-robin", "redis", round_trips=True),
    Lab("cluster sync round-robin", "round-robin", "cluster", latency=True),
    Lab("cluster async round-robin", "round-robin", "cluster", replication="async", reads=False, latency=True),
)


async def measure_reads_rounds(
    pool: ProcessPoolExecutor, labs: dict[str, Topology], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """1, `--rounds` times, the labs taking turns: drift on a shared machine then hits each alike."""
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in labs}
    names = list(labs)
    for index in range(args.rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:  # a new first lab each round
            print(f"... round {index + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            rounds[name].append(await measure_reads(pool, labs[name], args))
    return {name: median_round(results) for name, results in rounds.items()}


def median_round(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median req/s, with every round's req/s and CPU beside it."""
    ordered = sorted(results, key=lambda r: float(r["rps"]))
    return {
        **ordered[len(ordered) // 2],
        "rounds_rps": [r["rps"] for r in results],
        "rounds_cpu_us_per_request": [r["cpu_us_per_request"] for r in results],
    }


async def run_labs(pool: ProcessPoolExecutor, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Measurements 1 to 3, on labs that are all up at once (idle ones cost nothing)."""
    async with contextlib.AsyncExitStack() as stack:
        topologies: dict[str, Topology] = {}
        for lab in LABS:
            print(f"... starting {lab.name}", file=sys.stderr, flush=True)
            config = lab_config(lab.strategy, lab.backend, 3, lab.replication)
            lab_dir = log_dir / lab.name.replace(" ", "-")
            topologies[lab.name] = await stack.enter_async_context(started_lab(config, lab_dir))
        reads = await measure_reads_rounds(pool, {lab.name: topologies[lab.name] for lab in LABS if lab.reads}, args)
        out: dict[str, Any] = {lab.name: {} for lab in LABS}
        for lab in LABS:
            topology = topologies[lab.name]
            if lab.name in reads:
                out[lab.name]["reads"] = reads[lab.name]
            if lab.round_trips:
                print(f"... round trips: {lab.name}", file=sys.stderr, flush=True)
                out[lab.name]["round_trips"] = await measure_round_trips(pool, topology, args)
            if lab.latency:
                print(f"... direct writes: {lab.name}", file=sys.stderr, flush=True)
                out[lab.name]["write_latency"] = await measure_write_latency(pool, topology, args)
    return out


async def run_all(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Every lab, then the growing clusters; one generator process for the whole run."""
    load_before = os.getloadavg()  # other work on the machine moves every figure: record how busy it was
    # spawn, not fork: a forked child would inherit this process's running event loop and sockets.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        labs = await run_labs(pool, args, log_dir)
        growth = []
        for nodes in args.nodes:
            print(f"... cluster of {nodes} nodes", file=sys.stderr, flush=True)
            growth.append(await measure_replication(pool, nodes, args, log_dir / f"cluster-{nodes}"))
    machine = {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()}
    return {"settings": settings(args), "machine": machine, "labs": labs, "replication": growth}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's parameters, as the JSON records them."""
    return {
        "users": args.users,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "latency_users": args.latency_users,
        "writes": args.writes,
        "nodes": args.nodes,
        "loop": "uvloop" if loop_factory() else "asyncio",
        "python": sys.version.split()[0],
    }


# --------------------------------------------------------------------------- report


def table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    """Print a plain aligned table under a title."""
    cells = [headers, *[[cell if isinstance(cell, str) else f"{cell:g}" for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print(
            "  ".join(
                cell.rjust(width) if i else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )
        if index == 0:
            print("  ".join("-" * width for width in widths))


def ratio(numerator: float, denominator: float) -> str:
    """A ratio printed as 0.87x."""
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


def report_reads(labs: dict[str, Any], rounds: int) -> None:
    """Measurement 1: throughput per backend, and the ratios to local."""
    reads = {name: lab["reads"] for name, lab in labs.items() if "reads" in lab}
    rows = [
        [name, r["requests"], r["rps"], "-".join(f"{x:.0f}" for x in sorted(r["rounds_rps"])), r["p50_ms"],
         r["p99_ms"], f"{r['ok_share']:.0%}", r["cpu_us_per_request"],
         *r["cpu_us_per_request_by_role"].values(), r["generator_cpu_us_per_request"]]
        for name, r in reads.items()
    ]  # fmt: skip
    headers = ["lab", "requests", "req/s", "req/s rounds", "p50 ms", "p99 ms", "200s", "lab CPU us/req"]
    headers += ["LB", "servers", "Redis", "generator"]
    table(f"1. GET /me through the balancer, 3 servers; the median of {rounds} round(s)", headers, rows)
    local, sticky = reads["local round-robin"], reads["local sticky-cookie"]
    for store in ("redis round-robin", "cluster sync round-robin"):
        r = reads[store]
        per_round = sorted(a / b for a, b in zip(r["rounds_rps"], local["rounds_rps"], strict=True))
        print(
            f"{store.split()[0]}/local req/s: {ratio(r['rps'], local['rps'])} against local round-robin (the ratio),"
            f" {per_round[0]:.2f}x-{per_round[-1]:.2f}x round by round;"
            f" {ratio(r['rps'], sticky['rps'])} against local sticky-cookie."
            f" By lab CPU per request: {ratio(local['cpu_us_per_request'], r['cpu_us_per_request'])}"
            f" and {ratio(sticky['cpu_us_per_request'], r['cpu_us_per_request'])}"
        )


def report_round_trips(trips: dict[str, Any]) -> None:
    """Measurement 2: Redis round trips per request."""
    rows = [
        [name, r["requests"], f"{r['ok_share']:.0%}", r["round_trips"], r["round_trips_per_request"]]
        for name, r in (("GET /me", trips["read"]), ("POST /cart", trips["write"]))
    ]
    headers = ["phase", "requests", "200s", "round trips", "per request"]
    table("2. Redis round trips, summed over the 3 servers' /healthz", headers, rows)
    print(f"(reading /healthz itself cost {trips['probe_round_trips']} round trips, subtracted)")


def report_latency(labs: dict[str, Any], users: int) -> None:
    """Measurement 3: write latency straight to one server, and what replication adds."""
    base = labs["local round-robin"]["write_latency"]
    rows = []
    for name, lab in labs.items():
        if r := lab.get("write_latency"):
            added = r["p50_ms"] - base["p50_ms"]
            rows.append(
                [name.split(" round-robin")[0], r["requests"], f"{r['ok_share']:.0%}", r["p50_ms"], r["p99_ms"],
                 f"{added:+.3f}"]
            )  # fmt: skip
    headers = ["backend", "writes", "200s", "p50 ms", "p99 ms", "p50 added ms"]
    table(f"3. POST /cart straight to was-1, {users} user(s), 3 servers", headers, rows)


def report_replication(growth: list[dict[str, Any]]) -> None:
    """Measurement 4: replication traffic per write as the cluster grows."""
    rows = [
        [g["nodes"], g["writes"], f"{g['ok_share']:.0%}", g["messages_per_write"], g["bytes_per_write"],
         g["heartbeat_bytes_per_write_at_most"], g["total_messages_per_write"], g["connections"]]
        for g in growth
    ]  # fmt: skip
    headers = ["nodes", "writes", "200s", "messages/write", "bytes/write", "of which pings <=", "msgs+acks/write"]
    headers.append("connections N(N-1)")
    table("4. Replication per write, cluster sync, writes round-robin through the balancer", headers, rows)


def report(results: dict[str, Any]) -> None:
    """Print every table."""
    labs = results["labs"]
    machine = results["machine"]
    loads = (f"{machine[key][0]:.1f}" for key in ("load_average_before", "load_average_after"))
    print(f"{machine['cpus']} CPUs; 1-minute load average before and after the run: {', '.join(loads)}")
    report_reads(labs, results["settings"]["rounds"])
    report_round_trips(labs["redis round-robin"]["round_trips"])
    report_latency(labs, results["settings"]["latency_users"])
    report_replication(results["replication"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=30, help="virtual users of each phase (default 30)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each measured phase (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of measurement 1; the median is shown")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before a phase (default 1)")
    parser.add_argument("--latency-users", type=int, default=1, help="users of the direct write phase (default 1)")
    parser.add_argument("--writes", type=int, default=200, help="writes per cluster size (default 200)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 3, 4, 5, 6], help="cluster sizes")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if min(args.users, args.latency_users, args.writes, args.rounds) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--users, --latency-users, --writes and --rounds must be at least 1, --duration above 0")
    if any(not 2 <= n <= 32 for n in args.nodes):
        parser.error("--nodes: every cluster size must be between 2 and 32")
    return args


def main() -> None:
    """Run everything, print the tables, write the JSON if asked."""
    args = parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="lbsession-sessions-"))
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        try:
            results = runner.run(run_all(args, log_dir))
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted; every lab was stopped; their logs are in {log_dir}") from None
        except BaseException:
            print(f"the labs' logs are kept in {log_dir}", file=sys.stderr)
            raise
    shutil.rmtree(log_dir, ignore_errors=True)
    report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
