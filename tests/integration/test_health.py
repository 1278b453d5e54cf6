"""Health checks like HAProxy's `option httpchk` (issue 12, point 4), through a real `lbsession lb` process.

The upstreams run in the test's loop on real sockets: an app that answers 400 unless
Host is its own name (Django's ALLOWED_HOSTS), one that accepts connections and
never answers, an address nothing listens on. The balancer is the command a user
runs, its flags included; the tests read its `/status` and its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.integration.proxy_fixtures import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAST = ["--health-interval", "0.2", "--health-timeout", "0.5", "--health-rise", "1", "--health-fall", "1"]
WAIT_S = 15.0  # a bound on every wait for the balancer to see a change; a passing test stays far below it
ALL_DOWN_STARTS = "every upstream fails its health check"
ALL_DOWN_ENDS = "upstreams pass their health check again"


@dataclass
class StrictHostApp:
    """An app that answers 400 unless the Host is one it serves, as Django does with ALLOWED_HOSTS."""

    server_id: str
    allowed: set[str] = field(default_factory=lambda: {"app.example"})
    checks: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path and query, Host) of /healthz
    status: int = 200  # what a check of an allowed host gets
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        host = request.headers.get("Host", "")
        if request.path == "/healthz" or request.path == "/ping":
            self.checks.append((request.method, request.path_qs, host))
        if self.allowed and host.split(":")[0] not in self.allowed:
            return web.Response(status=400, text="Bad Request (400)")
        status = self.status if request.path in ("/healthz", "/ping") else 200
        return web.Response(status=status, text=self.server_id, headers={"X-Served-By": self.server_id})


@dataclass
class HungUpstream:
    """Accepts connections, reads what comes, never answers."""

    heads: list[bytes] = field(default_factory=list)
    url: str = ""
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.heads.append(head)

    def requests(self) -> list[bytes]:
        """The heads it got that were not health checks."""
        return [h for h in self.heads if not h.startswith(b"GET /healthz ")]

    def abort_all(self) -> None:
        for writer in self._writers:
            writer.transport.abort()


class Balancer:
    """A running `lbsession lb`: its URLs, its log lines as they come, its `/status`."""

    def __init__(self, process: asyncio.subprocess.Process, url: str, admin: str) -> None:
        self.process, self.url, self.admin = process, url, admin
        self.log: list[str] = []
        self._reader = asyncio.create_task(self._read_log())

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log.append(line.decode(errors="replace").rstrip())

    def logged(self, text: str) -> list[str]:
        return [line for line in self.log if text in line]

    async def wait_logged(self, text: str) -> list[str]:
        """The log lines holding `text`, once there is one (the log is read as it comes)."""
        try:
            async with asyncio.timeout(WAIT_S):
                while not self.logged(text):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pytest.fail(f"the balancer never logged {text!r}:\n" + "\n".join(self.log[-20:]))
        return self.logged(text)

    async def status(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.admin + "/status") as response:
            result: dict[str, Any] = await response.json()
            return result

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as http, http.get(self.admin + "/metrics") as response:
            return await response.text()

    async def until(self, what: str, probe: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first `/status` for which `probe` holds (polled: the balancer's checks run on their own clock)."""
        status: dict[str, Any] = {}
        try:
            async with asyncio.timeout(WAIT_S):
                while not probe(status := await self.status()):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pytest.fail(f"the balancer never showed {what}: {status}\n" + "\n".join(self.log[-20:]))
        return status

    def server(self, status: dict[str, Any], server_id: str) -> dict[str, Any]:
        return next(s for s in status["servers"] if s["id"] == server_id)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
        async with asyncio.timeout(15):
            await self.process.wait()
            await self._reader


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as stack:
        yield stack


async def serve_app(stack: contextlib.AsyncExitStack, app: StrictHostApp) -> StrictHostApp:
    web_app = web.Application()
    web_app.router.add_route("*", "/{tail:.*}", app.handle)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    app.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return app


async def serve_hung(stack: contextlib.AsyncExitStack) -> HungUpstream:
    hung = HungUpstream()
    server = await asyncio.start_server(hung.serve, "127.0.0.1", 0)
    stack.push_async_callback(server.wait_closed)
    stack.callback(hung.abort_all)
    stack.callback(server.close)
    hung.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    return hung


async def start_lb(stack: contextlib.AsyncExitStack, upstreams: dict[str, str], *flags: str) -> Balancer:
    """`lbsession lb` on free ports in front of `upstreams`, once it says it is balancing."""
    words = [f"--upstream={server_id}={url}" for server_id, url in upstreams.items()]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbsession", "lb", "--port", "0", "--admin-port", "0", *words, *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(WAIT_S):
        line = (await process.stdout.readline()).decode()
    match = re.search(r" on (http://\S+) .*; admin on (http://\S+)", line)
    if match is None:
        _, err = await process.communicate()
        pytest.fail(f"lbsession lb did not start: {line!r} {err.decode()[-2000:]}")
    balancer = Balancer(process, match.group(1), match.group(2))
    stack.push_async_callback(balancer.stop)
    return balancer


async def get(url: str, host: str) -> tuple[int, str | None]:
    async with aiohttp.ClientSession() as http, http.get(url + "/page", headers={"Host": host}) as response:
        await response.read()
        return response.status, response.headers.get("X-Served-By")


def healthy(status: dict[str, Any]) -> dict[str, bool]:
    return {s["id"]: s["healthy"] for s in status["servers"]}


async def test_a_strict_allowed_hosts_app_is_down_by_default_and_up_with_its_host(
    stack: contextlib.AsyncExitStack,
) -> None:
    apps = [await serve_app(stack, StrictHostApp(f"django-{n}")) for n in (1, 2)]
    hung = await serve_hung(stack)
    upstreams = {a.server_id: a.url for a in apps} | {"hung": hung.url, "gone": f"http://127.0.0.1:{free_port()}"}

    # The issue's story: the checks' Host is the upstream's address, so Django answers 400 and every
    # upstream is down. Each says why, and the balancer says it routes to all of them anyway.
    lb = await start_lb(stack, upstreams, *FAST)
    status = await lb.until("every upstream down", lambda s: s.get("health", {}).get("all_down") is True)
    reasons = {s["id"]: s["down_reason"] for s in status["servers"]}
    assert reasons == {
        "django-1": "status 400 (expected 200-399)",
        "django-2": "status 400 (expected 200-399)",
        "hung": "timeout after 0.5 s",
        "gone": "connection refused",
    }
    assert lb.server(status, "django-1")["last_check"]["result"] == "status 400 (expected 200-399)"
    assert "requests go to all of them" in status["health"]["explanation"]
    await lb.wait_logged(ALL_DOWN_STARTS)
    assert lb.logged("django-1 (http")[-1].endswith("down: status 400 (expected 200-399), 1 check in a row")
    assert lb.logged("hung (http")[-1].endswith("down: timeout after 0.5 s, 1 check in a row")
    assert lb.logged("gone (http")[-1].endswith("down: connection refused, 1 check in a row")
    await lb.stop()

    # With the Host Django expects, its servers pass; the hung one fails on its timeout and never
    # gets a request.
    lb = await start_lb(stack, upstreams, *FAST, "--health-host", "app.example")
    expected = {"django-1": True, "django-2": True, "hung": False, "gone": False}
    status = await lb.until("django up, hung down", lambda s: bool(s) and healthy(s) == expected)
    assert status["health"]["all_down"] is False and status["health"]["checks"] == "active"
    assert "(Host: app.example)" in status["health"]["check"]
    assert all(check[2] == "app.example" for app in apps for check in app.checks[-1:])
    answers = [await get(lb.url, "app.example") for _ in range(12)]
    assert sorted({a for a in answers}) == [(200, "django-1"), (200, "django-2")]
    assert hung.requests() == []
    assert lb.logged(ALL_DOWN_STARTS) == []


async def test_all_down_is_said_in_status_and_logged_once_as_it_starts_and_ends(
    stack: contextlib.AsyncExitStack,
) -> None:
    apps = [await serve_app(stack, StrictHostApp(f"django-{n}")) for n in (1, 2)]
    lb = await start_lb(stack, {a.server_id: a.url for a in apps}, *FAST)
    await lb.until("every upstream down", lambda s: s.get("health", {}).get("all_down") is True)
    assert "\nlbsession_lb_all_upstreams_down 1.0\n" in await lb.metrics()
    # Still routed, as nginx does: the client gets the app's own answer rather than the balancer's 503.
    assert {await get(lb.url, "elsewhere.example") for _ in range(4)} == {(400, None)}
    assert (await get(lb.url, "app.example"))[0] == 200
    rounds = len(apps[0].checks)
    async with asyncio.timeout(WAIT_S):  # more failed rounds: the start is still said only once
        while len(apps[0].checks) < rounds + 3:
            await asyncio.sleep(0.05)
    apps[1].allowed.clear()  # one app now accepts any Host
    status = await lb.until("django-2 back up", lambda s: s["health"]["all_down"] is False)
    assert healthy(status) == {"django-1": False, "django-2": True}
    assert status["health"]["explanation"] is None and status["health"]["all_down_since"] is None
    assert {await get(lb.url, "elsewhere.example") for _ in range(4)} == {(200, "django-2")}
    await lb.wait_logged(ALL_DOWN_ENDS)
    assert len(lb.logged(ALL_DOWN_STARTS)) == 1
    assert len(lb.logged(ALL_DOWN_ENDS)) == 1
    assert "django-1: status 400 (expected 200-399)" in lb.logged(ALL_DOWN_STARTS)[0]
    assert "\nlbsession_lb_all_upstreams_down 0.0\n" in await lb.metrics()


async def test_method_path_host_and_expected_statuses_are_the_ones_configured(
    stack: contextlib.AsyncExitStack,
) -> None:
    app = await serve_app(stack, StrictHostApp("app", allowed=set(), status=204))
    flags = ["--health-method", "HEAD", "--health-path", "/ping?deep=1", "--health-host", "app.example:8000"]
    lb = await start_lb(stack, {"app": app.url}, *FAST, *flags, "--health-expect", "204,300-399")
    status = await lb.until("a passed check", lambda s: (lb.server(s, "app")["last_check"] or {}).get("ok") is True)
    assert app.checks[-1] == ("HEAD", "/ping?deep=1", "app.example:8000")
    assert lb.server(status, "app")["last_check"]["result"] == "status 204"
    app.status = 200  # passes by default, not with 204,300-399
    status = await lb.until("the app down", lambda s: not healthy(s)["app"])
    assert lb.server(status, "app")["down_reason"] == "status 200 (expected 204,300-399)"


async def test_health_off_is_passive_only(stack: contextlib.AsyncExitStack) -> None:
    app = await serve_app(stack, StrictHostApp("app", allowed=set(), status=404))  # no health route at all
    gone = f"http://127.0.0.1:{free_port()}"
    lb = await start_lb(stack, {"app": app.url, "gone": gone}, "--health", "off", "--health-interval", "0.5")
    status = await lb.status()
    assert status["health"]["checks"] == "passive only" and status["health"]["check"] is None
    assert healthy(status) == {"app": True, "gone": True}
    # Round robin sends one of these to `gone`: refused, it is taken out and the request goes to `app`.
    assert [await get(lb.url, "t") for _ in range(4)] == [(200, "app")] * 4
    assert app.checks == []  # no active check ever reached it
    [down] = await lb.wait_logged("): down: ")
    assert re.search(r"down: connect failed: .* \(passive check\)$", down), down
    # Passive only, nothing else would bring it back: it is tried again after the interval.
    await lb.until("gone tried again", lambda s: healthy(s)["gone"])
    [up] = await lb.wait_logged("): up: ")
    assert up.endswith(f"gone ({gone}): up: tried again after 0.5 s (passive check only)")


async def test_health_settings_come_from_yaml_and_a_reload_applies_them(
    stack: contextlib.AsyncExitStack, tmp_path: Any
) -> None:
    app = await serve_app(stack, StrictHostApp("django"))
    config = tmp_path / "lb.yaml"

    def write(health: dict[str, Any]) -> None:
        fast = {"interval_s": 0.2, "timeout_s": 0.5, "rise": 1, "fall": 1}
        balancer = {"upstreams": [{"id": "django", "url": app.url}], "health": fast | health}
        config.write_text(json.dumps({"balancer": balancer}))  # JSON is YAML

    write({})
    lb = await start_lb(stack, {}, "--config", str(config))
    await lb.until("django down", lambda s: not healthy(s)["django"])
    write({"host": "app.example", "expect": "200"})
    lb.process.send_signal(signal.SIGHUP)
    status = await lb.until("django up after the reload", lambda s: healthy(s)["django"])
    assert "GET /healthz (Host: app.example) expecting 200," in status["health"]["check"]
    assert app.checks[-1][2] == "app.example"
    write({"active": False})  # YAML's `active: false`, applied by a reload too
    lb.process.send_signal(signal.SIGHUP)
    await lb.until("passive only", lambda s: s["health"]["checks"] == "passive only")
