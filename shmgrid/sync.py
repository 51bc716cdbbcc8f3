"""Counter and Lock: the small synchronisation objects of a grid.

A Counter is an atomic int64 (add / get / set / compare_and_set); ``add``
refuses to leave the int64 range (IntegerOverflow, nothing changed).

A Lock is an inter-process mutex owned by one thread. ``acquire`` waits
(GIL released, Ctrl-C honoured within 0.1 s) up to an optional timeout. If
the holding thread or its process dies, the next acquirer gets the lock and
is told: ``lock.owner_died`` is True after that acquire (False after any
other), or, with ``acquire(raise_if_owner_died=True)``, LockOwnerDied is
raised *with the lock held*. Locks are not reentrant (acquiring a lock the
thread holds raises Deadlock), and releasing a lock the thread does not hold
raises LockNotHeld.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, Optional

from . import _async
from ._core import ffi, lib
from ._wait import SLICE_NS, start, wait_more
from .errors import InvalidArgument, LockOwnerDied, raise_for
from .grid import cname

__all__ = ["Counter", "Lock"]

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_EAGAIN = lib.SG_EAGAIN
_OWNERDIED = lib.SG_OWNERDIED
# (thread id, lock word address) -> the Gate its loop's tasks queue on,
# for each lock a task holds through acquire_async; release() hands the
# gate on. Empty unless acquire_async is used.
_async_held: Dict[Any, "_async.Gate"] = {}


def _i64(arg: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{arg} must be an int, not {type(v).__name__}")
    if not _I64_MIN <= v <= _I64_MAX:
        raise InvalidArgument(f"{arg} {v} is outside the int64 range")
    return v


class _TimedOut(Exception):
    pass


class _Out(threading.local):
    """A per-thread int64 out-value: cffi drops the GIL inside C calls, so
    threads must not share one, and ffi.new per call costs ~300 ns."""

    def __init__(self) -> None:
        self.p = ffi.new("int64_t *")


_out = _Out()


def _open_named(grid: Any, name: str, kind: str) -> Any:
    """The C handle of the counter or lock ``name`` (made if missing)."""
    out = ffi.new(f"sg_{kind} **")
    rc = getattr(lib, f"sg_{kind}_open")(grid._handle(), cname(name, kind), out)
    if rc:
        raise_for(rc)
    return ffi.gc(out[0], getattr(lib, f"sg_{kind}_free"))


class Counter:
    """A named atomic int64 in a :class:`~shmgrid.Grid`: ``grid.counter(name)``."""

    __slots__ = ("_grid", "_h", "_name", "__weakref__")
    _grid: Any
    _h: Any
    _name: str

    @classmethod
    def _open(cls, grid: Any, name: str) -> "Counter":
        c = cls.__new__(cls)
        c._h = _open_named(grid, name, "counter")
        c._grid, c._name = grid, name
        return c

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<shmgrid.Counter {self._name!r}>"

    def add(self, n: int = 1) -> int:
        """Add ``n`` atomically; returns the new value."""
        out = _out.p
        if type(n) is not int or not _I64_MIN <= n <= _I64_MAX:
            _i64("n", n)
        rc = lib.sg_counter_add(self._h, n, out)
        if rc:
            raise_for(rc)
        return out[0]  # type: ignore[no-any-return]

    def get(self) -> int:
        out = _out.p
        rc = lib.sg_counter_get(self._h, out)
        if rc:
            raise_for(rc)
        return out[0]  # type: ignore[no-any-return]

    def set(self, value: int) -> None:
        rc = lib.sg_counter_set(self._h, _i64("value", value))
        if rc:
            raise_for(rc)

    def compare_and_set(self, old: int, new: int) -> bool:
        """Set to ``new`` if the value is ``old``; True if it was set."""
        rc = lib.sg_counter_compare_and_set(self._h, _i64("old", old), _i64("new", new))
        if rc < 0:
            raise_for(rc)
        return rc == 0


class Lock:
    """A named robust inter-process lock in a :class:`~shmgrid.Grid`:
    ``grid.lock(name)``. Use it as a context manager or with
    acquire/release."""

    __slots__ = ("_grid", "_h", "_name", "owner_died", "__weakref__")
    _grid: Any
    _h: Any
    _name: str
    owner_died: bool

    @classmethod
    def _open(cls, grid: Any, name: str) -> "Lock":
        lk = cls.__new__(cls)
        lk._h = _open_named(grid, name, "lock")
        lk._grid, lk._name = grid, name
        lk.owner_died = False
        return lk

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<shmgrid.Lock {self._name!r}>"

    def acquire(self, timeout: Optional[float] = None, *, raise_if_owner_died: bool = False) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds (None: no limit;
        0: do not wait). True if taken, False on timeout. Sets
        ``owner_died`` (see the module doc)."""
        h = self._h
        deadline, ns = (None, SLICE_NS) if timeout is None else start(timeout)
        rc = lib.sg_lock_acquire(h, ns)
        if rc < 0:
            try:
                rc = wait_more(lambda t: lib.sg_lock_acquire(h, t), rc, deadline, lambda: _TimedOut())
            except _TimedOut:
                return False
        self.owner_died = rc == _OWNERDIED
        if self.owner_died and raise_if_owner_died:
            raise LockOwnerDied(f"lock {self._name!r} acquired; its previous owner died holding it")
        return True

    def release(self) -> None:
        """Release the lock; LockNotHeld if this thread does not hold it."""
        rc = lib.sg_lock_release(self._h)
        if rc:
            raise_for(rc)
        if _async_held:
            gate = _async_held.pop((threading.get_ident(), self._key()), None)
            if gate is not None:
                gate.release()

    def _key(self) -> int:
        return _async._addr(self._event())

    async def acquire_async(self, timeout: Optional[float] = None, *, raise_if_owner_died: bool = False) -> bool:
        """``acquire`` for a coroutine: awaits the lock without blocking the
        event loop (see README, "asyncio"). The lock is owned by the loop's
        thread, so ``release()`` must be called in that thread, by the task
        that holds it. Tasks of one loop queue for it in FIFO order (for
        the shared lock they are one thread). True if taken, False on
        timeout. A cancelled ``acquire_async`` does not hold the lock: it is
        taken by a non-blocking call only after the last ``await``."""
        loop = asyncio.get_running_loop()
        deadline = _async.deadline_of(loop, timeout)
        key = self._key()
        gate = _async.gate(loop, key)
        if not await gate.acquire(loop, deadline):
            return False
        h = self._h

        attempt = _async.nonblocking(lambda: lib.sg_lock_acquire(h, 0))
        try:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            rc = await _async.wait_until(attempt, self._event(), self._grid._handle, left, _TimedOut,
                                         slice_s=_async.LOCK_SLICE)
        except _TimedOut:
            gate.release()
            return False
        except BaseException:
            gate.release()
            raise
        # No await from the C acquire to here: a cancellation cannot land
        # between taking the lock and recording who must release the gate.
        _async_held[(threading.get_ident(), key)] = gate
        self.owner_died = rc == _OWNERDIED
        if self.owner_died and raise_if_owner_died:
            raise LockOwnerDied(f"lock {self._name!r} acquired; its previous owner died holding it")
        return True

    def _event(self) -> Any:
        return _async.check_open(lib.sg_lock_event(self._h), f"lock {self._name!r}")

    async def __aenter__(self) -> "Lock":
        await self.acquire_async()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def locked(self) -> bool:
        """Whether some live or dead thread holds it now (a snapshot)."""
        return self.stats()["owner_tid"] != 0

    def stats(self) -> Dict[str, Any]:
        """``owner_tid`` (0 if free), ``owner_alive``, ``acquisitions``,
        ``owner_deaths`` (acquires that recovered it from a dead holder),
        ``waiters``."""
        info = ffi.new("sg_lock_info *")
        rc = lib.sg_lock_info_get(self._h, info)
        if rc:
            raise_for(rc)
        return {"owner_tid": info.owner_tid, "owner_alive": bool(info.owner_alive),
                "acquisitions": info.acquisitions, "owner_deaths": info.owner_deaths, "waiters": info.waiters}

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
