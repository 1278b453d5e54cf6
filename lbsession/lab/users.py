"""Virtual users: a seeded population of browser-like clients, each with its own cookie jar.

A user logs in, then visits the site until the run ends: a visit is a few reads
of /me and cart writes in a seeded order, each followed by a think time. A 401
after a successful login is a re-login, the very bug of the lab: the user logs
in again, as a person would, and carries on. Every response is recorded with
the server that answered (X-Served-By), its status and its latency.

With `steps.websocket`, a read is a message on a WebSocket (`GET /ws`) the user
keeps open: its answer names the server (a 200 in the records), a close with
4401 is the re-login's 401, and a socket lost with its server is opened again
at the next read (counted as a reconnect), through the balancer, which pins it
by the same sticky cookie as every other request.

The same seed gives the same population (addresses, heavy users, users behind
the NAT, users who tamper with their cookie) and the same order of arrival and
of requests; only the timings of a real network are left to chance.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from yarl import URL

from lbsession.balancer.strategies.sticky_cookie import StickyCookieStrategy

if TYPE_CHECKING:
    from lbsession.lab.scenario import Population, Steps

NAT_ADDRESS = "127.0.100.1"  # where users behind the NAT come from; apart from the distinct addresses
REQUEST_TIMEOUT_S = 15.0  # above the Redis store's 5 s retry: a failover is a stall, not a client timeout
WS_LOGIN_REQUIRED = 4401  # the app server's close code for an unknown session (lbsession.appserver.app)
JITTER = 0.2  # think times vary by +-20%, so users do not march in lockstep


def distinct_address(index: int) -> str:
    """User `index`'s own loopback address: 127.0.0.2, 127.0.0.3, ... (Linux routes all of 127/8 locally)."""
    return f"127.0.{index // 250}.{index % 250 + 2}"


class CookieFormat(Protocol):
    """How a balancer's server cookie names a server, read as a client can (a strategy, or a real balancer's)."""

    def cookie_names(self, value: str, server_id: str) -> bool:
        """Does `value` name `server_id`?"""
        ...

    def cookie_renamed(self, value: str, server_id: str, other_id: str) -> str | None:
        """`value`, naming `server_id`, altered to name `other_id`: a client's forgery (None: not forgeable)."""
        ...


@dataclass(frozen=True)
class UserPlan:
    """Everything the seed decides about one user."""

    index: int  # the user's number; names and addresses follow it
    position: int  # the order of arrival
    name: str
    source_ip: str | None  # None: the system's choice, 127.0.0.1
    start_s: float
    think_s: float
    heavy: bool
    behind_nat: bool
    tamper_at_s: float | None  # when the user forges its sticky cookie, if ever
    seed: int  # of the user's own random stream: its visits and think times
    replay_at_s: float | None = None  # when the user copies its session cookie, logs out and replays the copy
    forge_at_s: float | None = None  # when the user damages its session cookie


def plan_population(population: Population, steps: Steps, seed: int, duration_s: float) -> list[UserPlan]:
    """The users, in their order of arrival; the same seed always gives the same plans."""
    rng = random.Random(seed)
    count = population.users
    heavy = set(rng.sample(range(count), population.heavy_users))
    nat = set(rng.sample(range(count), population.nat_users))
    tamper = set(rng.sample(range(count), population.tamper_users))
    # A stream of its own, so that populations without these users stay exactly as they were.
    cookie_rng = random.Random(f"{seed}-session-cookie")
    replay = set(cookie_rng.sample(range(count), population.replay_users))
    forge = set(cookie_rng.sample(sorted(set(range(count)) - replay), population.forge_session_users))
    order = list(range(count))
    rng.shuffle(order)
    plans = []
    for position, index in enumerate(order):
        if population.addresses == "shared":
            source_ip = None
        else:
            source_ip = NAT_ADDRESS if index in nat else distinct_address(index)
        think_s = steps.think_ms / 1000 / (population.heavy_weight if index in heavy else 1.0)
        plans.append(
            UserPlan(
                index=index,
                position=position,
                name=f"user-{index:03d}",
                source_ip=source_ip,
                start_s=population.ramp_s * position / count,
                think_s=think_s,
                heavy=index in heavy,
                behind_nat=index in nat,
                tamper_at_s=duration_s / 2 if index in tamper else None,
                seed=rng.getrandbits(64),
                replay_at_s=duration_s / 2 if index in replay else None,
                forge_at_s=duration_s / 2 if index in forge else None,
            )
        )
    return plans


@dataclass(slots=True)
class Record:
    """One request as the user saw it."""

    user: int
    action: str  # login | me | cart | cart-read | prefs | prefs-read | logout | replay | ws-open | ws (a message)
    started_s: float  # on the run's clock
    latency_s: float
    status: int  # 0: no response (connection refused, reset, timeout)
    server: str | None  # X-Served-By
    relogin: bool = False  # a 401 after a successful login
    session_bytes: int = 0  # the size of the session cookie the request carried (name=value)

    @property
    def ok(self) -> bool:
        """Answered, and not with a server error."""
        return 0 < self.status < 500

    @property
    def ended_s(self) -> float:
        """When the answer (or the error) arrived, on the run's clock."""
        return self.started_s + self.latency_s


class VirtualUser:
    """One user: a cookie jar, optionally its own source address, and its plan."""

    def __init__(
        self,
        plan: UserPlan,
        steps: Steps,
        lb_url: str,
        clock: Callable[[], float],
        records: list[Record],
        *,
        sticky_cookie: str | None = "LBSERVER",  # None: the balancer sets no server cookie
        session_cookie: str = "SESSION",
        cookie_format: CookieFormat = StickyCookieStrategy,
        server_ids: list[str] | None = None,
    ) -> None:
        self.plan = plan
        self.steps = steps
        self.lb_url = lb_url
        self.clock = clock
        self.records = records
        self.sticky_cookie = sticky_cookie
        self.session_cookie = session_cookie
        self.cookie_format = cookie_format  # how the balancer's cookie names a server (its strategy or it declares it)
        self.server_ids = server_ids or []  # whom a forged cookie may claim
        self.logged_in = False
        self.relogins = 0
        self.tampered = 0
        self.cookie_checks = 0
        self.cookie_matches = 0
        self.sample_cookie: str | None = None
        self.cart_acked = 0  # cart writes acknowledged since the last login
        self.cart_seen: int | None = None  # items in the cart at the end, when it could be read
        self.prefs_acked = 0  # preferences set (each a new name) since the last login
        self.prefs_seen: int | None = None  # preferences at the end, when they could be read
        self.replays = ReplayOutcome()
        self.forged_answers: dict[int, int] = {}  # answers to requests sent with a damaged session cookie, by status
        self._forged = False  # the coming batch carries the damaged cookie
        self.ws_reconnects = 0  # WebSockets opened again after one was lost
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ws_lost = False
        self._rng = random.Random(plan.seed)
        self._http: aiohttp.ClientSession | None = None

    async def run(self, deadline: Callable[[], float]) -> None:
        """Arrive at the planned time, then log in and visit until `deadline()` on the run's clock."""
        await self._sleep_until(self.plan.start_s)
        connector = aiohttp.TCPConnector(local_addr=(self.plan.source_ip, 0) if self.plan.source_ip else None)
        # unsafe=True: keep cookies set by an IP-address host (127.0.0.1), as browsers do.
        self._http = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        try:
            await self._browse(deadline)
            if self._ws is not None:
                await self._ws.close()
            if self.steps.cart_writes and self.logged_in:
                await self._read_cart()
            if self.steps.prefs_writes and self.logged_in:
                await self._read_prefs()
            if self.steps.logout and self.logged_in:
                await self._send("logout", "POST", "/logout")
        finally:
            await self._http.close()

    async def _browse(self, deadline: Callable[[], float]) -> None:
        while self.clock() < deadline():
            if not self.logged_in:
                await self._login()
                await self._think(deadline)
                continue
            for batch in self._visit():
                if self.clock() >= deadline() or not self.logged_in:
                    break
                if _due(self.plan.replay_at_s, self.clock()) and not self.replays.logged_out_s:
                    await self._logout_and_replay(deadline)
                    return
                self._maybe_tamper()
                self._maybe_forge_session()
                await asyncio.gather(*(self._act(action) for action in batch))
                self._forged = False
                await self._think(deadline)

    def _visit(self) -> list[tuple[str, ...]]:
        """One visit's requests in a seeded order; a tuple of several is sent at once."""
        steps = self.steps
        batches: list[tuple[str, ...]] = [("me",)] * steps.reads
        writes = ("cart",) * steps.cart_writes + ("prefs",) * steps.prefs_writes
        parallel = steps.cart_parallel and len(writes) > 1
        batches += [] if parallel else [(write,) for write in writes]
        self._rng.shuffle(batches)
        if parallel:
            batches.insert(self._rng.randrange(len(batches) + 1), writes)
        return batches

    async def _login(self) -> None:
        record, _ = await self._send("login", "POST", "/login", json={"username": self.plan.name})
        if record.status == 200:
            self.logged_in = True
            self.cart_acked = self.prefs_acked = 0  # a new session: its cart and preferences start empty

    async def _act(self, action: str) -> None:
        if action == "me" and self.steps.websocket:
            record = await self._ws_read()
        elif action == "me":
            path = f"/me?work_ms={self.steps.work_ms}" if self.steps.work_ms else "/me"
            record, _ = await self._send("me", "GET", path)
        elif action == "prefs":
            record, _ = await self._send(
                "prefs", "POST", "/prefs", json={"name": f"p{self.prefs_acked}", "value": "on"}
            )
            self.prefs_acked += record.status == 200
        else:
            item = f"{self.plan.name}-{self.cart_acked}".ljust(self.steps.item_chars, ".")
            path = f"/cart?work_ms={self.steps.work_ms}" if self.steps.work_ms else "/cart"
            record, _ = await self._send("cart", "POST", path, json={"item": item})
            self.cart_acked += record.status == 200
        if self._forged:  # a damaged cookie must be a fresh anonymous session: a 401 here is no re-login
            self.forged_answers[record.status] = self.forged_answers.get(record.status, 0) + 1
            self.logged_in = self.logged_in and record.status == 200
        elif record.status == 401 and self.logged_in:
            record.relogin = True  # logged in a moment ago, asked to log in again: the bug
            self.relogins += 1
            self.logged_in = False

    async def _read_cart(self) -> None:
        record, body = await self._send("cart-read", "GET", "/cart")
        if record.status == 200 and isinstance(body, dict) and isinstance(body.get("cart"), list):
            self.cart_seen = len(body["cart"])

    async def _read_prefs(self) -> None:
        record, body = await self._send("prefs-read", "GET", "/prefs")
        if record.status == 200 and isinstance(body, dict) and isinstance(body.get("prefs"), dict):
            self.prefs_seen = len(body["prefs"])

    async def _send(
        self, action: str, method: str, path: str, *, via: aiohttp.ClientSession | None = None, **kwargs: Any
    ) -> tuple[Record, Any]:
        http = via or self._http
        assert http is not None
        session = kwargs.get("headers", {}).get("Cookie") if via else self._session_cookie()
        started = self.clock()
        status, server, body = 0, None, None
        try:
            async with http.request(method, self.lb_url + path, allow_redirects=False, **kwargs) as response:
                status, server = response.status, response.headers.get("X-Served-By")
                if response.content_type == "application/json":
                    body = await response.json()
                else:
                    await response.read()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            status = 0  # no answer: the request counts as failed, and the user carries on
        return self._record(action, started, status, server, len(session) if session else 0), body

    async def _ws_read(self) -> Record:
        """One message on the user's WebSocket, opened first if need be; its answer, a 4401, or a lost socket."""
        if self._ws is None:
            opened = await self._ws_open()
            if self._ws is None:
                return opened
        started = self.clock()
        status, server = 0, None
        with contextlib.suppress(aiohttp.ClientError, ConnectionError):
            await self._ws.send_str(self.plan.name)  # on a dead socket, the receive below says how it ended
        try:
            message: aiohttp.WSMessage | None = await self._ws.receive(timeout=REQUEST_TIMEOUT_S)
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            message = None
        if message is not None and message.type == aiohttp.WSMsgType.TEXT:
            status, server = 200, message.json().get("server")
        elif message is not None and message.type == aiohttp.WSMsgType.CLOSE and message.data == WS_LOGIN_REQUIRED:
            status = 401
        if status != 200:  # closed by the server, or lost with it: a new socket at the next read
            await self._ws.close()
            self._ws, self._ws_lost = None, status != 401
        return self._record("ws", started, status, server)

    async def _ws_open(self) -> Record:
        """Open the WebSocket through the balancer; recorded as `ws-open`, 101 when it was."""
        assert self._http is not None
        started = self.clock()
        status, server = 0, None
        try:
            ws = await self._http.ws_connect(self.lb_url + "/ws", timeout=aiohttp.ClientWSTimeout(ws_close=1.0))
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status
        except (aiohttp.ClientError, TimeoutError):
            pass
        else:
            self._ws, status, server = ws, 101, ws._response.headers.get("X-Served-By")
            self.ws_reconnects += self._ws_lost
            self._ws_lost = False
        return self._record("ws-open", started, status, server)

    def _record(self, action: str, started: float, status: int, server: str | None, session_bytes: int = 0) -> Record:
        record = Record(self.plan.index, action, started, self.clock() - started, status, server)
        record.session_bytes = session_bytes
        self.records.append(record)
        self._check_cookie(server)
        return record

    def _cookie(self, name: str | None = None) -> str | None:
        assert self._http is not None
        for morsel in self._http.cookie_jar:
            if morsel.key == (name or self.sticky_cookie):
                return morsel.value
        return None

    def _session_cookie(self) -> str | None:
        """`SESSION=<value>` as the next request sends it, or None."""
        value = self._cookie(self.session_cookie)
        return None if value is None else f"{self.session_cookie}={value}"

    def _maybe_forge_session(self) -> None:
        """Once, damage the session cookie: flip a character, cut it short, or put another key's seal in."""
        value = self._cookie(self.session_cookie)
        if self.forged_answers or self._forged or not _due(self.plan.forge_at_s, self.clock()) or value is None:
            return
        kind = ("tampered", "truncated", "foreign")[self.plan.index % 3]
        middle = len(value) // 2
        if kind == "tampered":
            forged = value[:middle] + ("A" if value[middle] != "A" else "B") + value[middle + 1 :]
        elif kind == "truncated":
            forged = value[: max(1, len(value) - 12)]
        else:  # the same shape as a genuine value (its handle kept), sealed under a key nobody in the lab holds
            handle = value[: value.find(".") + 1]
            sealed = base64.urlsafe_b64encode(secrets.token_bytes(len(value) * 3 // 4)).decode()
            forged = handle + sealed[: len(value) - len(handle)]
        assert self._http is not None
        self._http.cookie_jar.update_cookies({self.session_cookie: forged}, URL(self.lb_url))
        self._forged = True

    async def _logout_and_replay(self, deadline: Callable[[], float]) -> None:
        """Copy the session cookie, log out, then replay the copy (as whoever copied it would) until the end."""
        copied = self._session_cookie()
        await self._send("logout", "POST", "/logout")
        self.logged_in = False
        self.replays.logged_out_s = self.clock()
        if copied is None:
            return
        connector = aiohttp.TCPConnector(local_addr=(self.plan.source_ip, 0) if self.plan.source_ip else None)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        # A jar that keeps nothing: the copy is replayed as it was, never renewed by the answers.
        async with aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout
        ) as thief:
            while self.clock() < deadline():
                record, _ = await self._send("replay", "GET", "/me", via=thief, headers={"Cookie": copied})
                self.replays.count(record, self.replays.logged_out_s)
                await self._think(deadline)

    def _check_cookie(self, server: str | None) -> None:
        """Does the balancer's cookie name the server that answered? (C12: it is readable.)"""
        value = self._cookie() if server is not None else None
        if value is None or server is None:
            return
        self.sample_cookie = self.sample_cookie or value
        self.cookie_checks += 1
        self.cookie_matches += self.cookie_format.cookie_names(value, server)

    def pinned_server(self) -> str | None:
        """The server the balancer's cookie names now, read as a client can (None: no such cookie)."""
        value = self._cookie() if self._http is not None and self.sticky_cookie is not None else None
        if value is None:
            return None
        named = [s for s in self.server_ids if self.cookie_format.cookie_names(value, s)]
        return max(named, key=len, default=None)  # ids may hold dots: "a" and "a.b" both prefix "a.b.<tag>"

    def _maybe_tamper(self) -> None:
        """Once, claim another server with our own tag: a forgery the signature must expose."""
        due = self.plan.tamper_at_s
        value = self._cookie()
        if self.tampered or due is None or self.clock() < due or value is None or self._http is None:
            return
        if self.sticky_cookie is None:  # a balancer without a server cookie: nothing to forge
            return
        pinned = self.pinned_server()
        others = sorted(set(self.server_ids) - {pinned})
        forged = (
            self.cookie_format.cookie_renamed(value, pinned, self._rng.choice(others)) if pinned and others else None
        )
        if forged is None:
            return
        self._http.cookie_jar.update_cookies({self.sticky_cookie: forged}, URL(self.lb_url))
        self.tampered += 1

    async def _think(self, deadline: Callable[[], float]) -> None:
        pause = self.plan.think_s * self._rng.uniform(1 - JITTER, 1 + JITTER)
        await asyncio.sleep(max(0.0, min(pause, deadline() - self.clock())))

    async def _sleep_until(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - self.clock()))


@dataclass
class ReplayOutcome:
    """What a copied session cookie was worth after its user logged out."""

    logged_out_s: float = 0.0  # when the user logged out (0: never did)
    accepted: int = 0  # replays answered as the logged-out user: logout was not revocation
    refused: int = 0  # replays answered 401
    window_s: float = 0.0  # how long after the logout the copy was still accepted

    def count(self, record: Record, logged_out_s: float) -> None:
        """Add one replay's answer."""
        if record.status == 200:
            self.accepted += 1
            self.window_s = max(self.window_s, record.ended_s - logged_out_s)
        elif record.status == 401:
            self.refused += 1


def _due(at_s: float | None, now_s: float) -> bool:
    return at_s is not None and now_s >= at_s
