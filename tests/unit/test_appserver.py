"""The app server's HTTP contract (docs/architecture.md), against a real AppServer on a free port.

Clients are real aiohttp ClientSessions with their own cookie jar. The only
doubles are stores, the app's dependency: one that cannot be reached, one that
breaks, and a LocalStore that records what it was asked to save.
"""

from __future__ import annotations

import asyncio
import os
import signal
import string
from collections.abc import AsyncIterator, Mapping, Set
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from lbsession.appserver.app import AppServer, serve_forever
from lbsession.appserver.session import get_session, session_middleware
from lbsession.appserver.stores import SessionStore
from lbsession.appserver.stores.local import LocalStore
from lbsession.config import AppServerConfig, SessionConfig
from lbsession.errors import StoreUnavailable

SERVER_ID = "was-test"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
A_VALID_LOOKING_ID = "A" * 43


class UnreachableStore(SessionStore):
    """A store whose every call fails the way a dead Redis does."""

    name = "unreachable"
    reason = "connection refused by 127.0.0.1:6379 (test double)"

    async def load(self, session_id: str, ttl_s: float | None = None) -> dict[str, Any] | None:
        raise StoreUnavailable(self.reason)

    async def save(self, session_id: str, changed: Mapping[str, Any], removed: Set[str], ttl_s: float) -> None:
        raise StoreUnavailable(self.reason)

    async def delete(self, session_id: str) -> None:
        raise StoreUnavailable(self.reason)

    async def count(self) -> int:
        raise StoreUnavailable(self.reason)


class BuggyStore(UnreachableStore):
    """A store with a programming error: not an outage, so not a 503."""

    async def load(self, session_id: str, ttl_s: float | None = None) -> dict[str, Any] | None:
        raise RuntimeError("bug in the store")


class RecordingStore(LocalStore):
    """The real local store, noting every save it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.saves: list[tuple[str, dict[str, Any], set[str]]] = []

    async def save(self, session_id: str, changed: Mapping[str, Any], removed: Set[str], ttl_s: float) -> None:
        self.saves.append((session_id, dict(changed), set(removed)))
        await super().save(session_id, changed, removed, ttl_s)


def make_config(**session: Any) -> AppServerConfig:
    return AppServerConfig(id=SERVER_ID, port=0, session=SessionConfig(**session))


@pytest.fixture
async def server() -> AsyncIterator[AppServer]:
    async with AppServer(make_config(), store=LocalStore()) as running:
        yield running


@pytest.fixture
async def client(server: AppServer) -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe=True: the jar otherwise refuses cookies from an IP address such as 127.0.0.1.
    async with aiohttp.ClientSession(base_url=server.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


@pytest.fixture
async def bare(server: AppServer) -> AsyncIterator[aiohttp.ClientSession]:
    """A client without a cookie jar, for sending a chosen cookie by hand."""
    async with aiohttp.ClientSession(base_url=server.url, cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def session_id(client: aiohttp.ClientSession, server: AppServer) -> str:
    return client.cookie_jar.filter_cookies(URL(server.url))["SESSION"].value


def set_cookies(response: aiohttp.ClientResponse) -> list[dict[str, str]]:
    """Each Set-Cookie header as {name, value, lower-cased attribute: value}."""
    out = []
    for header in response.headers.getall("Set-Cookie", []):
        first, *attrs = (part.strip() for part in header.split(";"))
        name, _, value = first.partition("=")
        cookie = {"name": name, "value": value}
        for attr in attrs:
            key, _, val = attr.partition("=")
            cookie[key.lower()] = val
        out.append(cookie)
    return out


async def login(client: aiohttp.ClientSession, username: str = "alice") -> dict[str, Any]:
    async with client.post("/login", json={"username": username}) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def me_with_cookie(bare: aiohttp.ClientSession, value: str) -> int:
    async with bare.get("/me", headers={"Cookie": f"SESSION={value}"}) as resp:
        return resp.status


# --------------------------------------------------------------------------- login, me, logout


async def test_login_then_me(client: aiohttp.ClientSession) -> None:
    assert await login(client) == {"user": "alice", "server": SERVER_ID}
    async with client.get("/me") as resp:
        assert resp.status == 200
        assert await resp.json() == {"user": "alice", "server": SERVER_ID}


@pytest.mark.parametrize("work", ["-1", "abc", "1001"])
async def test_me_refuses_a_work_time_it_cannot_wait(client: aiohttp.ClientSession, work: str) -> None:
    await login(client)
    async with client.get("/me", params={"work_ms": work}) as resp:
        assert resp.status == 400
        assert "work_ms must be a whole number from 0 to 1000" in (await resp.json())["error"]
    async with client.get("/me", params={"work_ms": "5"}) as resp:
        assert (resp.status, (await resp.json())["user"]) == (200, "alice")


@pytest.mark.parametrize("work", ["-1", "abc", "1001"])
async def test_a_cart_write_refuses_a_work_time_it_cannot_wait_and_writes_nothing(
    client: aiohttp.ClientSession, work: str
) -> None:
    await login(client)
    async with client.post("/cart", params={"work_ms": work}, json={"item": "apple"}) as resp:
        assert resp.status == 400
        assert "work_ms must be a whole number from 0 to 1000" in (await resp.json())["error"]
    async with client.post("/cart", params={"work_ms": "5"}, json={"item": "pear"}) as resp:
        assert (resp.status, (await resp.json())["cart"]) == (200, ["pear"])


async def test_prefs_are_an_attribute_of_their_own_beside_the_cart(client: aiohttp.ClientSession) -> None:
    async with client.post("/prefs", json={"name": "theme", "value": "dark"}) as resp:
        assert resp.status == 401
    await login(client)
    async with client.post("/cart", json={"item": "apple"}):
        pass
    async with client.post("/prefs", json={"name": "theme", "value": "dark"}) as resp:
        assert (resp.status, (await resp.json())["prefs"]) == (200, {"theme": "dark"})
    async with client.post("/prefs", json={"name": "theme"}) as resp:
        assert resp.status == 400 and "value is missing" in (await resp.json())["error"]
    async with client.get("/prefs") as resp:
        assert (await resp.json())["prefs"] == {"theme": "dark"}
    async with client.get("/cart") as resp:
        assert (await resp.json())["cart"] == ["apple"]


async def test_me_without_login_is_401_json(client: aiohttp.ClientSession) -> None:
    async with client.get("/me") as resp:
        assert resp.status == 401
        assert resp.content_type == "application/json"
        assert await resp.json() == {"error": "login required", "server": SERVER_ID}


@pytest.mark.parametrize(
    ("accept", "redirects"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("text/*, application/json;q=0.5", True),
        ("*/*", False),
        ("application/json", False),
        ("text/html;q=0.5, application/json", False),
        ("", False),
    ],
)
async def test_me_without_login_redirects_only_clients_preferring_html(
    client: aiohttp.ClientSession, accept: str, redirects: bool
) -> None:
    async with client.get("/me", headers={"Accept": accept}, allow_redirects=False) as resp:
        if redirects:
            assert (resp.status, resp.headers["Location"]) == (302, "/login")
        else:
            assert resp.status == 401


async def test_browser_form_login_redirects_to_me(client: aiohttp.ClientSession) -> None:
    async with client.get("/login") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "name='username'" in await resp.text()
    headers = {"Accept": BROWSER_ACCEPT}
    async with client.post("/login", data={"username": "bob"}, headers=headers, allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, "/me")
    async with client.get("/me") as resp:
        assert await resp.json() == {"user": "bob", "server": SERVER_ID}


async def test_login_rotates_a_planted_session_id(
    server: AppServer, bare: aiohttp.ClientSession, client: aiohttp.ClientSession
) -> None:
    planted = "planted-by-an-attacker-0123456789abcdef"
    await server.store.save(planted, {"cart": ["apple"]}, set(), 60.0)
    async with bare.post("/login", json={"username": "alice"}, headers={"Cookie": f"SESSION={planted}"}) as resp:
        assert resp.status == 200
        (cookie,) = set_cookies(resp)
    assert cookie["name"] == "SESSION" and cookie["value"] != planted
    assert await server.store.load(planted) is None
    assert await me_with_cookie(bare, planted) == 401  # the old id is dead
    assert await me_with_cookie(bare, cookie["value"]) == 200
    assert await server.store.load(cookie["value"]) == {"cart": ["apple"], "user": "alice"}  # attributes moved


async def test_login_again_rotates_and_a_new_user_starts_clean(
    server: AppServer, client: aiohttp.ClientSession, bare: aiohttp.ClientSession
) -> None:
    await login(client, "alice")
    async with client.post("/cart", json={"item": "apple"}) as resp:
        assert resp.status == 200
    first = session_id(client, server)
    await login(client, "alice")
    second = session_id(client, server)
    assert second != first
    assert await me_with_cookie(bare, first) == 401
    async with client.get("/cart") as resp:
        assert (await resp.json())["cart"] == ["apple"]  # same user: the session carries over
    await login(client, "bob")
    async with client.get("/cart") as resp:
        assert (await resp.json())["cart"] == []  # another user: nothing of alice's
    assert await server.store.count() == 1


async def test_logout_kills_the_session(
    server: AppServer, client: aiohttp.ClientSession, bare: aiohttp.ClientSession
) -> None:
    await login(client)
    sid = session_id(client, server)
    async with client.post("/logout") as resp:
        assert resp.status == 200
        assert await resp.json() == {"logged_out": True, "server": SERVER_ID}
        (cookie,) = set_cookies(resp)
    assert cookie["name"] == "SESSION" and cookie["max-age"] == "0"  # the browser drops it
    assert await server.store.count() == 0
    assert await me_with_cookie(bare, sid) == 401
    async with client.get("/me") as resp:
        assert resp.status == 401


async def test_logout_without_a_session_is_fine(client: aiohttp.ClientSession) -> None:
    async with client.post("/logout") as resp:
        assert resp.status == 200
        assert set_cookies(resp) == []


# --------------------------------------------------------------------------- the cookie


async def test_cookie_attributes(server: AppServer, client: aiohttp.ClientSession) -> None:
    async with client.post("/login", json={"username": "alice"}) as resp:
        (cookie,) = set_cookies(resp)
    assert cookie["name"] == "SESSION"
    assert "httponly" in cookie
    assert cookie["samesite"] == "Lax"
    assert cookie["path"] == "/"
    assert "secure" not in cookie
    assert "max-age" not in cookie and "expires" not in cookie  # the store's TTL is the one clock


async def test_cookie_is_secure_and_named_when_configured() -> None:
    config = make_config(cookie_name="SID", secure=True, same_site="Strict")
    async with (
        AppServer(config, store=LocalStore()) as server,
        aiohttp.ClientSession(base_url=server.url) as client,
        client.post("/login", json={"username": "alice"}) as resp,
    ):
        (cookie,) = set_cookies(resp)
    assert cookie["name"] == "SID"
    assert "secure" in cookie and "httponly" in cookie
    assert cookie["samesite"] == "Strict"


async def test_session_id_has_at_least_128_random_bits(server: AppServer, client: aiohttp.ClientSession) -> None:
    ids = set()
    for _ in range(5):
        await login(client)
        ids.add(session_id(client, server))
    assert len(ids) == 5
    alphabet = set(string.ascii_letters + string.digits + "-_")
    for sid in ids:
        assert set(sid) <= alphabet
        assert len(sid) * 6 >= 128  # base64url: 6 bits per character


# --------------------------------------------------------------------------- cart


async def test_cart_append_and_read(client: aiohttp.ClientSession) -> None:
    await login(client)
    for item, expected in (("apple", ["apple"]), ("pear", ["apple", "pear"])):
        async with client.post("/cart", json={"item": item}) as resp:
            assert await resp.json() == {"cart": expected, "server": SERVER_ID}
    async with client.get("/cart") as resp:
        assert await resp.json() == {"cart": ["apple", "pear"], "server": SERVER_ID}


async def test_cart_needs_login(client: aiohttp.ClientSession, server: AppServer) -> None:
    async with client.post("/cart", json={"item": "apple"}) as resp:
        assert resp.status == 401
        assert await resp.json() == {"error": "login required", "server": SERVER_ID}
    async with client.get("/cart") as resp:
        assert resp.status == 401
    assert await server.store.count() == 0


async def test_the_cart_holds_at_most_100_items(client: aiohttp.ClientSession) -> None:
    await login(client)
    for n in range(100):
        async with client.post("/cart", json={"item": f"item-{n}"}) as resp:
            assert resp.status == 200
    async with client.post("/cart", json={"item": "one-too-many"}) as resp:
        assert resp.status == 400
        assert await resp.json() == {"error": "the cart is full (100 items); remove some", "server": SERVER_ID}
    async with client.get("/cart") as resp:
        assert (await resp.json())["cart"] == [f"item-{n}" for n in range(100)]  # unchanged


async def test_only_changed_attributes_are_saved() -> None:
    store = RecordingStore()
    async with (
        AppServer(make_config(), store=store) as server,
        aiohttp.ClientSession(base_url=server.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as client,
    ):
        await login(client)
        async with client.post("/cart", json={"item": "apple"}) as resp:
            assert resp.status == 200
        async with client.get("/me") as resp:
            assert resp.status == 200
    sid = session_id(client, server)
    assert store.saves == [(sid, {"user": "alice"}, set()), (sid, {"cart": ["apple"]}, set())]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("path", "kwargs", "message"),
    [
        ("/login", {"json": {"username": ""}}, "username must not be empty"),
        ("/login", {"json": {"username": "   "}}, "username must not be empty"),
        ("/login", {"json": {"username": "a" * 65}}, "65 characters long; at most 64"),
        ("/login", {"json": {"username": "tab\tname"}}, "printable"),
        ("/login", {"json": {"username": 5}}, "username must be a string, not int"),
        ("/login", {"json": {"user": "alice"}}, "username is missing"),
        ("/login", {"json": ["alice"]}, "must be a JSON object"),
        ("/login", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, "not valid JSON"),
        ("/login", {"data": b"\xff\xfe\xfa", "headers": {"Content-Type": "application/json"}}, "not valid JSON"),
        ("/login", {"data": {"username": ""}}, "username must not be empty"),
        ("/cart", {"json": {}}, "item is missing"),
        ("/cart", {"json": {"item": ["apple"]}}, "item must be a string, not list"),
        ("/cart", {"data": b"apple", "headers": {"Content-Type": "text/plain"}}, "not valid JSON"),
    ],
)
async def test_bad_input_is_400_with_a_message(
    server: AppServer, client: aiohttp.ClientSession, path: str, kwargs: dict[str, Any], message: str
) -> None:
    if path == "/cart":
        await login(client)
    before = await server.store.count()
    async with client.post(path, **kwargs) as resp:
        assert resp.status == 400
        assert resp.headers["X-Served-By"] == SERVER_ID
        body = await resp.json()
    assert message in body["error"] and body["server"] == SERVER_ID
    assert await server.store.count() == before


async def test_64_characters_are_allowed(client: aiohttp.ClientSession) -> None:
    assert (await login(client, "é" * 64))["user"] == "é" * 64


# --------------------------------------------------------------------------- X-Served-By, healthz, no-session


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/login", 200),
        ("GET", "/me", 401),
        ("POST", "/login", 400),
        ("GET", "/nowhere", 404),
        ("GET", "/logout", 405),
    ],
)
async def test_every_response_says_who_served_it(
    client: aiohttp.ClientSession, method: str, path: str, status: int
) -> None:
    async with client.request(method, path) as resp:
        assert resp.status == status
        assert resp.headers["X-Served-By"] == SERVER_ID


async def test_healthz_counts_sessions(server: AppServer, client: aiohttp.ClientSession) -> None:
    async def sessions() -> int:
        async with client.get("/healthz") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["server"] == SERVER_ID and body["backend"] == "local"
            return int(body["sessions"])

    assert await sessions() == 0
    await login(client, "alice")
    async with aiohttp.ClientSession(base_url=server.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        await login(other, "bob")
    assert await sessions() == 2
    async with client.post("/logout"):
        pass
    assert await sessions() == 1


async def test_requests_that_never_touch_the_session_create_none(
    server: AppServer, client: aiohttp.ClientSession
) -> None:
    for method, path in [("GET", "/healthz"), ("GET", "/login"), ("GET", "/me"), ("GET", "/cart"), ("GET", "/x")]:
        async with client.request(method, path) as resp:
            assert set_cookies(resp) == [], path
    async with client.post("/logout") as resp:
        assert set_cookies(resp) == []
    assert await server.store.count() == 0
    assert len(client.cookie_jar) == 0


async def test_unknown_cookie_is_no_session(bare: aiohttp.ClientSession) -> None:
    assert await me_with_cookie(bare, A_VALID_LOOKING_ID) == 401


# --------------------------------------------------------------------------- an unreachable store


@pytest.fixture
async def unreachable() -> AsyncIterator[aiohttp.ClientSession]:
    async with (
        AppServer(make_config(), store=UnreachableStore()) as server,
        aiohttp.ClientSession(base_url=server.url, cookie_jar=aiohttp.DummyCookieJar()) as client,
    ):
        yield client


async def test_unreachable_store_is_503_not_401(unreachable: aiohttp.ClientSession) -> None:
    requests = [
        ("GET", "/me", {"Cookie": f"SESSION={A_VALID_LOOKING_ID}"}),
        ("GET", "/cart", {"Cookie": f"SESSION={A_VALID_LOOKING_ID}"}),
        ("POST", "/logout", {"Cookie": f"SESSION={A_VALID_LOOKING_ID}"}),
    ]
    for method, path, headers in requests:
        async with unreachable.request(method, path, headers=headers) as resp:
            assert resp.status == 503, path
            assert resp.headers["X-Served-By"] == SERVER_ID
            assert await resp.json() == {
                "error": "session store unavailable",
                "reason": UnreachableStore.reason,
                "server": SERVER_ID,
            }
    async with unreachable.post("/login", json={"username": "alice"}) as resp:
        assert resp.status == 503  # the save fails: not a login that silently did not stick
        assert set_cookies(resp) == []


async def test_a_login_whose_save_fails_keeps_the_previous_session() -> None:
    store = RecordingStore()
    async with (
        AppServer(make_config(), store=store) as server,
        aiohttp.ClientSession(base_url=server.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as client,
    ):
        await login(client, "alice")

        async def refuse(session_id: str, changed: Mapping[str, Any], removed: Set[str], ttl_s: float) -> None:
            raise StoreUnavailable("write refused (test double)")

        store.save = refuse  # type: ignore[method-assign]
        async with client.post("/login", json={"username": "alice"}) as resp:
            assert resp.status == 503 and set_cookies(resp) == []
        async with client.get("/me") as resp:
            assert resp.status == 200  # the old id was not deleted before its successor was saved


async def test_unreachable_store_fails_healthz(unreachable: aiohttp.ClientSession) -> None:
    async with unreachable.get("/healthz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["server"] == SERVER_ID and body["backend"] == "unreachable"
    assert body["reason"] == UnreachableStore.reason and "session store unavailable" in body["error"]


async def test_requests_without_a_session_do_not_need_the_store(unreachable: aiohttp.ClientSession) -> None:
    # No cookie: there is nothing to look up, so "not logged in" is the truth, not a guess.
    async with unreachable.get("/me") as resp:
        assert resp.status == 401
    async with unreachable.get("/nowhere", headers={"Cookie": f"SESSION={A_VALID_LOOKING_ID}"}) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    "value",
    ["not a token!", "short", "A" * 129, "abc.def" * 8, "%2e%2e" * 8],
    ids=["bad-chars", "too-short", "too-long", "dots", "percent"],
)
async def test_malformed_cookie_is_no_session_and_never_reaches_the_store(
    unreachable: aiohttp.ClientSession, value: str
) -> None:
    async with unreachable.get("/me", headers={"Cookie": f"SESSION={value}"}) as resp:
        assert resp.status == 401  # a 503 would mean the store was asked


async def test_a_store_bug_is_a_500_not_a_503_and_still_says_who() -> None:
    async with (
        AppServer(make_config(), store=BuggyStore()) as server,
        aiohttp.ClientSession(base_url=server.url) as client,
        client.get("/me", headers={"Cookie": f"SESSION={A_VALID_LOOKING_ID}"}) as resp,
    ):
        assert resp.status == 500
        assert resp.headers["X-Served-By"] == SERVER_ID


# --------------------------------------------------------------------------- the session layer alone


async def test_in_place_changes_are_saved_too() -> None:
    store = LocalStore()

    async def visit(request: web.Request) -> web.Response:
        session = await get_session(request)
        session.setdefault("visits", []).append(len(session["visits"]))  # no __setitem__ on later visits
        return web.json_response(session["visits"])

    app = web.Application(middlewares=[session_middleware(store, SessionConfig(), server_id=SERVER_ID)])
    app.router.add_get("/", visit)
    async with TestClient(TestServer(app)) as client:
        for expected in ([0], [0, 1], [0, 1, 2]):
            resp = await client.get("/")
            assert await resp.json() == expected


async def test_get_session_without_the_middleware_is_a_clear_error() -> None:
    async def handler(request: web.Request) -> web.Response:
        with pytest.raises(RuntimeError, match="session_middleware"):
            await get_session(request)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/")).status == 200


# --------------------------------------------------------------------------- lifecycle


async def test_port_zero_is_read_back_and_stop_is_idempotent() -> None:
    store = LocalStore()
    server = AppServer(make_config(), store=store)
    await server.start()
    try:
        assert server.port != 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as client, client.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200
    finally:
        await server.stop()
    await server.stop()
    assert not any(t.get_name() == "lbsession-local-store-sweep" for t in asyncio.all_tasks())  # store closed


async def test_a_failed_bind_leaves_nothing_running() -> None:
    async with AppServer(make_config(), store=LocalStore()) as first:
        store = LocalStore()
        taken = AppServerConfig(id="was-2", port=first.port)
        with pytest.raises(OSError):
            await AppServer(taken, store=store).start()
        sweeps = [t for t in asyncio.all_tasks() if t.get_name() == "lbsession-local-store-sweep"]
        assert len(sweeps) == 1  # the first server's only: the failed one closed its store


async def test_serve_forever_runs_until_sigterm() -> None:
    statuses: list[int] = []
    ready: list[AppServer] = []

    async def probe_then_terminate(server: AppServer) -> None:
        async with aiohttp.ClientSession() as client, client.get(f"{server.url}/healthz") as resp:
            statuses.append(resp.status)
        os.kill(os.getpid(), signal.SIGTERM)  # serve_forever installed its handler before on_ready

    def on_ready(server: AppServer) -> None:
        ready.append(server)
        probes.append(asyncio.get_running_loop().create_task(probe_then_terminate(server)))

    probes: list[asyncio.Task[None]] = []
    async with asyncio.timeout(10):
        await serve_forever(AppServerConfig(id=SERVER_ID, port=0), on_ready)
    await asyncio.gather(*probes)
    assert statuses == [200]
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as client, client.get(f"{ready[0].url}/healthz"):
            pass
