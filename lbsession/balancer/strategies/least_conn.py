"""`least-conn`: the server with the fewest requests in flight (nginx `least_conn`)."""

from __future__ import annotations

from collections.abc import Sequence

from lbsession.balancer.strategies.base import RequestFacts, Route, Strategy, UpstreamView, accepting_new


class LeastConnStrategy(Strategy):
    """Send each request to the least busy server; ties go round-robin so idle servers share."""

    name = "least-conn"

    def __init__(self) -> None:
        self._start = 0

    def choose(self, facts: RequestFacts, upstreams: Sequence[UpstreamView]) -> Route:
        candidates = accepting_new(upstreams)
        count = len(candidates)
        start = self._start % count
        self._start = start + 1
        best = candidates[start]
        for offset in range(1, count):
            upstream = candidates[(start + offset) % count]
            if upstream.in_flight < best.in_flight:
                best = upstream
        return Route(best, "new")
