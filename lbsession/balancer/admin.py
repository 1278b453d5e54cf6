"""The balancer's admin API, on its own listener (loopback by default).

    GET    /status                    strategy, servers, counters (JSON)
    POST   /servers                   {"id", "url"}: add an upstream
    POST   /servers/{id}/drain        {"draining": true|false, "timeout_s": 30}: no new clients; pinned
                                      ones until timeout_s (default drain_timeout_s), then redispatched
    DELETE /servers/{id}              remove an upstream
    PUT    /strategy                  {"strategy": name}: switch the routing strategy
    GET    /metrics                   Prometheus metrics (lbsession.balancer.metrics)

Nothing else: the balancer stands alone and imports no other part of lbsession.
Whoever starts it adds more routes to this application (`LoadBalancer.admin_extensions`):
`lbsession lb` the dashboard (lbsession.dashboard); `lbsession run` serves these same
routes from the lab's own control listener instead (lbsession.lab.control), beside
the routes that manage its processes and play scenarios.

Errors are JSON `{"error": "..."}` with a 4xx status that says what was wrong.

Who may use it (every route, the dashboard included): clients on loopback, and those in
`balancer.admin_allow`. A request that changes anything must also be JSON
(`Content-Type: application/json`, even with an empty `{}` body): a web page on another
site can make a browser send a plain POST to 127.0.0.1 without asking, but not a JSON one
(that needs a CORS preflight, which this API never grants), so a page visited in the
lab's browser cannot kill its servers. With `balancer.admin_token` set, which an admin
listener bound beyond loopback requires, changes also need `Authorization: Bearer <token>`.
Without a token, requests must also be addressed to 127.0.0.1 or localhost (the Host header),
so that a page whose domain was re-pointed at 127.0.0.1 (DNS rebinding) gets nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from yarl import URL

from lbsession.balancer.metrics import balancer_metrics_handler
from lbsession.balancer.strategies import STRATEGIES
from lbsession.errors import ConfigError, ServerIdInUse

if TYPE_CHECKING:
    from lbsession.balancer.balancer import LoadBalancer
    from lbsession.balancer.config import BalancerConfig

LB_KEY: web.AppKey[LoadBalancer] = web.AppKey("lb")


def json_error(status: int, message: str) -> web.Response:
    """A JSON error response the admin API and the topology routes share."""
    return web.json_response({"error": message}, status=status)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body ({} when empty); HTTPBadRequest naming the problem otherwise."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"the body is not valid JSON: {exc}"}), content_type="application/json"
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "the body must be a JSON object"}), content_type="application/json"
        )
    return body


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_guard(config: BalancerConfig) -> Middleware:
    """The middleware that keeps the admin API to its allowed clients, and changes to JSON and the token."""
    allowed = [ipaddress.ip_network(cidr, strict=False) for cidr in config.admin_allow]
    token = config.admin_token

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not _client_allowed(request.remote, allowed):
            return json_error(403, "the admin API answers loopback clients only; allow more with balancer.admin_allow")
        if token is None and _host_name(request.host) not in _LOOPBACK_NAMES:
            # DNS rebinding: a page whose domain now resolves to 127.0.0.1 is same-origin with us and may
            # send JSON; it still names its own domain in Host. With a token, the token decides instead.
            return json_error(403, "without balancer.admin_token, the admin API answers only to 127.0.0.1 or localhost")
        if request.method in _SAFE_METHODS:
            return await handler(request)
        if request.content_type != "application/json":
            return json_error(415, "changes must be sent as JSON (Content-Type: application/json), even an empty {}")
        if token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
                return json_error(401, "this admin API needs Authorization: Bearer <balancer.admin_token>")
        return await handler(request)

    return guard


_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def _host_name(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8081" is "::1")."""
    try:
        return URL(f"http://{host}").host or ""
    except ValueError:
        return ""


def _client_allowed(remote: str | None, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False  # a Unix socket or an unknown peer: not an address we were asked to trust
    return address.is_loopback or any(address in network for network in allowed)


def create_admin_app(lb: LoadBalancer) -> web.Application:
    """The admin application for `lb`: its guard, its routes, and those its starter added."""
    app = web.Application(middlewares=[admin_guard(lb.config)])
    add_admin_routes(app, lb)
    for extend in lb.admin_extensions:
        extend(app)
    return app


def add_admin_routes(app: web.Application, lb: LoadBalancer) -> None:
    """The balancer's admin routes, on `app` (its own admin application, or a lab's control listener)."""
    app[LB_KEY] = lb
    app.router.add_get("/status", _status)
    app.router.add_post("/servers", _add_server)
    app.router.add_post("/servers/{id}/drain", _drain)
    app.router.add_delete("/servers/{id}", _remove)
    app.router.add_put("/strategy", _set_strategy)
    app.router.add_get("/metrics", balancer_metrics_handler(lb))


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[LB_KEY].status())


async def _add_server(request: web.Request) -> web.Response:
    body = await read_json(request)
    server_id, url = body.get("id"), body.get("url")
    if not isinstance(server_id, str) or not isinstance(url, str):
        return json_error(
            400,
            'give {"id": "was-4", "url": "http://127.0.0.1:8004"}, an app server already running; in '
            "`lbsession run`, POST /topology/servers starts one and adds it",
        )
    try:
        upstream = request.app[LB_KEY].pool.add(server_id, url)
    except ServerIdInUse as exc:
        return json_error(409, str(exc))
    except ConfigError as exc:
        return json_error(400, str(exc))
    return web.json_response(upstream.as_dict(), status=201)


async def _drain(request: web.Request) -> web.Response:
    lb = request.app[LB_KEY]
    server_id = request.match_info["id"]
    body = await read_json(request)
    draining = body.get("draining", True)
    if server_id not in lb.pool.upstreams:
        return json_error(404, f"no server {server_id!r}; known: {', '.join(lb.pool.upstreams) or 'none'}")
    if not isinstance(draining, bool):
        return json_error(400, '"draining" must be true or false')
    timeout_s = body.get("timeout_s", lb.config.drain_timeout_s)
    is_seconds = isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s >= 0
    if timeout_s is not None and not is_seconds:
        return json_error(400, '"timeout_s" must be a number of seconds >= 0, or null to keep pinned clients forever')
    return web.json_response(lb.pool.drain(server_id, draining, timeout_s).as_dict())


async def _remove(request: web.Request) -> web.Response:
    lb = request.app[LB_KEY]
    server_id = request.match_info["id"]
    if server_id not in lb.pool.upstreams:
        return json_error(404, f"no server {server_id!r}; known: {', '.join(lb.pool.upstreams) or 'none'}")
    return web.json_response(lb.pool.remove(server_id).as_dict())


async def _set_strategy(request: web.Request) -> web.Response:
    lb = request.app[LB_KEY]
    name = (await read_json(request)).get("strategy")
    if name not in STRATEGIES:
        return json_error(400, f"strategy {name!r} is not valid; choose one of: {', '.join(STRATEGIES)}")
    lb.set_strategy(name)
    return web.json_response({"strategy": lb.strategy.name})
