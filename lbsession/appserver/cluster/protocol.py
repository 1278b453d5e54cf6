"""The replication channel between cluster nodes: length-prefixed JSON frames, each one authenticated.

Why a framed TCP protocol and not an HTTP endpoint: a `sync` write waits for
every peer's acknowledgement before the user gets an answer, so the round trip
is on the user's critical path. A frame on a persistent stream costs tens of
microseconds; an HTTP request through aiohttp's client costs hundreds.

    frame  = length (4 bytes, big-endian) | tag (32 bytes) | payload (JSON object)
    tag    = HMAC-SHA256(connection key, direction | seq | payload)
    key    = HMAC-SHA256(shared secret, "lbsession-cluster:" | challenge)

The accepting side opens every connection with a fresh random challenge (the
only unauthenticated frame). Every later frame in each direction carries a
sequence number one above the last. So a frame recorded on one connection is
worthless on any other (another key), and cannot be replayed or reordered on
its own (another sequence number). A frame longer than the configured bound is
refused before it is read, so a peer cannot make a node buffer without limit;
the handshake's frames have bounds of their own, far below it, since they are
read before anything is authenticated.

    Exception
    ├── ProtocolError       the peer broke the protocol: close the connection
    └── MessageTooLarge     we were about to: nothing was sent, the connection is fine
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
from typing import Any

CHALLENGE_BYTES = 32
TAG_BYTES = 32


class ProtocolError(Exception):
    """A frame was malformed, too large, forged or replayed; the connection must be closed."""


class MessageTooLarge(Exception):
    """A message to send would make a frame over the limit; it was not sent and the connection is still usable."""


def connection_key(secret: bytes, challenge: bytes) -> bytes:
    """The key that authenticates every frame of one connection."""
    return hmac.new(secret, b"lbsession-cluster:" + challenge, hashlib.sha256).digest()


class Channel:
    """One authenticated, ordered connection between two nodes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame_bytes: int) -> None:
        self.reader = reader
        self.writer = writer
        self.max_frame_bytes = max_frame_bytes
        self._key = b""
        self._send_dir = b""
        self._recv_dir = b""
        self._send_seq = 0
        self._recv_seq = 0
        self.bytes_sent = 0

    # -------------------------------------------------------------- handshake

    async def accept(self, secret: bytes) -> None:
        """The accepting side: send the challenge; frames are authenticated from here on."""
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        self._write_raw(challenge)
        await self.writer.drain()
        self._setup(secret, challenge, send=b"A", recv=b"C")

    async def connect(self, secret: bytes) -> None:
        """The connecting side: read the challenge."""
        challenge = await self._read_raw(CHALLENGE_BYTES)
        if len(challenge) != CHALLENGE_BYTES:
            raise ProtocolError("the peer's challenge has the wrong size")
        self._setup(secret, challenge, send=b"C", recv=b"A")

    def _setup(self, secret: bytes, challenge: bytes, send: bytes, recv: bytes) -> None:
        self._key = connection_key(secret, challenge)
        self._send_dir, self._recv_dir = send, recv

    # -------------------------------------------------------------- frames

    def send(self, message: dict[str, Any]) -> None:
        """Queue one authenticated message (call `drain` to wait for the buffer to empty).

        MessageTooLarge if its frame would be over the limit: the peer would
        close the connection on it, and on every retry, so it is never sent.
        """
        self.send_payload(self.encode(message))

    def encode(self, message: dict[str, Any]) -> bytes:
        """A message's payload, for `send_payload` now or later; MessageTooLarge if over the frame limit."""
        payload = json.dumps(message, separators=(",", ":")).encode()
        if TAG_BYTES + len(payload) > self.max_frame_bytes:
            raise MessageTooLarge(
                f"a {message.get('type')} message of {TAG_BYTES + len(payload)} bytes "
                f"is over the {self.max_frame_bytes}-byte frame limit"
            )
        return payload

    def send_payload(self, payload: bytes) -> None:
        """Queue one payload made by `encode`, authenticated with the next sequence number."""
        self._send_seq += 1
        tag = self._tag(self._send_dir, self._send_seq, payload)
        self._write_raw(tag + payload)

    async def receive(self, max_bytes: int | None = None) -> dict[str, Any]:
        """The next message; ProtocolError if it is forged, replayed, oversized or not JSON.

        `max_bytes` lowers the frame limit for this one message (the hello, read unauthenticated).
        """
        frame = await self._read_raw(max_bytes)
        tag, payload = frame[:TAG_BYTES], frame[TAG_BYTES:]
        self._recv_seq += 1
        if not hmac.compare_digest(tag, self._tag(self._recv_dir, self._recv_seq, payload)):
            raise ProtocolError("a frame failed authentication (wrong secret, forged, or replayed)")
        try:
            message = json.loads(payload)
        except ValueError:
            raise ProtocolError("an authenticated frame is not JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ProtocolError("a frame is not a message object with a type")
        return message

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        await self.writer.drain()

    def close(self) -> None:
        """Close the connection."""
        self.writer.close()

    def is_closing(self) -> bool:
        """True once this side closed the connection (or started to), or the connection was lost."""
        return self.writer.is_closing()

    def _tag(self, direction: bytes, seq: int, payload: bytes) -> bytes:
        return hmac.new(self._key, direction + seq.to_bytes(8, "big") + payload, hashlib.sha256).digest()

    def _write_raw(self, frame: bytes) -> None:
        self.writer.write(len(frame).to_bytes(4, "big") + frame)
        self.bytes_sent += 4 + len(frame)

    async def _read_raw(self, max_bytes: int | None = None) -> bytes:
        limit = self.max_frame_bytes if max_bytes is None else min(max_bytes, self.max_frame_bytes)
        try:
            length = int.from_bytes(await self.reader.readexactly(4), "big")
            if length > limit:
                raise ProtocolError(f"a frame of {length} bytes is over the {limit}-byte limit")
            return await self.reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("the peer closed the connection") from None
