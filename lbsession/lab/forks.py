"""A warm parent for a lab's app servers: each is a fork of it, ready in milliseconds instead of ~0.4 s.

Starting `python -m lbsession server` is a Python start and the import of aiohttp,
redis-py and lbsession: ~0.3 s of CPU, and a lab starts three at once (a matrix, some
two hundred). `python -m lbsession.lab.forks FD` pays that once: it imports what an app
server runs, prints its ready line, then forks one child per request on the socket FD.
A child is what `spawn` would have started, in a fork's clothes: a session of its own,
stdin from /dev/null, its ready line on the pipe the lab gave, its stderr in its log
file, its environment the one it was given (its whole config, read at start as ever),
and `lbsession server` run with its arguments. It is a real process: SIGKILL is its death.

The lab holds it by a `ForkedProcess`, the part of `subprocess.Popen` that a `Child`
uses. The warm parent reaps a child only when the lab asks, once its pidfd says it has
exited, so its pid cannot be handed to another process while the lab holds it.

Only a lab's first servers are forked (Topology.start): a server started during a run
(a restart, a scale-out) is spawned as before, so a fault takes the time it always took.

    {"op": "spawn", "argv": [...], "env": {...}} + 2 fds (stdout, log)   -> {"pid": N}
    {"op": "reap", "pid": N}                                              -> {"status": S}
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from lbsession.errors import TopologyError
from lbsession.lab.process import Child, child_environ, python_module, read_ready_line, spawn

READY_TIMEOUT_S = 20.0
# What `lbsession server` imports (its command, the app, the redis store's client), by name:
# the warm parent runs the command as `python -m lbsession` would, and uses none of them itself.
PRELOADED = ("lbsession.cli", "lbsession.appserver.app", "redis.asyncio")
MESSAGE_BYTES = 1 << 20  # a request: an environment, a few kB; one datagram of a SOCK_SEQPACKET


class ForkedProcess:
    """A child of the warm parent, as a `Child` handles it: pid, poll, wait, signals, stdout."""

    def __init__(self, pid: int, forks: Forks, stdout: IO[bytes]) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None
        self._forks = forks
        self._pidfd = os.pidfd_open(pid)  # readable once it exits; not reaped until asked, so the pid stays its own

    def poll(self) -> int | None:
        """The exit status once it has exited (reaped by the warm parent), else None."""
        if self.returncode is None and select.select([self._pidfd], [], [], 0)[0]:
            self.returncode = self._forks.reap(self.pid)
            os.close(self._pidfd)
        return self.returncode

    def wait(self) -> int:
        """Block until it exits (a Child calls it once its pidfd is readable); its exit status."""
        while self.poll() is None:
            select.select([self._pidfd], [], [])
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Signal it if it still runs (an exited, unreaped one keeps its pid: no other process is hit)."""
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)


class Forks:
    """The lab's handle on its warm parent: start it, fork app servers from it, stop it."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: Child | None = None
        self._socket: socket.socket | None = None

    @property
    def running(self) -> bool:
        """Whether the warm parent has been started and has not exited."""
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start the warm parent and wait until it has imported what an app server runs."""
        await self.stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = python_module("lbsession.lab.forks", str(theirs.fileno()))
            self.process = spawn("forks", argv, self.log_path, env=child_environ({}), ready_line=True,
                                 pass_fds=(theirs.fileno(),))  # fmt: skip
        finally:
            theirs.close()
        self._socket = ours
        await read_ready_line(self.process, READY_TIMEOUT_S)

    async def stop(self) -> None:
        """Stop the warm parent (its running children, if any, are not its to stop)."""
        if self._socket is not None:
            self._socket.close()  # it reads end-of-file and exits
            self._socket = None
        if self.process is not None:
            await self.process.stop()

    def spawn(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> Child:
        """`lbsession <argv>` as a fork of the warm parent, its ready line kept for `read_ready_line`."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        read_end, write_end = os.pipe()
        try:
            with open(log_path, "ab") as log_file:
                pid = self._call({"op": "spawn", "argv": list(argv), "env": dict(env)}, (write_end, log_file.fileno()))
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        return Child(name, ForkedProcess(int(pid), self, os.fdopen(read_end, "rb", buffering=0)), log_path)

    def reap(self, pid: int) -> int:
        """The exit status of an exited child; -1 when the warm parent can no longer tell."""
        try:
            return int(self._call({"op": "reap", "pid": pid}))
        except TopologyError:
            return -1

    def _call(self, request: dict[str, Any], fds: Sequence[int] = ()) -> Any:
        """One request and its answer; quick (a fork, a reap of an exited child), so a blocking call."""
        if self._socket is None:
            raise TopologyError("the warm parent of the app servers is not started")
        try:
            socket.send_fds(self._socket, [json.dumps(request).encode()], list(fds))
            answer = json.loads(self._socket.recv(MESSAGE_BYTES) or b"{}")
        except (OSError, ValueError) as exc:
            raise TopologyError(f"the warm parent did not answer {request['op']}: {exc}; see {self.log_path}") from None
        if "error" in answer or "result" not in answer:
            raise TopologyError(f"the warm parent refused {request['op']}: {answer.get('error', 'no answer')}")
        return answer["result"]


# --------------------------------------------------------------------------- the warm parent


def _serve(channel: socket.socket) -> None:
    """Answer requests until the lab closes its end."""
    while True:
        message, fds, _, _ = socket.recv_fds(channel, MESSAGE_BYTES, 2)
        if not message:
            return
        request = json.loads(message)
        try:
            if request["op"] == "spawn":
                answer: dict[str, Any] = {"result": _fork(request, fds, channel)}
            else:
                answer = {"result": os.waitstatus_to_exitcode(os.waitpid(int(request["pid"]), 0)[1])}
        except OSError as exc:
            answer = {"error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        channel.send(json.dumps(answer).encode())


def _fork(request: dict[str, Any], fds: list[int], channel: socket.socket) -> int:
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:  # the child: never returns to the loop above
        os.setsid()  # as spawn's start_new_session: Ctrl-C in a terminal reaches only the lab
        channel.close()
        stdout, log = fds
        devnull = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((devnull, 0), (stdout, 1), (log, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["lbsession", *request["argv"]]
        runpy.run_module("lbsession", run_name="__main__", alter_sys=True)  # as `python -m lbsession` runs it
        status = 0
    except SystemExit as exc:
        status = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # not the warm parent's exit path: its buffers and handlers are not the child's


def _main(argv: list[str]) -> None:
    """`python -m lbsession.lab.forks FD`: import what an app server runs, say so, then fork on request."""
    for module in PRELOADED:  # the point: imported once, here, for every child
        with contextlib.suppress(ImportError):  # redis-py is optional
            importlib.import_module(module)
    channel = socket.socket(fileno=int(argv[0]))
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    _serve(channel)


if __name__ == "__main__":
    _main(sys.argv[1:])
