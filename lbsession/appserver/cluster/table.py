"""A node's full copy of every session, merged attribute by attribute, last writer wins.

Each attribute carries the version of the write that set or removed it: a
Lamport clock paired with the writer's node id, compared as a tuple, so every
node orders two concurrent writes the same way without synchronised clocks.
Removals and session deletes are tombstones that carry a version too, so a
late, older write cannot bring an attribute or a logged-out session back.

A change is what travels between nodes, and what a snapshot is made of:

    {"sid": ..., "ttl_ms": ..., "set": {attr: [json, version]}, "del": {attr: version}, "drop": version}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Set
from typing import Any

Version = tuple[int, str]


class _Entry:
    __slots__ = ("attrs", "dropped", "expires_at")

    def __init__(self) -> None:
        self.attrs: dict[str, tuple[str | None, Version]] = {}  # value None: removed
        self.dropped: Version | None = None  # the session was deleted by this write
        self.expires_at = 0.0

    def live(self) -> dict[str, str]:
        return {key: value for key, (value, _) in self.attrs.items() if value is not None}


class SessionTable:
    """Every session this node knows, with the versions that let copies converge."""

    def __init__(self, node_id: str, *, tombstone_ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.node_id = node_id
        self.lamport = 0
        self._tombstone_ttl_s = tombstone_ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def _next_version(self) -> Version:
        self.lamport += 1
        return (self.lamport, self.node_id)

    def load(self, sid: str, ttl_s: float | None) -> dict[str, str] | None:
        """The session's encoded attributes, or None; renews its expiry on this node when `ttl_s` is given."""
        entry = self._entries.get(sid)
        if entry is None or entry.expires_at <= self._clock():
            return None
        fields = entry.live()
        if not fields:
            return None
        if ttl_s is not None:
            entry.expires_at = max(entry.expires_at, self._clock() + ttl_s)
        return fields

    def write(self, sid: str, encoded: Mapping[str, str], removed: Set[str], ttl_s: float) -> dict[str, Any]:
        """Apply a local write and return the change to replicate."""
        version = self._next_version()
        change: dict[str, Any] = {
            "sid": sid,
            "ttl_ms": round(ttl_s * 1000),
            "set": {key: [value, list(version)] for key, value in encoded.items()},
            "del": {key: list(version) for key in removed},
        }
        self.apply(change)
        return change

    def drop(self, sid: str) -> dict[str, Any]:
        """Delete a session locally and return the change to replicate."""
        change = {"sid": sid, "ttl_ms": round(self._tombstone_ttl_s * 1000), "drop": list(self._next_version())}
        self.apply(change)
        return change

    def apply(self, change: Mapping[str, Any]) -> None:
        """Merge a change (local or from a peer): per attribute, the higher version wins."""
        sid = change["sid"]
        entry = self._entries.get(sid)
        if entry is None:
            entry = self._entries[sid] = _Entry()
        for key, (value, version) in change.get("set", {}).items():
            self._merge(entry, key, value, _version(version))
        for key, version in change.get("del", {}).items():
            self._merge(entry, key, None, _version(version))
        if "drop" in change:
            dropped = _version(change["drop"])
            self._observe(dropped)
            if entry.dropped is None or dropped > entry.dropped:
                entry.dropped = dropped
                entry.attrs = {k: v for k, v in entry.attrs.items() if v[1] > dropped}
        now = self._clock()
        if entry.live():
            entry.expires_at = max(entry.expires_at, now + change["ttl_ms"] / 1000)
        else:
            # Nothing left to serve: only the versions are kept, long enough for a late write to lose
            # against them, not for the rest of the session's life (logouts would pile up for 30 min).
            # A tombstone from a snapshot keeps the time it had left, so relinking never renews it.
            keep_s = min(change["ttl_ms"] / 1000, self._tombstone_ttl_s)
            entry.expires_at = min(max(entry.expires_at, now + keep_s), now + self._tombstone_ttl_s)

    def _merge(self, entry: _Entry, key: str, value: str | None, version: Version) -> None:
        self._observe(version)
        if entry.dropped is not None and version <= entry.dropped:
            return  # written before the session was deleted
        current = entry.attrs.get(key)
        if current is None or version > current[1]:
            entry.attrs[key] = (value, version)

    def _observe(self, version: Version) -> None:
        self.lamport = max(self.lamport, version[0])

    def count(self) -> int:
        """Live sessions (unexpired, with at least one attribute)."""
        now = self._clock()
        return sum(1 for e in self._entries.values() if e.expires_at > now and e.live())

    def snapshot(self) -> Iterator[dict[str, Any]]:
        """Every unexpired entry, tombstones included, as changes a new node can apply."""
        now = self._clock()
        for sid, entry in list(self._entries.items()):
            if entry.expires_at <= now:
                continue
            change: dict[str, Any] = {
                "sid": sid,
                "ttl_ms": round((entry.expires_at - now) * 1000),
                "set": {k: [v, list(ver)] for k, (v, ver) in entry.attrs.items() if v is not None},
                "del": {k: list(ver) for k, (v, ver) in entry.attrs.items() if v is None},
            }
            if entry.dropped is not None:
                change["drop"] = list(entry.dropped)
            yield change

    def purge(self) -> int:
        """Forget expired sessions and tombstones; return how many went."""
        now = self._clock()
        expired = [sid for sid, entry in self._entries.items() if entry.expires_at <= now]
        for sid in expired:
            del self._entries[sid]
        return len(expired)


def _version(raw: Any) -> Version:
    """A version from the wire; ValueError if it is not [int, str]."""
    lamport, node = raw
    if not isinstance(lamport, int) or not isinstance(node, str):
        raise ValueError(f"not a version: {raw!r}")
    return (lamport, node)
