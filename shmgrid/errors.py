"""Exception classes, and the one place C return codes become exceptions.

Every class derives from :class:`ShmgridError`; where a Python user would
naturally catch a builtin (``FileNotFoundError``, ``ValueError``,
``queue.Empty``, ``TimeoutError``...), the class derives from it too.
"""
from __future__ import annotations

import queue
from typing import NoReturn

from ._core import ffi, lib

__all__ = [
    "ShmgridError",
    "SegmentNotFound",
    "SegmentExists",
    "PermissionDenied",
    "IncompatibleSegment",
    "CorruptSegment",
    "InvalidName",
    "InvalidArgument",
    "ObjectMismatch",
    "ValueTooLarge",
    "CapacityError",
    "NotAnInteger",
    "IntegerOverflow",
    "Closed",
    "Busy",
    "Full",
    "Empty",
    "RemoteUnavailable",
    "LockOwnerDied",
    "LockNotHeld",
    "Deadlock",
    "Lapped",
]


class ShmgridError(Exception):
    """Base class of every shmgrid error."""


class SegmentNotFound(ShmgridError, FileNotFoundError):
    """No grid of that name exists."""


class SegmentExists(ShmgridError, FileExistsError):
    """Grid.create() of a name that exists."""


class PermissionDenied(ShmgridError, PermissionError):
    """The segment's mode does not let this user open it."""


class IncompatibleSegment(ShmgridError):
    """Not a shmgrid segment, another format or layout, truncated, or never
    completed by its creator."""


class CorruptSegment(ShmgridError):
    """A structure in the segment failed a consistency check."""


class InvalidName(ShmgridError, ValueError):
    """A grid or object name outside the allowed characters or length."""


class InvalidArgument(ShmgridError, ValueError):
    """An argument out of its documented range."""


class ObjectMismatch(ShmgridError, ValueError):
    """An object exists under that name with another kind or parameters."""


class ValueTooLarge(ShmgridError, ValueError):
    """A key or value over the limit fixed at creation; nothing was written."""


class CapacityError(ShmgridError):
    """Out of room: map slots, grid heap, directory or process table."""


class NotAnInteger(ShmgridError, TypeError):
    """incr() on a key whose value is not an 8-byte int64."""


class IntegerOverflow(ShmgridError, OverflowError):
    """incr() would leave the int64 range; nothing was written."""


class Closed(ShmgridError):
    """Use of a grid or object after Grid.close()."""


class Busy(ShmgridError, TimeoutError):
    """Another live process held up an operation for too long."""


class Full(ShmgridError, queue.Full):
    """A bounded structure is full."""


class Empty(ShmgridError, queue.Empty):
    """A structure has nothing to give."""


class RemoteUnavailable(ShmgridError, TimeoutError):
    """The owner of a key could not be reached within the timeout."""


class LockOwnerDied(ShmgridError):
    """Raised by ``Lock.acquire(raise_if_owner_died=True)`` when the lock was
    acquired, but its previous owner died holding it. The caller holds the
    lock: repair what the dead owner left half done, then release it."""


class LockNotHeld(ShmgridError, RuntimeError):
    """release() of a lock the calling thread does not hold."""


class Deadlock(ShmgridError, RuntimeError):
    """acquire() of a lock the calling thread already holds (locks are not
    reentrant)."""


class Lapped(ShmgridError):
    """A subscriber of a lossy topic fell more than the topic's capacity
    behind: ``lost`` messages were overwritten before it read them. The
    subscription carries on from the oldest message still retained."""

    def __init__(self, lost: int) -> None:
        super().__init__(f"subscriber was lapped: {lost} messages lost")
        self.lost = lost


_BY_CODE: dict[int, type[ShmgridError]] = {
    lib.SG_EINVAL: InvalidArgument,
    lib.SG_ENOENT: SegmentNotFound,
    lib.SG_EEXIST: SegmentExists,
    lib.SG_EACCES: PermissionDenied,
    lib.SG_EINCOMPAT: IncompatibleSegment,
    lib.SG_ECORRUPT: CorruptSegment,
    lib.SG_EKEYSIZE: ValueTooLarge,
    lib.SG_EVALSIZE: ValueTooLarge,
    lib.SG_EFULL: CapacityError,
    lib.SG_ENOMEM: CapacityError,
    lib.SG_ECLOSED: Closed,
    lib.SG_EMISMATCH: ObjectMismatch,
    lib.SG_ENOTINT: NotAnInteger,
    lib.SG_EOVERFLOW: IntegerOverflow,
    lib.SG_EDIRFULL: CapacityError,
    lib.SG_EPROCFULL: CapacityError,
    lib.SG_ESYS: ShmgridError,
    lib.SG_EBUSY: Busy,
    lib.SG_ENAME: InvalidName,
    lib.SG_ENOTOWNER: LockNotHeld,
    lib.SG_EDEADLK: Deadlock,
    lib.SG_EAGAIN: Busy,
    lib.SG_EREMOTE: RemoteUnavailable,
}


def raise_for(rc: int) -> NoReturn:
    """Raise the exception for C return code ``rc`` with the C message."""
    msg = ffi.string(lib.sg_errmsg()).decode("utf-8", "replace")
    raise _BY_CODE.get(rc, ShmgridError)(msg or f"shmgrid error {rc}")
