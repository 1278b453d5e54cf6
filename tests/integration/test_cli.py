"""The `lbsession` command as a user runs it: real subprocesses, real signals, real exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.integration


async def lbsession(*args: str) -> asyncio.subprocess.Process:
    """Start `python -m lbsession ARGS` with its output captured."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbsession", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def finished(*args: str) -> tuple[int, str, str]:
    """Run `lbsession ARGS` to completion; return (exit status, stdout, stderr)."""
    process = await lbsession(*args)
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def wait_for_file(path: Path, process: asyncio.subprocess.Process, timeout_s: float = 60) -> dict:
    """Wait until the ready file appears (failing fast if the process dies first)."""
    async with asyncio.timeout(timeout_s):
        while not path.exists():
            if process.returncode is not None:
                _, err = await process.communicate()
                pytest.fail(f"lbsession run exited {process.returncode}: {err.decode()[-2000:]}")
            await asyncio.sleep(0.05)
    return json.loads(path.read_text())


def alive(pid: int) -> bool:
    """True if a process with this id exists (and is not a zombie we own)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(") ")[1].startswith("Z"))


async def test_run_writes_the_ready_file_serves_the_lab_and_stops_on_sigterm(tmp_path):
    ready = tmp_path / "ready.json"
    process = await lbsession(
        "run", "--strategy", "sticky-cookie", "--backend", "local", "--servers", "2",
        "--port", "0", "--admin-port", "0", "--ready-file", str(ready),
    )  # fmt: skip
    try:
        info = await wait_for_file(ready, process)
        assert [s["id"] for s in info["servers"]] == ["was-1", "was-2"]
        assert all(alive(s["pid"]) for s in info["servers"])
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            async with http.post(info["lb"] + "/login", json={"username": "alice"}) as r:
                assert r.status == 200
                home = r.headers["X-Served-By"]
            for _ in range(4):
                async with http.get(info["lb"] + "/me") as r:
                    assert (r.status, r.headers["X-Served-By"]) == (200, home)
            for _ in range(3):  # a WebSocket stays on the same server too, and knows who we are
                async with http.ws_connect(info["lb"] + "/ws") as ws:
                    await ws.send_str("hi")
                    assert await ws.receive_json(timeout=10) == {"user": "alice", "server": home, "echo": "hi"}
                    async with http.get(info["admin"] + "/status") as r:
                        assert (await r.json())["tunnels"]["by_server"][home] >= 1  # the last may still be closing
            async with http.get(info["admin"] + "/status") as r:
                assert (await r.json())["strategy"] == "sticky-cookie"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            out, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert "curl" in out.decode()  # the ready-to-paste example
    assert not any(alive(s["pid"]) for s in info["servers"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--strategy", "nope"], "choose one of: round-robin, least-conn, sticky-cookie"),
        (["run", "--backend", "nope"], "choose one of: local, redis"),
        (["run", "--config", "/nonexistent/lab.yaml"], "/nonexistent/lab.yaml: cannot read the config file"),
        (["run", "--servers", "0"], "--servers: servers: 0 must be between 1 and 32"),
        (["lb", "--port", "0"], "no upstreams: give --upstream"),
        (["lb", "--upstream", "ftp://x:1"], "must start with http://"),
    ],
)
async def test_mistakes_are_one_line_errors_with_exit_status_2(args, expected):
    status, _, err = await finished(*args)
    assert status == 2, err
    assert err.startswith("error: ") or "\nerror: " in err
    assert expected in err
    assert "Traceback" not in err


async def test_a_bad_config_file_names_the_file_and_the_key(tmp_path):
    config = tmp_path / "lab.yaml"
    config.write_text("balancer:\n  strategy: sticky\n  prot: 8080\n")
    status, _, err = await finished("run", "--config", str(config))
    assert status == 2
    assert f"{config}: balancer.strategy: 'sticky' is not valid" in err
    assert f"{config}: balancer.prot: unknown setting" in err
    assert "Traceback" not in err


async def test_a_busy_port_is_a_clear_error_and_leaves_no_process_behind(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, _, err = await finished("run", "--port", str(port), "--admin-port", "0", "--servers", "1")
    assert status == 2
    assert "already in use" in err and "--port" in err
    assert "Traceback" not in err


async def test_server_prints_its_ready_line_with_the_bound_port():
    process = await lbsession("server", "--id", "was-9", "--port", "0", "--ready-line")
    try:
        async with asyncio.timeout(30):
            line = json.loads(await process.stdout.readline())
        async with aiohttp.ClientSession() as http, http.get(line["url"] + "/healthz") as r:
            assert r.status == 200
            assert (await r.json())["server"] == "was-9"
    finally:
        process.terminate()
        async with asyncio.timeout(30):
            await process.communicate()
    assert process.returncode == 0
    assert line["port"] > 0 and line["pid"] == process.pid
