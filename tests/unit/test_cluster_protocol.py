"""The replication channel's frame limits, on in-memory streams: what is refused, and what it costs."""

from __future__ import annotations

import asyncio

import pytest

from lbsession.appserver.cluster.protocol import Channel, MessageTooLarge, ProtocolError

SECRET = b"protocol-test-secret"
LIMIT = 1024


class MemoryWriter:
    """The writing half of a stream that only collects the bytes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def take(self) -> bytes:
        out, self.data = bytes(self.data), bytearray()
        return out


def channel() -> tuple[Channel, asyncio.StreamReader, MemoryWriter]:
    reader, writer = asyncio.StreamReader(), MemoryWriter()
    return Channel(reader, writer, LIMIT), reader, writer  # type: ignore[arg-type]


async def connected_pair() -> tuple[Channel, asyncio.StreamReader, Channel, MemoryWriter]:
    """An accepting and a connecting channel after the challenge; the second's bytes are fed by hand."""
    acceptor, acceptor_in, acceptor_out = channel()
    connector, connector_in, connector_out = channel()
    await acceptor.accept(SECRET)
    connector_in.feed_data(acceptor_out.take())
    await connector.connect(SECRET)
    return acceptor, acceptor_in, connector, connector_out


async def test_a_message_over_the_frame_limit_is_refused_and_the_channel_stays_usable() -> None:
    acceptor, acceptor_in, connector, connector_out = await connected_pair()

    with pytest.raises(MessageTooLarge, match=f"over the {LIMIT}-byte frame limit"):
        connector.send({"type": "change", "change": {"blob": "x" * LIMIT}})
    assert connector_out.take() == b""  # nothing written
    connector.send({"type": "ping"})
    acceptor_in.feed_data(connector_out.take())

    assert await acceptor.receive() == {"type": "ping"}  # the refused one used no sequence number


async def test_a_frame_declared_over_a_lowered_limit_is_refused_before_it_is_read() -> None:
    acceptor, acceptor_in, _, _ = await connected_pair()
    acceptor_in.feed_data((LIMIT - 1).to_bytes(4, "big"))  # the header only: the body never comes

    with pytest.raises(ProtocolError, match="over the 64-byte limit"):
        await asyncio.wait_for(acceptor.receive(max_bytes=64), timeout=5)


async def test_a_challenge_declared_longer_than_a_challenge_is_refused_at_once() -> None:
    connector, connector_in, _ = channel()
    connector_in.feed_data(LIMIT.to_bytes(4, "big"))

    with pytest.raises(ProtocolError, match="over the 32-byte limit"):
        await asyncio.wait_for(connector.connect(SECRET), timeout=5)
