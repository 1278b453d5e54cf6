"""A real balancer in front of the lab: its config written from the topology, its binary a child the lab owns.

`BalancerFront` is what HAProxy and nginx share: the child process (through
lbsession.lab.process: a log file in the run's folder, ready when its public
port answers, stopped by handle), and the routes it adds to the lab's control
listener in place of lbsession's admin API:

    GET    /status               the servers, the strategy, and what this balancer cannot show (`unseen`)
    POST   /servers/{id}/drain   no new clients for that server (as the balancer can do it)
    DELETE /servers/{id}         out of the balancer
    PUT    /strategy             409: a real balancer's strategy is in its config file
    GET    /                     a page saying the live dashboard follows lbsession's own balancer only

A subclass writes the config (`render`), applies the changes (`add`, `drain`,
`remove`) and says how far it can be seen (`refresh`, `unseen`).
"""

from __future__ import annotations

import asyncio
import contextlib
from html import escape
from pathlib import Path
from typing import Any, ClassVar

from aiohttp import web

from lbsession.balancer.admin import json_error, read_json
from lbsession.config import Config
from lbsession.errors import ConfigError, TopologyError
from lbsession.lab.balancers import require_binary
from lbsession.lab.process import HOST, Child, free_port, http_status, spawn, wait_http

READY_TIMEOUT_S = 20.0
REFRESH_S = 0.5  # how often the balancer's own counters are read back while it runs


class BalancerFront:
    """One real balancer run by the lab, and its view for the lab's control listener (see BalancerView)."""

    name: ClassVar[str]
    # Metrics a client cannot measure without the balancer's own counters, with the reason this one lacks them.
    unseen: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Config, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.port = config.balancer.port or free_port()  # a real balancer cannot report a port 0 it bound
        self.servers: dict[str, int] = {}  # server id -> port, as the balancer knows them
        self.states: dict[str, str] = {}  # server id -> ready | drain | removed, as the lab set them
        self.counts: dict[str, int] = {}  # requests per server, when the balancer shows them
        self.in_flight: dict[str, int] = {}  # requests in flight per server, when the balancer shows them
        self.up: dict[str, bool] = {}  # does the balancer's own check count the server up, when it shows it
        self.process: Child | None = None
        self._refresher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ for a subclass

    @property
    def cookie(self) -> str | None:
        """The name of the balancer's own server cookie, if it sets one."""
        return None

    def render(self) -> str:
        """The balancer's config file for the servers in `self.servers` and their states."""
        raise NotImplementedError

    def argv(self, config_path: Path) -> list[str]:
        """The command line that runs the balancer in the foreground with `config_path`."""
        raise NotImplementedError

    def check_argv(self, config_path: Path) -> list[str]:
        """The command line that checks `config_path` without running it."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """What differs from what the lab asked for (a strategy the balancer does not have)."""
        return []

    @classmethod
    def refusals(cls, config: Config) -> list[str]:
        """The settings of `config` this balancer has no way to honour, each with what to do instead.

        A lab refuses to start with any (ConfigError) rather than run without them unnoticed.
        """
        if config.balancer.strategy == "sticky-cookie" and config.balancer.sticky.mode == "balanced":
            return [
                f"--sticky-mode balanced: {cls.name} has no balanced sticky mode (ingress-nginx's, a Lua balancer); "
                "run it with --balancer lbsession, or drop --sticky-mode"
            ]
        return []

    @classmethod
    def refuse(cls, config: Config) -> None:
        """ConfigError (exit 2) naming every setting of `config` this balancer cannot honour."""
        problems = cls.refusals(config)
        if problems:
            raise ConfigError(f"--balancer {cls.name} cannot run this lab: " + "; ".join(problems))

    async def apply(self, server_id: str) -> None:
        """Make the running balancer follow the new state of `server_id`."""
        raise NotImplementedError

    async def refresh(self) -> None:
        """Read the balancer's own counters into `self.counts`, if it has any."""

    async def wait_up(self, server_id: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once the balancer would send requests to `server_id` again."""
        async with asyncio.timeout(timeout_s):
            while await http_status(self.servers[server_id], self.config.balancer.health.path) != 200:  # noqa: ASYNC110 - each turn is a real probe
                await asyncio.sleep(self.config.balancer.health.interval_s / 4)

    # ------------------------------------------------------------------ lifecycle

    @property
    def binary(self) -> str:
        """The installed binary; ConfigError naming the apt package when it is missing."""
        return require_binary(self.name)

    @property
    def url(self) -> str:
        """The public URL users reach."""
        return f"http://{HOST}:{self.port}"

    @property
    def listen(self) -> str:
        """The public listener's address:port, as the config file writes it (the lab's --host)."""
        host = self.config.balancer.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def config_path(self) -> Path:
        """Where the generated config is written, in the run's log folder."""
        return self.log_dir / f"{self.name}.conf"

    async def start(self, servers: dict[str, int]) -> None:
        """Write the config, check it, start the binary; return once its public port answers."""
        self.servers = dict(servers)
        self.states = dict.fromkeys(servers, "ready")
        self.write_config()
        await self.check_config()
        self.process = spawn(self.name, self.argv(self.config_path), self.log_dir / f"{self.name}.log")
        await wait_http(self.process, self.port, self.config.balancer.health.path, READY_TIMEOUT_S)
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        """Stop the binary (SIGTERM, then SIGKILL after the grace period) and reap it."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self.process is not None:
            await self.process.stop()

    def write_config(self) -> None:
        """Write the config for the current servers and states."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render())

    async def check_config(self) -> None:
        """Run the binary's own check on the written config; TopologyError with its output otherwise."""
        proc = await asyncio.create_subprocess_exec(
            *self.check_argv(self.config_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            tail = " | ".join(output.decode(errors="replace").strip().splitlines()[-3:])
            raise TopologyError(f"{self.name} refused its generated config {self.config_path}: {tail}")

    async def _refresh_forever(self) -> None:
        while True:
            with contextlib.suppress(OSError, TopologyError):
                await self.refresh()
            await asyncio.sleep(REFRESH_S)

    # ------------------------------------------------------------------ changes

    async def add(self, server_id: str, port: int) -> None:
        """Put a newly started app server behind the balancer."""
        self.servers[server_id] = port
        self.states[server_id] = "ready"
        await self.apply(server_id)

    async def set_state(self, server_id: str, state: str) -> None:
        """`drain` or `removed`; TopologyError when the balancer does not know the server."""
        if self.states.get(server_id, "removed") == "removed":
            raise TopologyError(f"no server {server_id!r} behind {self.name}; known: {', '.join(self.active())}")
        self.states[server_id] = state
        await self.apply(server_id)

    def active(self) -> list[str]:
        """The servers behind the balancer, drained ones included."""
        return [s for s, state in self.states.items() if state != "removed"]

    # ------------------------------------------------------------------ the view (lbsession.lab.control)

    def strategy_name(self) -> str:
        """The strategy, by lbsession's name for it (the config was written from it)."""
        return self.config.balancer.strategy

    def served(self) -> dict[str, int]:
        """Requests per server as the balancer counted them; 0 where it shows nothing."""
        return {server_id: self.counts.get(server_id, 0) for server_id in self.active()}

    def status(self) -> dict[str, Any]:
        """`GET /status` in the shape of lbsession's own, plus what this balancer cannot show."""
        servers = [
            {"id": s, "url": f"http://{HOST}:{self.servers[s]}", "state": self.states[s],
             "requests": self.counts.get(s),
             **({"in_flight": self.in_flight[s], "healthy": self.up.get(s, False)} if s in self.in_flight else {})}
            for s in self.active()
        ]  # fmt: skip
        return {
            "balancer": self.name,
            "strategy": self.strategy_name(),
            "strategies": [self.strategy_name()],
            "url": self.url,
            "cookie": self.cookie,
            "servers": servers,
            "counters": {"routes": {}},  # routing reasons are lbsession's own; no real balancer reports them
            "unseen": dict(self.unseen),
            "notes": self.notes(),
            "config": str(self.config_path),
            "pid": self.process.pid if self.process is not None else None,
        }

    def install(self, app: web.Application) -> None:
        """The balancer's routes on the lab's control listener."""
        app.router.add_get("/status", self._get_status)
        app.router.add_post("/servers/{id}/drain", self._post_drain)
        app.router.add_delete("/servers/{id}", self._delete)
        app.router.add_put("/strategy", self._put_strategy)
        app.router.add_get("/", self._index)

    async def _get_status(self, request: web.Request) -> web.Response:
        with contextlib.suppress(OSError, TopologyError):
            await self.refresh()
        return web.json_response(self.status())

    async def _post_drain(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        state = "drain" if body.get("draining", True) else "ready"
        return await self._change(request.match_info["id"], state)

    async def _delete(self, request: web.Request) -> web.Response:
        return await self._change(request.match_info["id"], "removed")

    async def _change(self, server_id: str, state: str) -> web.Response:
        try:
            await self.set_state(server_id, state)
        except TopologyError as exc:
            return json_error(404 if "no server" in str(exc) else 500, str(exc))
        return web.json_response({"id": server_id, "state": state, "balancer": self.name})

    async def _put_strategy(self, request: web.Request) -> web.Response:
        await read_json(request)
        return json_error(
            409, f"{self.name}'s strategy is in its config file; start the lab again with --strategy to change it"
        )

    async def _index(self, request: web.Request) -> web.Response:
        """A page in place of the live dashboard, which follows lbsession's own balancer's events only."""
        with contextlib.suppress(OSError, TopologyError):
            await self.refresh()
        status = self.status()
        cells = [
            (s["id"], s["state"], "not shown" if s["requests"] is None else str(s["requests"]))
            for s in status["servers"]
        ]
        rows = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in cells)
        unseen = "".join(f"<li>{escape(metric)}: {escape(why)}</li>" for metric, why in status["unseen"].items())
        page = (
            f"<!doctype html><title>lbsession lab: {self.name}</title><h1>{self.name} in front of this lab</h1>"
            f"<p>The live dashboard follows lbsession's own balancer's events, which {self.name} does not emit. "
            f"Faults and scenarios work as with lbsession (/topology, /servers/..., /scenarios); GET /status "
            f"is this page as JSON.</p><table><tr><th>server</th><th>state</th><th>requests</th></tr>{rows}</table>"
            f"<p>What {self.name} cannot show:</p><ul>{unseen}</ul>"
        )
        return web.Response(text=page, content_type="text/html")
