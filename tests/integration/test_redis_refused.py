"""A Redis the store cannot use as asked: a write refused for replication (NOREPLICAS), a connection lost mid-setup."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from lbsession.appserver.config import RedisConfig
from lbsession.appserver.stores.redis import RedisStore
from lbsession.errors import StoreUnavailable
from lbsession.lab.redis_servers import RedisProcess, find_redis_binary

pytestmark = pytest.mark.integration


async def test_a_refused_write_is_store_unavailable_and_a_read_skips_the_renewal(tmp_path: Path) -> None:
    node = RedisProcess("refusing", find_redis_binary(), tmp_path, extra=["--appendonly", "no"])
    await node.start()
    store = RedisStore(RedisConfig(url=node.url, retry_s=5.0))
    await store.start()
    admin = aioredis.Redis(port=node.port)
    try:
        await store.save("s1", {"user": "alice"}, set(), ttl_s=60)
        # As an isolated primary with min-replicas-to-write: no replica, so every write is refused.
        await admin.config_set("min-replicas-to-write", 1)
        before = store.round_trips
        with pytest.raises(StoreUnavailable, match="NOREPLICAS"):
            await store.save("s1", {"cart": ["x"]}, set(), ttl_s=60)
        # Not retried within the 5 s budget: a retry could reach a new primary with this one's stale value.
        assert store.round_trips == before + 1
        assert await store.load("s1", ttl_s=60) == {"user": "alice"}  # the renewal refused, the read served
        assert await store.load("nobody", ttl_s=60) is None
    finally:
        await admin.aclose()
        await store.close()
        await node.stop()


async def test_a_transport_closed_under_redis_py_is_a_lost_connection_retried_not_a_500(tmp_path: Path) -> None:
    # In a failover uvloop raised this from redis-py's reconnect (the HELLO of a new connection on a
    # transport already closed), and the user got a 500; the attempt here meets it once, then Redis.
    node = RedisProcess("closing", find_redis_binary(), tmp_path, extra=["--appendonly", "no"])
    await node.start()
    store = RedisStore(RedisConfig(url=node.url, retry_s=5.0))
    await store.start()
    failures = ["unable to perform operation on <TCPTransport closed=True>; the handler is closed"]
    other = RuntimeError("a bug of ours")

    async def attempt() -> str:
        if failures:
            raise RuntimeError(failures.pop())
        return "answered"

    async def broken() -> str:
        raise other

    try:
        assert await store._call("load", attempt) == "answered"
        with pytest.raises(RuntimeError) as raised:  # any other RuntimeError is not taken for a lost connection
            await store._call("load", broken)
        assert raised.value is other
    finally:
        await store.close()
        await node.stop()
