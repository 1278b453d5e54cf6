"""`local`: sessions in the memory of one app server process.

This is the store that shows the bug: each server has its own dict, so a
session created on was-1 does not exist on was-2. It dies with its process.

It behaves like the Redis store on purpose, so a scenario compares topologies
and not two different session semantics:

- each attribute is stored JSON-encoded, like a field of a Redis hash, and
  `load` decodes a fresh dict: mutating it never changes the store, and a value
  that would not survive the trip to Redis fails here too;
- a session with no attributes does not exist (a hash with no fields is no key);
- expiry is per session, renewed by `save` and by `load(ttl_s=...)` (Redis
  `EXPIRE`); an expired session is invisible at once and its memory is
  reclaimed by a periodic sweep (Redis expires lazily on access plus a sweep).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from lbsession.appserver.stores.base import SessionStore
from lbsession.appserver.stores.codec import decode_attributes, encode_attributes


@dataclass(slots=True)
class _Entry:
    expires_at: float
    fields: dict[str, str] = field(default_factory=dict)


class LocalStore(SessionStore):
    """An in-process dict of sessions with per-session TTL; lost when the process dies."""

    name = "local"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, sweep_interval_s: float = 60.0) -> None:
        if sweep_interval_s <= 0:
            raise ValueError(f"sweep_interval_s must be greater than 0, not {sweep_interval_s}")
        self._clock = clock
        self._sweep_interval_s = sweep_interval_s
        self._sessions: dict[str, _Entry] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="lbsession-local-store-sweep")

    async def load(self, session_id: str, ttl_s: float | None = None) -> dict[str, Any] | None:
        entry = self._live(session_id)
        if entry is None:
            return None
        if ttl_s is not None:
            entry.expires_at = self._clock() + ttl_s
        return decode_attributes(entry.fields)

    async def save(self, session_id: str, changed: Mapping[str, Any], removed: Set[str], ttl_s: float) -> None:
        # Encode everything before touching the entry, so a bad value leaves the session as it was.
        encoded = encode_attributes(changed)
        entry = self._live(session_id)
        if entry is None:
            if not encoded:
                return  # like HDEL on a missing key: nothing to create
            entry = self._sessions[session_id] = _Entry(expires_at=0.0)
        for key in removed:
            entry.fields.pop(key, None)
        entry.fields.update(encoded)
        if not entry.fields:
            del self._sessions[session_id]  # like Redis dropping a hash whose last field went
            return
        entry.expires_at = self._clock() + ttl_s

    async def delete(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def count(self) -> int:
        self.purge_expired()
        return len(self._sessions)

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    def purge_expired(self) -> int:
        """Drop every expired session now; return how many went."""
        now = self._clock()
        expired = [sid for sid, entry in self._sessions.items() if entry.expires_at <= now]
        for sid in expired:
            del self._sessions[sid]
        return len(expired)

    def _live(self, session_id: str) -> _Entry | None:
        entry = self._sessions.get(session_id)
        if entry is not None and entry.expires_at <= self._clock():
            del self._sessions[session_id]
            return None
        return entry

    async def _sweep_forever(self) -> None:
        # Expired sessions are already invisible; the sweep only gives their memory back,
        # so a wall-clock interval is fine even when the expiry clock is injected.
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            self.purge_expired()
