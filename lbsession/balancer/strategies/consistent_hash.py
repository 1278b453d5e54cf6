"""`consistent-hash`: a hash ring with virtual nodes (Karger et al. 1997; ketama).

Each server owns `vnodes` points on a 64-bit ring and a key belongs to the
first point clockwise from its hash. When a server joins, it takes over only
the arcs just before its own points, about 1/(n+1) of the keys, where the
modulo hash moves about n/(n+1) of them.
"""

from __future__ import annotations

from bisect import bisect
from collections.abc import Sequence

from lbsession.balancer.strategies.base import (
    RequestFacts,
    Route,
    Strategy,
    UpstreamView,
    accepting_new,
    hash_key,
    stable_hash,
)
from lbsession.config import BalancerConfig


class HashRing:
    """The points of a set of servers on the ring, built once per set of server ids."""

    def __init__(self, server_ids: Sequence[str], vnodes: int) -> None:
        points = sorted(
            (stable_hash(f"{server_id}#{replica}"), index)
            for index, server_id in enumerate(server_ids)
            for replica in range(vnodes)
        )
        self._hashes = [h for h, _ in points]
        self._owners = [index for _, index in points]

    def owner(self, key_hash: int) -> int:
        """The index (into the server ids) of the server owning `key_hash`."""
        return self._owners[bisect(self._hashes, key_hash) % len(self._owners)]


class ConsistentHashStrategy(Strategy):
    """Pin each client to the owner of its key on a ring of the healthy servers."""

    name = "consistent-hash"
    pins = True

    def __init__(self, vnodes: int = 160, key: str = "client-ip") -> None:
        self._vnodes = vnodes
        self._key = key
        self._rings: dict[tuple[str, ...], HashRing] = {}

    @classmethod
    def from_config(cls, config: BalancerConfig) -> ConsistentHashStrategy:
        return cls(vnodes=config.hash.vnodes, key=config.hash.key)

    def choose(self, facts: RequestFacts, upstreams: Sequence[UpstreamView]) -> Route:
        candidates = accepting_new(upstreams)
        ids = tuple(u.server_id for u in candidates)
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) >= 16:  # health flapping must not grow this without bound
                self._rings.clear()
            ring = self._rings[ids] = HashRing(ids, self._vnodes)
        return Route(candidates[ring.owner(stable_hash(hash_key(facts, self._key)))], "pinned")
