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
import time
from typing import Any, Dict, Optional, Tuple

from . import errors
from .errors import RemoteUnavailable

__all__ = ["socket_address", "call"]

_HDR = struct.Struct("<I")
_MAX = 64 << 20
CLIENT_TIMEOUT = 60.0  # a safety net: the bridge answers RemoteUnavailable after its own timeout
RETRY_SECONDS = 10.0  # how long a request whose connection broke is sent again (a bridge restart)


def peer_cred(sock: socket.socket) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))  # type: ignore[return-value]


def grid_path(grid: str) -> str:
    """The file of grid ``grid`` (where its owner and mode are)."""
    from .grid import SHM_DIR  # here: grid imports map, which imports this module

    return os.path.join(SHM_DIR, grid)


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
    pid, uid, _ = peer_cred(s)
    try:
        owner = os.stat(grid_path(grid)).st_uid
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
    raised.

    Each request carries a random id. If the connection breaks before the
    reply (the bridge restarted, say), the request is sent again with the
    same id for up to RETRY_SECONDS: the owner applies a request id at
    most once, so a retry returns the first attempt's result."""
    with _conns_lock:
        c = _conns.setdefault(grid, _Conn())
    request = {**request, "rid": os.urandom(16).hex()}
    body = json.dumps(request).encode()
    frame = _HDR.pack(len(body)) + body
    sent = False  # the whole request went out at least once: it may have been applied
    give_up = 0.0
    while True:
        try:
            if c.sock is None or c.pid != os.getpid():  # one connection per thread, not inherited across fork
                c.sock, c.pid = _connect(grid), os.getpid()
            c.sock.sendall(frame)  # (a partial request is dropped by the bridge)
            sent = True
            (n,) = _HDR.unpack(_recv_exact(c.sock, 4))
            if n > _MAX:
                raise ConnectionError(f"reply of {n} bytes")
            reply = json.loads(_recv_exact(c.sock, n))
            break
        except RemoteUnavailable:  # no bridge to connect to, or not ours
            c.sock = None
            if not sent:
                raise
            err: BaseException = ConnectionError("the bridge went away and did not come back")
        except BaseException as e:  # broken, timed out or interrupted: the connection is out of step
            if c.sock is not None:
                c.sock.close()
            c.sock = None
            if isinstance(e, socket.timeout):  # a bridge that hangs: sending again would not help
                raise RemoteUnavailable(f"bridge for grid {grid!r} did not answer within {CLIENT_TIMEOUT:g} s; "
                                        "the write may or may not have been applied") from None
            if not isinstance(e, (OSError, ValueError)):
                raise
            err = e
        if sent and "retried" not in request:
            # a bridge that never saw the first attempt (it restarted) must
            # not answer "nothing was applied": that attempt may have been
            request["retried"] = True
            body = json.dumps(request).encode()
            frame = _HDR.pack(len(body)) + body
        now = time.monotonic()
        give_up = give_up or now + RETRY_SECONDS
        if now >= give_up:
            raise RemoteUnavailable(f"bridge for grid {grid!r}: {err}; the write may or may not have been "
                                    "applied") from None
        time.sleep(0.05)
    if "error" in reply:
        cls = getattr(errors, reply["error"], None)
        if not (isinstance(cls, type) and issubclass(cls, errors.ShmgridError)):
            cls = errors.ShmgridError
        raise cls(reply.get("message", ""))
    return reply  # type: ignore[no-any-return]
