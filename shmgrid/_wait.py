"""Blocking calls in slices: C sleeps at most 100 ms per call, so a
KeyboardInterrupt (or any signal handler) runs promptly while a Python
caller waits, and the GIL is released while it sleeps (cffi drops it
around every C call)."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

from ._core import lib
from .errors import InvalidArgument, raise_for

SLICE_NS = 100_000_000
_EAGAIN = lib.SG_EAGAIN
_EINTR = lib.SG_EINTR
_monotonic = time.monotonic


def check_timeout(timeout: Optional[float]) -> None:
    if timeout is None:
        return
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout != timeout:
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout < 0:
        raise InvalidArgument(f"timeout must be >= 0 or None, got {timeout!r}")


def first_slice(timeout: Optional[float]) -> int:
    """Nanoseconds for the first C call of a wait with ``timeout``."""
    if timeout is None:
        return SLICE_NS
    check_timeout(timeout)
    return min(int(timeout * 1e9), SLICE_NS)


def deadline_of(timeout: Optional[float]) -> Optional[float]:
    check_timeout(timeout)
    return None if timeout is None else _monotonic() + timeout


def until(call: Callable[[int], Any], deadline: Optional[float], on_timeout: Callable[[], Exception]) -> Any:
    """Call ``call(ns)`` in slices until it returns a result >= 0; raise
    ``on_timeout()`` once ``deadline`` (monotonic seconds, None: never) has
    passed with the call still unable to proceed."""
    while True:
        if deadline is None:
            ns = SLICE_NS
        else:
            left = deadline - _monotonic()
            ns = 0 if left <= 0 else min(int(left * 1e9), SLICE_NS)
        rc = call(ns)
        if rc >= 0:
            return rc
        if rc == _EAGAIN:
            if deadline is not None and (ns == 0 or _monotonic() >= deadline):
                raise on_timeout()
        elif rc != _EINTR:
            raise_for(rc)
        # EINTR: a pending KeyboardInterrupt is raised here, between bytecodes


def wait_more(call: Callable[[int], Any], rc: Any, timeout: Optional[float], on_timeout: Callable[[], Exception]) -> Any:
    """Carry on a wait whose first call, ``first_slice(timeout)`` long,
    returned ``rc`` (< 0)."""
    if rc != _EAGAIN and rc != _EINTR:
        raise_for(rc)
    if timeout is not None and rc == _EAGAIN and timeout * 1e9 <= SLICE_NS:
        raise on_timeout()  # the first slice was the whole timeout
    left = None if timeout is None else max(0.0, timeout - first_slice(timeout) / 1e9)
    return until(call, None if left is None else _monotonic() + left, on_timeout)
