"""The balancer's event bus: bounded queues, drops told to the slow viewer, and what the proxy publishes.

The proxy is driven in memory, as benchmarks/datapath.py does: real protocols,
transports that keep what is written.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lbsession.balancer.balancer import LoadBalancer
from lbsession.balancer.events import EventBus, user_tag
from lbsession.balancer.proxy import ClientConnection, UpstreamConnection
from lbsession.config import BalancerConfig, StickyConfig, UpstreamConfig

SESSION_ID = "s3cr3t-session-id-of-forty-three-characters"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class MemoryTransport:
    """Just enough of a transport for the protocols: it keeps what they write."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.7", 50000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closed = True


def balancer(strategy: str = "round-robin", servers: int = 2) -> LoadBalancer:
    """A balancer whose upstreams each have one pooled in-memory connection."""
    upstreams = tuple(UpstreamConfig(id=f"was-{i}", url=f"http://127.0.0.1:{9001 + i}") for i in range(1, servers + 1))
    lb = LoadBalancer(BalancerConfig(strategy=strategy, upstreams=upstreams, sticky=StickyConfig(secret="k" * 32)))
    for upstream in lb.pool.upstreams.values():
        conn = UpstreamConnection(lb, upstream)
        conn.connection_made(MemoryTransport())  # type: ignore[arg-type]
        upstream.idle.append(conn)
    return lb


def client_of(lb: LoadBalancer) -> ClientConnection:
    """A client connection from 127.0.0.7."""
    client = ClientConnection(lb)
    client.connection_made(MemoryTransport())  # type: ignore[arg-type]
    return client


def exchange(client: ClientConnection, request: bytes, response: bytes = RESPONSE) -> None:
    """One request through the proxy, answered by whichever upstream it was routed to."""
    client.data_received(request)
    assert client.upstream_conn is not None
    client.upstream_conn.data_received(response)


async def test_nobody_listening_means_inactive_and_nothing_queued() -> None:
    bus = EventBus()
    assert not bus.active
    bus.publish({"type": "x"})
    assert bus.subscribers == 0


async def test_a_subscriber_gets_events_in_order() -> None:
    bus = EventBus()
    subscription = bus.subscribe()
    assert bus.active
    for i in range(3):
        bus.publish({"type": "x", "i": i})
    assert await subscription.next_batch() == [{"type": "x", "i": 0}, {"type": "x", "i": 1}, {"type": "x", "i": 2}]


async def test_a_waiting_subscriber_wakes_on_publish() -> None:
    bus = EventBus()
    subscription = bus.subscribe()
    waiting = asyncio.create_task(subscription.next_batch(timeout_s=5))
    await asyncio.sleep(0)
    bus.publish({"type": "x"})
    assert await waiting == [{"type": "x"}]


async def test_a_slow_subscriber_drops_and_is_told_how_many() -> None:
    bus = EventBus()
    slow, fast = bus.subscribe(maxsize=3), bus.subscribe(maxsize=100)
    for i in range(10):
        bus.publish({"type": "x", "i": i})
    batch = await slow.next_batch()
    assert batch is not None
    assert batch[0]["type"] == "dropped" and batch[0]["dropped"] == 7
    assert [e["i"] for e in batch[1:]] == [0, 1, 2]
    assert bus.dropped == 7
    fast_batch = await fast.next_batch()
    assert fast_batch is not None and len(fast_batch) == 10  # one slow viewer costs the others nothing
    bus.publish({"type": "x", "i": 10})
    assert await slow.next_batch() == [{"type": "x", "i": 10}]  # told once, then back to normal


async def test_next_batch_times_out_empty_and_ends_with_none_when_closed() -> None:
    bus = EventBus()
    subscription = bus.subscribe()
    assert await subscription.next_batch(timeout_s=0.01) == []
    bus.unsubscribe(subscription)
    assert not bus.active
    assert await subscription.next_batch(timeout_s=1) is None


async def test_close_ends_every_subscription() -> None:
    bus = EventBus()
    subscriptions = [bus.subscribe() for _ in range(3)]
    waiting = [asyncio.create_task(s.next_batch(timeout_s=5)) for s in subscriptions]
    await asyncio.sleep(0)
    bus.close()
    assert await asyncio.gather(*waiting) == [None, None, None]
    assert not bus.active


def test_user_tag_is_short_stable_and_not_the_id() -> None:
    tag = user_tag(SESSION_ID)
    assert tag == user_tag(SESSION_ID)
    assert len(tag) == 8 and int(tag, 16) >= 0
    assert tag not in SESSION_ID and user_tag(SESSION_ID + "x") != tag


def test_user_tag_names_a_cookie_store_session_by_its_handle_not_by_the_sealed_part() -> None:
    # The cookie store's values of one session: one handle, a sealed part that changes with each response.
    assert user_tag("HANDLEhandle.gAAAAAfirst") == user_tag("HANDLEhandle.gAAAAAsecond") == user_tag("HANDLEhandle")
    assert user_tag("HANDLEhandle.gAAAAAfirst") != user_tag("OTHERhandle0.gAAAAAfirst")


async def test_the_proxy_publishes_each_answered_request() -> None:
    lb = balancer()
    subscription = lb.events.subscribe()
    client = client_of(lb)
    request = b"GET /me?token=hidden HTTP/1.1\r\nHost: lb\r\nCookie: SESSION=%s\r\n\r\n" % SESSION_ID.encode()
    exchange(client, request)
    exchange(client, request, b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
    batch = await subscription.next_batch()
    assert batch is not None
    first, second = batch
    assert first["type"] == "request" and first["by"] == "upstream"
    assert (first["client"], first["method"], first["path"]) == ("127.0.0.7", "GET", "/me")  # no query string
    assert first["user"] == user_tag(SESSION_ID) and SESSION_ID not in repr(batch)
    assert (first["strategy"], first["reason"], first["status"]) == ("round-robin", "new", 200)
    assert (first["server"], second["server"], second["status"]) == ("was-1", "was-2", 401)


async def test_the_proxy_publishes_its_own_answers_too() -> None:
    lb = balancer()
    subscription = lb.events.subscribe()
    for server_id in list(lb.pool.upstreams):
        lb.pool.remove(server_id)
    client_of(lb).data_received(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
    batch = await subscription.next_batch()
    assert batch is not None
    removed = [e for e in batch if e["type"] == "server"]
    assert [(e["server"], e["state"]) for e in removed] == [("was-1", "removed"), ("was-2", "removed")]
    answer = batch[-1]
    assert (answer["type"], answer["by"], answer["status"], answer["server"]) == ("request", "lb", 503, None)


async def test_switching_strategy_is_an_event_and_requests_carry_the_new_name() -> None:
    lb = balancer()
    subscription = lb.events.subscribe()
    lb.set_strategy("sticky-cookie")
    exchange(client_of(lb), b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
    batch = await subscription.next_batch()
    assert batch is not None
    assert batch[0] == {"type": "strategy", "t": batch[0]["t"], "strategy": "sticky-cookie"}
    assert batch[1]["strategy"] == "sticky-cookie"


@pytest.mark.parametrize("strategy", ["round-robin", "sticky-cookie"])
async def test_without_subscribers_the_proxy_publishes_nothing(strategy: str) -> None:
    lb = balancer(strategy)
    client = client_of(lb)
    for _ in range(5):
        exchange(client, b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
    assert lb.events.published == 0
    subscription = lb.events.subscribe()
    lb.events.unsubscribe(subscription)
    exchange(client, b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
    assert lb.events.published == 0
