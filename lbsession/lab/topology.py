"""A whole lab on one machine: the balancer, N app servers as real processes, and their control.

`lbsession run`, the scenario runner and the integration tests all start their
labs through this one class, so what a test proves is what a user runs.

The balancer runs inside the process that owns the Topology; every app server
is a child process (`python -m lbsession server`), so a fault is what it would
be in production: `SIGKILL`, the process gone with everything in its memory.
A child reports readiness by printing one JSON line on its stdout once its
port is bound, which also tells the parent the port it was given (port 0).

A child gets its whole configuration by one mechanism: the `LBSESSION_APP__*`
environment (lbsession.config.to_environ), which its `load_config` reads as any
user's variables. Its command line carries no setting, so nothing in it (a
Redis password, the cluster secret) shows in `ps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from lbsession.appserver.lab_control import LAB_TOKEN_ENV, LAB_TOKEN_HEADER, REPLICATION_PATH
from lbsession.balancer.balancer import LoadBalancer
from lbsession.balancer.upstream import Upstream
from lbsession.config import AppServerConfig, Config, RedisConfig, env_name, to_environ
from lbsession.errors import ConfigError, TopologyError
from lbsession.lab.balancers import front_class
from lbsession.lab.balancers.base import BalancerFront
from lbsession.lab.control import BalancerView, LabControl, LbsessionView
from lbsession.lab.forks import Forks
from lbsession.lab.link_service import LinkService
from lbsession.lab.process import Child, child_environ, free_port, python_module, read_ready_line, spawn
from lbsession.lab.redis_servers import RedisTopology

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 20.0  # a cold start imports aiohttp; generous for a loaded 2-core CI machine


@dataclass
class ManagedServer:
    """One app server process that the topology started and can kill or restart."""

    server_id: str
    port: int = 0
    process: Child | None = None
    log_path: Path | None = None
    restarts: int = 0
    extra_args: list[str] = field(default_factory=list)  # command-line flags that are not settings (--access-log)
    cluster_port: int = 0  # backend cluster: the replication listener, fixed so peers can list it
    # With links, peers reach it at 127.0.4.k (a relay on its port) and it dials them from 127.0.5.k,
    # so the relay in front of each node tells its peers apart by source (lbsession.lab.links).
    cluster_host: str = "127.0.0.1"
    source_host: str | None = None
    # Backend cluster: whom it replicates to, fixed at creation and kept on restart.
    cluster_peers: tuple[str, ...] = ()
    cluster_join: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)  # kill/restart one at a time
    links: dict[str, int] = field(default_factory=dict)  # with links: the relay port in front, by link name

    @property
    def url(self) -> str:
        """The server's own URL (bypassing the balancer)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The OS process id, or None when not running."""
        return self.process.pid if self.process is not None else None

    @property
    def cluster_address(self) -> str:
        """Where its peers reach its replication listener: the address they list."""
        return f"{self.cluster_host}:{self.cluster_port}"

    def as_dict(self) -> dict[str, Any]:
        """The server as the ready file and the admin API describe it."""
        info: dict[str, Any] = {"id": self.server_id, "url": self.url, "pid": self.pid, "restarts": self.restarts}
        if self.cluster_port:
            info["cluster_address"] = self.cluster_address
        if self.links:
            info["links"] = sorted(self.links)
        return info


class Topology:
    """Start, change and stop a lab: one balancer and its app servers."""

    def __init__(
        self,
        config: Config,
        *,
        log_dir: Path | None = None,
        server_args: list[str] | None = None,
        balancer: str = "lbsession",
        links: LinkService | None = None,
        forks: Forks | None = None,
    ) -> None:
        """`links`: a links process to reuse (the caller's to stop), rather than one of this lab's own.

        `forks`: a warm parent (the caller's to stop) to fork the first app servers from, rather
        than start each Python afresh; servers started later (restarts, scale-outs) are spawned.
        """
        if not config.balancer.health.active:
            raise ConfigError(
                f"balancer.health.active: false is for `lbsession lb` only: a lab waits on its servers' active "
                f"health checks to know they are up; remove it from the config file (or unset "
                f"{env_name('balancer.health.active')})"
            )
        self.config = config
        self.balancer = balancer  # lbsession's own, in this process; or a real one (lbsession.lab.balancers)
        self.front: BalancerFront | None = None  # the real balancer, when one is in front
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="lbsession-"))
        self.server_args = server_args or []  # flags that are not settings, for every app server
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
        # A reused links process knows one token: the lab's is that one.
        self._lab_token = links.token if links is not None else secrets.token_urlsafe(32)
        self._shared_links = links if config.links == "on" else None
        self._forks = forks
        self.control: LabControl | None = None  # the lab's admin port: process controls, scenarios, dashboard
        self.links: LinkService | None = None  # the faultable relays in the lab's paths (lbsession.lab.links)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every app server, then the balancer in front of them; return once all are healthy."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.balancer != "lbsession":  # before any process: a missing binary is the user's to fix
            front = front_class(self.balancer)
            front.refuse(self.config)
            self.front = front(self.config, self.log_dir)
        try:
            if self._shared_links is not None:
                self.links = self._shared_links
                if not self.links.running:
                    await self.links.start()
            elif self.config.links == "on":
                self.links = LinkService(self.log_dir / "links.log", self._lab_token)
                await self.links.start()
            await self._prepare_redis()
            servers = [self._new_server() for _ in range(self.config.servers)]
            for server in servers:  # every first server lists all the others
                server.cluster_peers = self._cluster_addresses([s for s in servers if s is not server])
                await self._link_peers(server)
            # An app server opens its Redis connections lazily, at its first request, so it starts
            # while Redis and Sentinel come up; the balancer's health checks, which reach the store,
            # begin only once both are ready.
            redis = [self.redis.start()] if self.redis is not None else []
            if self._forks is not None and not self._forks.running:
                await self._forks.start()
            await _together(*redis, *(self._spawn(s, self._forks) for s in servers))
            if self.front is not None:
                await self._start_front(self.front, servers)
                return
            self.lb = LoadBalancer(self.config.balancer)
            for server in servers:
                self.lb.pool.add(server.server_id, await self._front_url(server))
            await self.lb.start(admin=False)  # the lab's control listener serves its admin API
            self.control = LabControl(self, LbsessionView(self.lb), self.lb.config)
            await self.control.start()
            try:
                await self.wait_healthy()
            except TimeoutError:
                unhealthy = [s.server_id for s in servers if not self.lb.pool.upstreams[s.server_id].healthy]
                raise TopologyError(
                    f"{', '.join(unhealthy)} did not pass the balancer's health check in {READY_TIMEOUT_S:g} s; "
                    f"see {self.log_dir}"
                ) from None
        except BaseException:
            await self.stop()
            raise

    async def _start_front(self, front: BalancerFront, servers: list[ManagedServer]) -> None:
        """Start the real balancer in front of `servers`, then the control listener with its view."""
        await front.start({s.server_id: await self._front_port(s) for s in servers})
        self.control = LabControl(self, front, self.config.balancer)
        await self.control.start()
        await self.wait_healthy()

    async def stop(self) -> None:
        """Stop the balancer and every child (SIGTERM, then SIGKILL after a grace period)."""
        if self.control is not None:
            await self.control.stop()
        if self.front is not None:
            await self.front.stop()
        if self.lb is not None:
            await self.lb.stop(grace_s=2.0)
        # With no balancer left, nothing reaches the app servers: they and Redis stop together.
        redis = [self.redis.stop()] if self.redis is not None else []
        await asyncio.gather(*redis, *(self._terminate(s) for s in self.servers.values()))
        if self.links is not None and self.links is self._shared_links:
            await self._clear_shared_links()
        elif self.links is not None:
            await self.links.stop()

    async def _clear_shared_links(self) -> None:
        """Leave the reused links process with no link of this lab's; stop it if it cannot be cleared."""
        assert self.links is not None
        try:
            if self.links.running:
                await self.links.clear()
        except TopologyError as exc:  # the next lab starts a fresh one rather than inherit these links
            log.warning("stopping the reused links process: %s", exc)
            await self.links.stop()
        self.links = None

    async def _prepare_redis(self) -> None:
        """The session server, when the app servers need one and were given none: its ports and links, not started."""
        app = self.config.app
        uses_redis = app.backend == "redis" or (app.backend == "cookie" and app.cookie.deny_list)
        if not uses_redis or app.redis.url or app.redis.sentinels:
            return
        settings = self.config.redis_server
        self.redis = RedisTopology(
            self.log_dir / "redis",
            ha=settings.ha,
            persist=settings.persist,
            binary=settings.binary,
            down_after_ms=settings.down_after_ms,
            announce=self.links is not None,
            replicas=settings.replicas,
            min_replicas=(settings.min_replicas_to_write, settings.min_replicas_max_lag_s),
        )
        if self.links is not None and self.redis.ha:
            for node in self.redis.nodes:  # the Sentinels' path to each node, and each other node's replication
                name = f"sentinels->{node.name}"
                await self.links.add(name, "sentinels", node.name, node.port, node.port, node.announce_host)
                for replica in self.redis.nodes:
                    if replica is not node and replica.source_host is not None:
                        await self.links.add(f"{replica.name}->{node.name}", replica.name, node.name, node.port,
                                             node.port, node.announce_host, (replica.source_host,))  # fmt: skip

    async def __aenter__(self) -> Topology:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_healthy(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return when every running server passes the balancer's health check."""
        if self.front is not None:
            running = [s for s in self.servers.values() if s.pid is not None and s.server_id in self.front.active()]
            await asyncio.gather(*(self.front.wait_up(s.server_id, timeout_s) for s in running))
            return
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
        view = self._view()
        return {
            "lb": view.url,
            "admin": self.admin_url,
            "balancer": self.balancer,
            "strategy": view.strategy_name(),
            "backend": self.config.app.backend,
            "servers": [s.as_dict() for s in self.servers.values()],
            "redis": self.redis.as_dict() if self.redis is not None else None,
            "links": self.links.as_dict() if self.links is not None else None,
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
        if server.process is None or server.pid is None:
            raise TopologyError(f"{server.server_id} is not running")
        await server.process.kill()
        log.info("killed %s (SIGKILL)", server.server_id)
        if self.links is not None and f"lb->{server.server_id}" in server.links:
            # Its link refuses from now on, as the dead server does, rather than from the first
            # request that finds it dead (which a link, having accepted, could only reset).
            await self.links.call("POST", f"/links/lb->{server.server_id}/probe", {})

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
        if self.front is not None:
            if server_id in self.front.active():
                await self.front.wait_up(server_id)
            return server
        lb = self._balancer()
        if server_id in lb.pool.upstreams:
            # Only an active check may bring it back (rise), as with a real server coming up.
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._until_healthy(lb.pool.upstreams[server_id])
        return server

    async def deploy_server(self, server_id: str, drain_timeout_s: float = 5.0) -> dict[str, Any]:
        """One step of a rolling deploy: drain, wait for its requests in flight (bounded), restart, undrain.

        HAProxy's drain: no new clients, pinned ones still arrive, until nothing is in flight or
        `drain_timeout_s` has passed. Then, as HAProxy's deploy scripts do (drain, then `set
        server state maint`), it leaves the rotation, pinned clients too, and the process is
        replaced once the requests still in flight have finished: with sticky clients a drained
        server is idle only between their requests, and one arriving as the process dies would be
        a 502. It is put back once healthy.
        """
        self._server(server_id)
        pool = self._balancer().pool
        upstream = pool.drain(server_id, True, None)
        started = asyncio.get_running_loop().time()
        await _until_idle(upstream, drain_timeout_s)
        pool.drain(server_id, True, 0.0)  # a drain timeout of 0: out of the rotation now
        await _until_idle(upstream, drain_timeout_s, drained=True)
        drained_s = asyncio.get_running_loop().time() - started
        left = upstream.in_flight
        try:
            server = await self.restart_server(server_id)
        finally:
            pool.drain(server_id, False)
        return {**server.as_dict(), "drained_s": round(drained_s, 3), "in_flight_at_restart": left}

    async def add_server(self) -> ManagedServer:
        """Start one more app server and put it behind the balancer (scale-out).

        With the cluster store and static membership, the newcomer lists the running
        servers but theirs are left as they were: the seed's drawback, reproduced.
        With join membership it joins through one running member instead.
        """
        others = [s for s in self.servers.values() if s.pid is not None]
        server = self._new_server()
        if self.config.app.cluster.membership == "join" and others:
            server.cluster_join = others[0].cluster_address
        else:
            server.cluster_peers = self._cluster_addresses(others)
        await self._link_peers(server)
        await self._spawn(server)
        if self.front is not None:
            await self.front.add(server.server_id, await self._front_port(server))
            await self.front.wait_up(server.server_id)  # as the balancer's own check sees it come up
        else:
            self._balancer().pool.add(server.server_id, await self._front_url(server))
        return server

    async def cut_peer(self, server_id: str, peer_id: str | None, *, cut: bool = True) -> dict[str, Any]:
        """Stop (cut=False: resume) replication from a cluster server to one peer, or to all its peers."""
        server = self._server(server_id)
        if self.config.app.backend != "cluster":
            raise TopologyError(f"the backend is {self.config.app.backend}, not cluster: nothing replicates")
        if server.pid is None:
            raise TopologyError(f"{server_id} is not running")
        peer = None if peer_id is None else self._server(peer_id).cluster_address
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
        index = self._next_index
        server_id = f"was-{index}"
        self._next_index += 1
        server = ManagedServer(server_id, log_path=self.log_dir / f"{server_id}.log")
        if self.config.app.backend == "cluster":
            server.cluster_port = free_port()
            if self.links is not None:
                if index > 254:  # its addresses, 127.0.4.N and 127.0.5.N, have one byte for N
                    raise TopologyError(f"{server_id}: a lab with links has room for 254 cluster servers")
                server.cluster_host, server.source_host = f"127.0.4.{index}", f"127.0.5.{index}"
        self.servers[server_id] = server
        return server

    def server_argv(self, server: ManagedServer) -> list[str]:
        """The command line of an app server: no setting, those are in `server_environ`."""
        return python_module("lbsession", *self.server_command(server))

    def server_command(self, server: ManagedServer) -> list[str]:
        """What follows `python -m lbsession` in an app server's command line (a fork runs just that)."""
        return ["server", "--ready-line", *self.server_args, *server.extra_args]

    def server_config(self, server: ManagedServer) -> AppServerConfig:
        """The lab's app-server config as this one server gets it: its id, ports, peers and Redis."""
        app = self.config.app
        cluster = dataclasses.replace(
            app.cluster,
            port=server.cluster_port,
            peers=server.cluster_peers,
            join=server.cluster_join,
            advertise_host=server.cluster_host,
            source_host=server.source_host,
            secret=self._cluster_secret,
        )
        cookie = dataclasses.replace(app.cookie, keys=self._cookie_keys)
        return dataclasses.replace(
            app, id=server.server_id, host="127.0.0.1", port=server.port, cluster=cluster, cookie=cookie,
            redis=self._redis_config(server),
        )  # fmt: skip

    def server_environ(self, server: ManagedServer) -> dict[str, str]:
        """The environment of an app server: this process's, with its config as the only `LBSESSION_*`."""
        return child_environ({LAB_TOKEN_ENV: self._lab_token, **to_environ(self.server_config(server), "app")})

    def _cluster_addresses(self, peers: list[ManagedServer]) -> tuple[str, ...]:
        return tuple(p.cluster_address for p in peers) if self.config.app.backend == "cluster" else ()

    def _redis_config(self, server: ManagedServer) -> RedisConfig:
        """How an app server reaches Redis: the lab's own (through its link, if it has one), or the one configured."""
        redis = self.config.app.redis
        if self.redis is None:
            return redis
        config = self.redis.client_config(redis)
        sid, nodes = server.server_id, self.redis.nodes
        if f"{sid}->{nodes[0].name}" not in server.links:
            return config
        if not self.redis.ha:
            return dataclasses.replace(config, url=f"redis://127.0.0.1:{server.links[f'{sid}->{nodes[0].name}']}/0")
        # Sentinel names a primary by its announced address; this server dials its own link to it.
        sentinels = tuple(f"127.0.0.1:{server.links[f'{sid}->{s.name}']}" for s in self.redis.sentinels)
        mapped = tuple(f"{n.announce_host}:{n.port}=127.0.0.1:{server.links[f'{sid}->{n.name}']}" for n in nodes)
        return dataclasses.replace(config, sentinels=sentinels, address_map=mapped)

    async def _front_url(self, server: ManagedServer) -> str:
        """The URL the balancer is given for `server`: its link's, with links, else its own."""
        if self.links is None:
            return server.url
        name = f"lb->{server.server_id}"
        server.links[name] = await self.links.add(name, "lb", server.server_id, server.port)
        return f"http://127.0.0.1:{server.links[name]}"

    async def _front_port(self, server: ManagedServer) -> int:
        """The port a real balancer is given for `server`: its link's, with links, else its own."""
        return int((await self._front_url(server)).rpartition(":")[2])

    async def _link_to_redis(self, server: ManagedServer) -> None:
        """With links and the lab's Redis: links of its own from this server to each node and Sentinel, made once.

        Under Sentinel the server is told each node's announced address (127.0.2.k, the path
        Sentinel and the replicas use) and dials its own link instead (RedisConfig.address_map),
        so its path to a node can be cut apart from Sentinel's, and the other way round.
        """
        if self.links is None or self.redis is None:
            return
        for part in [*self.redis.nodes, *self.redis.sentinels]:
            name = f"{server.server_id}->{part.name}"
            if name not in server.links:
                server.links[name] = await self.links.add(name, server.server_id, part.name, part.port)

    async def _link_peers(self, server: ManagedServer) -> None:
        """With links and the cluster store: a link each way between `server` and every other server, made once.

        Made whether or not either lists the other: under static membership an added server's
        peers do not dial it (C8), and their links to it show no connection, which is the lesson.
        """
        if self.links is None or server.source_host is None:
            return
        for other in self.servers.values():
            if other is server or other.source_host is None:
                continue
            for a, b, source in ((server, other, server.source_host), (other, server, other.source_host)):
                name = f"{a.server_id}->{b.server_id}"
                if name not in a.links:
                    a.links[name] = await self.links.add(name, a.server_id, b.server_id, b.cluster_port,
                                                         b.cluster_port, b.cluster_host, (source,))  # fmt: skip

    async def _spawn(self, server: ManagedServer, forks: Forks | None = None) -> None:
        """Start `server`'s process (a fork of `forks`, if given) and wait for its ready line."""
        assert server.log_path is not None
        await self._link_to_redis(server)
        sid, log_path, env = server.server_id, server.log_path, self.server_environ(server)
        if forks is not None:
            server.process = forks.spawn(sid, self.server_command(server), log_path, env)
        else:
            server.process = spawn(sid, self.server_argv(server), log_path, env=env, ready_line=True)
        server.port = (await read_ready_line(server.process, READY_TIMEOUT_S))["port"]

    async def _terminate(self, server: ManagedServer) -> None:
        if server.process is not None:
            await server.process.stop()

    def _server(self, server_id: str) -> ManagedServer:
        if server_id not in self.servers:
            raise TopologyError(f"no managed server {server_id!r}; known: {', '.join(self.servers) or 'none'}")
        return self.servers[server_id]

    def _view(self) -> BalancerView:
        if self.control is None:
            raise TopologyError("the topology is not started")
        return self.control.view

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


async def _together(*steps: Awaitable[object]) -> None:
    """Run `steps` at once and wait for every one, then raise the first failure.

    Not a bare gather: on a failure it returns while the other steps still run, and the
    topology's stop would then miss the processes they start after it.
    """
    results = await asyncio.gather(*steps, return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        raise failure


async def _until_idle(upstream: Upstream, timeout_s: float, *, drained: bool = False) -> None:
    """Until nothing is in flight on `upstream` (and, with `drained`, it has left the rotation), at most `timeout_s`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            # The balancer's own counts are the facts waited for.
            while upstream.in_flight or (drained and not upstream.drained):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
