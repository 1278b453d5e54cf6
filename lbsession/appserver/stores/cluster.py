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
from lbsession.appserver.config import AppServerConfig, ClusterConfig
from lbsession.appserver.stores.base import SessionStore, StoreStat
from lbsession.appserver.stores.codec import decode_attributes, encode_attributes
from lbsession.errors import ConfigError

ACK_WAIT = "lbsession_cluster_ack_wait_seconds"
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
COUNTER_HELP = {
    "changes_sent": "Changes sent to peers (one per peer per write)",
    "acks": "Acks received from peers",
    "ack_timeouts": "Peers that did not ack in time and were marked down",
    "refused": "Replication connections refused (not in the static peers list)",
    "forged_frames": "Replication frames that failed authentication",
    "bytes_sent": "Replication bytes written to peers",
    "oversize": "Changes or sessions too big for one replication frame, kept local",
    "handshakes_dropped": "Replication connections closed before authenticating (timeout or too many)",
}


class ClusterStore(SessionStore):
    """A full local copy of every session, replicated to static or joined peers."""

    name = "cluster"
    shared = True  # replicated: every node holds every session
    settings = "cluster"
    timings = {ACK_WAIT: ("Time a sync write waited for every live peer's ack", ACK_BUCKETS)}

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

    def stats(self) -> list[StoreStat]:
        """Replication counters, and the links to peers by state."""
        counters = {**self.node.counters, "bytes_sent": self.node.bytes_sent}
        out = [StoreStat(f"lbsession_cluster_{key}", text, counters[key]) for key, text in COUNTER_HELP.items()]
        states = [link.state for link in self.node.links.values()]
        out += [
            StoreStat(
                "lbsession_cluster_peers", "Links to peers by state", states.count(state), "gauge", (("state", state),)
            )
            for state in sorted(set(states))
        ]
        return out

    def report_timings(self, observe: Callable[[str, float], None]) -> None:
        self.node.on_ack_wait = lambda seconds: observe(ACK_WAIT, seconds)

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            self.table.purge()
