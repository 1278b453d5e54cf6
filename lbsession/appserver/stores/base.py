"""The session store interfaces: server-side stores (by id) and client-side ones (the cookie is the session).

Server-side stores work on attributes, not whole sessions: `save` writes only what a
request changed or removed. Two requests of one user handled at once by two
servers that touch different attributes therefore both keep their change,
which a whole-session write would lose (the lost-update problem of shared
stores). Values are JSON-serialisable.

`load` returning None means "there is no such session". A store that cannot
answer raises StoreUnavailable instead: the app server turns that into a 503,
never into "please log in again", because confusing the two is the very bug
this lab is about.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Set
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

if TYPE_CHECKING:
    from lbsession.appserver.config import AppServerConfig


class StoreStat(NamedTuple):
    """One number a store keeps itself, which the app server's /metrics exposes as a Prometheus sample."""

    name: str  # the family, e.g. lbsession_redis_round_trips
    help: str
    value: float
    kind: Literal["counter", "gauge"] = "counter"
    labels: tuple[tuple[str, str], ...] = ()  # besides `server`, e.g. (("state", "up"),)


class Store(ABC):
    """What every session store is: its declared facts, its lifecycle and its own numbers.

    A store declares what the rest of the lab needs to know of it, so that a new
    store is its module plus its registry line: whether every app server sees the same
    sessions (`shared`: a user may land anywhere without logging in again), whether
    it keeps them at all (`client_side`: the session travels sealed in its cookie),
    and the config section holding its settings (`settings`, None when it has none).
    """

    name: ClassVar[str]
    shared: ClassVar[bool] = False  # do all app servers see one set of sessions (shared or replicated)?
    client_side: ClassVar[bool] = False  # a ClientSideStore: no server state, the cookie is the session
    settings: ClassVar[str | None] = None  # its section of the app server's config (`app.<settings>`)
    # Latencies the store times itself: histogram family -> (help, buckets); see report_timings.
    timings: ClassVar[Mapping[str, tuple[str, tuple[float, ...]]]] = {}

    @classmethod
    def from_config(cls, config: AppServerConfig) -> Store:
        """Build the store from the app server's settings."""
        return cls()

    async def start(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Connect or start background work; called once before the first request."""

    async def close(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Release connections and stop background work."""

    def describe(self) -> dict[str, Any]:
        """What /healthz shows of the store beyond its name (a cluster node shows its peers)."""
        return {}

    def stats(self) -> list[StoreStat]:
        """The counters and gauges the store keeps itself, read when Prometheus scrapes."""
        return []

    def report_timings(self, observe: Callable[[str, float], None]) -> None:  # noqa: B027 - optional hook
        """From now on, call `observe(family, seconds)` for each latency of `timings` the store measures."""


class SessionStore(Store):
    """A server-side store: sessions kept by id, loaded and saved attribute by attribute."""

    @abstractmethod
    async def load(self, session_id: str, ttl_s: float | None = None) -> dict[str, Any] | None:
        """The session's attributes, or None if there is no such session.

        With `ttl_s`, a found session's lifetime is renewed to `ttl_s` from now
        (sliding expiry), in the same round trip.
        """

    @abstractmethod
    async def save(self, session_id: str, changed: Mapping[str, Any], removed: Set[str], ttl_s: float) -> None:
        """Write the changed attributes and drop the removed ones; create the session if absent."""

    @abstractmethod
    async def delete(self, session_id: str) -> None:
        """Destroy the session; deleting a missing session is not an error."""

    @abstractmethod
    async def count(self) -> int:
        """How many live sessions the store holds; raises StoreUnavailable like every call."""


class Opened(NamedTuple):
    """A sealed cookie value, opened: whose session it is, what it holds, how old the seal is."""

    session_id: str
    attributes: dict[str, Any]
    age_s: float


class ClientSideStore(Store):
    """A store that keeps nothing: the whole session travels in its cookie, sealed (authenticated, encrypted).

    The session middleware hands it the cookie's value rather than an id: `open` turns a
    value into a session (None for a forged, foreign, truncated or expired one: a fresh
    anonymous session, never an error) and `seal` turns a session into the value set on
    the response. Every response that changes the session rewrites the whole of it.
    """

    shared = True  # every server holding the keys opens every cookie
    client_side = True

    @abstractmethod
    async def open(self, value: str, ttl_s: float) -> Opened | None:
        """The session sealed in `value`, or None when it is not genuine or older than `ttl_s`."""

    @abstractmethod
    async def seal(self, session_id: str, attributes: Mapping[str, Any], ttl_s: float) -> str:
        """The cookie value that carries the session; SessionTooLarge when it would not fit a cookie."""

    async def revoke(self, session_id: str, ttl_s: float) -> None:
        """At logout or login: refuse `session_id`'s cookies from now on, for the `ttl_s` they may live.

        Only a store with somewhere to remember it (a deny-list) can; by default it cannot, and a
        copy of the cookie made before logout stays valid until its max age.
        """
        return
