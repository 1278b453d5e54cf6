"""load_config: the four layers and their order, and errors that say where, what and how to fix it.

Every call passes `environ=` explicitly, so the tests never read or touch the
real environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lbsession.appserver.stores import STORES
from lbsession.balancer.strategies import STRATEGIES
from lbsession.config import (
    BACKEND_NAMES,
    STRATEGY_NAMES,
    BalancerConfig,
    Config,
    UpstreamConfig,
    load_config,
)
from lbsession.errors import ConfigError, LBSessionError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, text: str, name: str = "lbsession.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path | None = None, **kwargs: Any) -> list[str]:
    """The problems load_config reports; fails the test if it accepts the config."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as caught:
        load_config(path, **kwargs)
    assert str(caught.value) == "; ".join(caught.value.problems)
    return caught.value.problems


def only_problem(path: Path | None = None, **kwargs: Any) -> str:
    problems = problems_of(path, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------- layers


def test_defaults_load_without_a_file() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert (config.balancer.strategy, config.balancer.port, config.servers) == ("round-robin", 8080, 3)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), environ={}) == Config()
    assert load_config(write(tmp_path, "# only a comment\n"), environ={}) == Config()


def test_file_values_are_used(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
servers: 2
balancer:
  port: 8000
  strategy: sticky-cookie
  trusted_proxies: [10.0.0.0/8]
  upstreams:
    - {id: was-1, url: "http://127.0.0.1:8001"}
    - {id: was-2, url: "http://127.0.0.1:8002/"}
  sticky: {secret: "0123456789abcdef0123", max_age_s: 600, secure: true}
  health: {interval_s: 2, path: /ready}
app:
  session: {ttl_s: 60, same_site: Strict}
""",
    )
    config = load_config(path, environ={})
    balancer = config.balancer
    assert config.servers == 2
    assert (balancer.port, balancer.strategy, balancer.trusted_proxies) == (8000, "sticky-cookie", ("10.0.0.0/8",))
    assert balancer.upstreams == (
        UpstreamConfig("was-1", "http://127.0.0.1:8001"),
        UpstreamConfig("was-2", "http://127.0.0.1:8002/"),
    )
    assert balancer.upstreams[1].address == ("127.0.0.1", 8002)
    assert (balancer.sticky.secret, balancer.sticky.max_age_s, balancer.sticky.secure) == (
        "0123456789abcdef0123",
        600,
        True,
    )
    assert balancer.health.interval_s == 2.0 and isinstance(balancer.health.interval_s, float)
    assert balancer.health.path == "/ready"
    assert (config.app.session.ttl_s, config.app.session.same_site) == (60.0, "Strict")
    # Settings the file leaves out keep their defaults, at every level.
    assert balancer.admin_port == BalancerConfig().admin_port
    assert balancer.sticky.cookie_name == "LBSERVER"
    assert balancer.health.rise == 2
    assert config.app.port == 8001


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "balancer:\n  port: 8000\n  strategy: ip-hash\n")
    config = load_config(path, environ={"LBSESSION_BALANCER__PORT": "9000"})
    assert config.balancer.port == 9000
    assert config.balancer.strategy == "ip-hash"  # the rest of the file still counts


def test_env_values_read_as_yaml_scalars() -> None:
    config = load_config(
        environ={
            "LBSESSION_BALANCER__STICKY__SECURE": "true",
            "LBSESSION_BALANCER__HEALTH__INTERVAL_S": "1.5",
            "LBSESSION_APP__ID": "was-7",
            "LBSESSION_BALANCER__TRUSTED_PROXIES": "[10.0.0.0/8, 192.168.0.1]",
        }
    )
    assert config.balancer.sticky.secure is True
    assert config.balancer.health.interval_s == 1.5
    assert config.app.id == "was-7"
    assert config.balancer.trusted_proxies == ("10.0.0.0/8", "192.168.0.1")


def test_env_value_that_is_not_yaml_is_kept_as_text() -> None:
    secret = "@%weird: secret: with: colons"
    config = load_config(environ={"LBSESSION_BALANCER__STICKY__SECRET": secret})
    assert config.balancer.sticky.secret == secret


def test_unrelated_env_vars_are_ignored() -> None:
    environ = {"PATH": "/bin", "LBSESSION": "x", "LBSESSION_PORT": "1", "OTHER__BALANCER__PORT": "1"}
    assert load_config(environ=environ) == Config()


def test_env_shortcuts() -> None:
    config = load_config(
        environ={"LBSESSION_STRATEGY": "least-conn", "LBSESSION_SERVERS": "5", "LBSESSION_BACKEND": "local"}
    )
    assert (config.balancer.strategy, config.servers, config.app.backend) == ("least-conn", 5, "local")


def test_overrides_beat_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "balancer: {strategy: ip-hash, port: 8000}\n")
    config = load_config(
        path,
        overrides={"balancer.strategy|--strategy": "consistent-hash", "balancer.port": 7000},
        environ={"LBSESSION_STRATEGY": "least-conn", "LBSESSION_BALANCER__PORT": "9000"},
    )
    assert (config.balancer.strategy, config.balancer.port) == ("consistent-hash", 7000)


def test_override_of_none_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "balancer: {port: 8000}\n")
    config = load_config(
        path,
        overrides={"balancer.strategy|--strategy": None, "balancer.port|--port": None},
        environ={"LBSESSION_STRATEGY": "least-conn"},
    )
    assert (config.balancer.strategy, config.balancer.port) == ("least-conn", 8000)


def test_config_is_frozen() -> None:
    config = load_config(environ={})
    with pytest.raises(AttributeError):
        config.servers = 4  # type: ignore[misc]


# --------------------------------------------------------------------------- errors name their source


def bad_strategy_from_file(tmp_path: Path) -> tuple[dict[str, Any], str]:
    path = write(tmp_path, "balancer:\n  strategy: bogus\n")
    return {"path": path, "environ": {}}, str(path)


@pytest.mark.parametrize(
    ("make", "key"),
    [
        pytest.param(bad_strategy_from_file, "balancer.strategy", id="file"),
        pytest.param(
            lambda _: ({"environ": {"LBSESSION_BALANCER__STRATEGY": "bogus"}}, "LBSESSION_BALANCER__STRATEGY"),
            "balancer.strategy",
            id="env",
        ),
        pytest.param(
            lambda _: ({"environ": {"LBSESSION_STRATEGY": "bogus"}}, "LBSESSION_STRATEGY"),
            "balancer.strategy",
            id="env-shortcut",
        ),
        pytest.param(
            lambda _: ({"overrides": {"balancer.strategy|--strategy": "bogus"}, "environ": {}}, "--strategy"),
            "balancer.strategy",
            id="flag",
        ),
        pytest.param(
            lambda _: ({"overrides": {"balancer.strategy": "bogus"}, "environ": {}}, "balancer.strategy"),
            "balancer.strategy",
            id="unlabelled-override",
        ),
    ],
)
def test_unknown_strategy_names_source_key_value_and_choices(tmp_path: Path, make: Any, key: str) -> None:
    kwargs, source = make(tmp_path)
    problem = only_problem(**kwargs)
    assert problem.startswith(f"{source}: {key}: ")
    assert "'bogus'" in problem
    for name in STRATEGY_NAMES:
        assert name in problem


def test_all_mistakes_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
balancer:
  strategy: bogus
  port: eighty
  prot: 1
app:
  session: {same_site: None}
""",
    )
    problems = problems_of(path, environ={"LBSESSION_SERVERS": "0"}, overrides={"app.port|--app-port": 70000})
    assert len(problems) == 6, problems
    text = "\n".join(problems)
    for fragment in [
        f"{path}: balancer.strategy: 'bogus'",
        f"{path}: balancer.port: 'eighty' is not a whole number",
        f"{path}: balancer.prot: unknown setting",
        f"{path}: app.session.same_site:",
        "LBSESSION_SERVERS: servers: 0 must be between 1 and 32",
        "--app-port: app.port: 70000 is not a TCP port",
    ]:
        assert fragment in text


def test_unknown_key_lists_the_valid_ones(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path, "balancer:\n  sticky:\n    cookie: X\n"))
    assert "balancer.sticky.cookie: unknown setting" in problem
    for name in ("cookie_name", "secret", "max_age_s", "secure", "redispatch"):
        assert name in problem


def test_unknown_top_level_key(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path, "servres: 3\n"))
    assert problem.startswith(f"{tmp_path / 'lbsession.yaml'}: servres: unknown setting")
    assert all(name in problem for name in ("servers", "balancer", "app"))


def test_typo_in_the_middle_of_an_env_path_names_the_variable() -> None:
    problem = only_problem(environ={"LBSESSION_BALANCER__STIKCY__SECRET": "0123456789abcdef"})
    assert problem.startswith("LBSESSION_BALANCER__STIKCY__SECRET: balancer.stikcy: unknown setting")


def test_typo_in_the_middle_of_a_flag_path_names_the_flag() -> None:
    problem = only_problem(overrides={"balancer.stikcy.secret|--secret": "0123456789abcdef"})
    assert problem.startswith("--secret: balancer.stikcy: unknown setting")


@pytest.mark.parametrize(
    ("yaml_text", "key", "fragment"),
    [
        ("balancer: {port: eighty}", "balancer.port", "'eighty' is not a whole number"),
        ("balancer: {port: true}", "balancer.port", "True is not a whole number"),
        ("balancer: {port: 80.5}", "balancer.port", "80.5 is not a whole number"),
        ("balancer: {port: '²'}", "balancer.port", "'²' is not a whole number"),
        ("balancer: [1, 2]", "balancer", "expected a mapping of settings, got [1, 2]"),
        ("balancer: 3", "balancer", "expected a mapping of settings, got 3"),
        ("balancer: {sticky: [secret]}", "balancer.sticky", "expected a mapping of settings"),
        ("balancer: {upstreams: 'http://127.0.0.1:8001'}", "balancer.upstreams", "expected a list"),
        ("balancer: {upstreams: {id: a}}", "balancer.upstreams", "expected a list"),
        ("balancer: {trusted_proxies: 10.0.0.0/8}", "balancer.trusted_proxies", "expected a list"),
        ("balancer: {sticky: {secure: maybe}}", "balancer.sticky.secure", "'maybe' is not true or false"),
        ("balancer: {health: {interval_s: fast}}", "balancer.health.interval_s", "'fast' is not a number"),
        ("balancer: {health: {interval_s: true}}", "balancer.health.interval_s", "True is not a number"),
        ("balancer: {health: {interval_s: .nan}}", "balancer.health.interval_s", "nan is not a finite number"),
        ("balancer: {health: {timeout_s: [1]}}", "balancer.health.timeout_s", "[1] is not a number"),
        ("balancer: {host: [a]}", "balancer.host", "['a'] is not a string"),
        (
            "app: {session: {same_site: lax}}",
            "app.session.same_site",
            "'lax' is not valid; choose one of: Lax, Strict, None",
        ),
        ("app: {backend: memcached}", "app.backend", "'memcached' is not valid; choose one of: local, redis"),
    ],
)
def test_wrong_types_are_reported(tmp_path: Path, yaml_text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, yaml_text + "\n")
    assert only_problem(path).startswith(f"{path}: {key}: {fragment}")


def test_numbers_given_as_strings_are_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "balancer: {port: '9000', health: {interval_s: '0.5'}}\n"), environ={})
    assert (config.balancer.port, config.balancer.health.interval_s) == (9000, 0.5)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"servers|--servers": 0}, "--servers: servers: 0 must be between 1 and 32"),
        ({"servers": 33}, "servers: servers: 33 must be between 1 and 32"),
        (
            {"balancer.hash.key": "ip"},
            "balancer.hash.key: 'ip' is not valid; choose client-ip, header:<name> or cookie:<name>",
        ),
        ({"balancer.hash.key": "header:"}, "balancer.hash.key: 'header:' is not valid"),
        ({"balancer.hash.vnodes": 0}, "balancer.hash.vnodes: 0 must be greater than 0"),
        ({"balancer.sticky.secret": "short"}, "balancer.sticky.secret: must be at least 16 characters"),
        (
            {"balancer.sticky.cookie_name": "LB SERVER"},
            "balancer.sticky.cookie_name: 'LB SERVER' must be a plain cookie name",
        ),
        ({"balancer.sticky.max_age_s": -5}, "balancer.sticky.max_age_s: -5 must be greater than 0"),
        ({"balancer.health.path": "healthz"}, "balancer.health.path: 'healthz' must start with /"),
        ({"balancer.health.fall": 0}, "balancer.health.fall: 0 must be greater than 0"),
        ({"balancer.limits.read_timeout_s": 0}, "balancer.limits.read_timeout_s: 0.0 must be greater than 0"),
        (
            {"balancer.trusted_proxies": ["10.0.0.0/33"]},
            "balancer.trusted_proxies: '10.0.0.0/33' is not an address or CIDR",
        ),
        ({"app.id": "was 1"}, "app.id: 'was 1' must be letters, digits"),
        ({"app.session.ttl_s": 0}, "app.session.ttl_s: 0.0 must be greater than 0"),
    ],
)
def test_invalid_values_are_reported(overrides: dict[str, Any], fragment: str) -> None:
    assert fragment in only_problem(overrides=overrides)


# --------------------------------------------------------------------------- the file itself


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "servers: 2\nbalancer:\n  port: @8080\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}: not valid YAML at line 3, column 9")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    problem = only_problem(path)
    assert problem.startswith(f"{path}: cannot read the config file")


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    assert only_problem(tmp_path).startswith(f"{tmp_path}: cannot read the config file")


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"balancer:\n  host: caf\xe9\n")
    assert only_problem(path).startswith(f"{path}: the config file is not UTF-8 text")


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"), ("just words\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    assert only_problem(path) == f"{path}: the top level must be a mapping of settings, not {kind}"


def test_config_error_is_an_lbsession_error() -> None:
    assert issubclass(ConfigError, LBSessionError)
    assert ConfigError("one").problems == ["one"]


# --------------------------------------------------------------------------- upstreams, ports, cookies


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://x", "must start with http://"),
        ("https://127.0.0.1:8443", "must start with http://"),
        ("127.0.0.1:8001", "must start with http://"),
        ("http://127.0.0.1", "must name a host and a port"),
        ("http://:8001", "must name a host and a port"),
        ("http://127.0.0.1:8001/app", "must not have a path or query"),
        ("http://127.0.0.1:8001?x=1", "must not have a path or query"),
    ],
)
def test_bad_upstream_url(tmp_path: Path, url: str, fragment: str) -> None:
    path = write(
        tmp_path,
        f"balancer:\n  upstreams:\n    - {{id: ok, url: 'http://127.0.0.1:8001'}}\n    - {{id: a, url: '{url}'}}\n",
    )
    problem = only_problem(path)
    assert problem.startswith(f"{path}: balancer.upstreams[1].url: ")
    assert repr(url) in problem and fragment in problem


def test_upstream_port_out_of_range_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "balancer:\n  upstreams: [{id: a, url: 'http://127.0.0.1:99999'}]\n")
    assert only_problem(path).startswith(f"{path}: balancer.upstreams[0]")


def test_duplicate_upstream_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
balancer:
  upstreams:
    - {id: a, url: "http://127.0.0.1:8001"}
    - {id: b, url: "http://127.0.0.1:8002"}
    - {id: a, url: "http://127.0.0.1:8003"}
""",
    )
    assert only_problem(path) == f"{path}: balancer.upstreams: id 'a' appears twice"


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("{url: 'http://127.0.0.1:8001'}", "balancer.upstreams[0].id: is required"),
        ("{id: a}", "balancer.upstreams[0].url: is required"),
        ("{id: '', url: 'http://127.0.0.1:8001'}", "balancer.upstreams[0].id: must not be empty"),
        ("{id: a, url: 'http://127.0.0.1:8001', weight: 2}", "balancer.upstreams[0].weight: unknown setting"),
        ("'http://127.0.0.1:8001'", "balancer.upstreams[0]: expected a mapping of settings"),
    ],
)
def test_bad_upstream_entry(tmp_path: Path, entry: str, fragment: str) -> None:
    path = write(tmp_path, f"balancer:\n  upstreams: [{entry}]\n")
    assert only_problem(path).startswith(f"{path}: {fragment}")


def test_upstream_error_from_env_names_the_variable() -> None:
    name = "LBSESSION_BALANCER__UPSTREAMS"
    problem = only_problem(environ={name: "[{id: a, url: 'ftp://x'}]"})
    assert problem.startswith(f"{name}: balancer.upstreams[0].url: 'ftp://x' must start with http://")


def test_upstream_error_from_a_flag_names_the_flag() -> None:
    problem = only_problem(overrides={"balancer.upstreams|--upstream": [{"id": "a", "url": "http://x"}]})
    assert problem.startswith("--upstream: balancer.upstreams[0].url: ")


@pytest.mark.parametrize("key", ["balancer.port", "balancer.admin_port", "app.port"])
@pytest.mark.parametrize("port", [-1, 65536, 100000])
def test_port_out_of_range(key: str, port: int) -> None:
    problem = only_problem(overrides={key: port})
    assert problem == f"{key}: {key}: {port} is not a TCP port (0-65535, 0 = any free port)"


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_port_edges_are_valid(port: int) -> None:
    assert load_config(overrides={"balancer.port": port, "app.port": port}, environ={}).balancer.port == port


def test_same_site_none_requires_secure(tmp_path: Path) -> None:
    path = write(tmp_path, "app:\n  session:\n    same_site: None\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}: app.session.same_site: None requires secure: true")
    ok = load_config(write(tmp_path, "app:\n  session: {same_site: None, secure: true}\n", "ok.yaml"), environ={})
    assert ok.app.session.same_site == "None"


# --------------------------------------------------------------------------- registries and shipped configs


def test_strategy_registry_matches_the_literal() -> None:
    assert set(STRATEGIES) == set(STRATEGY_NAMES)


def test_store_registry_matches_the_literal() -> None:
    assert set(STORES) == set(BACKEND_NAMES)


def test_shipped_configs_load() -> None:
    # Only files directly in configs/: scenario files in subfolders have their own schema.
    assert CONFIGS.is_dir(), CONFIGS
    paths = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("*.yml")])
    assert all(p.parent == CONFIGS for p in paths)
    failures = {}
    for path in paths:
        try:
            load_config(path, environ={})
        except ConfigError as exc:
            failures[path.name] = exc.problems
    assert not failures, failures
