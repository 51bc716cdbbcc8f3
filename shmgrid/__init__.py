"""shmgrid: a shared-memory data grid for Python.

Processes on one host share lock-free structures in a POSIX shared-memory
segment (a *grid*)::

    import shmgrid
    with shmgrid.Grid.open("demo", size="64MiB") as grid:
        users = grid.map("users", capacity=10_000)
        users["alice"] = b"admin"
        users.incr("logins")

See README.md for the consistency and crash model.
"""
from .errors import (
    Busy,
    CapacityError,
    Closed,
    CorruptSegment,
    Empty,
    Full,
    IncompatibleSegment,
    IntegerOverflow,
    InvalidArgument,
    InvalidName,
    Deadlock,
    Lapped,
    LockNotHeld,
    LockOwnerDied,
    NotAnInteger,
    ObjectMismatch,
    PermissionDenied,
    RemoteUnavailable,
    SegmentExists,
    SegmentNotFound,
    ShmgridError,
    ValueTooLarge,
)
from .grid import DEFAULT_SIZE, Grid, parse_size
from .map import Map
from .ring import Ring
from .sync import Counter, Lock
from .topic import Subscription, Topic
from .watch import ChangeEvent, Watch

__version__ = "0.1.0"

__all__ = [
    "Grid",
    "Map",
    "Ring",
    "Topic",
    "Subscription",
    "Counter",
    "Lock",
    "Watch",
    "ChangeEvent",
    "DEFAULT_SIZE",
    "parse_size",
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
