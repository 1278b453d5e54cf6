"""First-run defects of the `lbsession` command (issue 11), run as a user runs it: real processes, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from lbsession.lab.process import free_port

pytestmark = pytest.mark.integration


async def lbsession(*args: str, tmpdir: Path) -> asyncio.subprocess.Process:
    """`python -m lbsession ARGS` with its own temporary directory, output captured."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbsession", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )  # fmt: skip


async def finished(*args: str, tmpdir: Path) -> tuple[int, str, str]:
    process = await lbsession(*args, tmpdir=tmpdir)
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def run_until_ready(tmp_path: Path, *extra: str) -> tuple[int, str]:
    """Start `lbsession run`, wait for its ready file, stop it with SIGTERM; return (status, stderr)."""
    ready = tmp_path / "ready.json"
    process = await lbsession(
        "run", "--servers", "1", "--port", "0", "--admin-port", "0", "--ready-file", str(ready), *extra,
        tmpdir=tmp_path / "tmp",
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            while not ready.exists():
                assert process.returncode is None, (await process.communicate())[1].decode()
                await asyncio.sleep(0.05)
        assert json.loads(ready.read_text())["servers"]
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode or 0, err.decode()


def leftovers(tmpdir: Path) -> list[Path]:
    return sorted(tmpdir.glob("lbsession-*"))


async def test_run_removes_its_log_folder_on_exit(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    status, err = await run_until_ready(tmp_path)
    assert status == 0, err
    assert leftovers(tmp_path / "tmp") == []


async def test_run_keeps_its_log_folder_with_keep_logs_and_says_where(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    status, err = await run_until_ready(tmp_path, "--keep-logs")
    assert status == 0, err
    (kept,) = leftovers(tmp_path / "tmp")
    assert f"logs kept in {kept}" in err
    assert (kept / "was-1.log").exists()


async def test_a_failed_run_leaves_no_log_folder(tmp_path: Path) -> None:
    config = tmp_path / "lab.yaml"
    config.write_text("redis_server: {binary: /nonexistent/redis-server}\n")  # fails once the lab is starting
    status, _, err = await finished(
        "run", "--config", str(config), "--backend", "redis", "--port", "0", "--admin-port", "0", tmpdir=tmp_path
    )
    assert status == 1, err
    assert "is not an executable file" in err and "Traceback" not in err
    assert leftovers(tmp_path) == []


async def test_a_scenario_against_nothing_is_a_usage_error(tmp_path: Path) -> None:
    target = f"http://127.0.0.1:{free_port()}"
    status, _, err = await finished("scenario", "C6", "--target", target, tmpdir=tmp_path)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --target {target}: "), lines
