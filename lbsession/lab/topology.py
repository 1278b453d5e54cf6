"""A whole lab on one machine: the balancer, N app servers as real processes, and their control.

`lbsession run`, the scenario runner and the integration tests all start their
labs through this one class, so what a test proves is what a user runs.

The balancer runs inside the process that owns the Topology; every app server
is a child process (`python -m lbsession server`), so a fault is what it would
be in production: `SIGKILL`, the process gone with everything in its memory.
A child reports readiness by printing one JSON line on its stdout once its
port is bound, which also tells the parent the port it was given (port 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from lbsession.appserver.lab_control import LAB_TOKEN_ENV, LAB_TOKEN_HEADER, REPLICATION_PATH
from lbsession.balancer.balancer import LoadBalancer
from lbsession.balancer.upstream import Upstream
from lbsession.config import Config
from lbsession.errors import TopologyError
from lbsession.lab.control import LabControl, LbsessionView
from lbsession.lab.redis_servers import RedisTopology, free_port

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 20.0  # a cold start imports aiohttp; generous for a loaded 2-core CI machine


@dataclass
class ManagedServer:
    """One app server process that the topology started and can kill or restart."""

    server_id: str
    port: int = 0
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    restarts: int = 0
    extra_args: list[str] = field(default_factory=list)
    cluster_port: int = 0  # backend cluster: the replication listener, fixed so peers can list it
    cluster_args: list[str] = field(default_factory=list)  # peers or join: fixed at creation, kept on restart
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)  # kill/restart one at a time

    @property
    def url(self) -> str:
        """The server's own URL (bypassing the balancer)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The OS process id, or None when not running."""
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    def as_dict(self) -> dict[str, Any]:
        """The server as the ready file and the admin API describe it."""
        info: dict[str, Any] = {"id": self.server_id, "url": self.url, "pid": self.pid, "restarts": self.restarts}
        if self.cluster_port:
            info["cluster_address"] = f"127.0.0.1:{self.cluster_port}"
        return info


class Topology:
    """Start, change and stop a lab: one balancer and its app servers."""

    def __init__(self, config: Config, *, log_dir: Path | None = None, server_args: list[str] | None = None) -> None:
        self.config = config
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="lbsession-"))
        self.server_args = server_args or []  # extra flags for every app server
        self.servers: dict[str, ManagedServer] = {}
        self.lb: LoadBalancer | None = None
        self.redis: RedisTopology | None = None  # the Redis this lab started, if it started one
        self._next_index = 1
        # One secret per lab authenticates the cluster's replication; it reaches the servers
        # through their environment, since a command line is visible to every local user.
        self._cluster_secret = config.app.cluster.secret or secrets.token_urlsafe(32)
        # Likewise the cookie store's keys: every server must open every other's cookies.
        self._cookie_keys = config.app.cookie.keys or (secrets.token_urlsafe(32),)
        # Unlocks the app servers' fault-injection route (lbsession.appserver.lab_control); only this
        # process knows it, so clients reaching the servers through the balancer cannot use the route.
        self._lab_token = secrets.token_urlsafe(32)
        self.control: LabControl | None = None  # the lab's admin port: process controls, scenarios, dashboard

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every app server, then the balancer in front of them; return once all are healthy."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._start_redis()
            servers = [self._new_server() for _ in range(self.config.servers)]
            for server in servers:  # every first server lists all the others
                server.cluster_args = self._peer_args([s for s in servers if s is not server])
            await asyncio.gather(*(self._spawn(s) for s in servers))
            self.lb = LoadBalancer(self.config.balancer)
            for server in servers:
                self.lb.pool.add(server.server_id, server.url)
            await self.lb.start(admin=False)  # the lab's control listener serves its admin API
            self.control = LabControl(self, LbsessionView(self.lb), self.lb.config)
            await self.control.start()
            await self.wait_healthy()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop the balancer and every child (SIGTERM, then SIGKILL after a grace period)."""
        if self.control is not None:
            await self.control.stop()
        if self.lb is not None:
            await self.lb.stop(grace_s=2.0)
        await asyncio.gather(*(self._terminate(s) for s in self.servers.values()))
        if self.redis is not None:
            await self.redis.stop()

    async def _start_redis(self) -> None:
        """Start the session server when the app servers need one and were given none."""
        app = self.config.app
        if app.backend != "redis" or app.redis.url or app.redis.sentinels:
            return
        settings = self.config.redis_server
        self.redis = RedisTopology(
            self.log_dir / "redis",
            ha=settings.ha,
            persist=settings.persist,
            binary=settings.binary,
            down_after_ms=settings.down_after_ms,
        )
        await self.redis.start()

    async def __aenter__(self) -> Topology:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_healthy(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return when every running server passes the balancer's health check."""
        lb = self._balancer()
        async with asyncio.timeout(timeout_s):
            for server in self.servers.values():
                if server.pid is not None and server.server_id in lb.pool.upstreams:
                    await self._until_healthy(lb.pool.upstreams[server.server_id])

    async def _until_healthy(self, upstream: Upstream) -> None:
        """Run active checks until the balancer counts `upstream` healthy (rise, as for a real server)."""
        lb = self._balancer()
        while not (await lb.pool.check(upstream) and upstream.healthy):  # noqa: ASYNC110 - each turn is a real check
            await asyncio.sleep(lb.config.health.interval_s / 4)

    @property
    def admin_url(self) -> str:
        """The lab's admin URL: process controls, scenarios, the dashboard and the balancer's admin API."""
        if self.control is None:
            raise TopologyError("the topology is not started")
        return self.control.url

    def ready_info(self) -> dict[str, Any]:
        """What `--ready-file` holds: the balancer's URLs and every server with its pid."""
        lb = self._balancer()
        return {
            "lb": lb.url,
            "admin": self.admin_url,
            "strategy": lb.strategy.name,
            "backend": self.config.app.backend,
            "servers": [s.as_dict() for s in self.servers.values()],
            "redis": self.redis.as_dict() if self.redis is not None else None,
            "log_dir": str(self.log_dir),
        }

    # ------------------------------------------------------------------ faults and changes

    async def kill_server(self, server_id: str) -> ManagedServer:
        """SIGKILL an app server: no shutdown, its in-memory sessions are gone."""
        server = self._server(server_id)
        async with server.lock:
            await self._kill(server)
        return server

    async def _kill(self, server: ManagedServer) -> None:
        if server.process is None or server.process.returncode is not None:
            raise TopologyError(f"{server.server_id} is not running")
        server.process.kill()
        await server.process.wait()
        log.info("killed %s (SIGKILL)", server.server_id)

    async def restart_server(self, server_id: str) -> ManagedServer:
        """Start a stopped or killed server again on its old port (a running one is killed first)."""
        server = self._server(server_id)
        # One change at a time per server: two restarts at once (a double click) would start two
        # processes on one port and lose track of the one that won.
        async with server.lock:
            if server.pid is not None:
                await self._kill(server)
            server.restarts += 1
            await self._spawn(server)
        lb = self._balancer()
        if server_id in lb.pool.upstreams:
            # Only an active check may bring it back (rise), as with a real server coming up.
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._until_healthy(lb.pool.upstreams[server_id])
        return server

    async def add_server(self) -> ManagedServer:
        """Start one more app server and put it behind the balancer (scale-out).

        With the cluster store and static membership, the newcomer lists the running
        servers but theirs are left as they were: the seed's drawback, reproduced.
        With join membership it joins through one running member instead.
        """
        others = [s for s in self.servers.values() if s.pid is not None]
        server = self._new_server()
        if self.config.app.cluster.membership == "join" and others:
            server.cluster_args = ["--cluster-join", f"127.0.0.1:{others[0].cluster_port}"]
        else:
            server.cluster_args = self._peer_args(others)
        await self._spawn(server)
        self._balancer().pool.add(server.server_id, server.url)
        return server

    async def cut_peer(self, server_id: str, peer_id: str | None, *, cut: bool = True) -> dict[str, Any]:
        """Stop (cut=False: resume) replication from a cluster server to one peer, or to all its peers."""
        server = self._server(server_id)
        if self.config.app.backend != "cluster":
            raise TopologyError(f"the backend is {self.config.app.backend}, not cluster: nothing replicates")
        if server.pid is None:
            raise TopologyError(f"{server_id} is not running")
        peer = None if peer_id is None else f"127.0.0.1:{self._server(peer_id).cluster_port}"
        url, headers = server.url + REPLICATION_PATH, {LAB_TOKEN_HEADER: self._lab_token}
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http,
                http.post(url, json={"peer": peer, "cut": cut}, headers=headers) as response,
            ):
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TopologyError(f"{server_id} did not take the cut: {type(exc).__name__}: {exc}") from None
        if response.status != 200:
            raise TopologyError(f"{server_id}: {body.get('error', response.status)}")
        log.info("%s replication from %s to %s", "cut" if cut else "healed", server_id, peer_id or "every peer")
        return {"id": server_id, "peer": peer_id, "cut": cut, **body}

    # ------------------------------------------------------------------ processes

    def _new_server(self) -> ManagedServer:
        server_id = f"was-{self._next_index}"
        self._next_index += 1
        server = ManagedServer(server_id, log_path=self.log_dir / f"{server_id}.log")
        if self.config.app.backend == "cluster":
            server.cluster_port = free_port()
        self.servers[server_id] = server
        return server

    def server_argv(self, server: ManagedServer) -> list[str]:
        """The command line of an app server, as a user would type it."""
        app = self.config.app
        session = app.session
        argv = [
            sys.executable, "-m", "lbsession", "server", "--id", server.server_id,
            "--host", "127.0.0.1", "--port", str(server.port), "--backend", app.backend,
            "--session-cookie", session.cookie_name, "--session-ttl", f"{session.ttl_s:g}", "--ready-line",
        ]  # fmt: skip
        if session.secure:
            argv.append("--secure-cookies")
        return argv + self._redis_args() + self._cluster_args(server) + self.server_args + server.extra_args

    def _peer_args(self, peers: list[ManagedServer]) -> list[str]:
        if self.config.app.backend != "cluster":
            return []
        return ["--cluster-peers", ",".join(f"127.0.0.1:{p.cluster_port}" for p in peers)]

    def _cluster_args(self, server: ManagedServer) -> list[str]:
        cluster = self.config.app.cluster
        if self.config.app.backend != "cluster":
            return []
        return [
            "--cluster-port", str(server.cluster_port), "--cluster-replication", cluster.replication,
            "--cluster-membership", cluster.membership, *server.cluster_args,
        ]  # fmt: skip

    def _redis_args(self) -> list[str]:
        """How the app servers reach Redis: the lab's own, or the one configured."""
        redis = self.config.app.redis
        if self.config.app.backend != "redis":
            return []
        if self.redis is not None:
            args = self.redis.app_server_args()
        else:
            # A configured URL may carry a password: it reaches the servers through their environment.
            args = [] if redis.url else ["--redis-service", redis.service_name]
            args += [arg for address in redis.sentinels for arg in ("--redis-sentinel", address)]
            args += ["--redis-cluster"] if redis.cluster else []
        return [*args, "--redis-prefix", redis.key_prefix, "--redis-retry", f"{redis.retry_s:g}"]

    async def _spawn(self, server: ManagedServer) -> None:
        assert server.log_path is not None
        with open(server.log_path, "ab") as log_file:  # noqa: ASYNC230 - opening a local log file does not block
            server.process = await asyncio.create_subprocess_exec(
                *self.server_argv(server),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "LBSESSION_APP__CLUSTER__SECRET": self._cluster_secret,
                    "LBSESSION_APP__COOKIE__KEYS": json.dumps(list(self._cookie_keys)),
                    LAB_TOKEN_ENV: self._lab_token,
                    **({"LBSESSION_REDIS_URL": self.config.app.redis.url} if self.config.app.redis.url else {}),
                },
                start_new_session=True,  # Ctrl-C in a terminal reaches `run`, which stops children itself
            )
        assert server.process.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                line = await server.process.stdout.readline()
        except TimeoutError:
            server.process.kill()
            await server.process.wait()
            raise TopologyError(
                f"{server.server_id} did not report ready in {READY_TIMEOUT_S:g} s; see {server.log_path}"
            ) from None
        if not line:
            await server.process.wait()
            tail = server.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise TopologyError(
                f"{server.server_id} exited with status {server.process.returncode}: {' | '.join(tail)}"
            )
        server.port = json.loads(line)["port"]

    async def _terminate(self, server: ManagedServer) -> None:
        process = server.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            async with asyncio.timeout(5.0):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    def _server(self, server_id: str) -> ManagedServer:
        if server_id not in self.servers:
            raise TopologyError(f"no managed server {server_id!r}; known: {', '.join(self.servers) or 'none'}")
        return self.servers[server_id]

    def _balancer(self) -> LoadBalancer:
        if self.lb is None:
            raise TopologyError("the topology is not started")
        return self.lb


def write_ready_file(path: Path, info: dict[str, Any]) -> None:
    """Write the ready file atomically, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o644)
