"""The demo app server (WAS): the HTTP contract of docs/architecture.md over a pluggable session store.

    POST /login    {"username"} or a form   rotate the session id, hold the user; 200 or 303 to /me for browsers
    GET  /login                             a tiny HTML form, where browsers are sent when not logged in
    GET  /me                                200 {"user", "server"}; 401, or 302 to /login for browsers
                   ?work_ms=N               first wait N ms (at most 1000), as a page waiting on its database does
    POST /logout                            destroy the session; 200
    POST /cart     {"item"}                 append to the session's cart (needs login); ?work_ms=N as for /me
    GET  /cart                              read it (needs login)
    POST /prefs    {"name", "value"}        set one preference, another attribute than the cart (needs login)
    GET  /prefs                             read them (needs login)
    GET  /healthz                           200 {"server", "backend", "sessions"}; 503 when the store is down
    GET  /headers                           the request headers as this server received them (what the LB forwarded)
    GET  /ws                                a WebSocket: each text message is answered {"user", "server", "echo"};
                                            closed with 4401 "login required" without a session
    GET  /metrics                           Prometheus: requests, re-logins, store calls (lbsession.appserver.metrics)

Every response, errors and 404s included, carries `X-Served-By: <server id>`:
the lab counts requests per server and follows a user across servers by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import signal
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from lbsession.appserver.config import AppServerConfig
from lbsession.appserver.lab_control import add_lab_routes
from lbsession.appserver.metrics import ASKED_TO_LOG_IN, AppMetrics
from lbsession.appserver.session import Session, get_session, session_middleware
from lbsession.appserver.stores import SessionStore, Store, create_store
from lbsession.errors import StoreUnavailable

CONFIG = web.AppKey("lbsession_config", AppServerConfig)
STORE = web.AppKey("lbsession_store", Store)

MAX_TEXT_CHARS = 64
MAX_WORK_MS = 1000  # GET /me?work_ms=N: a page that waits, so that requests are in flight long enough to count
WS_LOGIN_REQUIRED = 4401  # a private-use close code (RFC 6455 §7.4.2): HTTP's 401, said on a WebSocket
# The cart travels whole with every change (cluster replication) and every load (Redis), so normal use
# must not grow it without bound: 100 items of 64 characters stay far below the cluster's frame limit.
MAX_CART_ITEMS = 100
MAX_PREFS = 100  # the same bound for the preferences
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def create_app(config: AppServerConfig, store: Store) -> web.Application:
    """The aiohttp application of one app server; the caller owns the store's start and close."""
    metrics = AppMetrics(config, store)  # outermost, so it sees the session layer's 503s too
    app = web.Application(
        middlewares=[metrics.middleware, session_middleware(metrics.store, config.session, server_id=config.id)]
    )
    app[CONFIG] = config
    app[STORE] = store

    async def served_by(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Served-By"] = config.id

    # A signal, not a middleware: it also reaches the router's 404/405 and aiohttp's own 500.
    app.on_response_prepare.append(served_by)
    app.router.add_post("/login", login)
    app.router.add_get("/login", login_form)
    app.router.add_get("/me", me)
    app.router.add_post("/logout", logout)
    app.router.add_post("/cart", add_to_cart)
    app.router.add_get("/cart", read_cart)
    app.router.add_post("/prefs", set_pref)
    app.router.add_get("/prefs", read_prefs)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/headers", echo_headers)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/metrics", metrics.handle)
    add_lab_routes(app, store)  # only with a lab token: see lbsession.appserver.lab_control
    return app


# --------------------------------------------------------------------------- routes


async def login(request: web.Request) -> web.StreamResponse:
    """Start a fresh session id holding the user (rotation: a planted id never becomes a logged-in one)."""
    body = await _read_body(request, example='{"username": "alice"}')
    username = _text_field(request, body, "username")
    session = await get_session(request)
    if session.get("user") not in (None, username):
        session.clear()  # another user logging in on this browser must not inherit the previous user's cart
    session.rotate()
    session["user"] = username
    if _prefers_html(request):
        raise web.HTTPSeeOther("/me")  # 303: the browser follows with a GET
    return _reply(request, {"user": username})


async def login_form(request: web.Request) -> web.Response:
    """A minimal HTML login form, so the browser redirect of /me leads somewhere useful."""
    server = html.escape(request.app[CONFIG].id)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>lbsession login</title></head><body>"
        f"<h1>Log in</h1><p>served by <b>{server}</b></p>"
        "<form method='post' action='/login'>"
        f"<input name='username' maxlength='{MAX_TEXT_CHARS}' required autofocus>"
        "<button type='submit'>Log in</button></form></body></html>"
    )
    return web.Response(text=page, content_type="text/html")


async def _work(request: web.Request) -> None:
    """Wait `?work_ms=N` first, as a page waiting on its database does; a 400 for a time it cannot wait."""
    work = request.query.get("work_ms")
    if work is not None:
        if not work.isdecimal() or int(work) > MAX_WORK_MS:
            raise _json_error(request, web.HTTPBadRequest, f"work_ms must be a whole number from 0 to {MAX_WORK_MS}")
        await asyncio.sleep(int(work) / 1000)  # waiting, not computing: many such requests are in flight at once


async def me(request: web.Request) -> web.Response:
    """Who is logged in; the request the lab repeats to catch a re-login."""
    await _work(request)
    session = await get_session(request)
    if "user" not in session:
        if _prefers_html(request):
            raise web.HTTPFound("/login")
        raise _json_error(request, web.HTTPUnauthorized, "login required")
    return _reply(request, {"user": session["user"]})


async def logout(request: web.Request) -> web.Response:
    """Destroy the session in the store and expire the cookie; fine without a session too."""
    session = await get_session(request)
    session.invalidate()
    return _reply(request, {"logged_out": True})


async def add_to_cart(request: web.Request) -> web.Response:
    """Append an item to the session's cart: a read-modify-write, so concurrent appends can race."""
    await _work(request)  # before anything is written: a write in flight when its server dies was never made
    session = await _logged_in_session(request)
    item = _text_field(request, await _read_body(request, example='{"item": "apple"}'), "item")
    if len(session.get("cart", [])) >= MAX_CART_ITEMS:
        raise _json_error(request, web.HTTPBadRequest, f"the cart is full ({MAX_CART_ITEMS} items); remove some")
    cart = [*session.get("cart", []), item]
    session["cart"] = cart
    return _reply(request, {"cart": cart})


async def read_cart(request: web.Request) -> web.Response:
    """The session's cart."""
    session = await _logged_in_session(request)
    return _reply(request, {"cart": session.get("cart", [])})


async def set_pref(request: web.Request) -> web.Response:
    """Set one preference: `prefs` is its own attribute, so a server-side store writes it apart from the cart."""
    session = await _logged_in_session(request)
    body = await _read_body(request, example='{"name": "theme", "value": "dark"}')
    name, value = _text_field(request, body, "name"), _text_field(request, body, "value")
    prefs = dict(session.get("prefs", {}))
    if name not in prefs and len(prefs) >= MAX_PREFS:
        raise _json_error(request, web.HTTPBadRequest, f"too many preferences ({MAX_PREFS}); change existing ones")
    prefs[name] = value
    session["prefs"] = prefs
    return _reply(request, {"prefs": prefs})


async def read_prefs(request: web.Request) -> web.Response:
    """The session's preferences."""
    session = await _logged_in_session(request)
    return _reply(request, {"prefs": session.get("prefs", {})})


async def _logged_in_session(request: web.Request) -> Session:
    """The session of a logged-in user, or a 401 that says so."""
    session = await get_session(request)
    if "user" not in session:
        raise _json_error(request, web.HTTPUnauthorized, "login required")
    return session


async def healthz(request: web.Request) -> web.Response:
    """Alive, and can reach its store: what the balancer's active health check asks."""
    config, store = request.app[CONFIG], request.app[STORE]
    facts: dict[str, Any] = {"server": config.id, "backend": store.name, **store.describe()}
    if not isinstance(store, SessionStore):
        return web.json_response({**facts, "sessions": None})  # in the clients: nothing here to count or reach
    try:
        facts["sessions"] = await store.count()
    except StoreUnavailable as exc:
        return web.json_response({**facts, "error": "session store unavailable", "reason": str(exc)}, status=503)
    return web.json_response(facts)


async def echo_headers(request: web.Request) -> web.Response:
    """The headers this server received: shows X-Forwarded-* and that the LB's cookie was stripped."""
    return _reply(request, {"headers": dict(request.headers)})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """A WebSocket that answers each text message with who is logged in; 4401 without a session.

    The session is read once, at the handshake, as a browser's WebSocket sends its cookies only
    then: a user whose server dies reconnects, and the new server's store decides whether the
    session is still known (the lab's B6).
    """
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        # A page of another site may open a WebSocket to us with the user's cookies: the browser
        # sends its Origin, and only our own pages may speak for the user (RFC 6455 §10.2).
        raise _json_error(request, web.HTTPForbidden, f"a WebSocket from {origin} is refused: not this site's page")
    session = await get_session(request)
    user = session.get("user")
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    if user is None:
        request[ASKED_TO_LOG_IN] = True  # counted as a re-login when a session cookie came
        await ws.close(code=WS_LOGIN_REQUIRED, message=b"login required")
        return ws
    server = request.app[CONFIG].id
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_json({"user": user, "server": server, "echo": message.data})
    return ws


# --------------------------------------------------------------------------- request and response helpers


def _reply(request: web.Request, body: Mapping[str, Any]) -> web.Response:
    return web.json_response({**body, "server": request.app[CONFIG].id})


def _json_error(request: web.Request, status: type[web.HTTPException], message: str) -> web.HTTPException:
    text = json.dumps({"error": message, "server": request.app[CONFIG].id})
    return status(text=text, content_type="application/json")


async def _read_body(request: web.Request, *, example: str) -> Mapping[str, Any]:
    """The body as a mapping: a form when the Content-Type says so, JSON otherwise."""
    if request.content_type in _FORM_TYPES:
        try:
            return await request.post()
        except ValueError as exc:
            raise _json_error(request, web.HTTPBadRequest, f"the form body could not be read: {exc}") from None
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise _json_error(
            request,
            web.HTTPBadRequest,
            f"the body is not valid JSON ({exc}); send {example} with Content-Type: application/json",
        ) from None
    if not isinstance(body, dict):
        raise _json_error(
            request, web.HTTPBadRequest, f"the body must be a JSON object like {example}, not {type(body).__name__}"
        )
    return body


def _text_field(request: web.Request, body: Mapping[str, Any], name: str) -> str:
    """A short printable string field of the body, or a 400 that says what is wrong."""
    value = body.get(name)
    if value is None:
        problem = f"{name} is missing; send it as a JSON string field or a form field named {name}"
    elif not isinstance(value, str):
        problem = f"{name} must be a string, not {type(value).__name__}"
    elif not value.strip():
        problem = f"{name} must not be empty"
    elif len(value) > MAX_TEXT_CHARS:
        problem = f"{name} is {len(value)} characters long; at most {MAX_TEXT_CHARS} are allowed"
    elif not value.isprintable():
        problem = f"{name} must be printable text, without control characters or line breaks"
    else:
        return value
    raise _json_error(request, web.HTTPBadRequest, problem)


def _prefers_html(request: web.Request) -> bool:
    """True when the Accept header ranks text/html above application/json (a browser, not an API client)."""
    accept = request.headers.get("Accept", "")
    return _quality(accept, "text/html") > _quality(accept, "application/json")


def _quality(accept: str, media_type: str) -> float:
    """The q-value `accept` gives `media_type`, using the most specific matching range (RFC 9110, 12.5.1)."""
    major = media_type.split("/", 1)[0]
    best_rank, best_q = -1, 0.0
    for part in accept.split(","):
        range_, *params = (p.strip() for p in part.split(";"))
        range_ = range_.lower()
        rank = {media_type: 2, f"{major}/*": 1, "*/*": 0}.get(range_, -1)
        if rank <= best_rank:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                with contextlib.suppress(ValueError):
                    q = float(value)
        best_rank, best_q = rank, q
    return best_q


# --------------------------------------------------------------------------- lifecycle


class AppServer:
    """One app server: its application, listener and store, started and stopped together."""

    def __init__(self, config: AppServerConfig, store: Store | None = None, *, access_log: bool = False) -> None:
        self.config = config
        self.store = store if store is not None else create_store(config)
        self.app = create_app(config, self.store)
        self.port = config.port  # the bound port once started, when config.port is 0
        # An access log line costs CPU on every request, which skews the lab's load measurements.
        self._runner_kwargs: dict[str, Any] = {} if access_log else {"access_log": None}
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Where the server listens, `http://host:port`."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Start the store, then listen on config.host:config.port; on failure nothing is left running."""
        if self._runner is not None:
            raise RuntimeError(f"app server {self.config.id} is already started")
        await self.store.start()
        runner = web.AppRunner(self.app, **self._runner_kwargs)
        try:
            await runner.setup()
            await web.TCPSite(runner, self.config.host, self.config.port).start()
        except BaseException:
            await runner.cleanup()
            await self.store.close()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish, close the store; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            await runner.cleanup()
        finally:
            await self.store.close()

    async def __aenter__(self) -> AppServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def serve_forever(
    config: AppServerConfig, on_ready: Callable[[AppServer], None], *, access_log: bool = False
) -> None:
    """Run one app server until SIGTERM or SIGINT, then stop it cleanly."""
    server = AppServer(config, access_log=access_log)
    await server.start()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    installed: list[signal.Signals] = []
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, stopping.set)
                installed.append(signum)
            except NotImplementedError:  # Windows: Ctrl-C still arrives as KeyboardInterrupt
                pass
        on_ready(server)
        await stopping.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await server.stop()
