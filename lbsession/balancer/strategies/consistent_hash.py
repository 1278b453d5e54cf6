"""`consistent-hash`: a hash ring with virtual nodes (Karger et al. 1997; ketama).

Each server owns `vnodes` points on a 64-bit ring and a key belongs to the
first point clockwise from its hash. When a server joins, it takes over only
the arcs just before its own points, about 1/(n+1) of the keys, where the
modulo hash moves about n/(n+1) of them.

With a balance factor (consistent hashing with bounded loads: Mirrokni, Thorup and
Zadimoghaddam 2016; HAProxy's `hash-balance-factor`, Envoy's `hash_balance_factor`),
no server takes more than `factor` % of the mean in-flight load: a request whose
owner is full walks on clockwise to the next server that is not. The price is
stickiness: under load some requests leave the server their key hashes to.

Every decision is also audited against its own bound (`counters()`, in GET /status
as `strategy_counters`): a sampled in-flight count, taken between decisions, also
sees requests finish and cannot prove the cap; the decision itself can.
"""

from __future__ import annotations

from bisect import bisect
from collections.abc import Iterator, Sequence

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

    def walk(self, key_hash: int) -> Iterator[int]:
        """Every server's index once, in ring order from the owner of `key_hash` on."""
        start, seen = bisect(self._hashes, key_hash), set()
        count = len(self._owners)
        for step in range(count):
            index = self._owners[(start + step) % count]
            if index not in seen:
                seen.add(index)
                yield index


def bounded_slots(total_in_flight: int, factor_pct: int, servers: int, index: int) -> int:
    """How many requests server `index` (of `servers`, equal weights) may have in flight.

    HAProxy's chash_server_is_eligible: the slots are the in-flight requests, the coming one
    included, times the factor, rounded up; each server gets an equal share and the remainder
    is spread over the servers in order; never 0.
    """
    total = ((total_in_flight + 1) * factor_pct + 99) // 100
    share, rest = divmod(total, servers)
    slots = share + ((index + 1) * rest) // servers - (index * rest) // servers
    return max(slots, 1)


def in_flight_total(upstreams: Sequence[UpstreamView]) -> int:
    """The requests in flight on `upstreams` (a loop, not sum() of a generator: no object per request)."""
    total = 0
    for upstream in upstreams:
        total += upstream.in_flight
    return total


class ConsistentHashStrategy(Strategy):
    """Pin each client to the owner of its key on a ring of the healthy servers."""

    name = "consistent-hash"
    pins = True

    def __init__(self, vnodes: int = 160, key: str = "client-ip", balance_factor: int = 0) -> None:
        self._vnodes = vnodes
        self._key = key
        self._factor = balance_factor  # percent of the mean in-flight load; 0: unbounded
        self._rings: dict[tuple[str, ...], HashRing] = {}
        # The audit of the decisions (see counters()): plain integers, updated in O(1) per decision.
        self._decisions = 0
        self._violations = 0  # decisions that left the chosen server above ceil(factor x mean)
        self._fallbacks = 0  # decisions that found every server full (HAProxy then takes one anyway)
        self._worst = (0, 1)  # the worst decision's load x servers and in flight + 1: load / mean as a fraction

    @classmethod
    def from_config(cls, config: BalancerConfig) -> ConsistentHashStrategy:
        hashing = config.hash
        return cls(vnodes=hashing.vnodes, key=hashing.key, balance_factor=hashing.balance_factor)

    def describe(self) -> dict[str, int]:
        return {"balance_factor": self._factor}

    def counters(self) -> dict[str, int | float | None]:
        """What the decisions did against their bound, since this strategy was built.

        `decision_imbalance_max` is the worst, over the decisions, of the chosen server's
        in-flight requests before it takes the request over the mean in flight with the
        request: the two sides of HAProxy's test (`served < slots`, the slots being
        ceil(factor x mean) at most). In whole requests `served < ceil(c x mean)` is
        `served < c x mean`, so with a factor the ratio stays below c, with no rounding
        slack; after taking the request, the server holds ceil(c x mean) at most, which
        `bound_violations` checks at each decision (the bound computed apart from the walk).
        Without a factor there is no bound: the violations are None, the ratio still counted.
        """
        load, requests = self._worst
        bounded = bool(self._factor)
        return {
            "decisions": self._decisions,
            "bound_violations": self._violations if bounded else None,
            "bound_fallbacks": self._fallbacks if bounded else None,
            "decision_imbalance_max": load / requests if self._decisions else None,
        }

    def choose(self, facts: RequestFacts, upstreams: Sequence[UpstreamView]) -> Route:
        candidates = accepting_new(upstreams)
        ids = tuple([u.server_id for u in candidates])  # a list first: mypyc compiles it, not a generator
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) >= 16:  # health flapping must not grow this without bound
                self._rings.clear()
            ring = self._rings[ids] = HashRing(ids, self._vnodes)
        key_hash = stable_hash(hash_key(facts, self._key))
        total = in_flight_total(candidates)
        if not self._factor:
            route = Route(candidates[ring.owner(key_hash)], "pinned")
        else:
            route = self._bounded(ring, key_hash, candidates, total)
        self._audit(route.upstream.in_flight, total, len(candidates))
        return route

    def _bounded(self, ring: HashRing, key_hash: int, candidates: Sequence[UpstreamView], total: int) -> Route:
        """The first server clockwise from the key's owner that is under its bound."""
        first = None
        for index in ring.walk(key_hash):
            first = index if first is None else first
            if candidates[index].in_flight < bounded_slots(total, self._factor, len(candidates), index):
                return Route(candidates[index], "pinned" if index == first else "rehashed")
        # Unreachable while the factor is >= 100 (the slots add up to more than the load); HAProxy's
        # walk then gives up and takes a server anyway, and so do we: the owner, counted.
        self._fallbacks += 1
        return Route(candidates[first or 0], "pinned")

    def _audit(self, load: int, total: int, servers: int) -> None:
        """Count one decision: `load` the chosen server's in flight before it, of `total` on `servers`."""
        self._decisions += 1
        worst_load, worst_requests = self._worst
        if load * servers * worst_requests > worst_load * (total + 1):  # load / mean, compared as fractions
            self._worst = (load * servers, total + 1)
        # After taking the request: at most ceil(factor x mean with it), computed apart from bounded_slots.
        if self._factor and load + 1 > -(-(total + 1) * self._factor // (100 * servers)):
            self._violations += 1
