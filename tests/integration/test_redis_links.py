"""Under Sentinel, a node's Sentinel path and its replication path are separate links (told apart by source)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from lbsession.lab.faults import AdminClient
from lbsession.lab.redis_servers import SERVICE_NAME
from lbsession.lab.topology import Topology

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def _client(port: int) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=port, socket_timeout=2.0, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _until(probe: Callable[[], Awaitable[bool]]) -> None:
    while not await probe():  # each turn asks the real servers
        await asyncio.sleep(0.05)


async def _flags(sentinel: aioredis.Redis) -> set[str]:
    master: dict[str, Any] = await sentinel.execute_command("SENTINEL", "MASTER", SERVICE_NAME)
    flags = master["flags"]
    return set(flags.split(",")) if isinstance(flags, str) else set(flags)


async def _lab(start_lab: Any) -> tuple[Topology, AdminClient]:
    lab: Topology = await start_lab("round-robin", backend="redis", servers=1,
                                    redis_server={"ha": True, "down_after_ms": 500})  # fmt: skip
    assert lab.redis is not None
    return lab, AdminClient(lab.admin_url)


async def test_the_replication_link_is_its_own_and_listed(start_lab) -> None:
    lab, admin = await _lab(start_lab)
    try:
        _, answer = await admin.call("GET", "/links")
        links = {link["name"]: link for link in answer["links"]}
        sentinels, replication = links["sentinels->redis-1"], links["redis-2->redis-1"]
        assert replication["listen"] == sentinels["listen"] == "127.0.2.1:" + str(lab.redis.nodes[0].port)
        assert replication["sources"] == ["127.0.3.2"]
        assert (replication["from"], replication["to"]) == ("redis-2", "redis-1")
        assert replication["connections"]["total"] >= 1 and replication["bytes"]["downstream"] > 0  # the sync
        assert "redis-1->redis-2" in links  # for after a failover
    finally:
        await admin.close()


@dataclass
class HaLab:
    """A lab under Sentinel, its admin client, and direct clients of the primary, the replica and a Sentinel."""

    lab: Topology
    admin: AdminClient
    primary: aioredis.Redis
    replica: aioredis.Redis
    sentinel: aioredis.Redis


@pytest.fixture
async def ha(start_lab: Any) -> AsyncIterator[HaLab]:
    lab, admin = await _lab(start_lab)
    assert lab.redis is not None
    primary, replica = lab.redis.nodes
    try:
        async with _client(primary.port) as p, _client(replica.port) as r, _client(lab.redis.sentinels[0].port) as s:
            yield HaLab(lab, admin, p, r, s)
    finally:
        await admin.close()


async def test_sentinels_cut_from_the_primary_while_its_replica_still_replicates(ha: HaLab) -> None:
    await ha.replica.config_set("replica-priority", 0)  # no failover: Sentinel may only see the primary down
    status, _ = await ha.admin.call("POST", "/partitions", {"name": "p", "cut": ["sentinels->redis-1"]})
    assert status == 201
    await _until(lambda: _has_flag(ha.sentinel, "s_down"))
    await ha.primary.set("after-the-cut", "1")
    await _until(lambda: _is(ha.replica.get("after-the-cut"), "1"))  # replicated through its own link
    assert (await ha.replica.info("replication"))["master_link_status"] == "up"
    assert (await ha.admin.call("DELETE", "/partitions/p", {}))[0] == 200
    await _until(lambda: _lacks_flag(ha.sentinel, "s_down"))


async def test_the_replica_cut_from_the_primary_while_sentinels_still_reach_it(ha: HaLab) -> None:
    status, _ = await ha.admin.call("PUT", "/links/redis-2->redis-1", {"down": True})
    assert status == 200
    await _until(lambda: _is(_link_status(ha.replica), "down"))
    await ha.primary.set("during-the-cut", "1")
    master = await ha.sentinel.execute_command("SENTINEL", "MASTER", SERVICE_NAME)
    # Sentinel pings each second through its own link, which is intact: a fresh reply, no s_down.
    assert await _flags(ha.sentinel) == {"master"} and int(master["last-ok-ping-reply"]) < 1000
    assert await ha.replica.get("during-the-cut") is None
    assert (await ha.admin.call("DELETE", "/links/redis-2->redis-1", {}))[0] == 200
    await _until(lambda: _is(ha.replica.get("during-the-cut"), "1"))


async def _has_flag(sentinel: aioredis.Redis, flag: str) -> bool:
    return flag in await _flags(sentinel)


async def _lacks_flag(sentinel: aioredis.Redis, flag: str) -> bool:
    return flag not in await _flags(sentinel)


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


async def _link_status(replica: aioredis.Redis) -> str:
    return str((await replica.info("replication")).get("master_link_status"))
