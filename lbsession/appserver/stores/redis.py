"""`redis`: sessions in a separate session server, shared by every app server.

One Redis hash per session, one field per attribute, each value JSON-encoded,
under `key_prefix`. Every call is one round trip:

    load    HGETALL key, then PEXPIRE key ttl if it exists    (one Lua script)
    save    HDEL removed, HSET changed, PEXPIRE key ttl       (one Lua script: atomic, as MULTI)
    delete  DEL key

Why scripts rather than a pipeline: the same single round trip, but redis-py spends about
75 µs of CPU on one EVALSHA where a pipeline of two commands costs it about 120 µs, and
that client cost, not Redis, is what a Redis-backed app server mostly pays per request.
Each script touches one key, so it also runs on Redis Cluster; after a failover the new
primary may not know a script, and redis-py then loads it again by itself (NOSCRIPT).

Writing only the changed fields is what keeps two servers that handle two
requests of one user at once from overwriting each other's attributes.

Failover: redis-py's own retry would reconnect to the address it already had,
which after a Sentinel failover is the dead primary (redis-py issues #3560,
#3874). So its retry is off, and `_call` retries with backoff for up to
`retry_s`; an attempt that has to connect asks Sentinel for the primary (redis-py
asks only when it opens a connection, so one that still works keeps its node). A
user sees a delay of a few seconds, not a logout; past the bound the app server
answers 503 "session store unavailable", never 401.

With `wait_replicas`, each write is followed by `WAIT n timeout`: a write that
fewer replicas acknowledged is retried, then is a 503, so a write the user was
told about is on a replica too and survives the primary's loss (the zero-loss
variant of F2, at the price of a round trip and a replica's ack per write).

A write refused with READONLY (a demoted primary) is retried the same way:
redis-py drops the connection, so the next attempt asks Sentinel. A write refused
with NOREPLICAS (a primary with `min-replicas-to-write` cut from its replicas) is
not retried: its value was computed from what that primary holds (a cart is read,
appended to and written whole), and that primary is likely being replaced. A retry
that reached the new primary once the partition healed would write the stale value
over every change the other app servers made there since the failover (scenario F2
measured it: most of its lost writes were theirs, erased by such retries). Either
way a refused write is StoreUnavailable with Redis' own reason, never a 500. A read renews the TTL,
which is a write: when that renewal is refused, the read is made again without
it (a plain HGETALL), so an isolated primary still serves the sessions it holds.

Redis Cluster: redis-py's cluster retry is off too (it would repeat a hung node's
timeout ten times within one attempt), and an attempt re-reads the slot map when
redis-py has dropped it. A primary with no replica that dies leaves its slots
unserved, and the other nodes refuse every key (cluster-require-full-coverage):
each call is StoreUnavailable until it is back, and `count()`, which scans every
primary, fails rather than count the survivors' keys alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Set
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lbsession.appserver.config import AppServerConfig, RedisConfig
from lbsession.appserver.stores.base import SessionStore, StoreStat
from lbsession.appserver.stores.codec import decode_attributes, encode_attributes
from lbsession.errors import ConfigError, StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOAD = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields > 0 and ARGV[1] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return fields
"""
# ARGV: ttl in ms, how many fields are removed, the removed fields, then field/value pairs.
_SAVE = """
local removed = tonumber(ARGV[2])
if removed > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 3, 2 + removed)) end
if #ARGV > 2 + removed then redis.call('HSET', KEYS[1], unpack(ARGV, 3 + removed)) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

# Errors that mean "try again shortly": the server is gone, busy, or being replaced.
# ReadOnlyError: a demoted primary still answering; MasterNotFoundError is a ConnectionError.
TRANSIENT = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    ClusterDownError,
    TryAgainError,
    OSError,
)


def _refused_write(exc: ResponseError) -> bool:
    """A write Redis refused for its replication state (from a script too: the code leads the message)."""
    return any(code in str(exc) for code in ("NOREPLICAS", "READONLY"))


def _isolated_primary(exc: ResponseError) -> bool:
    """NOREPLICAS: the primary lacks the replicas `min-replicas-to-write` asks for (cut from them, most likely)."""
    return "NOREPLICAS" in str(exc)


class RefusedWrite(Exception):
    """Internal: a ResponseError that is a refused write, retried as a transient failure."""


def _closed_transport(exc: RuntimeError) -> bool:
    """uvloop's refusal to write on a transport that closed under redis-py: a lost connection, not a bug of ours.

    Seen in a failover: redis-py (8.1) finds a pooled connection with unread data, drops it and
    connects again, and the HELLO of the new connection meets a transport already closed (the dead
    primary's relay hung up); uvloop raises RuntimeError there, where asyncio's own loop drops the
    write. Retried like any lost connection, so the user gets a delay or a 503, never a 500.
    """
    return "handler is closed" in str(exc)


class MappedSentinel(Sentinel):
    """Sentinel, with the primary's address mapped to the one this server dials (RedisConfig.address_map)."""

    def __init__(self, address_map: Mapping[tuple[str, int], tuple[str, int]], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.address_map = dict(address_map)

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        host, port = await super().discover_master(service_name)
        return self.address_map.get((host, int(port)), (host, int(port)))


def _address_map(pairs: tuple[str, ...]) -> dict[tuple[str, int], tuple[str, int]]:
    def address(text: str) -> tuple[str, int]:
        host, _, port = text.rpartition(":")
        return host, int(port)

    return {address(given): address(dialled) for given, _, dialled in (p.partition("=") for p in pairs)}


class RedisStore(SessionStore):
    """Sessions as Redis hashes, through a URL, Sentinel or Redis Cluster."""

    name = "redis"
    shared = True
    settings = "redis"

    def __init__(self, config: RedisConfig, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if config.url is None and not config.sentinels:
            raise ConfigError("backend redis needs a server: give --redis-url redis://host:port/0 or --redis-sentinel")
        self.config = config
        self._sleep = sleep
        self._prefix = config.key_prefix
        self._client: Any = None
        self._sentinel: Sentinel | None = None
        self._load_script: Any = None
        self._save_script: Any = None
        self.round_trips = 0  # for the benchmark: one per load, one per save
        self.where = ",".join(config.sentinels) if config.sentinels else _redact(config.url or "")

    @classmethod
    def from_config(cls, config: AppServerConfig) -> RedisStore:
        return cls(config.redis)

    async def start(self) -> None:
        """Create the client; connections open lazily, so a Redis that is down now is not fatal."""
        config = self.config
        options: dict[str, Any] = {
            "socket_timeout": config.timeout_s,
            "socket_connect_timeout": config.timeout_s,
            "decode_responses": True,
        }
        if config.sentinels:
            nodes = [(h, int(p)) for h, _, p in (a.rpartition(":") for a in config.sentinels)]
            sentinel_kwargs = {"socket_timeout": config.timeout_s}
            mapping = _address_map(config.address_map)
            self._sentinel = MappedSentinel(mapping, nodes, sentinel_kwargs=sentinel_kwargs, **options)
            self._client = self._sentinel.master_for(config.service_name, retry=Retry(NoBackoff(), 0))
        elif config.cluster:
            assert config.url is not None  # __init__ checked: no sentinels means a URL
            # Its own retry off as well: by default 10 more tries, each up to timeout_s on a hung node.
            self._client = RedisCluster.from_url(config.url, retry=Retry(NoBackoff(), 0), **options)
        else:
            assert config.url is not None
            self._client = aioredis.from_url(config.url, retry=Retry(NoBackoff(), 0), **options)
        self._load_script = self._client.register_script(_LOAD)
        self._save_script = self._client.register_script(_SAVE)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def load(self, session_id: str, ttl_s: float | None = None) -> dict[str, Any] | None:
        keys = [self._prefix + session_id]
        args = [_milliseconds(ttl_s) if ttl_s is not None else ""]

        async def attempt() -> list[str]:
            try:
                flat: list[str] = await self._load_script(keys=keys, args=args)
                return flat
            except ResponseError as exc:
                if not _isolated_primary(exc):
                    raise
                log.warning("redis refused the TTL renewal of a read (%s); reading without it", exc)
                return await self._hgetall_flat(keys[0])

        flat = await self._call("load", attempt)
        if not flat:
            return None
        return decode_attributes(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def _hgetall_flat(self, key: str) -> list[str]:
        fields = await self._client.hgetall(key)
        return [item for pair in fields.items() for item in pair]

    async def save(self, session_id: str, changed: Mapping[str, Any], removed: Set[str], ttl_s: float) -> None:
        if not changed and not removed:
            return
        encoded = encode_attributes(changed)  # before any I/O: a value that is not JSON is a bug, not an outage
        keys = [self._prefix + session_id]
        args: list[Any] = [_milliseconds(ttl_s), len(removed), *removed]
        for field, value in encoded.items():
            args += (field, value)

        async def attempt() -> None:
            await self._save_script(keys=keys, args=args)
            wanted = self.config.wait_replicas
            if wanted:  # a second round trip: the price of a write that survives a failover
                acked = int(await self._client.execute_command("WAIT", wanted, self.config.wait_timeout_ms))
                if acked < wanted:
                    raise RefusedWrite(f"WAIT: {acked} of {wanted} replicas acknowledged within "
                                       f"{self.config.wait_timeout_ms} ms")  # fmt: skip

        await self._call("save", attempt)

    async def delete(self, session_id: str) -> None:
        await self._call("delete", lambda: self._client.delete(self._prefix + session_id))

    async def count(self) -> int:
        async def attempt() -> int:
            total = 0
            async for _ in self._client.scan_iter(match=self._prefix + "*", count=1000):
                total += 1
            return total

        return await self._call("count", attempt)

    def describe(self) -> dict[str, Any]:
        """Where the store is and how many round trips it made (the benchmark reads this)."""
        return {"redis": self.where, "round_trips": self.round_trips}

    def stats(self) -> list[StoreStat]:
        """Round trips to Redis: one per load and one per save, plus every retry."""
        return [StoreStat("lbsession_redis_round_trips", "Round trips to Redis, retries included", self.round_trips)]

    async def _call(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt`, retrying transient errors with backoff for up to `retry_s`.

        On Redis Cluster the slot map is read first: redis-py (8.1) sends a command issued
        before it has the map to an arbitrary node, so many concurrent first commands all
        meet MOVED, and its fifth MOVED closes every connection under the others' feet
        (AttributeError from inside redis-py). `initialize()` makes them wait for the map,
        and is a no-op once it is read.
        """
        if self._client is None:
            raise StoreUnavailable("the redis store is not started")
        deadline = time.monotonic() + self.config.retry_s
        delay = 0.05
        while True:
            self.round_trips += 1
            try:
                if self.config.cluster:
                    await self._client.initialize()  # see _call's docstring
                try:
                    return await attempt()
                except ResponseError as exc:
                    if not _refused_write(exc) or isinstance(exc, ReadOnlyError):
                        raise
                    if _isolated_primary(exc):  # not retried: see the module docstring
                        raise StoreUnavailable(f"redis at {self.where} refused {what}: {exc}") from exc
                    raise RefusedWrite(str(exc)) from exc
            except (*TRANSIENT, RedisClusterException, RefusedWrite, RuntimeError) as exc:
                if isinstance(exc, RuntimeError) and not _closed_transport(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        f"redis at {self.where} did not answer {what} for {self.config.retry_s:g} s: {exc}"
                    ) from exc
                log.warning("redis %s failed (%s); retrying in %.2f s", what, exc, delay)
            await self._sleep(delay)
            delay = min(delay * 2, 0.5)


def _milliseconds(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}" if credentials or at else url
