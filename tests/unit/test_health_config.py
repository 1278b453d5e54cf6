"""The health-check settings (issue 12, point 4): each bad value is one line naming the flag."""

from __future__ import annotations

import pytest

from lbsession.cli import main
from lbsession.config import HealthConfig, load_config
from lbsession.errors import ConfigError
from lbsession.lab.topology import Topology

LB = ["lb", "--upstream", "http://127.0.0.1:1"]


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--health-expect", "99", "'99' is not an HTTP status (100-599)"),
        ("--health-expect", "abc", "'abc' is not an HTTP status"),
        ("--health-expect", "500-200", "the range '500-200' ends before it starts"),
        ("--health-expect", "200,,204", "'' is not an HTTP status"),
        ("--health-expect", "200-600", "'200-600' is not an HTTP status"),
        ("--health-path", "healthz", "'healthz' must start with /"),
        ("--health-path", "/a b", "'/a b' must start with / and hold no spaces"),
        ("--health-method", "GE T", "'GE T' is not an HTTP method"),
        ("--health-host", "t/evil", "'t/evil' is not a host name"),
        ("--health-host", "user@t", "'user@t' is not a host name"),
        ("--health-interval", "0", "0.0 must be greater than 0"),
        ("--health-timeout", "abc", "'abc' is not a number"),
        ("--health-rise", "0", "0 must be greater than 0"),
        ("--health-fall", "x", "'x' is not a whole number"),
        ("--health", "maybe", "'maybe' is not on or off"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag(
    flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*LB, flag, value]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {flag}: ") and says in line, line


@pytest.mark.parametrize(
    ("expect", "passing", "failing"),
    [
        ("200-399", (200, 302, 399), (199, 400, 503)),
        ("200,204", (200, 204), (201, 302)),
        ("200, 300-302", (200, 300, 302), (204, 303)),
        ("503", (503,), (200,)),
    ],
)
def test_expect_is_a_range_a_list_or_both(expect: str, passing: tuple[int, ...], failing: tuple[int, ...]) -> None:
    statuses = HealthConfig(expect=expect).statuses()
    assert all(s in statuses for s in passing) and not any(s in statuses for s in failing)


def test_yaml_and_variables_read_off_and_a_numeric_expect() -> None:
    environ = {"LBSESSION_BALANCER__HEALTH__ACTIVE": "off", "LBSESSION_BALANCER__HEALTH__EXPECT": "204"}
    health = load_config(environ=environ).balancer.health
    assert (health.active, health.expect) == (False, "204")


def test_run_refuses_health_off_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--health", "off"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --health: `lbsession run` keeps its active health checks")


def test_a_lab_refuses_passive_only_health_from_a_file_or_variable() -> None:
    config = load_config(environ={"LBSESSION_BALANCER__HEALTH__ACTIVE": "false"})
    with pytest.raises(ConfigError, match=r"^balancer.health.active: false is for `lbsession lb` only"):
        Topology(config)
