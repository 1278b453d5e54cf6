"""The Redis store on a real Redis Cluster: keys spread over the nodes, a dead node, an app server.

The contract suite (test_store_contract.py) runs every store test against the
cluster too; these are the things only a cluster has.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from lbsession.appserver.stores.redis import RedisStore
from lbsession.config import RedisConfig
from lbsession.errors import StoreUnavailable, TopologyError
from lbsession.lab.redis_servers import RedisClusterTopology, RedisProcess, find_cli_binary

pytestmark = pytest.mark.integration


@asynccontextmanager
async def cluster_store(url: str, prefix: str, retry_s: float = 1.0) -> AsyncIterator[RedisStore]:
    """A started RedisStore in cluster mode, closed at the end."""
    store = RedisStore(RedisConfig(url=url, cluster=True, key_prefix=prefix, retry_s=retry_s))
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def keys_on(node: RedisProcess, prefix: str) -> list[str]:
    """The keys under `prefix` that this one node holds, asked of it alone (SCAN is per node)."""
    async with aioredis.Redis(port=node.port, decode_responses=True) as client:
        return [key async for key in client.scan_iter(match=prefix + "*", count=1000)]


async def cluster_state(node: RedisProcess) -> str:
    """`ok` or `fail`, as this node sees the cluster."""
    async with aioredis.Redis(port=node.port, decode_responses=True) as client:
        info = str(await client.execute_command("CLUSTER", "INFO"))
    return info.partition("cluster_state:")[2].split()[0]


async def test_sessions_spread_over_every_node_and_count_sees_them_all(redis_cluster: RedisClusterTopology) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    async with cluster_store(redis_cluster.url, prefix) as store:
        # 48 random slots leave one of three nodes empty with probability 3 * (2/3)**48, about 1e-8.
        for n in range(48):
            await store.save(uuid.uuid4().hex, {"n": n}, set(), 60.0)

        per_node = {node.name: len(await keys_on(node, prefix)) for node in redis_cluster.nodes}

        assert all(count > 0 for count in per_node.values()), per_node  # every primary holds sessions
        assert sum(per_node.values()) == 48
        assert await store.count() == 48  # the count walks every primary, not the one the URL names


async def test_many_first_calls_at_once_on_a_fresh_client(redis_cluster: RedisClusterTopology) -> None:
    # As an app server's first requests after a start, or after redis-py dropped its slot map.
    prefix = f"test:{uuid.uuid4().hex}:"
    ids = [uuid.uuid4().hex for _ in range(40)]
    async with cluster_store(redis_cluster.url, prefix) as store:
        await asyncio.gather(*(store.save(sid, {"sid": sid}, set(), 60.0) for sid in ids))
    async with cluster_store(redis_cluster.url, prefix) as store:
        loaded = await asyncio.gather(*(store.load(sid) for sid in ids))
    assert loaded == [{"sid": sid} for sid in ids]


async def test_a_dead_node_makes_the_store_unavailable_never_a_short_count(tmp_path: Path) -> None:
    # A cluster of its own, quick to declare a node failed, so the shared one is never harmed.
    cluster = RedisClusterTopology(tmp_path, node_timeout_ms=500)
    await cluster.start()
    try:
        prefix = "test:dead-node:"
        async with cluster_store(cluster.url, prefix, retry_s=0.3) as store:
            for n in range(24):
                await store.save(uuid.uuid4().hex, {"n": n}, set(), 60.0)
            assert await store.count() == 24
            survivor, victim = cluster.nodes[0], cluster.nodes[-1]  # the survivor is the node the URL names
            on_survivor = (await keys_on(survivor, prefix))[0].removeprefix(prefix)

            assert victim.process is not None
            victim.process.send_signal(signal.SIGSTOP)  # hung: connects, never answers
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.count()
            # retry_s, then at most one attempt (a 0.5 s timeout for the slot map, one for the command).
            # redis-py's own cluster retry, left on, made it 11 timeouts per attempt: about 6 s.
            assert time.monotonic() - started < 3.0

            await victim.kill()
            with pytest.raises(StoreUnavailable):
                await store.count()  # before the others notice: the dead node does not answer SCAN

            async with asyncio.timeout(10):
                while await cluster_state(survivor) != "fail":
                    await asyncio.sleep(0.05)  # the next probe; node timeout 0.5 s, then the vote
            # Now the live nodes still answer SCAN with their own keys: a count from them alone would
            # be short, silently. And with no replica to promote, the slots of the dead node are not
            # served, so the whole cluster refuses keys (cluster-require-full-coverage): 503, never 401.
            with pytest.raises(StoreUnavailable):
                await store.count()
            with pytest.raises(StoreUnavailable):
                await store.load(on_survivor)
    finally:
        await cluster.stop()


async def test_an_app_server_in_cluster_mode_logs_in_and_knows_the_user(redis_cluster: RedisClusterTopology) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbsession", "server", "--id", "was-c", "--port", "0", "--ready-line",
        "--backend", "redis", "--redis-url", redis_cluster.url, "--redis-cluster", "--redis-prefix", prefix,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            ready = await process.stdout.readline()  # type: ignore[union-attr]
        assert ready, (await process.communicate())[1].decode()[-2000:]
        url = json.loads(ready)["url"]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post(url + "/login", json={"username": "alice"}) as reply:
                assert reply.status == 200, await reply.text()
            async with http.get(url + "/me") as reply:
                assert reply.status == 200, await reply.text()
                assert (await reply.json())["user"] == "alice"
        async with cluster_store(redis_cluster.url, prefix) as store:
            assert await store.count() == 1  # the session lives in the cluster
    finally:
        process.terminate()
        async with asyncio.timeout(30):
            await process.communicate()
    assert process.returncode == 0


def test_a_server_binary_without_its_cli_beside_it_says_so(tmp_path: Path) -> None:
    server = tmp_path / "redis-server"
    server.write_text("")
    with pytest.raises(TopologyError, match="no redis-cli beside"):
        find_cli_binary(server)
