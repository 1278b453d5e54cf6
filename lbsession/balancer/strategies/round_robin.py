"""`round-robin`: each new request to the next server in turn (nginx and HAProxy's default)."""

from __future__ import annotations

from collections.abc import Sequence

from lbsession.balancer.strategies.base import RequestFacts, Route, Strategy, UpstreamView, accepting_new


class RoundRobinStrategy(Strategy):
    """Rotate through the servers that accept new clients, ignoring any session."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, facts: RequestFacts, upstreams: Sequence[UpstreamView]) -> Route:
        candidates = accepting_new(upstreams)
        index = self._next % len(candidates)
        self._next = index + 1
        return Route(candidates[index], "new")
