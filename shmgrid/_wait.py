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
import time
from typing import Any, Callable, Optional, Tuple

from ._core import lib
from .errors import InvalidArgument, raise_for

SLICE_NS = 100_000_000
_EAGAIN = lib.SG_EAGAIN
_EINTR = lib.SG_EINTR
_monotonic = time.monotonic


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
