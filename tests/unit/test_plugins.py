"""A plug-in is its module plus its registry line: a new strategy and a new store, picked up everywhere.

Each test registers a plug-in defined here (its "module") by one registry entry, as a
contributor would, and checks that everything that lists plug-ins sees it without
another file being touched: config validation, the CLI's choices, the admin API,
the matrix's grid, its expectations and its JSON schema.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence, Set
from typing import Any

import jsonschema
import pytest

from lbsession.appserver.stores import STORES, SessionStore, store_class
from lbsession.balancer.strategies import STRATEGIES, RequestFacts, Route, Strategy, UpstreamView, strategy_class
from lbsession.cli import build_parser, config_from_args
from lbsession.config import BACKEND_NAMES, STRATEGY_NAMES, load_config
from lbsession.errors import ConfigError
from lbsession.lab.matrix import load_directory, matrix_plan, matrix_schema, theory
from lbsession.lab.scenario import PACKAGED_SCENARIOS


class FirstServerStrategy(Strategy):
    """Every request to the first healthy server: trivially pinning, and trivially uneven."""

    name = "first-server"
    pins = True

    def choose(self, facts: RequestFacts, upstreams: Sequence[UpstreamView]) -> Route:
        return Route(upstreams[0], "pinned")


class ForgetfulStore(SessionStore):
    """A store that holds nothing: not shared, so the matrix expects re-logins without pinning."""

    name = "forgetful"

    async def load(self, session_id: str, ttl_s: float | None = None) -> dict[str, Any] | None:
        return None

    async def save(self, session_id: str, changed: Mapping[str, Any], removed: Set[str], ttl_s: float) -> None:
        return None

    async def delete(self, session_id: str) -> None:
        return None

    async def count(self) -> int:
        return 0


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The two plug-ins, each by its registry line only."""
    monkeypatch.setitem(STRATEGIES, "first-server", f"{__name__}:FirstServerStrategy")
    monkeypatch.setitem(STORES, "forgetful", f"{__name__}:ForgetfulStore")
    yield


@pytest.mark.usefixtures("registered")
def test_the_registries_and_their_name_lists_see_the_new_plugins() -> None:
    assert strategy_class("first-server") is FirstServerStrategy
    assert store_class("forgetful") is ForgetfulStore
    assert "first-server" in STRATEGY_NAMES and "forgetful" in BACKEND_NAMES


@pytest.mark.usefixtures("registered")
def test_config_validation_accepts_them_and_still_names_them_in_its_choices() -> None:
    config = load_config(overrides={"balancer.strategy": "first-server", "app.backend": "forgetful"}, environ={})
    assert (config.balancer.strategy, config.app.backend) == ("first-server", "forgetful")
    with pytest.raises(ConfigError, match="first-server") as raised:
        load_config(overrides={"balancer.strategy|--strategy": "first"}, environ={})
    assert "--strategy: balancer.strategy: 'first' is not valid" in str(raised.value)


@pytest.mark.usefixtures("registered")
def test_the_cli_takes_them(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["run", "--strategy", "first-server", "--backend", "forgetful"])
    config = config_from_args(args, environ={})
    assert (config.balancer.strategy, config.app.backend) == ("first-server", "forgetful")
    bench = build_parser().parse_args(["bench", "--strategy", "first-server"])
    assert bench.strategy == "first-server"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lb", "--help"])
    assert "first-server" in capsys.readouterr().out


@pytest.mark.usefixtures("registered")
def test_the_matrix_grids_them_with_the_theory_their_declarations_give() -> None:
    plan = matrix_plan(load_directory(PACKAGED_SCENARIOS))
    names = {s.name for s in plan}
    assert {"grid-first-server-local", "grid-round-robin-forgetful", "grid-first-server-forgetful"} <= names
    assert theory("first-server", "local")[0].op == "=="  # it pins: no re-login even with local sessions
    assert theory("round-robin", "forgetful")[0].op == ">"  # not shared: re-logins under round-robin
    run = {"topology": {"strategy": "first-server", "backend": "forgetful", "servers": 3}}
    topology = matrix_schema()["$defs"]["run"]["properties"]["topology"]
    jsonschema.validate(run["topology"], topology)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**run["topology"], "strategy": "unregistered"}, topology)


def test_without_the_registry_line_they_are_unknown() -> None:
    assert "first-server" not in STRATEGY_NAMES
    with pytest.raises(ConfigError, match="'first-server' is not valid"):
        load_config(overrides={"balancer.strategy": "first-server"}, environ={})
