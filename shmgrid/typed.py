"""Typed maps: fixed-width keys and values described by numpy dtypes.

``grid.map(name, key_dtype="i8", value_dtype="f8")`` creates (or opens) a
map whose keys and values are the bytes of one element of those dtypes;
``max_key`` and ``max_value`` are the itemsizes. The dtypes are recorded in
the map (as their numpy descriptions, structured dtypes included) and
checked when the map is opened with dtypes (ObjectMismatch if they differ);
``grid.map(name)`` without them takes the recorded ones.

The batch calls of a typed map take and return numpy arrays. Its single
calls take keys and values as anything ``numpy.asarray(x, dtype)`` accepts
(Python ints and floats, numpy scalars, tuples for a structured dtype) and
return numpy scalars (``numpy.void`` records for a structured dtype), so that
``m[3] = 1.5; m[3] == 1.5`` holds and a value keeps its exact type. Keys
compare by their bytes: ``0.0`` and ``-0.0`` are two keys, and every NaN
with the same bits is one key.
"""
from __future__ import annotations

import ast
import functools
import struct
from typing import Any, Iterator, Optional, Tuple

from ._core import ffi, lib
from .errors import CorruptSegment, InvalidArgument, NotAnInteger, ValueTooLarge, raise_for
from .batch import _exact
from .map import Map

__all__ = ["TypedMap"]

_MISSING: Any = object()


def _np() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a dependency; a broken install
        raise ImportError("typed maps (key_dtype / value_dtype) need numpy: pip install numpy") from None
    return numpy


def _describe(dt: Any, what: str) -> bytes:
    np = _np()
    try:
        dt = np.dtype(dt)
    except TypeError as e:
        raise InvalidArgument(f"{what}: not a numpy dtype ({e})") from None
    if dt.hasobject or dt.itemsize == 0:
        raise InvalidArgument(f"{what} {dt} is not fixed-width data (objects, or no bytes)")
    return repr(np.lib.format.dtype_to_descr(dt)).encode("ascii")


def _undescribe(text: bytes, width: int, what: str) -> Any:
    """A dtype read back from the segment, checked as carefully as one
    given to create the map: whatever wrote the segment (another program,
    damage) must not make us hand numpy object pointers to C."""
    np = _np()
    try:
        dt = np.lib.format.descr_to_dtype(ast.literal_eval(text.decode("ascii")))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError) as e:
        raise CorruptSegment(f"the map's recorded {what} dtype cannot be read: {e}") from None
    if dt.hasobject or dt.itemsize != width:
        raise CorruptSegment(f"the map's recorded {what} dtype {dt} is not {width}-byte fixed-width data")
    return dt


def open_args(key_dtype: Any, value_dtype: Any, max_key: Optional[int],
              max_value: Optional[int]) -> Tuple[int, int, bytes, bytes]:
    """max_key, max_value and the two descriptions for sg_map_open_typed."""
    if key_dtype is None or value_dtype is None:
        raise InvalidArgument("a typed map needs both key_dtype and value_dtype")
    np = _np()
    kt, vt = _describe(key_dtype, "key_dtype"), _describe(value_dtype, "value_dtype")
    kw, vw = np.dtype(key_dtype).itemsize, np.dtype(value_dtype).itemsize
    for arg, given, width in (("max_key", max_key, kw), ("max_value", max_value, vw)):
        if given is not None and given != width:
            raise InvalidArgument(f"{arg}={given} disagrees with the dtype's itemsize {width}; leave it out")
    return kw, vw, kt, vt


def types_of(h: Any) -> Optional[Tuple[Any, Any]]:
    """The (key, value) dtypes of an open map handle, or None if untyped."""
    cap = lib.SG_MAP_TYPES_MAX
    kbuf, vbuf = ffi.new("char[]", cap), ffi.new("char[]", cap)
    kl, vl = ffi.new("size_t *"), ffi.new("size_t *")
    rc = lib.sg_map_types_get(h, kbuf, cap, kl, vbuf, cap, vl)
    if rc == lib.SG_NO:
        return None
    if rc:
        raise_for(rc)
    cap64, kw, vw, maxcap = ffi.new("uint64_t *"), ffi.new("uint32_t *"), ffi.new("uint32_t *"), ffi.new("uint64_t *")
    rc = lib.sg_map_params(h, cap64, kw, vw, maxcap)
    if rc:
        raise_for(rc)
    return (_undescribe(ffi.unpack(kbuf, kl[0]), kw[0], "key"),
            _undescribe(ffi.unpack(vbuf, vl[0]), vw[0], "value"))


_STRUCT_CODES = {("i", 1): "b", ("i", 2): "h", ("i", 4): "i", ("i", 8): "q", ("u", 1): "B", ("u", 2): "H",
                 ("u", 4): "I", ("u", 8): "Q", ("f", 2): "e", ("f", 4): "f", ("f", 8): "d", ("b", 1): "?"}


@functools.lru_cache(maxsize=64)
def _codec(dt: Any) -> Tuple[Any, Any]:
    """(pack, unpack) of one element of a plain numeric dtype, by struct
    (five times faster than numpy for one scalar); (None, None) otherwise."""
    code = _STRUCT_CODES.get((dt.kind, dt.itemsize)) if dt.fields is None and dt.subdtype is None else None
    if code is None:
        return None, None
    s = struct.Struct(("<" if dt.byteorder in "<=|" else ">") + code)
    return s.pack, s.unpack


def _scalar(x: Any, dt: Any, what: str) -> bytes:
    """One key or value as the bytes of one ``dt``: a plain Python number
    by struct when that is exact, else converted as the batch calls convert
    (2**40 or 1.5 is not an int32)."""
    pack = _codec(dt)[0]
    if pack is not None and type(x) in (int, float, bool) and (type(x) is not float or dt.kind == "f"):
        try:
            return pack(x)  # type: ignore[no-any-return]
        except (struct.error, OverflowError):
            pass  # out of range: numpy says why, or rounds to inf as the batches do
    a = _exact(x, dt, what)
    if a.ndim:
        raise TypeError(f"one {what} of dtype {dt} expected, got an array of shape {a.shape}")
    return a.tobytes()  # type: ignore[no-any-return]


class TypedMap(Map):
    """A :class:`~shmgrid.Map` of fixed-width keys and values (numpy
    dtypes). Every Map method works; keys and values convert as the module
    docstring says. Get one with ``grid.map(name, key_dtype=..., value_dtype=...)``."""

    __slots__ = ()

    def _k(self, key: Any) -> bytes:
        return _scalar(key, self._kdt, "key")

    def _v(self, value: Any) -> bytes:
        return _scalar(value, self._vdt, "value")

    def _out(self, raw: bytes) -> Any:
        if len(raw) != self._vdt.itemsize:  # stored past the type through the C API or a raw() handle
            raise ValueTooLarge(f"the value is {len(raw)} bytes, not one {self._vdt} ({self._vdt.itemsize} bytes)")
        unpack = _codec(self._vdt)[1]
        if unpack is not None:
            return self._vdt.type(unpack(raw)[0])
        return _np().frombuffer(raw, dtype=self._vdt)[0]

    def _key_out(self, raw: bytes) -> Any:
        return _np().frombuffer(raw, dtype=self._kdt)[0]

    def _check_int_values(self) -> None:
        if self._vdt != _np().dtype("<i8"):
            raise NotAnInteger(f"incr needs a map of int64 values; this map's values are {self._vdt}")

    def __repr__(self) -> str:
        return f"<shmgrid.TypedMap {self._name!r} capacity={self._capacity} {self._kdt} -> {self._vdt}>"

    def get(self, key: Any, default: Any = None, consistent: bool = False) -> Any:
        v = super().get(self._k(key), _MISSING, consistent)
        return default if v is _MISSING else self._out(v)

    def get_versioned(self, key: Any) -> Any:
        r = super().get_versioned(self._k(key))
        return None if r is None else (self._out(r[0]), r[1])

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._k(key))

    def put(self, key: Any, value: Any) -> int:
        return super().put(self._k(key), self._v(value))

    def put_if_absent(self, key: Any, value: Any) -> bool:
        return super().put_if_absent(self._k(key), self._v(value))

    def replace(self, key: Any, expected: Any, new: Any) -> bool:
        return super().replace(self._k(key), self._v(expected), self._v(new))

    def compare_and_set(self, key: Any, version: int, value: Any) -> Optional[int]:
        return super().compare_and_set(self._k(key), version, self._v(value))

    def delete(self, key: Any) -> bool:
        return super().delete(self._k(key))

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        v = super().pop(self._k(key), _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return self._out(v)

    def incr(self, key: Any, delta: int = 1) -> int:
        self._check_int_values()
        return super().incr(self._k(key), delta)

    def setdefault(self, key: Any, default: Any = 0) -> Any:  # type: ignore[override]
        while True:
            if self.put_if_absent(key, default):
                return self._out(self._v(default))
            v = self.get(key, _MISSING)
            if v is not _MISSING:
                return v

    def watch(self, prefix: Any = None) -> Any:
        """A watch of this map's changes; its events carry keys as bytes
        (``numpy.frombuffer(event.key, map.key_dtype)`` decodes one)."""
        return super().watch(prefix)

    def _walk(self) -> Iterator[Tuple[Any, Any, int]]:
        for k, v, ver in super()._walk():
            yield self._key_out(k), self._out(v), ver
