"""The session store interface every backend implements.

Stores work on attributes, not whole sessions: `save` writes only what a
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
from collections.abc import Mapping, Set
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from lbsession.config import AppServerConfig


class SessionStore(ABC):
    """Where an app server keeps sessions: load, save changes, delete."""

    name: ClassVar[str]

    @classmethod
    def from_config(cls, config: AppServerConfig) -> SessionStore:
        """Build the store from the app server's settings."""
        return cls()

    async def start(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Connect or start background work; called once before the first request."""

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

    async def close(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Release connections and stop background work."""

    def describe(self) -> dict[str, Any]:
        """What /healthz shows of the store beyond its name (a cluster node shows its peers)."""
        return {}
