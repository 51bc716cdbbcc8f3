"""Topic: publish/subscribe between processes.

A subscription sees every message published after ``subscribe()``
returned, in publication order, and all subscriptions see the same order.
Lossless topics (the default) make ``publish`` wait for the slowest live
subscriber (timeout: Full); a subscriber whose process died stops holding
publishers back. Lossy topics (``lossless=False``) never make publishers
wait: a subscriber that falls more than ``capacity`` messages behind gets
:class:`~shmgrid.Lapped` (with ``.lost``, the exact number of messages it
missed) from its next ``get``, then carries on from the oldest message
still retained.

A Subscription belongs to the process that made it (it is not inherited
usefully across fork) and is used by one thread at a time.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from . import _async
from ._core import ffi, lib
from ._wait import SLICE_NS, OneThread, start, wait_more
from .errors import Empty, Full, InvalidArgument, Lapped, raise_for
from .grid import cname
from .ring import _payload, _positive, _writable

__all__ = ["Topic", "Subscription"]

_publish = lib.sg_topic_publish
_sub_get = lib.sg_sub_get
_EAGAIN = lib.SG_EAGAIN
_ELAPPED = lib.SG_ELAPPED


class Topic:
    """A named topic in a :class:`~shmgrid.Grid`: ``grid.topic(name)``."""

    __slots__ = ("_grid", "_h", "_name", "_info", "__weakref__")
    _grid: Any
    _h: Any
    _name: str
    _info: Dict[str, Any]

    @classmethod
    def _open(cls, grid: Any, name: str, capacity: Optional[int], max_message: Optional[int],
              lossless: Optional[bool], max_subscribers: Optional[int]) -> "Topic":
        cap, mm, ms = (_positive("capacity", capacity), _positive("max_message", max_message),
                       _positive("max_subscribers", max_subscribers))
        if lossless is not None and not isinstance(lossless, bool):
            raise TypeError(f"lossless must be True, False or None, got {lossless!r}")
        mode = 0 if lossless is None else (1 if lossless else 2)
        out = ffi.new("sg_topic **")
        try:
            rc = lib.sg_topic_open(grid._handle(), cname(name, "topic"), cap, mm, mode, ms, out)
        except OverflowError:
            raise InvalidArgument("capacity, max_message or max_subscribers is out of range") from None
        if rc:
            raise_for(rc)
        t = cls.__new__(cls)
        t._grid = grid
        t._h = ffi.gc(out[0], lib.sg_topic_free)
        t._name = name
        t._info = t.stats()
        return t

    @property
    def name(self) -> str:
        return self._name

    @property
    def capacity(self) -> int:
        return self._info["capacity"]  # type: ignore[no-any-return]

    @property
    def max_message(self) -> int:
        return self._info["max_message"]  # type: ignore[no-any-return]

    @property
    def lossless(self) -> bool:
        return self._info["lossless"]  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        mode = "lossless" if self.lossless else "lossy"
        return f"<shmgrid.Topic {self._name!r} capacity={self.capacity} max_message={self.max_message} {mode}>"

    def stats(self) -> Dict[str, Any]:
        """``published`` (positions claimed), live ``subscribers``,
        ``dead_subscribers`` (records of dead processes a blocked lossless
        publisher has not removed yet), how far the slowest record is
        behind (``lag``), ``skipped`` (positions whose publisher died),
        ``removed`` (dead subscribers dropped), ``waiters``."""
        info = ffi.new("sg_topic_info *")
        rc = lib.sg_topic_info_get(self._h, info)
        if rc:
            raise_for(rc)
        return {"capacity": info.capacity, "max_message": info.max_message, "lossless": bool(info.lossless),
                "max_subscribers": info.max_subscribers, "published": info.tail,
                "subscribers": info.subscribers, "dead_subscribers": info.dead_subscribers,
                "lag": info.tail - info.oldest_cursor,
                "skipped": info.skipped, "removed": info.removed, "waiters": info.waiters}

    def publish(self, data: Any, timeout: Optional[float] = None) -> None:
        """Publish ``data``. Lossless: waits up to ``timeout`` seconds (None:
        no limit) for the slowest live subscriber, then raises Full; lossy:
        never waits for subscribers. Either way it waits for another
        publisher that claimed the position one ``capacity`` back and is
        still writing it (rare, unless there are about as many publishers as
        ``capacity``). ValueTooLarge if over ``max_message``."""
        p = data if type(data) is bytes else _payload(data)
        h = self._h
        deadline, ns = (None, SLICE_NS) if timeout is None else start(timeout)
        rc = _publish(h, p, len(p), ns)
        if rc:
            wait_more(lambda n: _publish(h, p, len(p), n), rc, deadline,
                      lambda: Full(f"topic {self._name!r} is full: a subscriber is a whole capacity behind, "
                                   "or another publisher is still writing the message one capacity back"))

    async def publish_async(self, data: Any, timeout: Optional[float] = None) -> None:
        """``publish`` for a coroutine: awaits room (lossless: the slowest
        subscriber) without blocking the event loop. A cancelled
        ``publish_async`` has published nothing."""
        p = data if type(data) is bytes else _payload(data)
        h = self._h

        attempt = _async.nonblocking(lambda: _publish(h, p, len(p), 0), lambda rc: None)
        ev = _async.check_open(lib.sg_topic_event(h), f"topic {self._name!r}")
        await _async.wait_until(attempt, ev, self._grid._handle, timeout,
                                lambda: Full(f"topic {self._name!r} is full: a subscriber is a whole capacity behind"))

    def subscribe(self) -> "Subscription":
        """A new subscription: it sees every message published from now on."""
        out = ffi.new("sg_sub **")
        rc = lib.sg_topic_subscribe(self._h, out)
        if rc:
            raise_for(rc)
        return Subscription(self, out[0])


class Subscription(OneThread):
    """One subscriber of a Topic. Iterate it, or call ``get``. ``close()``
    (or leaving a ``with`` block) stops publishers waiting for it. One
    thread at a time (see OneThread): another thread gets Busy, and
    ``close()`` from another thread ends a blocked ``get`` with Closed."""

    __slots__ = ("_topic", "_buf", "_view", "_cap", "_lost", "_ro")
    _what = "subscription"

    def __init__(self, topic: Topic, handle: Any) -> None:
        super().__init__(ffi.gc(handle, lib.sg_sub_free))
        self._topic = topic
        self._cap = topic.max_message
        self._buf = ffi.new("char[]", max(1, self._cap))
        self._view = ffi.buffer(self._buf)
        self._lost = ffi.new("uint64_t *")
        self._ro: Optional[memoryview] = None  # get_view's read-only view of _buf

    def get(self, timeout: Optional[float] = None) -> bytes:
        """The next message, waiting up to ``timeout`` seconds (None: no
        limit); Empty on timeout. On a lossy topic, Lapped when messages
        were overwritten before this subscriber read them (``.lost`` counts
        positions, including any whose publisher died mid-publish); the next
        call returns the oldest message still retained."""
        return self._get_to(self._buf, self._cap, timeout, lambda n: self._view[0:n])  # type: ignore[no-any-return]

    def get_into(self, buf: Any, timeout: Optional[float] = None) -> int:
        """The next message copied straight from the topic's cell into
        ``buf`` (a writable contiguous buffer: bytearray, memoryview, array,
        numpy array); returns its length. ``buf`` must hold ``max_message``
        bytes (InvalidArgument otherwise, raised before anything is read:
        the message stays next). Waits, times out and raises Lapped as
        ``get`` does."""
        p = _writable(buf)
        return self._get_to(p, len(p), timeout)  # type: ignore[no-any-return]

    def get_view(self, timeout: Optional[float] = None) -> memoryview:
        """The next message as a read-only memoryview of this
        subscription's own buffer (no bytes object is made). It stays
        readable for good, but the next ``get``/``get_view`` on this
        subscription overwrites its bytes: copy what must outlive that. It
        never points into the shared topic, whose cells publishers reuse."""
        if self._ro is None:
            self._ro = memoryview(self._view).toreadonly()
        return self._get_to(self._buf, self._cap, timeout, lambda n: self._ro[0:n])  # type: ignore[no-any-return, index]

    def _get_to(self, buf: Any, cap: int, timeout: Optional[float],
                take: Optional[Callable[[int], Any]] = None) -> Any:
        """The next message read into buf: its length, or ``take(length)``,
        taken still inside the one-thread guard (once it is left, another
        thread's read may overwrite the buffer)."""
        h = self._enter()
        try:
            lost = self._lost

            def call(ns: int) -> int:
                n = _sub_get(h, buf, cap, ns, lost)
                if n == _ELAPPED:
                    raise Lapped(lost[0])
                return n  # type: ignore[no-any-return]

            n = self._wait(call, timeout, lambda: Empty(f"no message on topic {self._topic.name!r}"))
            return n if take is None else take(n)
        finally:
            self._leave()

    async def get_async(self, timeout: Optional[float] = None) -> bytes:
        """``get`` for a coroutine: awaits the next message without blocking
        the event loop (see README, "asyncio"). Several tasks of one loop
        may await one subscription (each message goes to one of them); a
        thread other than the loop's gets Busy while a read is under way,
        as for ``get``. ``close()`` ends the await with Closed; a cancelled
        ``get_async`` has read nothing."""
        buf, cap, lost, view = self._buf, self._cap, self._lost, self._view

        def attempt() -> Any:
            h = self._enter()
            try:  # the message is copied out before another thread may read into buf
                n = _sub_get(h, buf, cap, 0, lost)
                if n >= 0:
                    return view[0:n]
                if n == _EAGAIN:
                    return _async.AGAIN
                if n == _ELAPPED:
                    raise Lapped(lost[0])
                raise_for(n)
            finally:
                self._leave()

        return await _async.wait_until(attempt, self._event(), self._topic._grid._handle, timeout,  # type: ignore[no-any-return]
                                       lambda: Empty(f"no message on topic {self._topic.name!r}"), owner=self)

    def _event(self) -> Any:
        h = self._enter()
        try:
            return _async.check_open(lib.sg_sub_event(h), "subscription")
        finally:
            self._leave()

    def get_nowait(self) -> bytes:
        """The next message, or Empty at once (Lapped as for get)."""
        return self.get(0)

    def pending(self) -> int:
        """Messages published that this subscription has not read yet."""
        h = self._enter()
        try:
            n = lib.sg_sub_pending(h)
            if n < 0:
                raise_for(n)
            return n  # type: ignore[no-any-return]
        finally:
            self._leave()

    def __iter__(self) -> "Subscription":
        """Messages as they come, blocking. Iteration ends only by an
        exception; after Lapped, iterating again carries on."""
        return self

    def __next__(self) -> bytes:
        return self.get()

    def __aiter__(self) -> "Subscription":
        """Messages as they come, awaited (``async for msg in sub``)."""
        return self

    async def __anext__(self) -> bytes:
        return await self.get_async()
