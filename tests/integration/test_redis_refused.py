"""A Redis that refuses writes for its replication state (NOREPLICAS): a 503 with the reason at once, reads served."""

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
