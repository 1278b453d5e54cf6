"""The balancer's admin API, on its own listener (loopback by default).

    GET    /status                    strategy, servers, counters (JSON)
    POST   /servers                   {"id", "url"}: add an upstream
    POST   /servers/{id}/drain        {"draining": true|false}: no new clients (default true)
    DELETE /servers/{id}              remove an upstream
    PUT    /strategy                  {"strategy": name}: switch the routing strategy

`lbsession run` adds routes that manage its own processes (kill, restart, add);
see lbsession.lab.topology.

Errors are JSON `{"error": "..."}` with a 4xx status that says what was wrong.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from lbsession.config import STRATEGY_NAMES
from lbsession.errors import ConfigError

if TYPE_CHECKING:
    from lbsession.balancer.balancer import LoadBalancer

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


def create_admin_app(lb: LoadBalancer) -> web.Application:
    """The admin application for `lb`."""
    app = web.Application()
    app[LB_KEY] = lb
    app.router.add_get("/status", _status)
    app.router.add_post("/servers", _add_server)
    app.router.add_post("/servers/{id}/drain", _drain)
    app.router.add_delete("/servers/{id}", _remove)
    app.router.add_put("/strategy", _set_strategy)
    return app


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[LB_KEY].status())


async def _add_server(request: web.Request) -> web.Response:
    body = await read_json(request)
    server_id, url = body.get("id"), body.get("url")
    if not isinstance(server_id, str) or not isinstance(url, str):
        return json_error(400, 'give {"id": "was-4", "url": "http://127.0.0.1:8004"}')
    try:
        upstream = request.app[LB_KEY].pool.add(server_id, url)
    except ConfigError as exc:
        return json_error(409 if "in use" in str(exc) else 400, str(exc))
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
    return web.json_response(lb.pool.drain(server_id, draining).as_dict())


async def _remove(request: web.Request) -> web.Response:
    lb = request.app[LB_KEY]
    server_id = request.match_info["id"]
    if server_id not in lb.pool.upstreams:
        return json_error(404, f"no server {server_id!r}; known: {', '.join(lb.pool.upstreams) or 'none'}")
    return web.json_response(lb.pool.remove(server_id).as_dict())


async def _set_strategy(request: web.Request) -> web.Response:
    lb = request.app[LB_KEY]
    name = (await read_json(request)).get("strategy")
    if name not in STRATEGY_NAMES:
        return json_error(400, f"strategy {name!r} is not valid; choose one of: {', '.join(STRATEGY_NAMES)}")
    lb.set_strategy(name)
    return web.json_response({"strategy": lb.strategy.name})
