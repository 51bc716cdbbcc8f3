"""Blocking calls in slices: C sleeps at most 100 ms per call, so a
KeyboardInterrupt (or any signal handler) runs promptly while a Python
caller waits, and the GIL is released while it sleeps (cffi drops it
around every C call).

A blocking method makes its first C call directly (the fast path), with the
first slice from ``start(timeout)``; only if that call could not proceed
does it hand over to ``wait_more``, which keeps calling in slices until the
deadline ``start`` computed."""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from ._core import ffi, lib
from .errors import Busy, Closed, InvalidArgument, raise_for

SLICE_NS = 100_000_000
_EAGAIN = lib.SG_EAGAIN
_EINTR = lib.SG_EINTR
_monotonic = time.monotonic
# Called with a OneThread being closed: the asyncio layer wakes its awaiters.
_close_hooks: List[Callable[[Any], None]] = []


def start(timeout: Optional[float]) -> Tuple[Optional[float], int]:
    """(deadline in monotonic seconds or None, nanoseconds for the first
    C call) of a wait of ``timeout`` seconds (None or inf: no limit)."""
    if timeout is None:
        return None, SLICE_NS
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout != timeout:
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout < 0:
        raise InvalidArgument(f"timeout must be >= 0 or None, got {timeout!r}")
    if math.isinf(timeout):
        return None, SLICE_NS
    return _monotonic() + timeout, SLICE_NS if timeout >= 0.1 else int(timeout * 1e9)


def until(call: Callable[[int], Any], deadline: Optional[float], on_timeout: Callable[[], Exception]) -> Any:
    """Call ``call(ns)`` in slices until it returns a result >= 0; raise
    ``on_timeout()`` once ``deadline`` has passed with the call still unable
    to proceed."""
    while True:
        if deadline is None:
            ns = SLICE_NS
        else:
            left = deadline - _monotonic()
            ns = 0 if left <= 0 else SLICE_NS if left >= 0.1 else int(left * 1e9)
        rc = call(ns)
        if rc >= 0:
            return rc
        if rc == _EAGAIN:
            if deadline is not None and (ns == 0 or _monotonic() >= deadline):
                raise on_timeout()
        elif rc != _EINTR:
            raise_for(rc)
        # EINTR: a pending KeyboardInterrupt is raised here, between bytecodes


def wait_more(call: Callable[[int], Any], rc: Any, deadline: Optional[float],
              on_timeout: Callable[[], Exception]) -> Any:
    """Carry on a wait whose first call returned ``rc`` (< 0)."""
    if rc != _EAGAIN and rc != _EINTR:
        raise_for(rc)
    if rc == _EAGAIN and deadline is not None and _monotonic() >= deadline:
        raise on_timeout()
    return until(call, deadline, on_timeout)


class OneThread:
    """A C handle that one thread uses at a time and any thread may close
    (a subscription, a watch): sharing its cursor between threads would
    deliver some items twice and others never. A call while another thread
    is inside one raises Busy; ``close()`` waits for the thread inside to
    leave (it checks between sleeps of at most 100 ms, then raises Closed)
    before freeing the handle."""

    __slots__ = ("_h", "_lock", "_closing", "__weakref__")
    _what = "handle"

    def __init__(self, handle: Any) -> None:
        self._h: Any = handle
        self._lock = threading.Lock()
        self._closing = False

    def _enter(self) -> Any:
        if not self._lock.acquire(blocking=False):
            if self._closing:
                raise Closed(f"{self._what} is being closed")
            raise Busy(f"{self._what} is in use by another thread: use one {self._what} per thread")
        if self._h is None:
            self._lock.release()
            raise Closed(f"{self._what} is closed")
        return self._h

    def _leave(self) -> None:
        self._lock.release()

    def _wait(self, call: Callable[[int], Any], timeout: Optional[float], on_timeout: Callable[[], Exception]) -> Any:
        """``call(ns)`` in slices as for any blocking call, between _enter
        and _leave, ending with Closed if another thread closes us."""
        def step(ns: int) -> Any:
            if self._closing:
                raise Closed(f"{self._what} was closed by another thread")
            return call(ns)

        deadline, ns = (None, SLICE_NS) if timeout is None else start(timeout)
        rc = step(ns)
        return rc if rc >= 0 else wait_more(step, rc, deadline, on_timeout)

    def close(self) -> None:
        """Idempotent; safe from another thread than the one inside."""
        self._closing = True
        for hook in _close_hooks:
            hook(self)
        with self._lock:
            if self._h is not None:
                h, self._h = self._h, None
                ffi.release(h)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
