"""`lbsession bench`: the balancer's data path measured beside nginx direct and HAProxy.

Every target is measured on loopback, in front of the same upstreams:

    direct    the first upstream alone: what the upstream itself costs
    lbsession `python -m lbsession lb` as a child process, with the strategy asked
    haproxy   `haproxy -db`, `nbthread 1` (when installed), with that strategy's
              HAProxy equivalent (CASES below): `balance roundrobin`, `cookie
              LBSERVER insert`, `balance source`, ...

Each strategy is a case, and sticky-cookie two: with the cookie inserted (every
request comes without it, as from new users) and with it present (every request
carries the pin its first response set, as from returning users). `--strategy
all` measures every case, one balancer pair at a time, so only one pair shares
the machine with the upstreams and the load generator.

For each, a warm-up (connections opened, pools filled) and then a measured run
give req/s and p50/p99 latency as the client saw them, and the CPU per request:
the target process's utime + stime from /proc/<pid>/stat before and after the
run, divided by the requests served. The requirement is written in that figure
("<= 1.3x HAProxy's") because on a small shared machine req/s depends on who
else has the cores; CPU seconds per request much less.

The upstreams are one nginx process answering `return 200` when nginx is
installed, so the balancer, not the upstream, is what costs; else
`lbsession server` processes hit on `/healthz`. The load generator is wrk when
installed (a fixed duration), else the built-in asyncio one below (a fixed
number of requests). Every child is started and stopped here, by its handle
(lbsession.lab.process), in a `finally`: a Ctrl-C or an error leaves no process
behind. The lbsession children get their config from the environment, as the
lab's app servers do. `run_bench` returns a BenchReport; the CLI prints it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from lbsession.config import (
    AppServerConfig,
    BalancerConfig,
    LimitsConfig,
    StickyConfig,
    StrategyName,
    UpstreamConfig,
    to_environ,
)
from lbsession.errors import ConfigError, TopologyError
from lbsession.lab.process import (
    Child,
    child_environ,
    free_ports,
    http_get,
    python_module,
    read_ready_line,
    spawn,
    wait_http,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_RATIO_TARGET = 1.3  # the requirement: lbsession's CPU per request <= 1.3x HAProxy's
P99_RATIO_TARGET = 1.5  # and its p99 latency <= 1.5x HAProxy's at the same concurrency
STICKY_SECRET = "bench-sticky-secret-0123456789"  # a fixed key: a random one would log a warning
READY_TIMEOUT_S = 10.0
WARMUP_S = 1  # wrk's -d takes whole seconds
BUILTIN_DEADLINE_S = 60.0  # the built-in generator stops here even if requests remain
HOST = "127.0.0.1"


@dataclass(frozen=True)
class BenchParams:
    """What to measure and how: the `lbsession bench` flags, typed."""

    requests: int = 20000  # per measured target, with the built-in generator
    duration_s: int = 5  # of each measured wrk run
    connections: int = 50
    servers: int = 3
    strategy: StrategyName = "round-robin"  # or "all": every case of CASES
    tool: Literal["auto", "wrk", "builtin"] = "auto"
    haproxy: Literal["auto", "yes", "no"] = "auto"
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"  # the measured balancer's event loop
    body_bytes: int | None = None  # each response's body size (nginx serves a file); None: nginx's "ok\n"


@dataclass(frozen=True)
class LoadResult:
    """What one load run saw from the client side."""

    requests: int  # responses received, whatever their status
    errors: int  # socket errors plus non-2xx/3xx responses
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class LoadPlan:
    """How every target is loaded: the generator and its bounds."""

    wrk: str | None  # the wrk binary; None: the built-in generator
    connections: int
    duration_s: int  # wrk
    requests: int  # builtin

    def describe(self) -> str:
        """The generator and its bounds, as the report's heading shows them."""
        if self.wrk is not None:
            return f"wrk -t1 -c{self.connections} -d{self.duration_s}s"
        return f"builtin, {self.connections} connections, {self.requests} requests"


@dataclass(frozen=True)
class Target:
    """One thing to measure: its URL and the processes whose CPU is its cost."""

    name: str
    url: str
    pids: tuple[int, ...]
    build: str = ""  # lbsession: "compiled (mypyc 1.x)" or "pure Python (why)"


@dataclass(frozen=True)
class Figures:
    """One row of the report."""

    target: str
    load: LoadResult
    cpu_us_per_request: float
    upstream_cpu_us_per_request: float
    build: str = ""  # lbsession's rows: the build of its hot modules that ran, as its /status said

    def as_dict(self) -> dict[str, Any]:
        """The row as the JSON report holds it."""
        return {
            "target": self.target,
            **asdict(self.load),
            "cpu_us_per_request": round(self.cpu_us_per_request, 2),
            "upstream_cpu_us_per_request": round(self.upstream_cpu_us_per_request, 2),
            **({"build": self.build} if self.build else {}),
        }


@dataclass(frozen=True)
class BenchCase:
    """One row of the comparison: an lbsession strategy, its HAProxy equivalent, and how clients come."""

    name: str
    strategy: StrategyName
    haproxy: tuple[str, ...] | None  # the backend's directives; None: no HAProxy equivalent to measure
    cookie: bool = False  # HAProxy's servers get `cookie <id>` values
    pinned: bool = False  # every request carries the cookie its first response set (a returning user)


_STICKY = ("balance roundrobin", "cookie LBSERVER insert indirect nocache httponly")
CASES = (
    BenchCase("round-robin", "round-robin", ("balance roundrobin",)),
    BenchCase("least-conn", "least-conn", ("balance leastconn",)),
    BenchCase("sticky-cookie insert", "sticky-cookie", _STICKY, cookie=True),
    BenchCase("sticky-cookie present", "sticky-cookie", _STICKY, cookie=True, pinned=True),
    BenchCase("ip-hash", "ip-hash", ("balance source", "hash-type map-based")),
    BenchCase("consistent-hash", "consistent-hash", ("balance source", "hash-type consistent")),
)


def cases_for(strategy: str) -> tuple[BenchCase, ...]:
    """The cases `--strategy` asks for: all of them, a strategy's own, or one with nothing to compare with."""
    if strategy == "all":
        return CASES
    return tuple(c for c in CASES if c.strategy == strategy) or (BenchCase(strategy, strategy, None),)


# --------------------------------------------------------------------------- pure parts


def latency_ms(value: str, unit: str) -> float:
    """A wrk duration (`850.00us`, `1.20ms`, `1.05s`, `2.00m`) in milliseconds."""
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
    return float(value) * scale[unit]


_WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.M)
_WRK_RPS = re.compile(r"^Requests/sec:\s*([\d.]+)", re.M)
_WRK_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s*(\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(text: str) -> LoadResult:
    """The figures of `wrk --latency` output; ValueError when a figure is missing."""
    total, rps = _WRK_TOTAL.search(text), _WRK_RPS.search(text)
    percentiles = {m[1]: latency_ms(m[2], m[3]) for m in _WRK_PERCENTILE.finditer(text)}
    if total is None or rps is None or set(percentiles) != {"50", "99"}:
        raise ValueError(f"not the output of wrk --latency: {text[:200]!r}")
    errors = sum(int(n) for m in _WRK_SOCKET.finditer(text) for n in m.groups())
    errors += sum(int(m[1]) for m in _WRK_NON_2XX.finditer(text))
    return LoadResult(
        int(total[1]),
        errors,
        latency_ms(total[2], total[3]) / 1000,
        float(rps[1]),
        percentiles["50"],
        percentiles["99"],
    )


def proc_stat_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, from the text of /proc/<pid>/stat."""
    # The command name (field 2) may hold spaces and ')'; fields are counted after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """The CPU time (user + system) the processes have used so far."""
    return sum(proc_stat_ticks(Path(f"/proc/{pid}/stat").read_text()) for pid in pids) / CLK_TCK


def cpu_us_per_request(before_s: float, after_s: float, requests: int) -> float:
    """CPU microseconds per request over a run; ValueError when no request was served."""
    if requests <= 0:
        raise ValueError("no request was served: CPU per request is undefined")
    return (after_s - before_s) * 1e6 / requests


def percentile_ms(sorted_s: list[float], q: float) -> float:
    """The nearest-rank percentile `q` (0-100) of sorted latencies in seconds, in milliseconds."""
    if not sorted_s:
        return 0.0
    rank = max(1, -(-len(sorted_s) * q // 100))  # ceil without float surprises
    return sorted_s[int(rank) - 1] * 1000


def nginx_config(ports: list[int], prefix: Path, *, body_file: Path | None = None, connections: int = 0) -> str:
    """A one-process nginx answering `200 ok` (or `body_file`) on each port; temp paths kept inside `prefix`.

    `connections`: the client connections it must hold at once (0: nginx's default of 512).
    """
    if body_file is None:
        location = 'return 200 "ok\\n";'
    else:
        location = f"root {body_file.parent}; try_files /{body_file.name} =404;"
    servers = "\n".join(f"    server {{ listen {HOST}:{port}; location / {{ {location} }} }}" for port in ports)
    events = f"events {{ worker_connections {connections}; }}" if connections else "events {}"
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log;\n{events}\nhttp {{\n    access_log off;\n"
        f"{temp_paths}\n{servers}\n}}\n"
    )


def haproxy_config(
    port: int,
    upstream_ports: list[int],
    balance: tuple[str, ...] = ("balance roundrobin",),
    *,
    cookie: bool = False,
    maxconn: int = 4096,
) -> str:
    """HAProxy in front of the upstreams as lbsession is: keep-alive, one thread, no logs, `balance` as given."""
    servers = "\n".join(
        f"    server u{i} {HOST}:{p}" + (f" cookie u{i}" if cookie else "") for i, p in enumerate(upstream_ports, 1)
    )
    directives = "".join(f"    {line}\n" for line in balance)
    return (
        f"global\n    nbthread 1\n    maxconn {maxconn}\n\n"
        "defaults\n    mode http\n    option http-keep-alive\n"
        "    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\n"
        f"frontend bench\n    bind {HOST}:{port}\n    default_backend upstreams\n\n"
        f"backend upstreams\n{directives}{servers}\n"
    )


def find_tool(name: str) -> str | None:
    """The path of an installed program, looking in sbin too (nginx and haproxy live there)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


# --------------------------------------------------------------------------- load generators


@dataclass
class _Tally:
    remaining: int
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one Content-Length response; return (status, connection reusable)."""
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    status = int(head[9:12])
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError("a response without Content-Length")  # the upstreams here always send one
    length = int(head[at + 17 : head.index(b"\r\n", at + 2)])
    if length:
        await reader.readexactly(length)
    return status, b"\r\nconnection: close" not in head


async def _keep_sending(port: int, request: bytes, tally: _Tally) -> None:
    """One keep-alive connection sending requests one after another while any remain."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        while tally.remaining > 0:
            tally.remaining -= 1
            started = time.perf_counter()
            try:
                conn = conn or await asyncio.open_connection(HOST, port)
                conn[1].write(request)
                status, reusable = await _read_response(conn[0])
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                tally.errors += 1
                reusable = False
            else:
                tally.latencies_s.append(time.perf_counter() - started)
                tally.errors += not 200 <= status < 400
            if not reusable and conn is not None:
                conn[1].close()
                conn = None
    finally:
        if conn is not None:
            conn[1].close()


async def generate_load(
    port: int, path: str, connections: int, requests: int, deadline_s: float, cookie: str | None = None
) -> LoadResult:
    """Send `requests` GETs over `connections` keep-alive sockets (or until the deadline); measure."""
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{extra}\r\n".encode()
    tally = _Tally(remaining=requests)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(deadline_s):
            await asyncio.gather(*(_keep_sending(port, request, tally) for _ in range(connections)))
    except TimeoutError:
        pass  # bounded by time, e.g. a warm-up: what was served counts
    elapsed_s = time.perf_counter() - started
    latencies = sorted(tally.latencies_s)
    return LoadResult(
        len(latencies),
        tally.errors,
        round(elapsed_s, 3),
        round(len(latencies) / elapsed_s, 1),
        percentile_ms(latencies, 50),
        percentile_ms(latencies, 99),
    )


async def run_wrk(wrk: str, url: str, connections: int, duration_s: int, cookie: str | None = None) -> LoadResult:
    """Run wrk once against `url` (every request carrying `cookie`, if given) and parse its figures."""
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", url]
    if cookie:
        argv[1:1] = ["-H", f"Cookie: {cookie}"]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(duration_s + 30):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise TopologyError(f"wrk exited with status {process.returncode}: {err.decode(errors='replace').strip()}")
    try:
        return parse_wrk(out.decode())
    except ValueError as exc:
        raise TopologyError(str(exc)) from None


async def apply_load(plan: LoadPlan, url: str, *, warmup: bool, cookie: str | None = None) -> LoadResult:
    """One run against `url`: a short warm-up, or the measured run that the plan bounds."""
    if plan.wrk is not None:
        return await run_wrk(plan.wrk, url, plan.connections, WARMUP_S if warmup else plan.duration_s, cookie)
    parts = urlsplit(url)
    port, path = parts.port or 80, parts.path or "/"
    requests, deadline_s = (10**9, float(WARMUP_S)) if warmup else (plan.requests, BUILTIN_DEADLINE_S)
    return await generate_load(port, path, plan.connections, requests, deadline_s, cookie)


async def first_cookie(url: str) -> str:
    """The `name=value` of the first Set-Cookie that one GET of `url` gets: a balancer's pin."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    try:
        writer.write(f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(READY_TIMEOUT_S):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    finally:
        writer.close()
    for line in head.split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "set-cookie":
            return value.strip().split(";", 1)[0]
    raise TopologyError(f"{url} set no cookie: a sticky balancer should have pinned the first request")


# --------------------------------------------------------------------------- processes


class Children:
    """The child processes of one bench run, each logging to a file, stopped together by handle."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[Child] = []

    def start(
        self, name: str, argv: list[str], *, settings: dict[str, str] | None = None, ready_line: bool = False
    ) -> Child:
        """Start `argv` logging to <log_dir>/<name>.log; `settings` are its LBSESSION_* variables."""
        env = child_environ(settings or {})
        child = spawn(name, argv, self.log_dir / f"{name}.log", env=env, ready_line=ready_line)
        self.processes.append(child)
        return child

    async def stop_all(self) -> None:
        """SIGTERM every running child, SIGKILL those still alive after a grace period."""
        await asyncio.gather(*(child.stop() for child in reversed(self.processes)))


@dataclass(frozen=True)
class Upstreams:
    """The upstreams every target is measured in front of."""

    kind: str  # "nginx" or "server" (lbsession server processes)
    ports: list[int]
    path: str  # what to request: an nginx `return 200`, or the app server's cheapest page
    pids: tuple[int, ...]


def client_room(connections: int) -> int:
    """The client connections a balancer must admit for `connections` clients: HAProxy's `maxconn`."""
    return max(4096, connections + 64)  # room for health checks and the warm-up's leftovers


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def start_upstreams(children: Children, params: BenchParams) -> Upstreams:
    """Start one nginx serving `params.servers` ports when installed, else as many lbsession servers."""
    count = params.servers
    nginx = find_tool("nginx")
    if nginx is None and params.body_bytes is not None:
        raise ConfigError("--body-bytes needs nginx as the upstream: install it (apt-get install nginx)")
    if nginx is not None:
        ports, conf = free_ports(count), children.log_dir / "nginx.conf"
        body_file = None
        if params.body_bytes is not None:
            body_file = children.log_dir / "www" / "body"
            body_file.parent.mkdir()
            body_file.write_bytes(b"x" * params.body_bytes)
        # Each client of a balancer may hold an upstream connection of its own (`http-reuse safe`).
        room = 2 * params.connections + 512
        conf.write_text(nginx_config(ports, children.log_dir, body_file=body_file, connections=room))
        argv = [nginx, "-p", str(children.log_dir), "-c", str(conf), "-e", str(children.log_dir / "error.log")]
        child = children.start("nginx", argv)
        for port in ports:
            await wait_http(child, port, "/", READY_TIMEOUT_S)
        return Upstreams("nginx", ports, "/", (child.popen.pid,))
    ports, pids = [], []
    for index in range(1, count + 1):
        name = f"was-{index}"
        argv = python_module("lbsession", "server", "--ready-line")
        settings = to_environ(AppServerConfig(id=name, port=0), "app")
        child = children.start(name, argv, settings=settings, ready_line=True)
        ready = await read_ready_line(child, READY_TIMEOUT_S * 2)  # a cold start imports aiohttp
        ports.append(ready["port"])
        pids.append(child.popen.pid)
    return Upstreams("server", ports, "/healthz", tuple(pids))


async def start_target(
    children: Children,
    name: str,
    argv: list[str],
    port: int,
    path: str,
    settings: dict[str, str] | None = None,
    admin_port: int | None = None,
) -> Target:
    """Start a balancer (`argv` listens on `port`, logs to <name>.log); return once it proxies a 200.

    With `admin_port` (lbsession's), also wait for its admin API, which binds after the public
    listener, and read from its /status which build of the hot modules it runs.
    """
    child = children.start(name, argv, settings=settings)
    await wait_http(child, port, path, READY_TIMEOUT_S)
    build = ""
    if admin_port is not None:
        await wait_http(child, admin_port, "/status", READY_TIMEOUT_S)
        build = await balancer_build(admin_port)
    return Target(name, f"http://{HOST}:{port}{path}", (child.popen.pid,), build)


async def start_lbsession(
    children: Children, upstreams: Upstreams, case: BenchCase, loop: str, connections: int
) -> Target:
    """Start `lbsession lb` with the case's strategy in front of the upstreams."""
    port, admin_port = free_ports(2)
    balancer = BalancerConfig(
        port=port,
        admin_port=admin_port,
        strategy=case.strategy,
        upstreams=tuple(UpstreamConfig(f"u{i}", f"http://{HOST}:{p}") for i, p in enumerate(upstreams.ports, 1)),
        sticky=StickyConfig(secret=STICKY_SECRET),
        limits=LimitsConfig(max_connections=max(LimitsConfig().max_connections, client_room(connections))),
    )
    argv = python_module("lbsession", "--loop", loop, "--log-level", "warning", "lb")
    settings = to_environ(balancer, "balancer")
    return await start_target(children, f"lbsession-{case.strategy}", argv, port, upstreams.path, settings, admin_port)


async def balancer_build(admin_port: int) -> str:
    """Which build of its hot modules a started balancer runs, as its GET /status says."""
    async with asyncio.timeout(READY_TIMEOUT_S):
        _, body = await http_get(admin_port, "/status")
    return str(json.loads(body)["build"])


async def start_haproxy(
    children: Children, upstreams: Upstreams, case: BenchCase, haproxy: str, connections: int
) -> Target:
    """Start HAProxy with the case's equivalent of its strategy (`case.haproxy`) in front of the upstreams."""
    assert case.haproxy is not None
    (port,) = free_ports(1)
    conf = children.log_dir / f"haproxy-{case.strategy}.cfg"
    maxconn = client_room(connections)
    conf.write_text(haproxy_config(port, upstreams.ports, case.haproxy, cookie=case.cookie, maxconn=maxconn))
    argv = [haproxy, "-f", str(conf), "-db"]
    return await start_target(children, f"haproxy-{case.strategy}", argv, port, upstreams.path)


# --------------------------------------------------------------------------- measuring and reporting


async def measure(plan: LoadPlan, target: Target, upstream_pids: tuple[int, ...], *, pinned: bool = False) -> Figures:
    """Warm a target up, then load it once while counting its CPU and the upstreams'.

    `pinned`: every request carries the cookie the target set on a first request.
    """
    cookie = await first_cookie(target.url) if pinned else None
    await apply_load(plan, target.url, warmup=True, cookie=cookie)
    cpu_before, upstream_before = cpu_seconds(target.pids), cpu_seconds(upstream_pids)
    load = await apply_load(plan, target.url, warmup=False, cookie=cookie)
    cpu_after, upstream_after = cpu_seconds(target.pids), cpu_seconds(upstream_pids)
    if load.requests == 0:
        raise TopologyError(f"{target.name} served no request at {target.url}")
    return Figures(
        target.name,
        load,
        cpu_us_per_request(cpu_before, cpu_after, load.requests),
        cpu_us_per_request(upstream_before, upstream_after, load.requests),
    )


_PARAM_FLAGS = {
    "requests": "--requests",
    "connections": "--connections",
    "servers": "--servers",
    "duration_s": "--duration",
}


def plan_for(params: BenchParams) -> tuple[LoadPlan, str | None]:
    """The load plan and the HAProxy binary (None: not measured); ConfigError for an impossible request."""
    for name, flag in _PARAM_FLAGS.items():
        if getattr(params, name) <= 0:
            raise ConfigError(f"{flag}: {getattr(params, name)} must be greater than 0")
    if params.body_bytes is not None and params.body_bytes < 0:
        raise ConfigError(f"--body-bytes: {params.body_bytes} must be 0 or more")
    if params.connections > (limit := resource.getrlimit(resource.RLIMIT_NOFILE)[1]) // 2 - 64:
        raise ConfigError(
            f"--connections: {params.connections} needs about {2 * params.connections + 64} open files in the "
            f"balancer (a client and an upstream connection each), over this machine's hard limit of {limit}"
        )
    wrk = find_tool("wrk") if params.tool != "builtin" else None
    if params.tool == "wrk" and wrk is None:
        raise ConfigError("--tool wrk: wrk is not installed; install it (apt-get install wrk) or use --tool builtin")
    haproxy = find_tool("haproxy") if params.haproxy != "no" else None
    if params.haproxy == "yes" and haproxy is None:
        raise ConfigError("--haproxy yes: haproxy is not installed; install it or use --haproxy no")
    plan = LoadPlan(wrk, params.connections, params.duration_s, params.requests)
    return plan, haproxy


@dataclass(frozen=True)
class CaseReport:
    """One case: lbsession's figures beside its HAProxy equivalent's, and the ratios against the targets."""

    case: str
    haproxy_config: str  # the HAProxy directives compared with, or why HAProxy was not measured
    lbsession: Figures
    haproxy: Figures | None = None
    cpu_ratio: float | None = None  # lbsession / HAProxy CPU per request; None: HAProxy not run
    p99_ratio: float | None = None
    rps_ratio: float | None = None
    cpu_target_met: bool | None = None  # None: HAProxy not run, nothing to compare with
    p99_target_met: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        """The case as the JSON report holds it."""
        out: dict[str, Any] = {"case": self.case, "haproxy_config": self.haproxy_config}
        if self.haproxy is not None:
            out.update(
                cpu_ratio=self.cpu_ratio,
                p99_ratio=self.p99_ratio,
                rps_ratio=self.rps_ratio,
                cpu_target_met=self.cpu_target_met,
                p99_target_met=self.p99_target_met,
            )
        return out


def _ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 2) if theirs else None


def compare(case: str, lbsession: Figures, haproxy: Figures | None, haproxy_config: str = "") -> CaseReport:
    """A case's figures, plus the lbsession/HAProxy ratios and the verdicts against the targets."""
    report = CaseReport(case, haproxy_config, lbsession, haproxy)
    if haproxy is None:
        return report
    cpu = _ratio(lbsession.cpu_us_per_request, haproxy.cpu_us_per_request)
    p99 = _ratio(lbsession.load.p99_ms, haproxy.load.p99_ms)
    return dataclasses.replace(
        report,
        cpu_ratio=cpu,
        p99_ratio=p99,
        rps_ratio=_ratio(lbsession.load.rps, haproxy.load.rps),
        cpu_target_met=None if cpu is None else cpu <= CPU_RATIO_TARGET,  # None: too few requests to tell
        p99_target_met=None if p99 is None else p99 <= P99_RATIO_TARGET,
    )


@dataclass(frozen=True)
class BenchReport:
    """What one bench run measured: the setup, the direct upstream, and a comparison per case."""

    upstream: str  # "nginx" or "server"
    servers: int
    tool: str  # the load generator and its bounds
    loop: str
    strategy: str  # a strategy's name, or "all"
    direct: Figures
    cases: tuple[CaseReport, ...]

    @property
    def build(self) -> str:
        """The build of lbsession's hot modules that was measured (every lbsession row runs the same files)."""
        return next((case.lbsession.build for case in self.cases if case.lbsession.build), "not measured")

    @property
    def figures(self) -> tuple[Figures, ...]:
        """Every row measured, in order: the direct upstream, then each case's lbsession and HAProxy."""
        rows = [self.direct]
        for case in self.cases:
            rows += [case.lbsession] + ([case.haproxy] if case.haproxy is not None else [])
        return tuple(rows)

    def as_dict(self) -> dict[str, Any]:
        """The report as its JSON file holds it."""
        return {
            "upstream": self.upstream,
            "servers": self.servers,
            "tool": self.tool,
            "loop": self.loop,
            "build": self.build,
            "strategy": self.strategy,
            "targets": [f.as_dict() for f in self.figures],
            "cases": [c.as_dict() for c in self.cases],
            "cpu_ratio_target": CPU_RATIO_TARGET,
            "p99_ratio_target": P99_RATIO_TARGET,
        }


async def measure_balancer(
    children: Children, start: Awaitable[Target], plan: LoadPlan, upstreams: Upstreams, cases: tuple[BenchCase, ...]
) -> list[Figures]:
    """Start one balancer, measure each case on it, stop it: the machine holds one balancer at a time."""
    started = len(children.processes)
    try:
        target = await start
        balancer = target.name.partition("-")[0]
        rows = []
        for case in cases:
            figures = await measure(plan, target, upstreams.pids, pinned=case.pinned)
            rows.append(dataclasses.replace(figures, target=f"{balancer} {case.name}", build=target.build))
        return rows
    finally:
        mine, children.processes[started:] = children.processes[started:], []
        await asyncio.gather(*(child.stop() for child in mine))


async def measure_strategy(
    children: Children, plan: LoadPlan, upstreams: Upstreams, params: BenchParams, strategy: str, loop: str,
    haproxy: str | None,
) -> list[CaseReport]:  # fmt: skip
    """Each case of `strategy` on lbsession, then on its HAProxy equivalent; one report per case."""
    cases = cases_for(strategy)
    first, connections = cases[0], params.connections
    ours = await measure_balancer(
        children, start_lbsession(children, upstreams, first, loop, connections), plan, upstreams, cases
    )
    theirs: list[Figures | None] = [None] * len(cases)
    if haproxy is not None and first.haproxy is not None:
        start = start_haproxy(children, upstreams, first, haproxy, connections)
        theirs = [*await measure_balancer(children, start, plan, upstreams, cases)]
    reports = []
    for case, lbsession_row, haproxy_row in zip(cases, ours, theirs, strict=True):
        if haproxy is None:
            compared = "HAProxy not run"
        else:
            compared = "; ".join(case.haproxy) if case.haproxy else "no HAProxy equivalent"
        reports.append(compare(case.name, lbsession_row, haproxy_row, compared))
    return reports


async def measure_all(children: Children, plan: LoadPlan, params: BenchParams, haproxy: str | None) -> BenchReport:
    """Start the upstreams, measure them direct, then each strategy's pair in turn; return the report."""
    loop = params.loop if params.loop != "auto" else ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
    raise_fd_limit()
    upstreams = await start_upstreams(children, params)
    direct = Target(
        f"direct {upstreams.kind}", f"http://{HOST}:{upstreams.ports[0]}{upstreams.path}", upstreams.pids[:1]
    )
    direct_figures = await measure(plan, direct, upstreams.pids)
    strategies = list(dict.fromkeys(case.strategy for case in cases_for(params.strategy)))
    cases = [
        report
        for strategy in strategies
        for report in await measure_strategy(children, plan, upstreams, params, strategy, loop, haproxy)
    ]
    return BenchReport(
        upstream=upstreams.kind,
        servers=params.servers,
        tool=plan.describe(),
        loop=loop,
        strategy=params.strategy,
        direct=direct_figures,
        cases=tuple(cases),
    )


async def run_bench(params: BenchParams) -> BenchReport:
    """Start upstreams, lbsession and HAProxy; measure each; return the figures (the caller prints them)."""
    plan, haproxy = plan_for(params)
    children = Children(Path(tempfile.mkdtemp(prefix="lbsession-bench-")))
    keep_logs = False
    try:
        return await measure_all(children, plan, params, haproxy)
    except TopologyError:
        keep_logs = True  # the error names a log in the directory
        raise
    finally:
        await children.stop_all()
        if not keep_logs:
            shutil.rmtree(children.log_dir, ignore_errors=True)
