"""The warm parent of a lab's app servers against real forks: ready lines, health, signals, exit statuses."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lbsession.errors import TopologyError
from lbsession.lab.forks import Forks
from lbsession.lab.process import child_environ, http_status, read_ready_line

pytestmark = pytest.mark.integration


@pytest.fixture
async def forks(tmp_path: Path) -> AsyncIterator[Forks]:
    warm = Forks(tmp_path / "forks.log")
    await warm.start()
    try:
        yield warm
    finally:
        await warm.stop()


def server_env(server_id: str) -> dict[str, str]:
    return child_environ({"LBSESSION_APP__ID": server_id, "LBSESSION_APP__PORT": "0"})


async def test_a_fork_is_an_app_server_of_its_own_config_session_and_log(forks: Forks, tmp_path: Path) -> None:
    child = forks.spawn("was-7", ["server", "--ready-line"], tmp_path / "was-7.log", server_env("was-7"))
    try:
        ready = await read_ready_line(child, timeout_s=20)
        assert ready["id"] == "was-7" and ready["pid"] == child.pid
        assert await http_status(ready["port"], "/healthz") == 200
        assert os.getsid(ready["pid"]) == ready["pid"]  # a session of its own, as spawn gives
    finally:
        await child.stop()
    assert child.pid is None and child.returncode == 0  # SIGTERM: the server stops cleanly
    assert forks.running


async def test_sigkill_is_a_real_death_and_its_status_is_reported(forks: Forks, tmp_path: Path) -> None:
    first = forks.spawn("was-1", ["server", "--ready-line"], tmp_path / "was-1.log", server_env("was-1"))
    second = forks.spawn("was-2", ["server", "--ready-line"], tmp_path / "was-2.log", server_env("was-2"))
    try:
        port = (await read_ready_line(first, timeout_s=20))["port"]
        await read_ready_line(second, timeout_s=20)
        await first.kill()
        assert first.returncode == -signal.SIGKILL
        assert await http_status(port, "/healthz") == 0  # nothing answers: the process is gone
        assert second.pid is not None  # its sibling runs on
    finally:
        await first.stop()
        await second.stop()


async def test_a_fork_that_fails_is_an_error_naming_its_status_and_log(forks: Forks, tmp_path: Path) -> None:
    env = child_environ({"LBSESSION_APP__BACKEND": '"no-such-store"'})
    child = forks.spawn("bad", ["server", "--ready-line"], tmp_path / "bad.log", env)
    with pytest.raises(TopologyError, match="bad exited with status 2"):
        await read_ready_line(child, timeout_s=20)


async def test_a_stopped_warm_parent_refuses_to_fork(tmp_path: Path) -> None:
    warm = Forks(tmp_path / "forks.log")
    with pytest.raises(TopologyError, match="not started"):
        warm.spawn("was-1", ["server"], tmp_path / "was-1.log", server_env("was-1"))
