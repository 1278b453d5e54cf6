"""Upgrade tunnels: after `101 Switching Protocols`, both connections carry bytes, nothing else.

RFC 9110 §7.8: once the upstream agrees to switch (a WebSocket, RFC 6455, or any
other protocol named in Upgrade), HTTP is over on both connections, and the proxy
relays bytes both ways until both ends are done:

    client ◄──► TunnelEnd ◄──────── Tunnel ────────► TunnelEnd ◄──► upstream

The two HTTP protocols hand their transports over (`transport.set_protocol`), so a
tunnel costs the ordinary request path nothing. What it keeps from them:

- backpressure: when one side's write buffer is over its high-water mark, the other
  side stops reading until it drains (the transports' own pause/resume signals);
- half-close: an EOF one way is passed on with `write_eof`, and the other way still
  flows; the tunnel ends when both ways have ended, or either connection is lost;
- an idle timeout (`limits.tunnel_timeout_s`, HAProxy's `timeout tunnel`): no byte
  either way for that long, and both connections are closed.

The tunnel holds its upstream's in-flight count for as long as it lives, so
least-conn sees a long-lived WebSocket as the load it is.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbsession.balancer.balancer import LoadBalancer
    from lbsession.balancer.upstream import Upstream


class TunnelEnd(asyncio.Protocol):
    """One side of a tunnel: what it reads goes to the other side's transport."""

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: TunnelEnd | None = None
        self.ended = False  # this side sent its EOF: nothing more will be read from it

    def data_received(self, data: bytes) -> None:
        self.tunnel.touch()
        peer = self.peer
        if peer is not None and not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        peer = self.peer
        if peer is not None and not peer.transport.is_closing() and peer.transport.can_write_eof():
            peer.transport.write_eof()  # the other way may still have bytes to carry: keep it open
        if peer is None or peer.ended:
            self.tunnel.close()
        return True

    def pause_writing(self) -> None:
        # Our peer sends faster than our side reads: stop reading the peer until our buffer drains.
        peer = self.peer
        if peer is not None and not peer.transport.is_closing():
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()


class Tunnel:
    """A client connection and an upstream connection joined after a 101; counted by the balancer."""

    def __init__(self, lb: LoadBalancer, upstream: Upstream, client: asyncio.Transport, server: asyncio.Transport):
        self.lb = lb
        self.upstream = upstream
        self.client = TunnelEnd(self, client)
        self.server = TunnelEnd(self, server)
        self.client.peer, self.server.peer = self.server, self.client
        self.last_s = lb.clock
        self.closed = False

    def start(
        self, to_client: bytes, to_server: bytes, *, client_ended: bool, server_paused: bool, client_paused: bool
    ) -> None:
        """Take both transports over and send what either side had sent ahead of the switch.

        `server_paused` (`client_paused`): that side's reading was paused because the other side's
        write buffer was full; it stays paused until that buffer drains, which now tells this tunnel.
        """
        lb = self.lb
        lb.tunnels.add(self)
        lb.tunnels_opened += 1
        client, server = self.client.transport, self.server.transport
        client.set_protocol(self.client)
        server.set_protocol(self.server)
        if not client_paused:  # any other pause (a pipelining client) belonged to the HTTP exchange
            client.resume_reading()
        if not server_paused:
            server.resume_reading()
        if to_client:
            client.write(to_client)
        if to_server:
            server.write(to_server)
        if client_ended:  # the client half-closed right after its request
            self.client.eof_received()

    def touch(self) -> None:
        """A byte went through: the idle clock starts again."""
        self.last_s = self.lb.clock

    def check_timeout(self, now: float) -> None:
        """Called by the sweeper: close a tunnel silent both ways for `tunnel_timeout_s`."""
        if now - self.last_s > self.lb.limits.tunnel_timeout_s:
            self.lb.tunnel_timeouts += 1
            self.close()

    def close(self) -> None:
        """End the tunnel: close both connections (each flushes what it still has to write)."""
        if self.closed:
            return
        self.closed = True
        self.lb.tunnels.discard(self)
        self.upstream.in_flight -= 1
        for end in (self.client, self.server):
            end.transport.close()

    def abort(self) -> None:
        """Drop both connections at once (the balancer is stopping)."""
        self.close()
        for end in (self.client, self.server):
            end.transport.abort()
