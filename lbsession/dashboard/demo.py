"""Demo users the dashboard drives through the balancer, from the admin listener's own process.

Why server side: the page comes from the admin port and the balancer listens on
another, so a fetch from the page to the balancer is cross-origin. Answering it
would need CORS headers on the proxied app's responses (not the proxy's to add),
and the browser would then hold SESSION and LBSERVER cookies that, cookies
ignoring ports, it would also send to the admin listener. Here each demo user is
an HTTP client with its own cookie jar, a real user to the balancer and to the
app servers, and the page only says "alice: log in" or "alice: who am I?".
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import aiohttp

from lbsession.balancer.events import user_tag

MAX_USERS = 16  # the least recently used beyond this is forgotten, its connection closed
TIMEOUT_S = 10.0
MAX_BODY_BYTES = 4096


class DemoUsers:
    """Named users, each with a cookie jar, sending requests to the balancer's public URL."""

    def __init__(self, base_url: str, session_cookie: str = "SESSION") -> None:
        self.base_url = base_url
        self.session_cookie = session_cookie
        self._users: OrderedDict[str, aiohttp.ClientSession] = OrderedDict()

    async def request(self, username: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """Send one request as `username`: what came back, and its tags in the events (sent, then held)."""
        http = await self._user(username)
        sent_tag = self.tag(username)
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        try:
            async with http.request(
                method, self.base_url + path, json=body, allow_redirects=False, timeout=timeout
            ) as response:
                raw = await response.content.read(MAX_BODY_BYTES)
                reply: dict[str, Any] = {
                    "status": response.status,
                    "server": response.headers.get("X-Served-By"),
                    "body": raw.decode("utf-8", "replace"),
                }
        except (aiohttp.ClientError, TimeoutError) as exc:
            reply = {"status": None, "server": None, "body": f"{type(exc).__name__}: {exc}".strip(": ")}
        return {"user": username, "sent_tag": sent_tag, "tag": self.tag(username), **reply}

    def tag(self, username: str) -> str | None:
        """The tag of the user's current session cookie (what `user` is in the events), or None."""
        http = self._users.get(username)
        if http is None:
            return None
        for morsel in http.cookie_jar:
            if morsel.key == self.session_cookie and morsel.value:
                return user_tag(morsel.value)
        return None

    async def close(self) -> None:
        """Close every user's connections."""
        users, self._users = self._users, OrderedDict()
        for http in users.values():
            await http.close()

    async def _user(self, username: str) -> aiohttp.ClientSession:
        http = self._users.get(username)
        if http is None:
            # unsafe=True: keep cookies of an IP-address host (127.0.0.1), as browsers do.
            http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            self._users[username] = http
            while len(self._users) > MAX_USERS:
                _, oldest = self._users.popitem(last=False)
                await oldest.close()
        self._users.move_to_end(username)
        return http
