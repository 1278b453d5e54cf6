"""`sticky-cookie`: the balancer inserts a cookie naming the server (HAProxy `cookie ... insert`).

New clients are balanced round-robin and told, by a Set-Cookie on the response,
which server took them; later requests carrying the cookie go to that server.
The value is `<server id>.<HMAC-SHA256 tag>`, so a client can read where it is
pinned (the lab shows it) but cannot forge a pin to another server or probe
server ids. The proxy removes the cookie before the request reaches the server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Sequence

from lbsession.balancer.strategies.base import RequestFacts, Route, Strategy, UpstreamView
from lbsession.balancer.strategies.round_robin import RoundRobinStrategy
from lbsession.config import BalancerConfig
from lbsession.errors import NoHealthyUpstream

log = logging.getLogger(__name__)


class StickyCookieStrategy(Strategy):
    """Route by a signed server cookie; balance new and redispatched clients round-robin."""

    name = "sticky-cookie"

    def __init__(
        self,
        secret: bytes,
        cookie_name: str = "LBSERVER",
        max_age_s: int | None = None,
        secure: bool = False,
        redispatch: bool = True,
    ) -> None:
        self.cookie_name = cookie_name
        self.private_cookies = (cookie_name,)  # the proxy strips these before the app server sees them
        self._secret = secret
        self._redispatch = redispatch
        self._attributes = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
        if max_age_s is not None:
            self._attributes += f"; Max-Age={max_age_s}"
        self._balance = RoundRobinStrategy()
        self._verified: dict[str, str] = {}  # cookie value -> server id, only for values that verified

    @classmethod
    def from_config(cls, config: BalancerConfig) -> StickyCookieStrategy:
        sticky = config.sticky
        if sticky.secret is None:
            log.warning(
                "sticky.secret is not set: signing %s cookies with a random key, so they will not "
                "survive a restart of the balancer; set sticky.secret to keep them",
                sticky.cookie_name,
            )
        secret = (sticky.secret or secrets.token_urlsafe(32)).encode()
        return cls(secret, sticky.cookie_name, sticky.max_age_s, sticky.secure, sticky.redispatch)

    def cookie_value(self, server_id: str) -> str:
        """The signed cookie value that pins a client to `server_id`."""
        tag = hmac.new(self._secret, b"lbserver:" + server_id.encode(), hashlib.sha256).digest()[:16]
        return f"{server_id}.{base64.urlsafe_b64encode(tag).rstrip(b'=').decode()}"

    def server_of(self, value: str) -> str | None:
        """The server id a cookie value pins to, or None when it is forged or malformed."""
        server_id = self._verified.get(value)
        if server_id is None:
            claimed = value.rpartition(".")[0]
            # Genuine values are ASCII (RFC 6265 cookie-octets); compare_digest raises on non-ASCII str.
            if not claimed or not value.isascii() or not hmac.compare_digest(self.cookie_value(claimed), value):
                return None
            if len(self._verified) < 4096:  # only genuine values are cached, so this stays small
                self._verified[value] = claimed
            server_id = claimed
        return server_id

    def choose(self, facts: RequestFacts, upstreams: Sequence[UpstreamView]) -> Route:
        value = facts.cookie(self.cookie_name)
        if value is None:
            return self._pin(facts, upstreams, "new")
        server_id = self.server_of(value)
        if server_id is None:
            return self._pin(facts, upstreams, "forged-cookie")
        for upstream in upstreams:
            if upstream.server_id == server_id:
                return Route(upstream, "pinned")
        if not self._redispatch:
            raise NoHealthyUpstream(f"server {server_id} is down and redispatch is off")
        return self._pin(facts, upstreams, "redispatched")

    def _pin(self, facts: RequestFacts, upstreams: Sequence[UpstreamView], reason: str) -> Route:
        upstream = self._balance.choose(facts, upstreams).upstream
        cookie = f"{self.cookie_name}={self.cookie_value(upstream.server_id)}{self._attributes}"
        return Route(upstream, reason, cookie)  # type: ignore[arg-type]
