"""Ring: a bounded MPMC queue of byte messages, shared by processes.

Every message put is delivered to exactly one ``get``, FIFO per producer.
``put``/``get`` block (GIL released, Ctrl-C honoured within 0.1 s) with an
optional timeout; the ``_nowait`` forms and ``timeout=0`` never block. A
producer killed after claiming a cell does not stall consumers: they skip
its cell once its process is seen dead and count it (``stats()['skipped']``);
a consumer killed inside ``get`` loses the message it was taking
(``stats()['dropped']``).
"""
from __future__ import annotations

import array
import struct
import threading
from typing import Any, Dict, Iterable, List, Optional

from . import _async
from ._core import ffi, lib
from ._wait import SLICE_NS, start, until, wait_more
from .errors import Empty, Full, InvalidArgument, raise_for
from .grid import cname

__all__ = ["Ring"]

_put = lib.sg_ring_put
_get = lib.sg_ring_get
_io_get = lib.sg_ring_io_get
_io_get_many = lib.sg_ring_io_get_many
_unpack_from = struct.unpack_from
_MIXED = 0xFFFFFFFF
_EAGAIN = lib.SG_EAGAIN


def _payload(data: Any) -> Any:
    if type(data) is bytes:
        return data
    if isinstance(data, (bytearray, memoryview)):
        return ffi.from_buffer(data)
    raise TypeError(f"messages are bytes-like, not {type(data).__name__}")


def _blob(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"messages are bytes-like, not {type(data).__name__}")


def _writable(buf: Any) -> Any:
    """A char[] over a writable, contiguous buffer (bytearray, memoryview,
    array.array, numpy array...): its len() is the buffer's bytes."""
    try:
        fmt = memoryview(buf).format
    except TypeError:
        fmt = "B"  # not a buffer: from_buffer says so below
    if "O" in fmt:  # message bytes over object pointers would crash the interpreter
        raise TypeError(f"get_into needs a buffer of plain data, not one of Python objects ({type(buf).__name__})")
    try:
        return ffi.from_buffer(buf, require_writable=True)
    except (TypeError, BufferError, ValueError):
        raise TypeError(f"get_into needs a writable contiguous buffer, not {type(buf).__name__}") from None


def _positive(arg: str, v: Optional[int]) -> int:
    if v is None:
        return 0
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise TypeError(f"{arg} must be a positive int or None, got {v!r}")
    return v


class _Buffers(threading.local):
    """Per-thread output state (cffi releases the GIL during C calls, so
    threads must not share it): an sg_ring_io with room for ``max_items``
    messages, and a buffer view that copies out as bytes."""

    def __init__(self, h: Any, slot_size: int) -> None:
        self.h, self.slot_size = h, slot_size
        self._make(1)
        self.own: Optional[bytearray] = None  # get_view's buffer, made on first use

    def for_view(self) -> Any:
        """get_view's buffer: never resized or freed while a view of it lives
        (a view only ever sees a later message's bytes, never freed memory)."""
        if self.own is None:
            self.own = bytearray(max(1, self.slot_size))
            self.own_p = ffi.from_buffer(self.own)
            self.own_ro = memoryview(self.own).toreadonly()
        return self.own_p

    def _make(self, max_items: int) -> None:
        io = lib.sg_ring_io_new(self.h, max_items)
        if io == ffi.NULL:
            raise MemoryError(f"out of memory for a {max_items}-message ring buffer")
        self.io = ffi.gc(io, lib.sg_ring_io_free)
        self.view = ffi.buffer(io.buf, max_items * self.slot_size)
        self.pair = (self.io, self.view)  # one thread-local lookup on the hot path
        self.max_items = max_items

    def for_many(self, n: int) -> Any:
        if n > self.max_items:
            self._make(n)
        return self.io


class Ring:
    """A named MPMC ring in a :class:`~shmgrid.Grid`: ``grid.ring(name)``."""

    __slots__ = ("_grid", "_h", "_name", "_slots", "_slot_size", "_buf", "__weakref__")
    _grid: Any
    _h: Any
    _name: str
    _slots: int
    _slot_size: int
    _buf: _Buffers

    @classmethod
    def _open(cls, grid: Any, name: str, slots: Optional[int], slot_size: Optional[int]) -> "Ring":
        s, sz = _positive("slots", slots), _positive("slot_size", slot_size)
        out = ffi.new("sg_ring **")
        try:
            rc = lib.sg_ring_open(grid._handle(), cname(name, "ring"), s, sz, out)
        except OverflowError:
            raise InvalidArgument(f"slots {slots} or slot_size {slot_size} is out of range") from None
        if rc:
            raise_for(rc)
        r = cls.__new__(cls)
        r._grid = grid
        r._h = ffi.gc(out[0], lib.sg_ring_free)
        r._name = name
        info = ffi.new("sg_ring_info *")
        lib.sg_ring_info_get(r._h, info)
        r._slots, r._slot_size = info.slots, info.slot_size
        r._buf = _Buffers(r._h, r._slot_size)
        return r

    @property
    def name(self) -> str:
        return self._name

    @property
    def capacity(self) -> int:
        """Messages the ring holds at most (its slots)."""
        return self._slots  # type: ignore[no-any-return]

    @property
    def slot_size(self) -> int:
        """The largest message, in bytes."""
        return self._slot_size  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<shmgrid.Ring {self._name!r} capacity={self._slots} slot_size={self._slot_size}>"

    def __len__(self) -> int:
        """Messages in the ring (claimed by producers, not yet by consumers)."""
        n = lib.sg_ring_depth(self._h)
        if n < 0:
            raise_for(n)
        return n  # type: ignore[no-any-return]

    def stats(self) -> Dict[str, int]:
        """Positions produced (``tail``) and consumed (``head``), ``depth``,
        ``skipped`` (positions whose producer died after claiming them),
        ``dropped`` (messages whose consumer died while taking them) and
        ``waiters`` (live processes with a thread asleep on the ring)."""
        info = ffi.new("sg_ring_info *")
        rc = lib.sg_ring_info_get(self._h, info)
        if rc:
            raise_for(rc)
        return {"capacity": info.slots, "slot_size": info.slot_size, "head": info.head, "tail": info.tail,
                "depth": max(0, min(info.tail - info.head, info.slots)), "skipped": info.skipped,
                "dropped": info.dropped, "waiters": info.waiters}

    def validate(self) -> Dict[str, int]:
        """Check every cell against head and tail; raises CorruptSegment on
        a broken invariant, Busy if the ring changed meanwhile (it is
        meaningful only while idle). Returns stats()."""
        rc = lib.sg_ring_validate(self._h)
        if rc:
            raise_for(rc)
        return self.stats()

    # ---- put ------------------------------------------------------------------

    def put(self, data: Any, timeout: Optional[float] = None) -> None:
        """Enqueue ``data``, waiting for room up to ``timeout`` seconds (None:
        no limit). Raises Full on timeout, ValueTooLarge (nothing enqueued)
        if it is over ``slot_size``."""
        if type(data) is not bytes:
            data = _payload(data)
        if timeout is None:
            rc = _put(self._h, data, len(data), SLICE_NS)
            if rc:
                self._put_more(data, rc, None)
        else:
            deadline, ns = start(timeout)
            rc = _put(self._h, data, len(data), ns)
            if rc:
                self._put_more(data, rc, deadline)

    def _put_more(self, p: Any, rc: int, deadline: Optional[float]) -> None:
        h = self._h
        wait_more(lambda n: _put(h, p, len(p), n), rc, deadline, lambda: Full(f"ring {self._name!r} is full"))

    def put_nowait(self, data: Any) -> None:
        """Enqueue ``data`` or raise Full at once."""
        if type(data) is not bytes:
            data = _payload(data)
        rc = _put(self._h, data, len(data), 0)
        if rc:
            if rc == _EAGAIN:
                raise Full(f"ring {self._name!r} is full")
            raise_for(rc)

    def put_many(self, items: Iterable[Any], timeout: Optional[float] = None) -> int:
        """Enqueue ``items`` in order, a batch of cells per C call, waiting
        for room up to ``timeout`` seconds in all. Returns how many were
        enqueued: all of them, or on timeout the first n (raises Full if
        none). Every length is checked first: an item over ``slot_size``
        raises ValueTooLarge and nothing is enqueued."""
        deadline = start(timeout)[0]
        if not isinstance(items, (list, tuple)):
            items = list(items)
        n = len(items)
        if n == 0:
            return 0
        try:  # the fast path: bytes-like items joined in C
            joined = b"".join(items)
            lens = array.array("I", map(len, items))
        except TypeError:
            joined = None
        if joined is None or sum(lens) != len(joined):  # a str, or a memoryview of wider items
            items = [_blob(x) for x in items]
            joined = b"".join(items)
            lens = array.array("I", map(len, items))
        dp = ffi.from_buffer(joined)
        lp = ffi.from_buffer("uint32_t[]", lens)
        h = self._h
        done = off = 0
        while done < n:
            d, o = done, off
            try:
                k = until(lambda ns: lib.sg_ring_put_many(h, dp + o, lp + d, n - d, ns), deadline,
                          lambda: Full(f"ring {self._name!r} is full"))
            except Full:
                if done:
                    return done
                raise
            off += sum(lens[done:done + k])
            done += k
        return done

    # ---- get ------------------------------------------------------------------

    def get(self, timeout: Optional[float] = None) -> bytes:
        """Dequeue the next message, waiting up to ``timeout`` seconds (None:
        no limit). Raises Empty on timeout."""
        io, view = self._buf.pair
        if timeout is None:
            n = _io_get(io, SLICE_NS)
            if n < 0:
                n = self._get_more(io, n, None)
        else:
            deadline, ns = start(timeout)
            n = _io_get(io, ns)
            if n < 0:
                n = self._get_more(io, n, deadline)
        return view[0:n]  # type: ignore[no-any-return]

    def _get_more(self, io: Any, n: int, deadline: Optional[float]) -> int:
        return wait_more(lambda t: _io_get(io, t), n, deadline,  # type: ignore[no-any-return]
                         lambda: Empty(f"ring {self._name!r} is empty"))

    def get_nowait(self) -> bytes:
        """Dequeue the next message or raise Empty at once."""
        io, view = self._buf.pair
        n = _io_get(io, 0)
        if n < 0:
            if n == _EAGAIN:
                raise Empty(f"ring {self._name!r} is empty")
            raise_for(n)
        return view[0:n]  # type: ignore[no-any-return]

    def get_many(self, max_items: int, timeout: Optional[float] = None) -> List[bytes]:
        """Dequeue up to ``max_items`` messages in one C call, waiting up to
        ``timeout`` seconds for the first (then taking what is there).
        Raises Empty if none arrived in time."""
        if not isinstance(max_items, int) or isinstance(max_items, bool) or max_items <= 0:
            raise TypeError(f"max_items must be a positive int, got {max_items!r}")
        deadline = start(timeout)[0]
        b = self._buf
        m = min(max_items, self._slots)
        io = b.for_many(m)
        k = until(lambda ns: _io_get_many(io, m, ns), deadline, lambda: Empty(f"ring {self._name!r} is empty"))
        # Split in C: one struct format of k byte strings, read straight
        # out of the io buffer (struct caches compiled formats).
        u = io.uniform
        if u != _MIXED:
            fmt = f"{u}s" * k
        else:
            fmt = "s".join(map(str, io.lens[0:k])) + "s"
        return list(_unpack_from(fmt, b.view))

    # ---- zero-copy reads ---------------------------------------------------------

    def get_into(self, buf: Any, timeout: Optional[float] = None) -> int:
        """Dequeue the next message into ``buf`` (a writable contiguous
        buffer: bytearray, memoryview, array, numpy array) and return its
        length; the copy goes straight from the ring's cell into ``buf``.
        ``buf`` must hold ``slot_size`` bytes (InvalidArgument otherwise,
        raised before anything is taken: no message is lost). Waits as
        ``get`` does; Empty on timeout."""
        p = _writable(buf)
        return self._get_to(p, len(p), timeout)

    def _get_to(self, p: Any, cap: int, timeout: Optional[float]) -> int:
        h = self._h
        deadline, ns = start(timeout)
        n = _get(h, p, cap, ns)
        if n < 0:
            n = wait_more(lambda t: _get(h, p, cap, t), n, deadline, lambda: Empty(f"ring {self._name!r} is empty"))
        return n  # type: ignore[no-any-return]

    def get_view(self, timeout: Optional[float] = None) -> memoryview:
        """Dequeue the next message and return a read-only memoryview of it
        in a buffer private to this ring handle and this thread: no bytes
        object is made. The view stays readable for good, but its bytes are
        overwritten by the next ``get_view`` on this ring in this thread:
        copy (``bytes(v)``) what must outlive it. (It never points into the
        shared ring: a cell is reused as soon as its message is taken.)"""
        b = self._buf
        n = self._get_to(b.for_view(), b.slot_size, timeout)
        return b.own_ro[0:n]  # type: ignore[no-any-return]

    # ---- asyncio -------------------------------------------------------------------

    async def get_async(self, timeout: Optional[float] = None) -> bytes:
        """``get`` for a coroutine: awaits a message without blocking the
        event loop (see README, "asyncio"). The message is taken in the
        loop's thread only when the await ends, so a cancelled
        ``get_async`` has taken nothing."""
        io, view = self._buf.pair

        attempt = _async.nonblocking(lambda: _io_get(io, 0), lambda n: view[0:n])
        return await _async.wait_until(attempt, self._event(0), self._grid._handle, timeout,  # type: ignore[no-any-return]
                                       lambda: Empty(f"ring {self._name!r} is empty"))

    async def put_async(self, data: Any, timeout: Optional[float] = None) -> None:
        """``put`` for a coroutine: awaits room without blocking the event
        loop. A cancelled ``put_async`` has enqueued nothing."""
        p = data if type(data) is bytes else _payload(data)
        h = self._h

        attempt = _async.nonblocking(lambda: _put(h, p, len(p), 0), lambda rc: None)
        await _async.wait_until(attempt, self._event(1), self._grid._handle, timeout,
                                lambda: Full(f"ring {self._name!r} is full"))

    def _event(self, put: int) -> Any:
        return _async.check_open(lib.sg_ring_event(self._h, put), f"ring {self._name!r}")
