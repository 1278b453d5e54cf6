"""The first-run defects a new user met (issue 11), each pinned by a test that failed before its fix."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from lbsession.balancer.balancer import _with_sticky_secret
from lbsession.cli import build_parser, main
from lbsession.config import BalancerConfig
from lbsession.errors import ConfigError
from lbsession.lab.scenario import CLAIM_FAMILIES, find_scenario

ROOT = Path(__file__).resolve().parents[2]


def test_the_unknown_scenario_hint_names_every_claim_family() -> None:
    with pytest.raises(ConfigError) as info:
        find_scenario("Z9")
    message = str(info.value)
    assert "C1..C12" in message
    for family in CLAIM_FAMILIES:
        assert f"{family}1.." in message, (family, message)


def test_the_sticky_secret_warning_names_the_flag_the_key_and_the_variable(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _with_sticky_secret(BalancerConfig(strategy="sticky-cookie"))
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = record.getMessage()
    for name in ("--sticky-secret", "balancer.sticky.secret", "LBSESSION_BALANCER__STICKY__SECRET"):
        assert name in text, text


def test_results_folder_is_ignored_by_git() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "results/" in ignored or "/results/" in ignored


def test_the_readme_test_command_says_the_browser_tests_need_chromium() -> None:
    readme = (ROOT / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if re.match(r"pip install -e '\.\[test\]' && pytest", ln)]
    assert "Chromium" in line and "skip" in line


def help_of(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The `--help` text of one subcommand, as a user would see it."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes


def test_lb_help_does_not_claim_its_admin_api_can_kill_servers(capsys: pytest.CaptureFixture[str]) -> None:
    assert "kill" not in help_of("lb", capsys)


@pytest.fixture(autouse=True)
def wide_help(monkeypatch: pytest.MonkeyPatch) -> None:
    """argparse wraps help at the terminal's width, even inside a word such as round-robin."""
    monkeypatch.setenv("COLUMNS", "250")


def test_run_help_shows_the_defaults_of_strategy_and_backend(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of("run", capsys)
    assert re.search(r"--strategy STRATEGY [^()]*\(default: round-robin", text), text
    assert re.search(r"--backend BACKEND [^()]*\(default: local", text), text


def error_lines(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run `lbsession ARGV` in this process; return its exit status and the lines it wrote on stderr."""
    status = main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--port", "abc"], "error: --port: balancer.port: 'abc' is not a whole number"),
        (["server", "--port", "abc"], "error: --port: app.port: 'abc' is not a whole number"),
        (["bench", "--requests", "abc"], "error: argument --requests: invalid int value: 'abc'"),
        (["run", "--no-such-flag"], "error: unrecognized arguments: --no-such-flag"),
        (["nonsense"], "error: argument COMMAND: invalid choice: 'nonsense'"),
    ],
)
def test_a_mistyped_flag_is_one_error_line_with_status_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = error_lines(argv, capsys)
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected), lines


def test_the_same_port_for_both_listeners_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, lines = error_lines(["run", "--port", "20080", "--admin-port", "20080"], capsys)
    assert status == 2
    assert lines == [
        "error: --admin-port: balancer.admin_port: 20080 is the public port too; give the two listeners different ports"
    ]
