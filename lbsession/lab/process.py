"""The lab's child processes: spawn with a log file, wait until ready, stop by handle; free ports.

Every process the lab starts (app servers, Redis and its Sentinels, the bench's
balancers, nginx and HAProxy) goes through `spawn` and is stopped through its
`Child` handle, so the rules are written once (a matrix's first app servers are
forks of a warm parent instead, lbsession.lab.forks, under the same rules):

- A child gets a session of its own (`start_new_session`): Ctrl-C in a terminal
  reaches only the lab, which stops its children itself, in order.
- Its stderr, and its stdout unless the ready line is read from it, go to one log
  file, which an error names.
- Ready means a fact the child reports, never a guess at how long it takes: one
  JSON line on stdout once its port is bound (`read_ready_line`), or a probe that
  answers (`wait_until`, `wait_http`).
- Stopping is SIGTERM, a grace period, then SIGKILL, by handle, never by name.

The handle is a `subprocess.Popen` (or a fork's `ForkedProcess`), not an asyncio process: it must outlive the
event loop that started it (the test suite's shared Redis is started in a loop of
its own). Waiting on it stays non-blocking: its pidfd becomes readable when it
exits (Linux), else it is polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from lbsession.balancer.compiled import PURE_ENV
from lbsession.config import ENV_PREFIX
from lbsession.errors import TopologyError

HOST = "127.0.0.1"
STOP_GRACE_S = 5.0
POLL_S = 0.02  # the interval between two readiness probes, not a guess at how long readiness takes


class Process(Protocol):
    """What a Child uses of its process: a `subprocess.Popen`, or a fork of the warm parent (lbsession.lab.forks)."""

    pid: int
    stdout: IO[bytes] | None

    def poll(self) -> int | None: ...
    def wait(self) -> int: ...
    def send_signal(self, signum: int) -> None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


@dataclass
class Child:
    """One child process, its log file, and how to wait for it and stop it."""

    name: str
    popen: Process
    log_path: Path

    @property
    def pid(self) -> int | None:
        """The OS process id, or None once it has exited."""
        return self.popen.pid if self.popen.poll() is None else None

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.popen.poll()

    def send_signal(self, signum: int) -> None:
        """Send `signum` if the process still runs (a fault: SIGSTOP, SIGKILL)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the log, joined for a one-line error."""
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        return ""

    async def wait(self) -> int:
        """Wait until the process exits; return its status."""
        if self.popen.poll() is None:
            await _exited(self.popen)
        status = self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()  # the ready line's pipe; nothing more will come through it
        return status

    async def kill(self) -> None:
        """SIGKILL and reap: no shutdown, the memory gone."""
        self.send_signal(signal.SIGKILL)
        await self.wait()

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL if still running after `grace_s`; returns once reaped."""
        if self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            async with asyncio.timeout(grace_s):
                await self.wait()
        except TimeoutError:
            await self.kill()


def child_environ(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with `settings` as the only `LBSESSION_*` settings: a child's whole config.

    The parent's own variables are already in its config; passed on as well, they would be read
    again by the child, where a shortcut (LBSESSION_BACKEND) would win over the parent's choice.
    LBSESSION_PURE is no setting but which build of the balancer's code runs: every child keeps it.
    """
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) or k == PURE_ENV}
    return {**inherited, "PYTHONUNBUFFERED": "1", **settings}


def python_module(module: str, *args: str) -> list[str]:
    """The argv that runs `module` on this Python as `python -m` does, but without the working folder on sys.path.

    `-P`: a file in the folder the lab was started from (an `idna.py`, a `yaml.py`) must not
    shadow a module the child imports; the lab's children run installed code only.
    """
    return [sys.executable, "-P", "-m", module, *args]


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_line: bool = False,
    pass_fds: Sequence[int] = (),
) -> Child:
    """Start `argv` with its output in `log_path`; with `ready_line`, stdout is kept for `read_ready_line`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready_line else log_file,
            stderr=log_file,
            env=None if env is None else dict(env),
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    return Child(name, popen, log_path)


async def read_ready_line(child: Child, timeout_s: float) -> dict[str, Any]:
    """The JSON line the child prints once listening; TopologyError (the child killed) otherwise."""
    assert child.popen.stdout is not None, "spawn(..., ready_line=True) keeps stdout"
    try:
        async with asyncio.timeout(timeout_s):
            line = await _read_line(child.popen.stdout.fileno())
    except TimeoutError:
        await child.kill()
        raise TopologyError(f"{child.name} did not report ready in {timeout_s:g} s; see {child.log_path}") from None
    if not line:
        status = await child.wait()
        raise TopologyError(f"{child.name} exited with status {status}: {child.log_tail()}")
    try:
        ready: dict[str, Any] = json.loads(line)
    except ValueError:
        await child.kill()
        raise TopologyError(f"{child.name} printed {line[:80]!r}, not its JSON ready line") from None
    return ready


async def wait_until(child: Child, probe: Callable[[], Awaitable[Any]], what: str, timeout_s: float) -> None:
    """Ask `probe()` until it returns truthy; TopologyError if the child exits or `timeout_s` passes."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if child.returncode is not None:
                    raise TopologyError(f"{child.name} exited with status {child.returncode}; see {child.log_path}")
                if await probe():
                    return
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        raise TopologyError(f"timed out after {timeout_s:g} s waiting for {what}; see {child.log_path}") from None


async def wait_http(child: Child, port: int, path: str, timeout_s: float) -> None:
    """Return once GET `path` on `port` answers 200 (a health URL); TopologyError otherwise."""

    async def answers() -> bool:
        return await http_status(port, path) == 200

    await wait_until(child, answers, f"{child.name} to answer 200 on http://{HOST}:{port}{path}", timeout_s)


async def http_status(port: int, path: str) -> int:
    """The status of one GET on loopback, or 0 when nothing answers."""
    try:
        async with asyncio.timeout(1.0):
            return (await http_get(port, path, body=False))[0]
    except (OSError, TimeoutError, ValueError):
        return 0


async def http_get(port: int, path: str, body: bool = True) -> tuple[int, bytes]:
    """One GET on loopback (`Connection: close`): its status and, with `body`, the body read to the close."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        status = int((await reader.readline())[9:12] or 0)
        return status, (await reader.read()).partition(b"\r\n\r\n")[2] if body else b""
    finally:
        writer.close()


# --------------------------------------------------------------------------- ports


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on loopback now, for children that must know their port beforehand.

    The one rule: a child that can report the port it bound (the app server's ready line) is
    given port 0. Any other is given a port drawn here, below the ephemeral range and checked
    by binding it. Not from port 0 and released: the kernel hands that number out from the
    ephemeral range, which it also gives to outgoing connections as their source port, so
    between the choice and the child's bind some connection may take it (a cluster node opens
    links to its peers before its own listener is up). Below the range the kernel never hands
    a port out by itself; only another program choosing the same number could collide.
    """
    low = _ephemeral_low()
    chosen: set[int] = set()
    while len(chosen) < count:
        port = random.randrange(max(1024, low - 12000), low)
        if port not in chosen and _bindable(port):
            chosen.add(port)
    return list(chosen)


def free_port() -> int:
    """One port by the rule of `free_ports`."""
    return free_ports(1)[0]


def port_in_use(host: str, port: int) -> bool:
    """True when `port` cannot be bound on `host` now (0 never is: the kernel picks)."""
    return port != 0 and not _bindable(port, host)


def _bindable(port: int, host: str = HOST) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        # As the listeners themselves bind (SO_REUSEADDR): a port held only by TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# --------------------------------------------------------------------------- non-blocking waits


async def _exited(popen: Process) -> None:
    """Return once `popen` has exited, without reaping it and without a thread."""
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):  # not Linux, or the process is gone already
        while popen.poll() is None:  # noqa: ASYNC110 - nothing to wait on but the process table
            await asyncio.sleep(POLL_S)
        return
    try:
        await _readable(pidfd)  # a pidfd turns readable when its process exits
    finally:
        os.close(pidfd)


async def _read_line(fd: int) -> bytes:
    """One line from a pipe, read without blocking the loop; b"" when it closes first."""
    os.set_blocking(fd, False)
    buffer = bytearray()
    while b"\n" not in buffer:
        await _readable(fd)
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            return b""
        buffer += chunk
    return bytes(buffer[: buffer.index(b"\n") + 1])


async def _readable(fd: int) -> None:
    """Return once `fd` is readable."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        await ready.wait()
    finally:
        loop.remove_reader(fd)
