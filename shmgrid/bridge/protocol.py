"""The bridge's wire protocol: length-prefixed, bounded frames over TCP, a
shared-secret challenge-response before anything else, and a MAC on every
frame after it.

    frame:  u32 length (of what follows) | u8 type | payload [| tag]

Handshake (HMAC-SHA256 with the cluster secret; nonces are 32 random
bytes; names are UTF-8):

    server -> HELLO      server nonce | u8 protocol version | server name
    client -> AUTH       HMAC(secret, "c" | server nonce | client name) | client nonce | u8 version | client name
    server -> AUTH_OK    HMAC(secret, "s" | client nonce | server name)

Both sides prove they hold the secret, and each proof is bound to the
other side's fresh nonce, so a recorded exchange cannot be replayed. Until
AUTH_OK, any frame that is not the next step of the handshake, or larger
than MAX_HANDSHAKE, closes the connection.

After AUTH_OK every frame ends with a 16-byte tag: HMAC-SHA256, truncated,
under the session key of its direction, over the frame's sequence number
in that direction, its type and its payload. The session keys come from
the secret and both nonces, so they are fresh per connection; a frame
injected, altered, dropped, replayed, reordered or reflected by someone on
the path fails its tag and closes the connection. (Without [tls] the
frames are readable on the path: the tag gives integrity, not secrecy.)
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import struct
from typing import Any, Optional, Tuple

__all__ = ["ProtocolError", "Link", "read_frame", "frame", "client_handshake", "server_handshake", "T", "MAX_FRAME",
           "VERSION"]

MAX_FRAME = 16 << 20  # a records buffer (1 MiB) and a map name fit many times over
MAX_HANDSHAKE = 4096
_HDR = struct.Struct("<IB")
NONCE = 32
TAG = 16
VERSION = 2  # 2: frames carry a tag after the handshake


class T:
    """Frame types."""
    HELLO, AUTH, AUTH_OK, SUBSCRIBE, SNAP_BEGIN, RECORDS, SNAP_END, ERROR, HEARTBEAT, WRITE, WRITE_RESULT = range(1, 12)


class ProtocolError(Exception):
    """A frame that breaks the protocol: the connection is closed."""


def encode(obj: Any) -> bytes:
    """A JSON payload, compact."""
    return json.dumps(obj, separators=(",", ":")).encode()


def frame(kind: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(len(payload) + 1, kind) + payload


_RMETA = struct.Struct("<dQ")


def records_payload(map_name: str, records: bytes, sent: float, cursor: int) -> bytes:
    """RECORDS: u16 name length | name | f64 the owner's clock when it sent
    them (for lag figures) | u64 the owner's change-feed position once these
    are applied (where a reconnecting mirror resumes) | records."""
    n = map_name.encode()
    return struct.pack("<H", len(n)) + n + _RMETA.pack(sent, cursor) + records


def split_records(payload: bytes) -> Tuple[str, float, int, bytes]:
    if len(payload) < 2:
        raise ProtocolError("RECORDS frame without a map name")
    (n,) = struct.unpack_from("<H", payload)
    if len(payload) < 2 + n + _RMETA.size:
        raise ProtocolError("RECORDS frame with a truncated map name, time or position")
    sent, cursor = _RMETA.unpack_from(payload, 2 + n)
    return payload[2:2 + n].decode("utf-8", "replace"), sent, cursor, payload[2 + n + _RMETA.size:]


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> Tuple[int, bytes]:
    """The next frame; ProtocolError if its length is 0 or over ``limit``,
    asyncio.IncompleteReadError if the peer closed mid-frame."""
    hdr = await reader.readexactly(_HDR.size)
    length, kind = _HDR.unpack(hdr)
    if length == 0 or length > limit:
        raise ProtocolError(f"frame length {length} is outside 1..{limit}")
    payload = await reader.readexactly(length - 1)
    return kind, payload


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


_SEQ = struct.Struct("<QB")


class Link:
    """An authenticated connection, after the handshake: frames out with a
    tag, frames in checked against theirs (see the module's docstring).
    ``send`` is synchronous, so the frames of concurrent tasks take
    sequence numbers in the order their bytes enter the transport."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, send_key: bytes,
                 recv_key: bytes) -> None:
        self.reader, self.writer = reader, writer
        self._out = hmac.new(send_key, digestmod=hashlib.sha256)
        self._in = hmac.new(recv_key, digestmod=hashlib.sha256)
        self._sent = self._received = 0

    def _tag(self, base: "hmac.HMAC", seq: int, kind: int, payload: bytes) -> bytes:
        h = base.copy()
        h.update(_SEQ.pack(seq, kind))
        h.update(payload)
        return h.digest()[:TAG]

    def send(self, kind: int, payload: bytes = b"") -> int:
        """Queue a frame; its size on the wire."""
        tag = self._tag(self._out, self._sent, kind, payload)
        self._sent += 1
        data = b"".join((_HDR.pack(len(payload) + 1 + TAG, kind), payload, tag))
        self.writer.write(data)
        return len(data)

    def send_json(self, kind: int, obj: Any) -> int:
        return self.send(kind, encode(obj))

    async def recv(self, limit: int = MAX_FRAME) -> Tuple[int, bytes]:
        """The next frame, its tag checked; ProtocolError if it is out of
        bounds or its tag is wrong."""
        kind, body = await read_frame(self.reader, limit + TAG)
        if len(body) < TAG:
            raise ProtocolError(f"frame of type {kind} is too short to carry a tag")
        payload, tag = body[:-TAG], body[-TAG:]
        if not hmac.compare_digest(tag, self._tag(self._in, self._received, kind, payload)):
            raise ProtocolError(f"frame {self._received} (type {kind}) failed its integrity check: altered, "
                                "injected or out of order")
        self._received += 1
        return kind, payload

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

    def buffered(self) -> int:
        """Bytes queued in the transport, not yet sent."""
        return self.writer.transport.get_write_buffer_size()


def _session_keys(secret: bytes, server_nonce: bytes, client_nonce: bytes, server: bytes,
                  client: bytes) -> Tuple[bytes, bytes]:
    """(client to server, server to client) keys of one connection."""
    k = _mac(secret, b"k", server_nonce, client_nonce, server, b"\0", client)
    return _mac(k, b"c2s"), _mac(k, b"s2c")


async def server_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes,
                           name: str, timeout: float) -> Tuple[str, Link]:
    """Authenticate a connecting peer; its name and the link to it."""
    nonce = os.urandom(NONCE)
    writer.write(frame(T.HELLO, nonce + bytes([VERSION]) + name.encode()))
    await writer.drain()
    kind, payload = await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE), timeout)
    if kind != T.AUTH or len(payload) < 32 + NONCE + 2:
        raise ProtocolError(f"expected AUTH, got frame type {kind} of {len(payload)} bytes")
    proof, their_nonce, version, peer = payload[:32], payload[32:32 + NONCE], payload[32 + NONCE], \
        payload[33 + NONCE:]
    if version != VERSION:
        raise ProtocolError(f"the peer speaks bridge protocol {version}, we speak {VERSION}: run the same "
                            "shmgrid release on every host")
    if not hmac.compare_digest(proof, _mac(secret, b"c", nonce, peer)):
        raise ProtocolError(f"peer {peer.decode('utf-8', 'replace')!r} failed authentication (wrong secret?)")
    writer.write(frame(T.AUTH_OK, _mac(secret, b"s", their_nonce, name.encode())))
    await writer.drain()
    c2s, s2c = _session_keys(secret, nonce, their_nonce, name.encode(), peer)
    return peer.decode(), Link(reader, writer, s2c, c2s)


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes,
                           name: str, timeout: float, expect: Optional[str] = None) -> Tuple[str, Link]:
    """Authenticate to the server and check it is authentic (and, given
    ``expect``, that it is that host); its name and the link to it."""
    kind, payload = await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE), timeout)
    if kind != T.HELLO or len(payload) < NONCE + 2:
        raise ProtocolError(f"expected HELLO, got frame type {kind} of {len(payload)} bytes")
    nonce, version, server = payload[:NONCE], payload[NONCE], payload[NONCE + 1:]
    if version != VERSION:
        raise ProtocolError(f"the server speaks bridge protocol {version}, we speak {VERSION}: run the same "
                            "shmgrid release on every host")
    if expect is not None and server != expect.encode():
        raise ProtocolError(f"dialled {expect!r}, but the server there calls itself "
                            f"{server.decode('utf-8', 'replace')!r}: check [hosts]")
    mine = os.urandom(NONCE)
    writer.write(frame(T.AUTH, _mac(secret, b"c", nonce, name.encode()) + mine + bytes([VERSION]) + name.encode()))
    await writer.drain()
    kind, payload = await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE), timeout)
    if kind != T.AUTH_OK or not hmac.compare_digest(payload, _mac(secret, b"s", mine, server)):
        raise ProtocolError("the server failed authentication (wrong secret?)")
    c2s, s2c = _session_keys(secret, nonce, mine, server, name.encode())
    return server.decode(), Link(reader, writer, c2s, s2c)
