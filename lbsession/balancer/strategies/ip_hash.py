"""`ip-hash`: the client's address modulo the number of healthy servers.

Like nginx's `ip_hash`, but over the whole address rather than its first three
octets. Its weakness is the point of the lab: when a server joins or leaves,
`hash % n` changes for most clients, so most of them land on a new server.
"""

from __future__ import annotations

from collections.abc import Sequence

from lbsession.balancer.config import BalancerConfig
from lbsession.balancer.strategies.base import (
    RequestFacts,
    Route,
    Strategy,
    UpstreamView,
    accepting_new,
    hash_key,
    stable_hash,
)


class IpHashStrategy(Strategy):
    """Pin each client to `upstreams[hash(key) % len(upstreams)]`."""

    name = "ip-hash"
    pins = True

    def __init__(self, key: str = "client-ip") -> None:
        self._key = key

    @classmethod
    def from_config(cls, config: BalancerConfig) -> IpHashStrategy:
        return cls(key=config.hash.key)

    def choose(self, facts: RequestFacts, upstreams: Sequence[UpstreamView]) -> Route:
        candidates = accepting_new(upstreams)
        return Route(candidates[stable_hash(hash_key(facts, self._key)) % len(candidates)], "pinned")
