"""Grid: one POSIX shared-memory segment holding named objects.

Lifecycle, written down (as posix_ipc and py-lmdb do):

- ``Grid.create`` makes the segment (mode 0600 unless told otherwise) and
  fails if the name exists; ``Grid.attach`` opens an existing one;
  ``Grid.open`` does whichever applies.
- ``close()`` unmaps the segment and frees this process's slot in the
  segment's process table. Objects taken from a closed grid raise
  :class:`~shmgrid.Closed`. Do not close a grid while another thread of the
  same process is inside a call on it.
- Nothing is ever unlinked implicitly, not by close() and not by garbage
  collection: only ``Grid.unlink(name)`` / ``grid.unlink()`` removes the name
  (processes already attached keep their mapping).
- Across ``fork``: the child inherits the mapping and takes its own
  process-table slot (done automatically). With ``spawn``, children attach by
  name.
"""
from __future__ import annotations

import os
import re
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Union

from ._core import ffi, lib
from .errors import Busy, CapacityError, Closed, InvalidArgument, InvalidName, SegmentExists, SegmentNotFound, raise_for

if TYPE_CHECKING:
    from .array import SharedArray
    from .map import Map
    from .ring import Ring
    from .sync import Counter, Lock
    from .topic import Topic

__all__ = ["Grid", "parse_size", "DEFAULT_SIZE", "SHM_DIR"]

DEFAULT_SIZE: int = lib.SG_DEFAULT_GRID_SIZE
SHM_DIR = "/dev/shm"

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like ``"64MiB"``, ``"1.5GiB"``, ``"512M"``.

    Binary units: K, M, G, T, KiB, MiB, GiB, TiB; decimal: KB, MB, GB, TB.
    """
    if isinstance(size, bool):
        raise TypeError("size must be an int or a string like '64MiB', not bool")
    if isinstance(size, int):
        if size <= 0:
            raise InvalidArgument(f"size must be positive, got {size}")
        return size
    if isinstance(size, str):
        m = _SIZE_RE.match(size)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise InvalidArgument(
                f"cannot parse size {size!r}: use bytes or a number with a unit "
                "(K, M, G, T, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            )
        return int(float(m.group(1)) * _UNITS[unit])
    raise TypeError(f"size must be an int or a string like '64MiB', not {type(size).__name__}")


def cname(name: str, what: str = "grid") -> bytes:
    """``name`` as a C string; the C layer checks the characters and length,
    but a NUL would end the C string early, so it is refused here."""
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, not {type(name).__name__}")
    if "\0" in name:
        raise InvalidName(f"invalid {what} name {name!r}: it contains a NUL character")
    return name.encode("utf-8", "surrogateescape")


class _hybrid:
    """A method that is static when called on the class with arguments
    (``Grid.unlink("name")``) and bound when called on an instance
    (``grid.unlink()``)."""

    def __init__(self, static: Any, bound: Callable[..., Any]) -> None:
        if isinstance(static, staticmethod):  # not callable itself before Python 3.10
            static = static.__func__
        self._static, self._bound = static, bound
        self.__doc__ = static.__doc__

    def __get__(self, obj: Any, owner: Any = None) -> Callable[..., Any]:
        if obj is None:
            return self._static
        return self._bound.__get__(obj, owner)


_KINDS = {lib.SG_KIND_MAP: "map", lib.SG_KIND_RING: "ring", lib.SG_KIND_TOPIC: "topic",
          lib.SG_KIND_COUNTER: "counter", lib.SG_KIND_LOCK: "lock", lib.SG_KIND_ARRAY: "array"}

_open_grids: "weakref.WeakSet[Grid]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # An at-fork hook cannot raise to anyone; a child that finds the process
    # table full still works, but other processes cannot see it is alive.
    for g in list(_open_grids):
        if not g._closed and lib.sg_grid_after_fork(g._h) != 0:
            warnings.warn(
                f"grid {g._name!r}: forked child got no process-table slot: "
                + ffi.string(lib.sg_errmsg()).decode("utf-8", "replace"),
                RuntimeWarning,
                stacklevel=1,
            )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# Called with the C handle just before a grid is unmapped: the asyncio
# waiter thread (shmgrid/_async.py) stops watching the words inside it.
_close_hooks: List[Callable[[Any], None]] = []


class Grid:
    """A shared-memory grid. Make one with :meth:`create`, :meth:`attach` or
    :meth:`open`; use it as a context manager to close it on exit."""

    def __init__(self, handle: Any, name: str) -> None:  # private: use create/attach/open
        self._h = ffi.gc(handle, lib.sg_grid_free)
        self._name = name
        self._closed = False
        # Shared arrays handed out as numpy memory pin the mapping: close()
        # waits for the last of them to be collected before unmapping.
        self._pins = 0
        self._hooked = False  # close() ran its hooks: the mapping may go once nothing pins it
        # reentrant: a view's finaliser (_unpin) may run in a collection
        # triggered while this thread holds the lock
        self._pin_lock = threading.RLock()
        _open_grids.add(self)

    # ---- lifecycle --------------------------------------------------------

    @classmethod
    def create(cls, name: str, size: Union[int, str] = DEFAULT_SIZE, mode: int = 0o600) -> "Grid":
        """Create grid ``name`` of ``size`` bytes (a ceiling: tmpfs allocates
        pages only when touched). Raises SegmentExists if it exists."""
        nbytes = parse_size(size)
        if not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise InvalidArgument(f"mode must be a permission mode between 0 and 0o777, got {mode!r}")
        _check_room(nbytes)
        out = ffi.new("sg_grid **")
        rc = lib.sg_grid_create(cname(name), nbytes, mode, out)
        if rc:
            raise_for(rc)
        return cls(out[0], name)

    @classmethod
    def attach(cls, name: str) -> "Grid":
        """Attach to existing grid ``name``. Raises SegmentNotFound,
        PermissionDenied, or IncompatibleSegment (wrong magic, version or
        layout; truncated; creator died before it was ready)."""
        out = ffi.new("sg_grid **")
        rc = lib.sg_grid_attach(cname(name), out)
        if rc:
            raise_for(rc)
        return cls(out[0], name)

    @classmethod
    def open(cls, name: str, size: Union[int, str] = DEFAULT_SIZE, mode: int = 0o600) -> "Grid":
        """Attach to grid ``name``, creating it (with ``size`` and ``mode``)
        if it does not exist. Safe when several processes race to open it."""
        for _ in range(100):
            try:
                return cls.attach(name)
            except SegmentNotFound:
                pass
            try:
                return cls.create(name, size, mode)
            except SegmentExists:
                pass  # lost the race to create: attach to the winner's
        raise SegmentNotFound(f"grid {name!r} kept appearing and vanishing; gave up")

    def close(self) -> None:
        """Unmap the segment and leave its process table. Idempotent. Never
        unlinks. While shared arrays of this grid (or views of them) are
        still referenced, the grid is closed for every call but stays
        mapped until the last of them is collected."""
        with self._pin_lock:
            if self._closed:
                return
            self._closed = True
            _open_grids.discard(self)
        # Outside the lock: the hooks allocate, and a collection there may
        # free the last view, whose finaliser takes the lock (_unpin). The
        # mapping goes only once the hooks ran (they stop the asyncio
        # waiter from reading words in it) and no view pins it.
        for hook in _close_hooks:
            hook(self._h)
        with self._pin_lock:
            self._hooked = True
            if self._pins == 0:
                lib.sg_grid_close(self._h)

    def _pin(self) -> None:
        with self._pin_lock:
            if self._closed:
                raise Closed(f"grid {self._name!r} is closed")
            self._pins += 1

    def _unpin(self) -> None:
        with self._pin_lock:
            self._pins -= 1
            if self._pins == 0 and self._hooked:
                lib.sg_grid_close(self._h)

    def _unlink_self(self) -> None:
        """Remove this grid's name (the segment lives on while attached)."""
        Grid._unlink_name(self._name)

    @staticmethod
    def _unlink_name(name: str) -> None:
        """Remove grid ``name`` from the system. Processes already attached
        keep their mapping; new attaches fail with SegmentNotFound."""
        rc = lib.sg_grid_unlink(cname(name))
        if rc:
            raise_for(rc)

    unlink = _hybrid(_unlink_name, _unlink_self)

    def __enter__(self) -> "Grid":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.size} bytes"
        return f"<shmgrid.Grid {self._name!r} {state}>"

    # ---- properties -------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def size(self) -> int:
        return self.info()["size"]

    def _handle(self) -> Any:
        if self._closed:
            raise Closed(f"grid {self._name!r} is closed")
        return self._h

    # ---- objects ------------------------------------------------------------

    def map(
        self,
        name: str,
        capacity: Optional[int] = None,
        max_key: Optional[int] = None,
        max_value: Optional[int] = None,
        max_capacity: Optional[int] = None,
        key_dtype: Any = None,
        value_dtype: Any = None,
    ) -> "Map":
        """Create or open the map ``name``.

        ``capacity`` sizes the first table (default 16,384 keys); the map
        grows online past it, up to ``max_capacity`` keys if given, else
        until the grid's heap is full. Deleted keys' room comes back by
        itself. Parameters matter only on creation; when opening an existing
        map, any parameter given must equal the map's or ObjectMismatch is
        raised.

        With ``key_dtype`` and ``value_dtype`` (numpy dtypes, or anything
        ``numpy.dtype`` takes), a typed map of fixed-width keys and values:
        its batch calls take and return numpy arrays (README, "Batch
        calls"). The dtypes are recorded on creation and checked on open.
        """
        from .map import Map

        return Map._open(self, name, capacity, max_key, max_value, max_capacity, key_dtype, value_dtype)

    def ring(self, name: str, slots: Optional[int] = None, slot_size: Optional[int] = None) -> "Ring":
        """Create or open the MPMC ring ``name``: ``slots`` messages (default
        1024) of at most ``slot_size`` bytes (default 256). On an existing
        ring, a parameter given must equal the ring's (ObjectMismatch)."""
        from .ring import Ring

        return Ring._open(self, name, slots, slot_size)

    def topic(
        self,
        name: str,
        capacity: Optional[int] = None,
        max_message: Optional[int] = None,
        lossless: Optional[bool] = None,
        max_subscribers: Optional[int] = None,
    ) -> "Topic":
        """Create or open the pub/sub topic ``name``: the last ``capacity``
        messages (default 1024) of at most ``max_message`` bytes (default
        256) are retained; ``lossless`` (default True on creation) makes
        publishers wait for the slowest live subscriber; at most
        ``max_subscribers`` (default 64) at a time. On an existing topic, a
        parameter given must equal the topic's (ObjectMismatch)."""
        from .topic import Topic

        return Topic._open(self, name, capacity, max_message, lossless, max_subscribers)

    def counter(self, name: str) -> "Counter":
        """Create or open the atomic int64 counter ``name`` (starts at 0)."""
        from .sync import Counter

        return Counter._open(self, name)

    def lock(self, name: str) -> "Lock":
        """Create or open the robust inter-process lock ``name``."""
        from .sync import Lock

        return Lock._open(self, name)

    def array(self, name: str, shape: Any = None, dtype: Any = None) -> "SharedArray":
        """Create or open the shared numpy array ``name``: a
        :class:`~shmgrid.array.SharedArray` (an ``ndarray``) backed by the
        segment, all zeroes when created (version 0), 64-byte aligned.
        ``shape`` and ``dtype`` (default float64, any dtype without Python
        objects, structured ones included) matter on creation; on an
        existing array they must match exactly (ObjectMismatch), and both
        may be left out to open it as it is. ``publish(new)`` /
        ``snapshot()`` replace and read whole versions atomically; writes
        through the array itself are not atomic (see shmgrid.array)."""
        from .array import open_array

        return open_array(self, name, shape, dtype)

    # ---- introspection ------------------------------------------------------

    def info(self) -> Dict[str, int]:
        """Segment size, heap break, object and process counts."""
        out = ffi.new("sg_grid_info *")
        rc = lib.sg_grid_info_get(self._handle(), out)
        if rc:
            raise_for(rc)
        return {f: getattr(out, f) for f in (
            "size", "heap_start", "heap_brk", "created_ns", "format", "layout_sig",
            "objects", "procs_live", "procs_dead", "proc_slot")}

    def objects(self) -> List[Dict[str, Any]]:
        """The directory: one dict per named object (name, kind, params)."""
        out = ffi.new("sg_object_info *")
        h = self._handle()
        res = []
        for i in range(lib.SG_DIR_SIZE):
            rc = lib.sg_grid_object(h, i, out)
            if rc == lib.SG_NO:
                continue
            if rc:
                raise_for(rc)
            if out.state != 2:
                res.append({"name": None, "kind": "creating", "params": (), "bytes": 0})
                continue
            kind = _KINDS.get(out.kind, f"kind{out.kind}")
            res.append({"name": ffi.string(out.name).decode(), "kind": kind, "params": tuple(out.param),
                        "bytes": out.bytes})
        return res

    def processes(self) -> List[Dict[str, int]]:
        """The process table: pid, liveness and attach time of each slot in use."""
        out = ffi.new("sg_proc_info *")
        h = self._handle()
        res = []
        for i in range(lib.SG_PROC_TABLE_SIZE):
            rc = lib.sg_grid_proc(h, i, out)
            if rc == lib.SG_NO:
                continue
            if rc:
                raise_for(rc)
            res.append({"slot": i, "pid": out.pid, "alive": bool(out.alive),
                        "start_ticks": out.start_ticks, "attached_ns": out.attached_ns})
        return res

    def validate(self) -> Dict[str, Any]:
        """Walk the heap's free lists and every object; raise CorruptSegment
        on a broken invariant. Returns heap figures, per-map reports
        (``maps``) and the figures of the other objects (``objects``: a
        ring's stats, a topic's, a counter's value, a lock's holder).

        ``retired_bytes`` are old tables (and the key blocks of keys they
        dropped) waiting for every process reading them to move on.
        ``leaked_bytes`` (carved, yet neither free, reachable nor retired) is exact
        only while no process is writing: it counts blocks held by processes
        killed mid-operation.
        """
        # Maps first: validating one finishes its migration and may free
        # retired tables, which the heap walk must then see as free.
        objs = self.objects()
        maps = {o["name"]: self.map(o["name"]).validate() for o in objs if o["kind"] == "map"}
        others = {o["name"]: _object_report(self, o) for o in objs if o["kind"] not in ("map", "creating")}
        out = ffi.new("sg_heap_report *")
        rc = lib.sg_grid_validate(self._handle(), out)
        if rc:
            raise_for(rc)
        reachable = sum(r["block_bytes"] + r["table_bytes"] for r in maps.values())
        reachable += sum(o["bytes"] for o in objs if o["kind"] not in ("map", "creating"))
        retired = sum(r["retired_bytes"] for r in maps.values())
        return {
            "heap_bytes": out.heap_bytes,
            "carved_bytes": out.carved_bytes,
            "gap_bytes": out.gap_bytes,
            "free_bytes": out.free_bytes,
            "free_blocks": out.free_blocks,
            "reachable_bytes": reachable,
            "retired_bytes": retired,
            "leaked_bytes": max(0, out.carved_bytes - out.gap_bytes - out.free_bytes - reachable - retired),
            "maps": maps,
            "objects": others,
        }


def _object_report(grid: "Grid", o: Dict[str, Any]) -> Dict[str, Any]:
    """What `shmgrid stat` shows of a ring, topic, counter or lock."""
    kind, name = o["kind"], o["name"]
    if kind == "ring":
        ring = grid.ring(name)
        try:
            return {"kind": kind, "checked": True, **ring.validate()}
        except Busy:  # in use: the cell walk is only meaningful when idle
            return {"kind": kind, "checked": False, **ring.stats()}
    if kind == "topic":
        return {"kind": kind, **grid.topic(name).stats()}
    if kind == "counter":
        return {"kind": kind, "value": grid.counter(name).get()}
    if kind == "lock":
        return {"kind": kind, **grid.lock(name).stats()}
    if kind == "array":
        try:
            from .array import _Handle
        except ImportError:  # numpy missing: the directory entry is all we can show
            return {"kind": kind}
        a = _Handle(grid, name)
        try:  # repairs what a dead publisher left, and checks the seqlock words
            a.repair(timeout=0.05)
            checked = True
        except Busy:  # a live publisher holds the writer lock
            checked = False
        return {"kind": kind, "checked": checked, **a.stats()}
    return {"kind": kind}


def _check_room(nbytes: int) -> None:
    """Refuse a size larger than the free space of /dev/shm: the segment is
    sparse, and touching a page past the room left there kills the process
    with SIGBUS instead of raising an error."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return
    avail = st.f_bavail * st.f_frsize
    if nbytes > avail:
        raise CapacityError(
            f"grid size {nbytes} bytes exceeds the {avail} bytes free in {SHM_DIR}; "
            "pick a smaller size (writes past the free space would crash with SIGBUS)"
        )


def list_segments() -> Iterator[str]:
    """Names in /dev/shm that start with the shmgrid magic."""
    magic = lib.SG_SEGMENT_MAGIC.to_bytes(8, "little")
    try:
        names = sorted(os.listdir(SHM_DIR))
    except OSError:
        return
    for n in names:
        p = os.path.join(SHM_DIR, n)
        try:
            with open(p, "rb") as f:
                if f.read(8) == magic:
                    yield n
        except OSError:
            continue
