"""Routing strategies, by the name the CLI and the config use.

Like uvicorn's registries, a name maps to `module:Class`, imported only when
chosen. Everything that lists strategies reads them here, through
STRATEGY_NAMES: config validation (an unknown name fails at load time with the
list of valid ones), the CLI's choices, the matrix and its schema, the
dashboard's menu. So a new strategy is its module plus its line below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lbsession.balancer.strategies.base import RequestFacts, Route, RouteReason, Strategy, UpstreamView
from lbsession.settings import RegistryNames

if TYPE_CHECKING:
    from lbsession.balancer.config import BalancerConfig

STRATEGIES: dict[str, str] = {
    "round-robin": "lbsession.balancer.strategies.round_robin:RoundRobinStrategy",
    "least-conn": "lbsession.balancer.strategies.least_conn:LeastConnStrategy",
    "sticky-cookie": "lbsession.balancer.strategies.sticky_cookie:StickyCookieStrategy",
    "ip-hash": "lbsession.balancer.strategies.ip_hash:IpHashStrategy",
    "consistent-hash": "lbsession.balancer.strategies.consistent_hash:ConsistentHashStrategy",
}
STRATEGY_NAMES = RegistryNames(STRATEGIES)  # live: a strategy registered later is listed too


def strategy_class(name: str) -> type[Strategy]:
    """The Strategy class registered under `name`."""
    module, _, cls = STRATEGIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def create_strategy(config: BalancerConfig, name: str | None = None) -> Strategy:
    """A new strategy object for `name` (default: the configured one)."""
    return strategy_class(name or config.strategy).from_config(config)


__all__ = [
    "STRATEGIES",
    "STRATEGY_NAMES",
    "RequestFacts",
    "Route",
    "RouteReason",
    "Strategy",
    "UpstreamView",
    "create_strategy",
    "strategy_class",
]
