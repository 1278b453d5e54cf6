"""`cluster`: every app server keeps every session and replicates each change to its peers.

The store is the session table of this node (lbsession.appserver.cluster.table)
plus its replication node (lbsession.appserver.cluster.node). A save applies the
change here, sends it to every live peer and, with `replication: sync`, answers
only when they all acknowledged it (or were marked down after `ack_timeout_s`);
with `async` it answers at once, and a user whose next request lands on a peer
that has not caught up is asked to log in again: the replication-lag re-login.

A read renews a session's expiry on the node that served it only; writes renew
it everywhere. Replicating every read would double the traffic of a scheme whose
cost already grows with the square of the number of nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Set
from typing import Any

from lbsession.appserver.cluster.node import ClusterNode
from lbsession.appserver.cluster.table import SessionTable
from lbsession.appserver.stores.base import SessionStore
from lbsession.appserver.stores.codec import decode_attributes, encode_attributes
from lbsession.config import AppServerConfig, ClusterConfig
from lbsession.errors import ConfigError


class ClusterStore(SessionStore):
    """A full local copy of every session, replicated to static or joined peers."""

    name = "cluster"

    def __init__(self, node_id: str, config: ClusterConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not config.secret:
            raise ConfigError(
                "backend cluster needs a shared secret of at least 16 characters: "
                "set LBSESSION_APP__CLUSTER__SECRET (or --cluster-secret) to the same value on every node"
            )
        self.table = SessionTable(node_id, tombstone_ttl_s=config.tombstone_ttl_s, clock=clock)
        self.node = ClusterNode(node_id, config, self.table, config.secret.encode())
        self._purger: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: AppServerConfig) -> ClusterStore:
        return cls(config.id, config.cluster)

    async def start(self) -> None:
        await self.node.start()
        self._purger = asyncio.create_task(self._purge_forever(), name="cluster-purge")

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        await self.node.stop()

    async def load(self, session_id: str, ttl_s: float | None = None) -> dict[str, Any] | None:
        fields = self.table.load(session_id, ttl_s)
        return decode_attributes(fields) if fields is not None else None

    async def save(self, session_id: str, changed: Mapping[str, Any], removed: Set[str], ttl_s: float) -> None:
        if not changed and not removed:
            return
        change = self.table.write(session_id, encode_attributes(changed), removed, ttl_s)
        await self.node.replicate(change)

    async def delete(self, session_id: str) -> None:
        await self.node.replicate(self.table.drop(session_id))

    async def count(self) -> int:
        return self.table.count()

    def describe(self) -> dict[str, Any]:
        return self.node.describe()

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            self.table.purge()
