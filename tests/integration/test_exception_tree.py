"""The exception tree: the errors callers catch by type rather than by reading their message."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from lbsession.appserver.cluster.node import ClusterNode
from lbsession.appserver.cluster.table import SessionTable
from lbsession.balancer.upstream import UpstreamPool
from lbsession.config import ClusterConfig, HealthConfig
from lbsession.errors import ConfigError, PeerRefused, ServerIdInUse


def test_a_taken_upstream_id_is_its_own_config_error() -> None:
    pool = UpstreamPool((), HealthConfig())
    pool.add("was-1", "http://127.0.0.1:8001")
    with pytest.raises(ServerIdInUse, match="already in use") as raised:
        pool.add("was-1", "http://127.0.0.1:8002")
    assert isinstance(raised.value, ConfigError)
    with pytest.raises(ConfigError) as bad_url:
        pool.add("was-2", "ftp://nowhere")
    assert not isinstance(bad_url.value, ServerIdInUse)


async def test_a_refusing_peer_is_peer_refused_and_a_failed_seed_sync_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = b"s" * 32
    listed = ClusterNode("was-1", ClusterConfig(port=0, peers=()), SessionTable("n", tombstone_ttl_s=60.0), secret)
    await listed.start()
    try:
        # was-2 is not in was-1's (empty) static list: was-1 answers its hello with a refusal.
        stranger = ClusterNode(
            "was-2", ClusterConfig(port=0, peers=(listed.address,)), SessionTable("n", tombstone_ttl_s=60.0), secret
        )
        with pytest.raises(PeerRefused, match="refused us"):
            await stranger.open_channel(listed.address, "snapshot")
        # A seed that cannot be reached is not fatal, but it is said, with the reason.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening: connections are refused
            lonely = ClusterNode(
                "was-3",
                ClusterConfig(port=0, peers=(dead,), startup_wait_s=0.2),
                SessionTable("n", tombstone_ttl_s=60.0),
                secret,
            )
            with caplog.at_level(logging.WARNING, logger="lbsession.appserver.cluster.node"):
                await lonely.start()
            await lonely.stop()
        assert any("no snapshot from " + dead in r.getMessage() for r in caplog.records)
    finally:
        await listed.stop()
        await asyncio.sleep(0)
