"""The balancer's event bus: every routing decision and server change, for whoever watches.

The proxy calls into the bus only behind `if lb.events.active:`, one attribute
test, so a balancer nobody watches pays nothing more per request. Publishing is
synchronous and never waits: each subscriber has a bounded queue, and when a
slow viewer's queue is full its new events are dropped and counted; its next
batch starts with a `dropped` event saying how many. A viewer can miss events,
but it can never slow the proxy down (the backpressure stops at the queue).

Events are plain dicts, JSON-ready:

    {"type": "request", "t", "client", "user", "server", "strategy", "reason", "status", "method", "path", "by"}
    {"type": "server", "t", "server", "state", "healthy", "draining"}   state: what changed (added, down, ...)
    {"type": "strategy", "t", "strategy"}
    {"type": "dropped", "t", "dropped"}                                  only in a subscriber's own stream

`user` is a short stable hash of the session cookie, never its value: the
stream shows that two requests belong to one user without handing a bearer
token to everyone who can open the dashboard. A session cookie names its session
up to its first dot: a server-side store's id has none, and the cookie store's
value, whose sealed part changes with every response, leads with the session's
public handle (`<handle>.<token>`), so one user stays one user as it writes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from lbsession.balancer.proxy import ClientConnection
    from lbsession.balancer.upstream import Upstream

Event = dict[str, Any]

DEFAULT_QUEUE_SIZE: Final = 2048
MAX_PATH_CHARS: Final = 80


@functools.lru_cache(maxsize=4096)  # a user sends the same cookie again and again
def user_tag(session_id: str) -> str:
    """A short, stable, one-way tag of a session cookie: names a user in the stream without revealing the id."""
    name = session_id.partition(".")[0]  # the cookie store's handle, before the sealed part that changes
    return hashlib.blake2b(name.encode(), digest_size=4, person=b"lbs-user").hexdigest()


class Subscription:
    """One viewer's bounded queue of events."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.dropped = 0  # events lost since the last batch was taken
        self.closed = False
        self._events: deque[Event] = deque()
        self._wakeup: asyncio.Future[None] | None = None

    def offer(self, event: Event) -> bool:
        """Queue an event, or count it as dropped when the queue is full (False); never blocks."""
        if len(self._events) >= self.maxsize:
            self.dropped += 1
            return False
        self._events.append(event)
        self._wake()
        return True

    def close(self) -> None:
        """End the subscription: a waiting `next_batch` returns None."""
        self.closed = True
        self._wake()

    async def next_batch(self, timeout_s: float | None = None) -> list[Event] | None:
        """Every queued event (after a `dropped` event if some were lost); [] on timeout; None once closed."""
        if not self._events and not self.dropped and not self.closed:
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._wakeup
            except TimeoutError:
                return []
            finally:
                self._wakeup = None
        if self.closed:
            return None
        batch = list(self._events)
        self._events.clear()
        if self.dropped:
            batch.insert(0, {"type": "dropped", "t": time.time(), "dropped": self.dropped})
            self.dropped = 0
        return batch

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)


class EventBus:
    """Fans the balancer's events out to subscribers; costs one attribute test when nobody listens."""

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, session_cookie: str = "SESSION") -> None:
        self.active = False  # the proxy's whole cost when nobody listens: reading this
        self.queue_size = queue_size
        self.session_cookie = session_cookie  # the app servers' cookie, hashed into `user`
        self.published = 0
        self.dropped = 0  # over every subscriber, for the metrics
        self.strategy = ""  # kept up to date by the balancer, so an event needs no lookup
        self._subscribers: list[Subscription] = []

    @property
    def subscribers(self) -> int:
        """How many viewers are subscribed."""
        return len(self._subscribers)

    def subscribe(self, maxsize: int | None = None) -> Subscription:
        """A new subscription with a queue of `maxsize` events (default: the bus's queue size)."""
        subscription = Subscription(maxsize or self.queue_size)
        self._subscribers.append(subscription)
        self.active = True
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop delivering to `subscription`, and close it."""
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)
        subscription.close()
        self.active = bool(self._subscribers)

    def close(self) -> None:
        """Close every subscription (the balancer is stopping)."""
        for subscription in list(self._subscribers):
            self.unsubscribe(subscription)

    def publish(self, event: Event) -> None:
        """Give `event` to every subscriber; synchronous, never waits."""
        self.published += 1
        for subscription in self._subscribers:
            if not subscription.offer(event):
                self.dropped += 1

    # -------------------------------------------------------------- what the balancer publishes

    def request_answered(self, client: ClientConnection, status: int, by: str, server_id: str | None = None) -> None:
        """A response is going to the client: from an upstream (`by="upstream"`) or the balancer itself."""
        route, req = client.route, client.req
        facts = client.facts if req is not None else None  # a refused head has no facts of its own
        session_id = facts.cookie(self.session_cookie) if facts is not None else None
        if server_id is None and route is not None:
            server_id = route.upstream.server_id
        path = req.target.split(b"?", 1)[0][:MAX_PATH_CHARS].decode("latin-1") if req is not None else None
        self.publish(
            {
                "type": "request",
                "t": time.time(),
                "client": facts.client_ip if facts is not None else client.client_ip,
                "user": user_tag(session_id) if session_id else None,
                "server": server_id,
                "strategy": self.strategy,
                "reason": route.reason if route is not None else None,
                "status": status,
                "method": req.method.decode("latin-1") if req is not None else None,
                "path": path,
                "by": by,
            }
        )

    def server_changed(self, upstream: Upstream, what: str) -> None:
        """An upstream was added, removed, went up or down, or (un)drained."""
        if self.active:
            self.publish(
                {
                    "type": "server",
                    "t": time.time(),
                    "server": upstream.server_id,
                    "state": what,
                    "healthy": upstream.healthy,
                    "draining": upstream.draining,
                }
            )

    def strategy_changed(self, name: str) -> None:
        """The routing strategy was switched."""
        self.strategy = name
        if self.active:
            self.publish({"type": "strategy", "t": time.time(), "strategy": name})
