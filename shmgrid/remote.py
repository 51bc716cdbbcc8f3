"""Writes to a mirrored map's partitions owned by another host go through
this host's bridge, over a Unix socket (abstract namespace, named after the
grid). The bridge forwards them to the owner, which applies them
atomically, and answers once this host's mirror holds the new version
(read-your-writes).

Why a socket and not a request ring in the grid: the socket gives each
caller its own reply channel and tells the bridge when a caller died, with
no shared state to recover; the round trip to the owner host dominates the
cost either way.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
from typing import Any, Dict, Optional

from . import errors
from .errors import RemoteUnavailable

__all__ = ["socket_address", "call"]

_HDR = struct.Struct("<I")
_MAX = 64 << 20
CLIENT_TIMEOUT = 60.0  # a safety net: the bridge answers RemoteUnavailable after its own timeout


def socket_address(grid: str) -> str:
    return f"\0shmgrid-bridge/{grid}"


def b64(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else base64.b64encode(b).decode()


def unb64(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else base64.b64decode(s)


class _Conn(threading.local):
    sock: Optional[socket.socket] = None
    pid: int = 0


_conns: Dict[str, _Conn] = {}
_conns_lock = threading.Lock()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the bridge closed the connection")
        buf += chunk
    return buf


def _connect(grid: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(socket_address(grid))
    except OSError as e:
        s.close()
        raise RemoteUnavailable(f"no bridge is running for grid {grid!r} on this host ({e.strerror}); "
                                "the key's partition is owned by another host") from None
    # the abstract namespace has no permissions: anyone may bind the name
    # first. Talk only to a bridge run by root or by the grid's owner.
    pid, uid, gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        owner = os.stat(os.path.join("/dev/shm", grid)).st_uid
    except OSError:
        owner = os.geteuid()
    if uid not in (0, owner, os.geteuid()):
        s.close()
        raise RemoteUnavailable(f"the process answering for grid {grid!r}'s bridge (pid {pid}, uid {uid}) is run "
                                f"neither by root nor by the grid's owner (uid {owner}): refusing to send it writes")
    s.settimeout(CLIENT_TIMEOUT)
    return s


def call(grid: str, request: Dict[str, Any]) -> Dict[str, Any]:
    """Send a request to this host's bridge for ``grid``; its reply. Raises
    RemoteUnavailable when no bridge runs, or the error class the owner
    raised."""
    with _conns_lock:
        c = _conns.setdefault(grid, _Conn())
    body = json.dumps(request).encode()
    frame = _HDR.pack(len(body)) + body
    fresh = False
    if c.sock is None or c.pid != os.getpid():  # one connection per thread, not inherited across fork
        c.sock, c.pid, fresh = _connect(grid), os.getpid(), True
    try:
        try:
            c.sock.sendall(frame)
        except OSError:
            if fresh:
                raise
            # a connection kept from before (the bridge restarted since):
            # the request did not get through, so sending it again is safe
            c.sock.close()
            c.sock = _connect(grid)
            c.sock.sendall(frame)
        (n,) = _HDR.unpack(_recv_exact(c.sock, 4))
        if n > _MAX:
            raise ConnectionError(f"reply of {n} bytes")
        reply = json.loads(_recv_exact(c.sock, n))
    except RemoteUnavailable:  # no bridge to reconnect to: nothing was sent
        c.sock = None
        raise
    except BaseException as e:  # broken, timed out or interrupted: the connection is out of step
        if c.sock is not None:
            c.sock.close()
        c.sock = None
        if isinstance(e, (OSError, ValueError)):
            raise RemoteUnavailable(f"bridge for grid {grid!r}: {e}; the write may or may not have been "
                                    "applied") from None
        raise
    if "error" in reply:
        cls = getattr(errors, reply["error"], None)
        if not (isinstance(cls, type) and issubclass(cls, errors.ShmgridError)):
            cls = errors.ShmgridError
        raise cls(reply.get("message", ""))
    return reply  # type: ignore[no-any-return]
