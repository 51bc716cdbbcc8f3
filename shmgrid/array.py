"""Shared numpy arrays: ``grid.array(name, shape, dtype)``.

The array returned is a :class:`SharedArray`, a ``numpy.ndarray`` whose data
lives in the grid's segment, so every process that opens the name sees the
same memory. Two ways to change it, with different guarantees:

- ``a.publish(new)`` replaces the whole contents as one new *version*
  (numbered 1, 2, ...; version 0 is all zeroes). ``a.snapshot()`` returns a
  private copy of one complete version and its number: never a mix of two
  versions, even if a publisher is killed in the middle of its copy, and a
  reader never waits on a dead or stopped publisher. Publishers take turns
  (a robust writer lock: one that dies holding it is recovered by the next).
- Writing through the array itself (``a[3] = 1.0``, ``a += 1``) is plain
  shared memory: visible to other processes' views at once, not atomic,
  not versioned. A snapshot taken while no publish is under way returns the
  last published contents without such writes; one taken during a publish
  may copy the live buffer (once the new version is complete there) with
  whatever was written into it since. The next publish overwrites them;
  ``a.publish(a)`` makes the current contents a version. Reading through
  the array is likewise unsynchronized: during a publish it shows the old
  and new version mixed. Use ``snapshot()`` when consistency matters.

``a.version`` is the newest complete version; ``a.wait_version(v)`` sleeps
until a version above ``v`` is published.

Lifetime: the array and every view of it keep the grid's mapping alive.
``grid.close()`` with arrays still referenced marks the grid closed (calls
raise Closed) but unmaps only once the last view is gone, so a view never
points into unmapped memory. Pickling a SharedArray (as multiprocessing
does) sends a plain copy; other processes should open the array by name.

numpy is installed with shmgrid (a dependency).
"""
from __future__ import annotations

import ast
import math
import operator
import threading
from typing import Any, Dict, Optional, Tuple

import numpy as np
from numpy.lib import format as _npformat

from ._core import ffi, lib
from ._wait import SLICE_NS, start, wait_more
from .batch import _exact
from .errors import Busy, Closed, CorruptSegment, InvalidArgument, raise_for
from .grid import cname

__all__ = ["SharedArray"]

MAX_BYTES: int = lib.SG_ARRAY_MAX_BYTES
_NO = lib.SG_NO


class _Out(threading.local):
    """A per-thread uint64 out-value (cffi drops the GIL inside C calls)."""

    def __init__(self) -> None:
        self.p = ffi.new("uint64_t *")


_out = _Out()


def _describe(shape: Any, dtype: Any) -> Tuple[Tuple[int, ...], np.dtype, bytes]:
    """Normalized shape, dtype, and the description stored in the segment:
    ``repr((shape, descr))`` with descr as in the .npy format, which keeps
    a structured dtype whole (field names, types, offsets, padding)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (int(shape),)
    try:
        shape = tuple(_dimension(n) for n in shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, not {shape!r}") from None
    if any(n < 0 for n in shape):
        raise InvalidArgument(f"shape {shape} has a negative dimension")
    dt = np.dtype(dtype)
    if dt.subdtype is not None:  # ('f4', (2, 3)): numpy would extend the shape
        base, sub = dt.subdtype
        shape, dt = shape + tuple(sub), base
    if dt.hasobject:
        raise InvalidArgument(f"dtype {dt} holds Python objects (pointers), which cannot be shared between processes")
    if dt.itemsize == 0:
        raise InvalidArgument(f"dtype {dt} has no bytes")
    # numpy's own checks (dimensions past intp, too many of them) before the
    # object exists: a name created with a shape numpy refuses could never
    # be opened again
    try:
        np.ndarray(shape, dt, buffer=bytearray(dt.itemsize), strides=(0,) * len(shape))
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidArgument(f"shape {shape} of {dt}: {e}") from None
    desc = repr((shape, _npformat.dtype_to_descr(dt))).encode("ascii")
    if len(desc) > lib.SG_ARRAY_DESC_MAX:
        raise InvalidArgument(f"the description of shape {shape} and dtype {dt} takes {len(desc)} bytes; "
                              f"the limit is {lib.SG_ARRAY_DESC_MAX}")
    return shape, dt, desc


def _dimension(n: Any) -> int:
    if isinstance(n, bool):  # an int to operator.index, never meant as a size
        raise TypeError
    return operator.index(n)


def _parse(name: str, desc: bytes) -> Tuple[Tuple[int, ...], np.dtype]:
    """Shape and dtype back from a description read out of the segment
    (written by another process: checked, never trusted)."""
    try:
        shape, descr = ast.literal_eval(desc.decode("ascii"))
        shape = tuple(_dimension(n) for n in shape)
        dt = _npformat.descr_to_dtype(descr)
    except Exception as e:  # noqa: BLE001 - any failure means a bad description
        raise CorruptSegment(f"array {name!r}: unreadable description {desc[:200]!r} ({e})") from None
    if any(n < 0 for n in shape) or dt.hasobject:
        raise CorruptSegment(f"array {name!r}: description {desc[:200]!r} is not a shape and a plain dtype")
    return shape, dt


class _Handle:
    """The C handle of an array and what it holds, without mapping a view
    (``shmgrid stat`` and validate use it on its own)."""

    __slots__ = ("grid", "name", "h", "shape", "dtype", "nbytes", "live", "out", "__weakref__")

    def __init__(self, grid: Any, name: str, shape: Any = None, dtype: Any = None) -> None:
        out = ffi.new("sg_array **")
        if shape is None:
            if dtype is not None:
                raise InvalidArgument("give shape with dtype (dtype alone cannot create or check an array)")
            rc = lib.sg_array_open(grid._handle(), cname(name, "array"), ffi.NULL, 0, 0, out)
            if rc == _NO:
                raise InvalidArgument(f"array {name!r} does not exist; give its shape (and dtype) to create it")
        else:
            shp, dt, desc = _describe(shape, np.float64 if dtype is None else dtype)
            nbytes = math.prod(shp) * dt.itemsize
            if nbytes > MAX_BYTES:
                raise InvalidArgument(f"array of shape {shp} and dtype {dt} takes {nbytes} bytes; "
                                      f"the limit is {MAX_BYTES} bytes")
            rc = lib.sg_array_open(grid._handle(), cname(name, "array"), desc, len(desc), nbytes, out)
        if rc:
            raise_for(rc)
        self.h = ffi.gc(out[0], lib.sg_array_free)
        self.grid, self.name = grid, name
        n = lib.sg_array_desc(self.h, ffi.NULL, 0)
        buf = ffi.new("char[]", max(n, 1))
        lib.sg_array_desc(self.h, buf, n)
        self.shape, self.dtype = _parse(name, ffi.unpack(buf, n))
        self.nbytes = lib.sg_array_nbytes(self.h)
        addr = int(ffi.cast("uintptr_t", lib.sg_array_live(self.h)))
        self.live = (addr, addr + self.nbytes)
        # the last `out` a snapshot filled, and its cffi pointer (which keeps
        # it alive): a loop reusing one buffer skips the checks and the
        # buffer lookup (~1 us a call)
        self.out: Any = None  # (the last out= array, its pointer)
        if self.nbytes != math.prod(self.shape) * self.dtype.itemsize:
            raise CorruptSegment(f"array {name!r}: {self.nbytes} bytes do not hold shape {self.shape} of {self.dtype}")

    def handle(self) -> Any:
        if self.grid.closed:
            raise Closed(f"grid {self.grid.name!r} is closed")
        return self.h

    def stats(self) -> Dict[str, Any]:
        out = ffi.new("sg_array_info *")
        rc = lib.sg_array_info_get(self.handle(), out)
        if rc:
            raise_for(rc)
        return {
            "shape": list(self.shape), "dtype": str(self.dtype), "nbytes": out.nbytes, "version": out.version,
            "publishes": out.publishes, "repairs": out.repairs, "locked_reads": out.locked_reads,
            "owner_deaths": out.owner_deaths, "seq": list(out.seq), "buffer_versions": list(out.ver),
            "writer_tid": out.writer_tid, "writer_alive": bool(out.writer_alive), "waiters": out.waiters,
        }

    def repair(self, timeout: Optional[float]) -> bool:
        deadline, ns = start(timeout)
        h = self.handle()
        rc = lib.sg_array_repair(h, ns)
        if rc < 0:
            rc = wait_more(lambda ns: lib.sg_array_repair(h, ns), rc, deadline,
                           lambda: Busy(f"array {self.name!r}: the writer lock stayed held"))
        return rc == 0


class SharedArray(np.ndarray):
    """A numpy array in shared memory, from :meth:`Grid.array
    <shmgrid.Grid.array>`. Views and results of arithmetic are plain numpy
    arrays as far as the methods below go: only the array ``grid.array()``
    returned has them."""

    _shm: Optional[_Handle]

    def __array_finalize__(self, obj: Any) -> None:
        self._shm = None  # a view or a copy: not the shared object itself

    def __array_wrap__(self, arr: Any, context: Any = None, return_scalar: bool = False) -> Any:
        # arithmetic on a shared array makes private memory: a plain ndarray
        out = arr.view(np.ndarray) if isinstance(arr, SharedArray) else arr
        return out[()] if return_scalar else out

    def __reduce__(self) -> Any:
        return self.view(np.ndarray).__reduce__()

    def _root(self) -> _Handle:
        s = self._shm
        if s is None:
            raise TypeError("snapshot/publish/version belong to the array grid.array() returned, not to a view or "
                            "copy of it")
        return s

    @property
    def name(self) -> str:
        return self._root().name

    @property
    def version(self) -> int:
        """The newest complete version (0 before the first publish)."""
        return lib.sg_array_version(self._root().handle())  # type: ignore[no-any-return]

    def snapshot(self, out: Optional[np.ndarray] = None, timeout: Optional[float] = None) -> Tuple[np.ndarray, int]:
        """``(copy, version)``: a private copy of one complete version and its
        number. ``out`` (a C-contiguous array of this shape and dtype) is
        filled instead of a new array. Waits only while publishers keep
        rewriting both buffers during the copy (then for the writer lock, up
        to ``timeout`` seconds: Busy)."""
        s = self._shm or self._root()
        if out is None:
            out = np.empty(s.shape, s.dtype)
            p = ffi.from_buffer("char[]", out, require_writable=True)
        elif s.out is not None and out is s.out[0] and out.flags.writeable:
            p = s.out[1]  # the same array as last time (its shape and dtype cannot change)
        else:
            if (not isinstance(out, np.ndarray) or out.shape != s.shape or out.dtype != s.dtype
                    or not out.flags.c_contiguous or not out.flags.writeable):
                raise InvalidArgument(f"out must be a writable C-contiguous array of shape {s.shape} and dtype "
                                      f"{s.dtype}")
            p = ffi.from_buffer("char[]", out, require_writable=True)
            addr = int(ffi.cast("uintptr_t", p))
            if out.nbytes and addr < s.live[1] and s.live[0] < addr + out.nbytes:
                raise InvalidArgument("out must not be the shared array itself (snapshot copies out of it)")
            s.out = (out, p)  # one store: threads sharing a handle never pair one with another's pointer
        if s.grid._closed:
            raise Closed(f"grid {s.grid.name!r} is closed")
        h, vp = s.h, _out.p
        deadline, ns = (None, SLICE_NS) if timeout is None else start(timeout)
        rc = lib.sg_array_snapshot(h, p, ns, vp)
        if rc:
            wait_more(lambda ns: lib.sg_array_snapshot(h, p, ns, vp), rc, deadline,
                      lambda: Busy(f"array {s.name!r}: snapshot timed out behind publishers"))
        return out, int(vp[0])

    def publish(self, new: Any, timeout: Optional[float] = None) -> int:
        """Replace the contents with ``new`` (broadcast to the shape, cast
        only within a kind: ints to floats yes, floats to ints no) as the
        next version; returns its number. Waits up to ``timeout`` seconds
        for other publishers (Busy)."""
        s = self._root()
        if type(new) in (int, float, complex):  # a Python number: weak, as in numpy's own promotion
            if np.result_type(s.dtype, new) != s.dtype:
                raise TypeError(f"cannot publish {new!r} into array {s.name!r} of {s.dtype} without changing it")
            src = np.asarray(new, dtype=s.dtype)
        else:
            src = np.asarray(new)
            if src.dtype != s.dtype and not np.can_cast(src.dtype, s.dtype, casting="same_kind"):
                raise TypeError(f"cannot publish {src.dtype} data into array {s.name!r} of {s.dtype} "
                                "(cast it first if that is meant)")
            if src.dtype != s.dtype and s.dtype.kind in "iub":
                src = _exact(src, s.dtype, f"publish into array {s.name!r}")  # int64 300 is not an int8
        try:
            src = np.broadcast_to(src, s.shape)
        except ValueError:
            raise InvalidArgument(f"cannot publish shape {src.shape} into array {s.name!r} of shape {s.shape}") from None
        src = np.ascontiguousarray(src, dtype=s.dtype)
        if np.may_share_memory(src, self):
            src = src.copy()  # the live buffer is written first: copy out of it before
        h, p, vp = s.handle(), ffi.from_buffer("char[]", src), _out.p
        deadline, ns = start(timeout)
        rc = lib.sg_array_publish(h, p, ns, vp)
        if rc:
            wait_more(lambda ns: lib.sg_array_publish(h, p, ns, vp), rc, deadline,
                      lambda: Busy(f"array {s.name!r}: another publisher held the writer lock; timed out"))
        return int(vp[0])

    def wait_version(self, after: int, timeout: Optional[float] = None) -> int:
        """Wait until a version above ``after`` is published; return it.
        Busy (a TimeoutError) if none comes within ``timeout`` seconds."""
        s = self._root()
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise TypeError(f"after must be a version number (an int >= 0), not {after!r}")
        h, vp = s.handle(), _out.p
        deadline, ns = start(timeout)
        rc = lib.sg_array_wait(h, after, ns, vp)
        if rc:
            wait_more(lambda ns: lib.sg_array_wait(h, after, ns, vp), rc, deadline,
                      lambda: Busy(f"array {s.name!r}: no version above {after} within {timeout} s"))
        return int(vp[0])

    def repair(self, timeout: Optional[float] = None) -> bool:
        """Take the writer lock, restore what a publisher killed mid-copy
        left, release. True if something needed it. Publishers do this by
        themselves; readers never need it."""
        return self._root().repair(timeout)

    def stats(self) -> Dict[str, Any]:
        """Version, publishes, repairs after dead publishers, snapshots that
        had to take the writer lock, the writer, the waiters."""
        return self._root().stats()


def open_array(grid: Any, name: str, shape: Any = None, dtype: Any = None) -> SharedArray:
    s = _Handle(grid, name, shape, dtype)
    ptr = lib.sg_array_live(s.handle())
    grid._pin()
    # The buffer keeps `pin` alive, every view keeps the buffer alive (numpy
    # collapses view bases to it), and the grid stays mapped until `pin`
    # is collected.
    pin = ffi.gc(ffi.cast("char *", ptr), lambda _p, grid=grid: grid._unpin())
    flat = np.frombuffer(ffi.buffer(pin, s.nbytes), dtype=s.dtype, count=math.prod(s.shape))
    a = flat.reshape(s.shape).view(SharedArray)
    a._shm = s
    return a

