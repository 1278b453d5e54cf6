"""`sticky-cookie`: the balancer inserts a cookie naming the server (HAProxy `cookie ... insert`).

New clients are balanced round-robin and told, by a Set-Cookie on the response,
which server took them; later requests carrying the cookie go to that server.
The value is `<server id>.<HMAC-SHA256 tag>`, so a client can read where it is
pinned (the lab shows it) but cannot forge a pin to another server or probe
server ids. The proxy removes the cookie before the request reaches the server.

Two modes, as ingress-nginx's `affinity-mode`. `persistent` (the default, HAProxy's
insert cookie): the cookie names the server, and a pin holds until that server is
gone; a server added later takes only new users, and a user redispatched off a
dead server stays where it was moved when the server returns (as AWS ALB does).
`balanced`: the cookie carries a random key instead (`@<key>.<tag>`, signed the
same way), and the server is that key's place on a consistent-hash ring of the
healthy servers. Adding a server moves about 1/N of the users to it, a returning
server gets its keys back, and several balancers agree without sharing state;
with local sessions, every user moved logs in again.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Final

from lbsession.balancer.config import BalancerConfig
from lbsession.balancer.strategies.base import RequestFacts, Route, Strategy, UpstreamView, accepting_new, stable_hash
from lbsession.balancer.strategies.consistent_hash import HashRing
from lbsession.balancer.strategies.round_robin import RoundRobinStrategy
from lbsession.errors import NoHealthyUpstream

BALANCED_PREFIX: Final = "@"  # a balanced-mode pin is a key, not a server id: `@<key>.<tag>`


class StickyCookieStrategy(Strategy):
    """Route by a signed server cookie; balance new and redispatched clients round-robin."""

    name = "sticky-cookie"
    pins = True

    def __init__(
        self,
        secret: bytes,
        cookie_name: str = "LBSERVER",
        max_age_s: int | None = None,
        secure: bool = False,
        redispatch: bool = True,
        clock: Callable[[], float] = time.time,
        mode: str = "persistent",
    ) -> None:
        self.cookie_name = cookie_name
        self.private_cookies = (cookie_name,)  # the proxy strips these before the app server sees them
        self._secret = secret
        self._redispatch = redispatch
        self._attributes = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
        if max_age_s is not None:
            self._attributes += f"; Max-Age={max_age_s}"
        self._max_age_s = max_age_s
        self._clock = clock
        self._balance = RoundRobinStrategy()
        self.mode = mode
        self._rings: dict[tuple[str, ...], HashRing] = {}  # balanced mode: one ring per set of servers
        self._verified: dict[str, tuple[str, int | None]] = {}  # value -> (server id, issued), genuine ones only
        self._issued: dict[str, tuple[int | None, str]] = {}  # server id -> (issue time, its Set-Cookie value)

    @classmethod
    def from_config(cls, config: BalancerConfig) -> StickyCookieStrategy:
        sticky = config.sticky
        # The balancer draws one random key per run when none is configured (see LoadBalancer);
        # a strategy built on its own, as in tests, gets one of its own.
        secret = (sticky.secret or secrets.token_urlsafe(32)).encode()
        return cls(secret, sticky.cookie_name, sticky.max_age_s, sticky.secure, sticky.redispatch, mode=sticky.mode)

    def describe(self) -> dict[str, str]:
        return {"sticky_mode": self.mode}

    def cookie_value(self, server_id: str, issued: int | None = None) -> str:
        """The signed cookie value that pins a client to `server_id`.

        With a max age, the value carries its issue time (`<id>.<time>.<tag>`) under the
        signature, so a pin copied or replayed after it expired is refused, not honoured.
        """
        if self._max_age_s is None:
            signed = f"lbserver:{server_id}"
            prefix = server_id
        else:
            issued = int(self._clock()) if issued is None else issued
            signed = f"lbserver:{server_id}:{issued:x}"
            prefix = f"{server_id}.{issued:x}"
        tag = hmac.digest(self._secret, signed.encode(), "sha256")[:16]  # OpenSSL's one-shot HMAC
        return f"{prefix}.{base64.urlsafe_b64encode(tag).rstrip(b'=').decode()}"

    @classmethod
    def cookie_names(cls, value: str, server_id: str) -> bool:
        """`<server id>.<tag>`, or `<server id>.<issued>.<tag>` with a max age: the id is the prefix.

        A balanced-mode value, `@<key>.<tag>`, names no server: only the ring says where the key goes.
        """
        return not value.startswith(BALANCED_PREFIX) and value.startswith(f"{server_id}.")

    @classmethod
    def cookie_renamed(cls, value: str, server_id: str, other_id: str) -> str | None:
        """Another server's id before our own tag: what `_verify` must refuse."""
        return other_id + value[len(server_id) :] if cls.cookie_names(value, server_id) else None

    def server_of(self, value: str) -> str | None:
        """The server id a cookie value pins to, or None when it is forged, malformed or expired."""
        pin = self._verify(value)
        return None if pin is None or self._stale(pin[1]) else pin[0]

    def _verify(self, value: str) -> tuple[str, int | None] | None:
        """(server id, issue time) of a genuine value, or None."""
        pin = self._verified.get(value)
        if pin is not None:
            return pin
        # Genuine values are ASCII (RFC 6265 cookie-octets); compare_digest raises on non-ASCII str.
        if not value.isascii():
            return None
        if self._max_age_s is None:
            claimed, issued = value.rpartition(".")[0], None
        else:
            claimed, _, stamp = value.rpartition(".")[0].rpartition(".")
            if not stamp or not all(c in "0123456789abcdef" for c in stamp) or len(stamp) > 12:
                return None
            issued = int(stamp, 16)
        if not claimed or not hmac.compare_digest(self.cookie_value(claimed, issued), value):
            return None
        if len(self._verified) < 4096:  # only genuine values are cached, so this stays small
            self._verified[value] = (claimed, issued)
        return claimed, issued

    def _stale(self, issued: int | None) -> bool:
        if issued is None or self._max_age_s is None:
            return False
        age = self._clock() - issued
        return not -60 <= age <= self._max_age_s  # a minute of clock skew between balancers is fine

    def choose(self, facts: RequestFacts, upstreams: Sequence[UpstreamView]) -> Route:
        value = facts.cookie(self.cookie_name)
        if value is None:
            return self._pin(facts, upstreams, "new")
        pin = self._verify(value)
        if pin is None:
            return self._pin(facts, upstreams, "forged-cookie")
        server_id, issued = pin
        if self._stale(issued):
            return self._pin(facts, upstreams, "expired-cookie")
        if server_id.startswith(BALANCED_PREFIX):
            return self._keyed(server_id, issued, upstreams)
        for upstream in upstreams:
            if upstream.server_id == server_id:
                if issued is not None and self._clock() - issued > self._max_age_s / 2:  # type: ignore[operator]
                    # Past half its life: re-issue, so an active user's pin slides (HAProxy's maxidle).
                    return Route(upstream, "pinned", self._set_cookie(server_id))
                return Route(upstream, "pinned")
        if not self._redispatch:
            raise NoHealthyUpstream(f"server {server_id} is down and redispatch is off")
        return self._pin(facts, upstreams, "redispatched")

    def _pin(self, facts: RequestFacts, upstreams: Sequence[UpstreamView], reason: str) -> Route:
        if self.mode == "balanced":
            key = BALANCED_PREFIX + secrets.token_hex(8)  # 64 random bits: where it lands is the ring's choice
            return Route(self._owner(key, accepting_new(upstreams)), reason, self._set_cookie(key))  # type: ignore[arg-type]
        upstream = self._balance.choose(facts, upstreams).upstream
        return Route(upstream, reason, self._set_cookie(upstream.server_id))  # type: ignore[arg-type]

    def _keyed(self, key: str, issued: int | None, upstreams: Sequence[UpstreamView]) -> Route:
        """A balanced pin: the key's owner on the ring of the servers up now (a draining one keeps its keys)."""
        if not upstreams:
            raise NoHealthyUpstream("no healthy upstream")
        upstream = self._owner(key, upstreams)
        if issued is not None and self._clock() - issued > self._max_age_s / 2:  # type: ignore[operator]
            return Route(upstream, "pinned", self._set_cookie(key))  # past half its life: slide, as above
        return Route(upstream, "pinned")

    def _owner(self, key: str, upstreams: Sequence[UpstreamView]) -> UpstreamView:
        ids = tuple([u.server_id for u in upstreams])
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) >= 16:  # health flapping must not grow this without bound
                self._rings.clear()
            ring = self._rings[ids] = HashRing(ids, 160)
        return upstreams[ring.owner(stable_hash(key))]

    def _set_cookie(self, server_id: str) -> str:
        """The Set-Cookie value pinning to `server_id` (or a balanced key), issued now.

        A server's pin is the same for every client pinned to it in the same second (its issue
        time has a second's resolution), so it is signed once per server and second, not once per
        new client: what HAProxy's unsigned `cookie insert` costs, a dictionary lookup.
        """
        issued = None if self._max_age_s is None else int(self._clock())
        cached = self._issued.get(server_id)
        if cached is not None and cached[0] == issued:
            return cached[1]
        header = f"{self.cookie_name}={self.cookie_value(server_id, issued)}{self._attributes}"
        if not server_id.startswith(BALANCED_PREFIX):  # a balanced key is random: never asked for twice
            if len(self._issued) >= 4096:  # server ids come and go with scale-out: keep it bounded
                self._issued.clear()
            self._issued[server_id] = (issued, header)
        return header
