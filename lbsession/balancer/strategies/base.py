"""What every routing strategy sees and returns.

A strategy is synchronous and does no I/O: given the facts of one request and
the upstreams that may take it, it names one upstream, the reason, and the
cookie to set if any. That keeps each one a plain object that the unit tests
drive as a function, and keeps the proxy's data path free of awaits.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol, get_args

from mypy_extensions import mypyc_attr  # mypyc's class options, for the compiled build

from lbsession.errors import NoHealthyUpstream

if TYPE_CHECKING:
    from lbsession.balancer.config import BalancerConfig


RouteReason = Literal["new", "pinned", "rehashed", "redispatched", "forged-cookie", "expired-cookie", "retried"]
ROUTE_REASONS: tuple[RouteReason, ...] = get_args(RouteReason)


class UpstreamView(Protocol):
    """The little a strategy may know about an upstream."""

    @property
    def server_id(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def draining(self) -> bool: ...


class HeaderSource(Protocol):
    """Where a strategy reads a request header: `get(lower-case name)`; a dict will do in tests."""

    def get(self, name: str, default: None = None, /) -> str | None: ...


class RequestFacts:
    """The facts of one request a strategy may route on: client address, cookies, headers."""

    __slots__ = ("_cookie_header", "_cookies", "_headers", "client_ip")

    def __init__(
        self,
        client_ip: str,
        cookie_header: str | None = None,
        headers: HeaderSource | None = None,
        cookies: dict[str, str] | None = None,
    ) -> None:
        self.client_ip = client_ip
        self._cookie_header = cookie_header
        self._headers: HeaderSource = headers if headers is not None else {}
        self._cookies = cookies  # already parsed (the proxy reuses a connection's last parse), or None

    def cookie(self, name: str) -> str | None:
        """The value of cookie `name`, or None; parsed once, on first use."""
        if self._cookies is None:
            self._cookies = parse_cookie_header(self._cookie_header or "")
        return self._cookies.get(name)

    def header(self, name: str) -> str | None:
        """A request header by lower-case name, or None."""
        return self._headers.get(name)


def parse_cookie_header(value: str) -> dict[str, str]:
    """Parse a Cookie request header (RFC 6265 §5.4) leniently; the first of a repeated name wins."""
    cookies: dict[str, str] = {}
    for pair in value.split(";"):
        name, sep, val = pair.partition("=")
        name = name.strip()
        if sep and name and name not in cookies:
            cookies[name] = val.strip().strip('"')
    return cookies


class Route:
    """A strategy's answer: where the request goes, why, and the Set-Cookie value to add.

    A plain class with slots: one is made per request, and compiled (mypyc) it is a C struct
    built without the interpreter, where a NamedTuple's `__new__` stays Python code.
    """

    __slots__ = ("reason", "set_cookie", "upstream")

    def __init__(self, upstream: UpstreamView, reason: RouteReason, set_cookie: str | None = None) -> None:
        self.upstream = upstream
        self.reason = reason
        self.set_cookie = set_cookie

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Route):
            return NotImplemented
        return (self.upstream, self.reason, self.set_cookie) == (other.upstream, other.reason, other.set_cookie)

    def __hash__(self) -> int:
        return hash((self.upstream, self.reason, self.set_cookie))

    def __repr__(self) -> str:
        return f"Route(upstream={self.upstream!r}, reason={self.reason!r}, set_cookie={self.set_cookie!r})"


# A plug-in strategy is an interpreted subclass, which a compiled class refuses unless told.
@mypyc_attr(allow_interpreted_subclasses=True)
class Strategy(ABC):
    """Choose an upstream for a request. Synchronous, no I/O, never imports aiohttp.

    A strategy also declares what the rest of lbsession needs to know of it, so that
    a new strategy is its module plus its registry line: whether it keeps a user on
    one server (`pins`: the lab then expects no re-login even with local sessions),
    which cookies are the balancer's own (`private_cookies`: stripped before the
    request reaches the app server), and how to read its cookie as a client can
    (`cookie_names`, `cookie_renamed`: the lab's checks of C2 and C12).
    """

    name: ClassVar[str]
    pins: ClassVar[bool] = False
    private_cookies: tuple[str, ...] = ()  # per instance when the name is a setting

    @classmethod
    def cookie_names(cls, value: str, server_id: str) -> bool:
        """Does a value of this strategy's cookie name `server_id`? Read as a client can: unverified."""
        return False

    @classmethod
    def cookie_renamed(cls, value: str, server_id: str, other_id: str) -> str | None:
        """`value`, naming `server_id`, altered to name `other_id` under its own signature: a client's forgery."""
        return None

    def describe(self) -> dict[str, Any]:
        """The settings that shape this strategy's routing, for GET /status and the dashboard (none by default)."""
        return {}

    def counters(self) -> dict[str, Any]:
        """What this strategy counted of its own decisions since it was built, for GET /status (none by default)."""
        return {}

    @classmethod
    def from_config(cls, config: BalancerConfig) -> Strategy:
        """Build the strategy from the balancer's settings."""
        return cls()

    @abstractmethod
    def choose(self, facts: RequestFacts, upstreams: Sequence[UpstreamView]) -> Route:
        """Pick one of `upstreams` (healthy, in configured order); raise NoHealthyUpstream if none fits."""


def accepting_new(upstreams: Sequence[UpstreamView]) -> Sequence[UpstreamView]:
    """The upstreams that take new clients: healthy and not draining (HAProxy's weight 0 drain)."""
    for upstream in upstreams:
        if upstream.draining:
            break
    else:
        if upstreams:
            return upstreams  # the usual case: nobody is draining, and no list is built per request
    fresh = [u for u in upstreams if not u.draining]
    if not fresh:
        raise NoHealthyUpstream("no healthy upstream accepts new clients")
    return fresh


def stable_hash(key: str) -> int:
    """A 64-bit hash that is the same in every process (unlike hash(), which is salted).

    A client sends the same key (its address, its cookie) request after request, so the hashes
    are remembered: a dictionary lookup instead of a BLAKE2 object per request. Bounded, so a
    client inventing keys cannot grow it.
    """
    known = _HASHES.get(key)
    if known is None:
        known = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
        if len(_HASHES) >= 65536:
            _HASHES.clear()
        _HASHES[key] = known
    return known


_HASHES: Final[dict[str, int]] = {}


def hash_key(facts: RequestFacts, key: str) -> str:
    """The string a hashing strategy hashes: the client IP, or a header or cookie value."""
    if key == "client-ip":
        return facts.client_ip
    kind, _, name = key.partition(":")
    value = facts.header(name.lower()) if kind == "header" else facts.cookie(name)
    # A request without the key falls back to its address, as nginx's `hash` does with an empty key.
    return value if value else facts.client_ip
