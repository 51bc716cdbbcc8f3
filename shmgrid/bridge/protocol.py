"""The bridge's wire protocol: length-prefixed, bounded frames over TCP,
and a shared-secret challenge-response before anything else.

    frame:  u32 length (of what follows) | u8 type | payload

Handshake (HMAC-SHA256 with the cluster secret; nonces are 32 random
bytes; names are UTF-8):

    server -> HELLO      server nonce | server name
    client -> AUTH       HMAC(secret, "c" | server nonce | client name) | client nonce | client name
    server -> AUTH_OK    HMAC(secret, "s" | client nonce | server name)

Both sides prove they hold the secret, and each proof is bound to the
other side's fresh nonce, so a recorded exchange cannot be replayed. Until
AUTH_OK, any frame that is not the next step of the handshake, or larger
than MAX_HANDSHAKE, closes the connection.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import struct
from typing import Any, Tuple

__all__ = ["ProtocolError", "read_frame", "frame", "client_handshake", "server_handshake", "T", "MAX_FRAME"]

MAX_FRAME = 16 << 20  # a records buffer (1 MiB) and a map name fit many times over
MAX_HANDSHAKE = 4096
_HDR = struct.Struct("<IB")
NONCE = 32


class T:
    """Frame types."""
    HELLO, AUTH, AUTH_OK, SUBSCRIBE, SNAP_BEGIN, RECORDS, SNAP_END, ERROR, HEARTBEAT, WRITE, WRITE_RESULT = range(1, 12)


class ProtocolError(Exception):
    """A frame that breaks the protocol: the connection is closed."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(len(payload) + 1, kind) + payload


def jframe(kind: int, obj: Any) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


_RMETA = struct.Struct("<dQ")


def records_frame(map_name: str, records: bytes, sent: float, cursor: int) -> bytes:
    """RECORDS: u16 name length | name | f64 the owner's clock when it sent
    them (for lag figures) | u64 the owner's change-feed position once these
    are applied (where a reconnecting mirror resumes) | records."""
    n = map_name.encode()
    return frame(T.RECORDS, struct.pack("<H", len(n)) + n + _RMETA.pack(sent, cursor) + records)


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


async def server_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes,
                           name: str, timeout: float) -> str:
    """Authenticate a connecting peer; its name."""
    nonce = os.urandom(NONCE)
    writer.write(frame(T.HELLO, nonce + name.encode()))
    await writer.drain()
    kind, payload = await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE), timeout)
    if kind != T.AUTH or len(payload) < 32 + NONCE + 1:
        raise ProtocolError(f"expected AUTH, got frame type {kind} of {len(payload)} bytes")
    proof, their_nonce, peer = payload[:32], payload[32:32 + NONCE], payload[32 + NONCE:]
    if not hmac.compare_digest(proof, _mac(secret, b"c", nonce, peer)):
        raise ProtocolError(f"peer {peer.decode('utf-8', 'replace')!r} failed authentication (wrong secret?)")
    writer.write(frame(T.AUTH_OK, _mac(secret, b"s", their_nonce, name.encode())))
    await writer.drain()
    return peer.decode()


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes,
                           name: str, timeout: float) -> str:
    """Authenticate to the server and check it is authentic; its name."""
    kind, payload = await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE), timeout)
    if kind != T.HELLO or len(payload) < NONCE + 1:
        raise ProtocolError(f"expected HELLO, got frame type {kind} of {len(payload)} bytes")
    nonce, server = payload[:NONCE], payload[NONCE:]
    mine = os.urandom(NONCE)
    writer.write(frame(T.AUTH, _mac(secret, b"c", nonce, name.encode()) + mine + name.encode()))
    await writer.drain()
    kind, payload = await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE), timeout)
    if kind != T.AUTH_OK or not hmac.compare_digest(payload, _mac(secret, b"s", mine, server)):
        raise ProtocolError("the server failed authentication (wrong secret?)")
    return server.decode()
