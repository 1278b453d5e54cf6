"""The dashboard's routes on the balancer's admin listener.

GET  /                  the dashboard page
GET  /dashboard/...     its script, styles and images (static/)
GET  /events            the event stream (Server-Sent Events, see lbsession.balancer.events)
POST /demo/login        {"username"}: that demo user logs in through the balancer
POST /demo/me           {"username"}: that demo user asks GET /me through the balancer
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from lbsession.dashboard.demo import DemoUsers

if TYPE_CHECKING:
    from lbsession.balancer.balancer import LoadBalancer

STATIC_DIR = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0  # a comment this often, so a viewer that went away is noticed by a failed write
# Linux grows a socket's send buffer up to 4 MB (tcp_wmem): ~16,000 events a stalled viewer would
# replay minutes late. A fixed small buffer makes backpressure, and so dropping, start early.
STREAM_SNDBUF_BYTES = 64 * 1024
MAX_USERNAME_CHARS = 32
DEMO_KEY: web.AppKey[DemoUsers] = web.AppKey("lbsession_demo_users")
_NO_CACHE = {"Cache-Control": "no-cache"}  # a lab upgraded in place must not serve yesterday's page


def add_dashboard_routes(app: web.Application, lb: LoadBalancer) -> None:
    """Serve the dashboard, the event stream and the demo users on the admin application."""

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers=_NO_CACHE)

    async def events(request: web.Request) -> web.StreamResponse:
        return await stream_events(request, lb)

    async def demo(request: web.Request) -> web.Response:
        return await _demo(request, request.app[DEMO_KEY])

    async def close_streams(app: web.Application) -> None:
        lb.events.close()  # ends every /events handler, which would otherwise hold the shutdown up

    async def close_demo_users(app: web.Application) -> None:
        await app[DEMO_KEY].close()

    # The admin application is made once the public listener is bound, so lb.url is final here.
    app[DEMO_KEY] = DemoUsers(lb.url, lb.events.session_cookie)
    app.router.add_get("/", index)
    app.router.add_static("/dashboard", STATIC_DIR)
    app.router.add_get("/events", events)
    app.router.add_post("/demo/{action:login|me}", demo)
    app.on_shutdown.append(close_streams)
    app.on_cleanup.append(close_demo_users)


async def stream_events(request: web.Request, lb: LoadBalancer) -> web.StreamResponse:
    """Relay the balancer's events as Server-Sent Events until the viewer leaves or the balancer stops."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF_BYTES)
    await response.prepare(request)
    subscription = lb.events.subscribe()
    try:
        await response.write(b"retry: 2000\n: lbsession events\n\n")
        while (batch := await subscription.next_batch(timeout_s=KEEPALIVE_S)) is not None:
            payload = b"".join(b"data: %s\n\n" % json.dumps(event).encode() for event in batch)
            # The write waits while the viewer's socket is full; meanwhile its queue fills and
            # the bus drops for it alone (see lbsession.balancer.events). The proxy never waits.
            await response.write(payload or b": keep-alive\n\n")
    except ConnectionError:  # the viewer went away: aiohttp cannot write to a closing transport
        pass
    finally:
        lb.events.unsubscribe(subscription)
    return response


async def _demo(request: web.Request, users: DemoUsers) -> web.Response:
    """One request of a demo user through the balancer: what it got back, and its tag in the events."""
    if request.content_type != "application/json":
        # JSON only: a cross-site form cannot send it without a CORS preflight, which this API never grants.
        return web.json_response({"error": "send a JSON body with Content-Type: application/json"}, status=415)
    try:
        body = await request.json()
    except ValueError:
        body = None
    username = body.get("username") if isinstance(body, dict) else None
    if not isinstance(username, str) or not username.strip() or len(username) > MAX_USERNAME_CHARS:
        return web.json_response(
            {"error": f'give {{"username": "alice"}}, 1 to {MAX_USERNAME_CHARS} characters'}, status=400
        )
    if not username.isprintable():
        return web.json_response({"error": "the username must be printable text"}, status=400)
    username = username.strip()
    if request.match_info["action"] == "login":
        reply = await users.request(username, "POST", "/login", {"username": username})
    else:
        reply = await users.request(username, "GET", "/me")
    return web.json_response(reply)
