"""Watching a map's changes from any process on the host.

Every successful write to a map (put, delete, incr, the CAS forms...)
appends ``(key, version, put/delete)`` to the map's change feed, a ring of
``FEED_SLOTS`` records that writers never wait on. ``m.watch()`` reads the
changes made after it was opened, in the order their writes took positions
in the feed. Two writes of one key racing each other may append in the
opposite order of their versions (the CAS and the append are two steps):
the event's version tells the true order. A watch that falls more
than ``FEED_SLOTS`` changes behind (or finds a change whose writer was
killed mid-append) gets one ``ChangeEvent(kind="lost", lost=n)`` saying how
many changes it missed, then carries on: it never blocks writers. Lost
counts include changes to keys outside the watch's prefix, which cannot be
told apart once missed.

On a mirror host (see the bridge), a partition whose owner's grid was
created again is forgotten before it is followed anew: each of its keys
shows as a delete with version 0, and the new grid's versions that follow
may be lower than the ones seen before, so "the version tells the order"
holds between two version-0 deletes, not across one.

A Watch belongs to the process that opened it and is used by one thread at
a time (a second thread gets Busy; ``close()`` from another thread ends a
blocked ``get`` with Closed within 0.1 s).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

from . import _async
from ._core import ffi, lib
from ._wait import OneThread
from .errors import Empty, raise_for

__all__ = ["ChangeEvent", "Watch", "FEED_SLOTS"]

FEED_SLOTS: int = lib.SG_FEED_SLOTS
_KINDS = {lib.SG_CHANGE_PUT: "put", lib.SG_CHANGE_DELETE: "delete", lib.SG_CHANGE_LOST: "lost"}
_next = lib.sg_watch_next
_EAGAIN = lib.SG_EAGAIN


class ChangeEvent(NamedTuple):
    """One change: ``kind`` is "put" (the key was stored: put, incr, the
    CAS forms...), "delete", or "lost" (``lost`` changes were missed; key
    None, version 0)."""

    kind: str
    key: Optional[bytes]
    version: int
    lost: int = 0


class Watch(OneThread):
    """Changes to a map made after ``m.watch()`` returned. Iterate it, or
    call ``get``. One thread at a time (see OneThread)."""

    __slots__ = ("_map", "_kbuf", "_kview", "_ev")
    _what = "watch"

    def __init__(self, m: Any, prefix: bytes) -> None:
        out = ffi.new("sg_watch **")
        rc = lib.sg_watch_open(m._h, prefix, len(prefix), out)
        if rc:
            raise_for(rc)
        super().__init__(ffi.gc(out[0], lib.sg_watch_free))
        self._map = m  # keeps the map handle alive as long as the watch
        self._kbuf = ffi.new("char[]", max(1, m.max_key))
        self._kview = ffi.buffer(self._kbuf)
        self._ev = ffi.new("sg_change *")

    def get(self, timeout: Optional[float] = None) -> ChangeEvent:
        """The next change, waiting up to ``timeout`` seconds (None: no
        limit); Empty on timeout."""
        h = self._enter()
        try:
            kbuf, kcap, ev = self._kbuf, len(self._kbuf), self._ev
            self._wait(lambda ns: _next(h, kbuf, kcap, ev, ns), timeout, lambda: Empty("no change"))
            return self._event_read()
        finally:
            self._leave()

    def _event_read(self) -> ChangeEvent:
        """The event just read, made while still inside the one-thread
        guard: once it is left, another thread's read overwrites it."""
        ev = self._ev
        kind = _KINDS[ev.kind]
        if kind == "lost":
            return ChangeEvent("lost", None, 0, ev.lost)
        return ChangeEvent(kind, self._kview[0:ev.klen], ev.version)

    def get_nowait(self) -> ChangeEvent:
        return self.get(0)

    async def get_async(self, timeout: Optional[float] = None) -> ChangeEvent:
        """``get`` for a coroutine: awaits the next change without blocking
        the event loop (see README, "asyncio"). ``close()`` ends the await
        with Closed; a cancelled ``get_async`` has read nothing."""
        kbuf, kcap, ev = self._kbuf, len(self._kbuf), self._ev

        def attempt() -> Any:
            h = self._enter()
            try:
                rc = _next(h, kbuf, kcap, ev, 0)
                if rc == _EAGAIN:
                    return _async.AGAIN
                if rc < 0:
                    raise_for(rc)
                return self._event_read()
            finally:
                self._leave()

        return await _async.wait_until(attempt, self._event(), self._map._grid._handle, timeout,  # type: ignore[no-any-return]
                                       lambda: Empty("no change"), owner=self)

    def _event(self) -> Any:
        h = self._enter()
        try:
            return _async.check_open(lib.sg_watch_event(h), "watch")
        finally:
            self._leave()

    def __iter__(self) -> "Watch":
        """Changes as they come, blocking."""
        return self

    def __next__(self) -> ChangeEvent:
        return self.get()

    def __aiter__(self) -> "Watch":
        """Changes as they come, awaited: ``async for ev in m.watch()``."""
        return self

    async def __anext__(self) -> ChangeEvent:
        return await self.get_async()
