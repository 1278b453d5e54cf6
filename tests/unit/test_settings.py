"""A setting is declared once (issue 11): its field gives the flag, the help, the key path and the variable."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest

from lbsession.cli import build_parser, config_from_args
from lbsession.config import (
    AppServerConfig,
    ClusterConfig,
    Config,
    DeclaredSetting,
    RedisConfig,
    SessionConfig,
    declared_settings,
    env_name,
    load_config,
    to_environ,
)
from lbsession.errors import ConfigError

DECLARED = declared_settings()
COMMANDS = ("run", "lb", "server")

# A valid value per key path where the type alone does not give one.
SAMPLES: dict[str, tuple[str, Any]] = {
    "links": ("off", "off"),
    "balancer.strategy": ("least-conn", "least-conn"),
    "balancer.admin_host": ("127.0.0.2", "127.0.0.2"),  # off loopback it would need a token
    "balancer.sticky.secret": ("a-secret-of-twenty-chars", "a-secret-of-twenty-chars"),
    "balancer.hash.balance_factor": ("125", 125),
    "balancer.sticky.mode": ("balanced", "balanced"),
    "app.backend": ("cluster", "cluster"),
    "app.redis.url": ("redis://127.0.0.1:6390/2", "redis://127.0.0.1:6390/2"),
    "app.cluster.secret": ("a-secret-of-twenty-chars", "a-secret-of-twenty-chars"),
    "app.cluster.replication": ("async", "async"),
    "app.cluster.membership": ("join", "join"),
    "app.cluster.join": ("127.0.0.1:7001", "127.0.0.1:7001"),
    "app.cluster.peers": ("127.0.0.1:7001,127.0.0.1:7002", ("127.0.0.1:7001", "127.0.0.1:7002")),
    "app.redis.sentinels": ("127.0.0.1:26379", ("127.0.0.1:26379",)),
    "balancer.health.active": ("off", False),  # a switch: --health on|off
    "balancer.health.path": ("/up?full=1", "/up?full=1"),
    "balancer.health.method": ("HEAD", "HEAD"),
    "balancer.health.host": ("app.example:8000", "app.example:8000"),
    "balancer.health.expect": ("200,204,300-399", "200,204,300-399"),
}


def sample(declared: DeclaredSetting) -> tuple[list[str], Any]:
    """The command-line words that set `declared`, and the value the config must then hold."""
    if declared.path in SAMPLES:
        text, value = SAMPLES[declared.path]
        return [declared.flag.name, text], value
    hint = declared.hint
    if hint is bool:
        return [declared.flag.name], True
    if hint is int:
        return [declared.flag.name, "7"], 7
    if hint is float:
        return [declared.flag.name, "2.5"], 2.5
    return [declared.flag.name, "was_7"], "was_7"


def value_at(config: Config, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize(
    ("command", "declared"),
    [(c, d) for d in DECLARED for c in d.flag.commands],
    ids=lambda v: v if isinstance(v, str) else v.flag.name,
)
def test_every_declared_flag_sets_its_key_path(command: str, declared: DeclaredSetting) -> None:
    words, expected = sample(declared)
    args = build_parser().parse_args([command, *words])
    assert value_at(config_from_args(args, environ={}), declared.path) == expected


@pytest.mark.parametrize(
    ("command", "declared"),
    [(c, d) for d in DECLARED if d.hint in (int, float) for c in d.flag.commands],  # 'abc' is wrong for any number
    ids=lambda v: v if isinstance(v, str) else v.flag.name,
)
def test_a_bad_number_names_the_flag_and_the_key(command: str, declared: DeclaredSetting) -> None:
    args = build_parser().parse_args([command, declared.flag.name, "abc"])
    with pytest.raises(ConfigError, match=rf"^{declared.flag.name}: {declared.path}: 'abc' is not a"):
        config_from_args(args, environ={})


def test_flag_names_are_unique_per_command() -> None:
    for command in COMMANDS:
        names = [d.flag.name for d in DECLARED if command in d.flag.commands]
        assert len(names) == len(set(names)), command


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_each_default_and_variable(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for declared in DECLARED:
        if command in declared.flag.commands:
            assert declared.flag.name in text
            assert f"env {declared.env})" in text
    assert "(default: " in text


def test_env_names_follow_the_loader() -> None:
    assert env_name("balancer.sticky.secret") == "LBSESSION_BALANCER__STICKY__SECRET"
    numbers = {d.path: n for n, d in enumerate((d for d in DECLARED if d.hint is int), 2)}  # distinct: no port clash
    numbers["balancer.hash.balance_factor"] = 125  # a percentage from 100
    config = load_config(environ={env_name(path): str(n) for path, n in numbers.items()})
    assert {path: value_at(config, path) for path in numbers} == numbers


def test_to_environ_gives_back_the_same_section() -> None:
    app = AppServerConfig(
        id="was-9",
        port=0,
        backend="cluster",
        session=SessionConfig(cookie_name="true", ttl_s=60.0, secure=True),  # a string that reads as YAML true
        redis=RedisConfig(url=None, sentinels=("127.0.0.1:26379", "127.0.0.1:26380"), key_prefix="3"),
        cluster=ClusterConfig(peers=("127.0.0.1:7001",), secret="@%weird: secret: with: colons", join=None),
    )
    assert load_config(environ=to_environ(app, "app")).app == app


def test_every_leaf_of_a_section_has_a_variable() -> None:
    environ = to_environ(AppServerConfig(), "app")

    def leaves(cls: type, prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        out: list[str] = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                out += leaves(hints[f.name], f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")
        return out

    assert sorted(environ) == sorted(env_name(p) for p in leaves(AppServerConfig, "app."))
