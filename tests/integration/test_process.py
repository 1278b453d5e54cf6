"""The lab's process module against real child processes: ready lines, probes, stopping, ports."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import pytest

from lbsession.errors import TopologyError
from lbsession.lab.process import (
    _ephemeral_low,
    child_environ,
    free_ports,
    port_in_use,
    python_module,
    read_ready_line,
    spawn,
    wait_http,
)

pytestmark = pytest.mark.integration


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_the_ready_line_is_read_and_the_child_stopped_by_handle(tmp_path: Path) -> None:
    code = (
        "import json, sys, time; print(json.dumps({'port': 1234}), flush=True); "
        "print('log', file=sys.stderr, flush=True); time.sleep(60)"
    )
    child = spawn("sleeper", python(code), tmp_path / "sleeper.log", ready_line=True)
    try:
        assert await read_ready_line(child, timeout_s=20) == {"port": 1234}
        assert child.pid is not None
        async with asyncio.timeout(20):  # its stderr line follows the ready line: wait for it, not a SIGTERM race
            while "log" not in (tmp_path / "sleeper.log").read_text():
                await asyncio.sleep(0.01)
    finally:
        await child.stop()
    assert child.pid is None and child.returncode == -signal.SIGTERM
    assert "log" in (tmp_path / "sleeper.log").read_text()


async def test_a_child_that_exits_before_ready_is_an_error_naming_its_status_and_log(tmp_path: Path) -> None:
    code = "import sys; print('no such thing', file=sys.stderr); sys.exit(3)"
    child = spawn("broken", python(code), tmp_path / "broken.log", ready_line=True)
    with pytest.raises(TopologyError, match="broken exited with status 3: no such thing"):
        await read_ready_line(child, timeout_s=20)


async def test_a_child_silent_past_the_timeout_is_killed(tmp_path: Path) -> None:
    child = spawn("mute", python("import time; time.sleep(60)"), tmp_path / "mute.log", ready_line=True)
    with pytest.raises(TopologyError, match=r"did not report ready in 0\.5 s"):
        await read_ready_line(child, timeout_s=0.5)
    assert child.returncode == -signal.SIGKILL


async def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    code = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('{}', flush=True); time.sleep(60)"
    child = spawn("stubborn", python(code), tmp_path / "stubborn.log", ready_line=True)
    await read_ready_line(child, timeout_s=20)  # its SIGTERM handler is installed by now
    await child.stop(grace_s=0.3)
    assert child.returncode == -signal.SIGKILL


async def test_wait_http_fails_fast_when_the_child_dies(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    child = spawn("dies", python("raise SystemExit(4)"), tmp_path / "dies.log")
    with pytest.raises(TopologyError, match="dies exited with status 4"):
        await wait_http(child, port, "/", timeout_s=20)


async def test_wait_http_returns_once_the_child_answers_200(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    child = spawn("http", argv, tmp_path / "http.log")
    try:
        await wait_http(child, port, "/", timeout_s=20)
    finally:
        await child.stop()


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(1024 <= p < _ephemeral_low() for p in ports)
    assert not any(port_in_use("127.0.0.1", p) for p in ports)


def test_port_in_use_sees_a_listener() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert port_in_use("127.0.0.1", busy.getsockname()[1])
    assert not port_in_use("127.0.0.1", 0)


def test_a_childs_only_lbsession_variables_are_the_ones_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBSESSION_BACKEND", "redis")  # read by the parent already; the child must not read it again
    monkeypatch.setenv("UNRELATED", "kept")
    monkeypatch.delenv("LBSESSION_PURE", raising=False)  # no setting, and kept (the next test)
    environ = child_environ({"LBSESSION_APP__BACKEND": '"local"'})
    assert {k: v for k, v in environ.items() if k.startswith("LBSESSION_")} == {"LBSESSION_APP__BACKEND": '"local"'}
    assert environ["UNRELATED"] == "kept"


def test_a_child_runs_the_same_build_as_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBSESSION_PURE", "1")  # not a setting: which build of the balancer's code runs
    assert child_environ({})["LBSESSION_PURE"] == "1"


async def test_a_module_in_the_folder_the_lab_runs_from_does_not_shadow_what_a_child_imports(tmp_path, monkeypatch):
    # `python -m` would import ./lbsession/ ahead of the installed package; the lab's children must not.
    (tmp_path / "lbsession").mkdir()
    (tmp_path / "lbsession" / "__init__.py").write_text("raise SystemExit('the shadow was imported')\n")
    monkeypatch.chdir(tmp_path)
    child = spawn("help", python_module("lbsession", "--help"), tmp_path / "help.log", env=child_environ({}))
    assert await asyncio.wait_for(asyncio.to_thread(child.popen.wait), 30) == 0
    assert "usage: lbsession" in (tmp_path / "help.log").read_text()
