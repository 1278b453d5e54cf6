"""The lab's control listener: the admin port of `lbsession run`, whichever balancer is in front.

    GET  /topology                      the lab's processes: servers with their pids, Redis nodes, logs
    POST /topology/servers              start one more app server and put it behind the balancer
    POST /servers/{id}/kill, /restart   SIGKILL an app server; start it again on its port
    POST /servers/{id}/deploy           a rolling deploy: drain, out of the rotation, wait in flight, restart, undrain
    POST /servers/{id}/cluster/cut      stop replication from a cluster server (to {"peer"}, or all); /heal
    POST /redis/primary/kill            SIGKILL the current Redis primary
    POST /redis/{name}/restart          start a Redis node again (HA: a synced replica; {"empty": true}: empty master)
    GET/POST /scenarios, GET /scenarios/current   play a scenario against this lab (lbsession.lab.live)
    GET /links, PUT/DELETE /links/{name}          the lab's links: their faults, bytes, connections; set, heal
    POST /partitions, DELETE /partitions/{name}   cut a set of links both ways; heal (lbsession.lab.link_service)

and, through the balancer's adapter (`BalancerView`), whatever that balancer
offers itself: for lbsession's own, its admin API (`/status`, `/servers`,
`/strategy`, `/metrics`: lbsession.balancer.admin) and the dashboard with its
event stream (lbsession.dashboard). The lab's routes and the scenarios depend
only on the view, so another balancer can be put in front without the
dashboard, the faults or the scenarios losing their API.

The listener has the admin API's guard (loopback, JSON changes, the token):
it can kill processes.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from lbsession.balancer.admin import add_admin_routes, admin_guard, json_error, read_json
from lbsession.config import BalancerConfig
from lbsession.dashboard.routes import add_dashboard_routes
from lbsession.errors import TopologyError
from lbsession.lab.live import LiveScenarios

if TYPE_CHECKING:
    from lbsession.balancer.balancer import LoadBalancer
    from lbsession.lab.topology import Topology

log = logging.getLogger(__name__)


class BalancerView(Protocol):
    """What the lab needs to know of the balancer in front of it, whichever balancer that is."""

    @property
    def url(self) -> str:
        """The public URL users reach."""

    def strategy_name(self) -> str:
        """The routing strategy in force, by lbsession's name for it."""

    def served(self) -> dict[str, int]:
        """Requests the balancer sent to each server so far, by server id."""

    def install(self, app: web.Application) -> None:
        """Add the balancer's own routes (status, admin, dashboard) to the control application."""


class LbsessionView:
    """lbsession's own balancer, running in this process: its admin API and the dashboard come along."""

    def __init__(self, lb: LoadBalancer) -> None:
        self.lb = lb

    @property
    def url(self) -> str:
        """The balancer's public URL."""
        return self.lb.url

    def strategy_name(self) -> str:
        """The strategy the balancer routes with now."""
        return self.lb.strategy.name

    def served(self) -> dict[str, int]:
        """Requests sent to each upstream, retries included."""
        return {server_id: u.requests for server_id, u in self.lb.pool.upstreams.items()}

    def install(self, app: web.Application) -> None:
        """The balancer's admin API and the dashboard, on the lab's listener."""
        add_admin_routes(app, self.lb)
        add_dashboard_routes(app, self.lb)


class LabControl:
    """The lab's control application on the admin port: process controls, scenarios, the balancer's view."""

    def __init__(self, topology: Topology, view: BalancerView, config: BalancerConfig) -> None:
        self.topology = topology
        self.view = view
        self.config = config
        self.scenarios = LiveScenarios(self)
        self.port = config.admin_port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The control listener's URL (the lab's admin URL)."""
        host = self.config.admin_host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind the control listener (port 0 allowed; the bound port is read back)."""
        app = web.Application(middlewares=[admin_guard(self.config)])
        self.view.install(app)
        self._add_routes(app)
        self.scenarios.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.admin_host, self.config.admin_port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop a scenario in progress, then the listener."""
        await self.scenarios.cancel()  # its users would hold the balancer's grace period up
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/topology", self._get_topology)
        app.router.add_post("/topology/servers", self._post_add)
        app.router.add_post("/servers/{id}/kill", self._post_kill)
        app.router.add_post("/servers/{id}/restart", self._post_restart)
        app.router.add_post("/servers/{id}/deploy", self._post_deploy)
        app.router.add_post("/redis/primary/kill", self._post_kill_redis)
        app.router.add_post("/redis/{name}/restart", self._post_restart_redis)
        app.router.add_post("/servers/{id}/cluster/cut", self._post_cut)
        app.router.add_post("/servers/{id}/cluster/heal", self._post_cut)
        app.router.add_get("/links", self._links_call)
        app.router.add_get("/links/{name}", self._links_call)
        app.router.add_put("/links/{name}", self._links_call)
        app.router.add_delete("/links/{name}", self._links_call)
        app.router.add_get("/partitions", self._links_call)
        app.router.add_post("/partitions", self._links_call)
        app.router.add_delete("/partitions/{name}", self._links_call)

    async def _get_topology(self, request: web.Request) -> web.Response:
        info = self.topology.ready_info()
        if self.topology.redis is not None and info["redis"] is not None:
            roles = await self.topology.redis.roles()  # asked of each node now: a failover shows at once
            for node in info["redis"]["nodes"]:
                node["role"] = roles[node["name"]]
        return web.json_response(info)

    async def _post_add(self, request: web.Request) -> web.Response:
        await read_json(request)
        try:
            server = await self.topology.add_server()
        except TopologyError as exc:
            return json_error(500, str(exc))
        return web.json_response(server.as_dict(), status=201)

    async def _post_kill(self, request: web.Request) -> web.Response:
        try:
            server = await self.topology.kill_server(request.match_info["id"])
        except TopologyError as exc:
            return json_error(404 if "no managed" in str(exc) else 409, str(exc))
        return web.json_response({**server.as_dict(), "signal": signal.SIGKILL.name})

    async def _post_restart(self, request: web.Request) -> web.Response:
        try:
            server = await self.topology.restart_server(request.match_info["id"])
        except TopologyError as exc:
            return json_error(404 if "no managed" in str(exc) else 500, str(exc))
        except TimeoutError:
            return json_error(504, f"{request.match_info['id']} restarted but did not pass its health check in time")
        return web.json_response(server.as_dict())

    async def _post_deploy(self, request: web.Request) -> web.Response:
        timeout_s = (await read_json(request)).get("drain_timeout_s", 5.0)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not 0 <= timeout_s <= 600:
            return json_error(400, f'"drain_timeout_s" must be a number of seconds from 0 to 600, not {timeout_s!r}')
        try:
            return web.json_response(await self.topology.deploy_server(request.match_info["id"], timeout_s))
        except TopologyError as exc:
            return json_error(404 if "no managed" in str(exc) else 500, str(exc))
        except TimeoutError:
            return json_error(504, f"{request.match_info['id']} restarted but did not pass its health check in time")

    async def _post_cut(self, request: web.Request) -> web.Response:
        peer = (await read_json(request)).get("peer")
        if peer is not None and not isinstance(peer, str):
            return json_error(400, 'give {"peer": "was-2"}, or no body to cut every peer')
        cut = request.path.endswith("/cut")
        try:
            return web.json_response(await self.topology.cut_peer(request.match_info["id"], peer, cut=cut))
        except TopologyError as exc:
            return json_error(404 if "no managed" in str(exc) else 409, str(exc))

    async def _links_call(self, request: web.Request) -> web.Response:
        """Forward to the links process, which checks the request whole (a 400 changes nothing)."""
        links = self.topology.links
        if links is None:
            return json_error(409, "this lab runs without links (--links off); start it with --links on")
        body = await read_json(request) if request.method in ("PUT", "POST") else None
        try:
            status, answer = await links.call(request.method, request.path, body)
        except TopologyError as exc:
            return json_error(502, str(exc))
        if status < 300 and request.method != "GET":
            log.info("%s %s: %s", request.method, request.path, body or "healed")
        return web.json_response(answer, status=status)

    async def _post_kill_redis(self, request: web.Request) -> web.Response:
        redis = self.topology.redis
        if redis is None:
            return json_error(409, "this lab did not start a Redis (backend is not redis, or --redis-url was given)")
        try:
            node = await redis.kill_primary()
        except TopologyError as exc:
            return json_error(409, str(exc))
        return web.json_response({**node.as_dict(), "signal": signal.SIGKILL.name})

    async def _post_restart_redis(self, request: web.Request) -> web.Response:
        redis = self.topology.redis
        if redis is None:
            return json_error(409, "this lab did not start a Redis (backend is not redis, or --redis-url was given)")
        empty = (await read_json(request)).get("empty", False)
        if not isinstance(empty, bool):
            return json_error(400, f'"empty" must be true or false, not {empty!r}')
        try:
            node = await redis.restart(request.match_info["name"], empty=empty)
        except TopologyError as exc:
            return json_error(404 if "no Redis node" in str(exc) else 500, str(exc))
        return web.json_response(node.as_dict())
