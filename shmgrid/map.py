"""Map: a lock-free hash map in a grid, shared by every attached process.

Keys and values are bytes (any bytes-like object is accepted; ``str`` keys
are UTF-8 encoded, and come back from iteration as bytes). Every key has a
64-bit version that grows by one on every change, deletes included, and
keeps growing if the key is stored again.

Each operation is linearizable on its own key. Iteration (``iter``,
``keys``, ``values``, ``items``) is weakly consistent, like Java's
ConcurrentHashMap: it sees every key present for the whole walk, and may or
may not see keys added or removed during it; each (key, value) pair it
yields was current at some instant.
"""
from __future__ import annotations

import threading
from collections.abc import MutableMapping
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from ._core import ffi, lib
from .errors import InvalidArgument, raise_for
from .grid import cname
from .remote import b64, call, unb64

__all__ = ["Map"]

BytesLike = Union[bytes, bytearray, memoryview]
Key = Union[str, BytesLike]

_NO = lib.SG_NO
_EREMOTE = lib.SG_EREMOTE
_ABSENT = lib.SG_ENOKEY
_io_get = lib.sg_io_get
_io_put = lib.sg_io_put
_io_incr = lib.sg_io_incr
_unpack = ffi.unpack
_MISSING: Any = object()
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def _key(k: Any) -> bytes:
    if type(k) is bytes:
        return k
    if isinstance(k, str):
        return k.encode("utf-8")
    if isinstance(k, (bytes, bytearray, memoryview)):
        return bytes(k)
    raise TypeError(f"map keys are bytes-like or str, not {type(k).__name__}")


def _val(v: Any) -> bytes:
    if type(v) is bytes:
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise TypeError(f"map values are bytes-like, not {type(v).__name__} (encode it first)")


class _PerThread(threading.local):
    """Per-thread call state: cffi releases the GIL during C calls, so two
    threads must never share an output buffer. ``io`` carries the map, the
    value buffer and the out-values of the hot calls (get, put, incr)."""

    def __init__(self, h: Any, value_cap: int) -> None:
        io = lib.sg_io_new(h)
        if io == ffi.NULL:
            raise MemoryError("out of memory for a per-thread map buffer")
        self.io = ffi.gc(io, lib.sg_io_free)
        # view[0:n] copies the first n bytes out as bytes, ~70 ns cheaper
        # than ffi.unpack(buf, n)
        self.get_args = (self.io, ffi.buffer(self.io.buf, value_cap))
        self.val = self.io.buf
        self.len = ffi.new("size_t *")
        self.ver = ffi.new("uint64_t *")


class _WalkBuffers:
    """Buffers of one iteration (generators of one thread may interleave)."""

    def __init__(self, value_cap: int, key_cap: int) -> None:
        self.val = ffi.new("char[]", value_cap)
        self.key = ffi.new("char[]", key_cap)
        self.len = ffi.new("size_t *")
        self.klen = ffi.new("size_t *")
        self.ver = ffi.new("uint64_t *")


class Map(MutableMapping):  # type: ignore[type-arg]
    """A named map in a :class:`~shmgrid.Grid`. Get one with ``grid.map(name)``."""

    __slots__ = ("_grid", "_h", "_name", "_cap", "_max_key", "_capacity", "_max_capacity", "_tls", "_kdt", "_vdt",
                 "__weakref__")
    _grid: Any
    _h: Any
    _name: str
    _cap: int
    _max_key: int
    _capacity: int
    _max_capacity: Optional[int]
    _tls: _PerThread
    _kdt: Any  # numpy dtypes of a typed map (see shmgrid.typed), else None
    _vdt: Any

    @classmethod
    def _open(
        cls,
        grid: Any,
        name: str,
        capacity: Optional[int],
        max_key: Optional[int],
        max_value: Optional[int],
        max_capacity: Optional[int] = None,
        key_dtype: Any = None,
        value_dtype: Any = None,
        raw: bool = False,
    ) -> "Map":
        for arg, v in (("capacity", capacity), ("max_key", max_key), ("max_value", max_value),
                       ("max_capacity", max_capacity)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise TypeError(f"{arg} must be a positive int or None, got {v!r}")
        cn = cname(name, "map")
        out = ffi.new("sg_map **")
        if key_dtype is not None or value_dtype is not None:
            from .typed import open_args

            max_key, max_value, kt, vt = open_args(key_dtype, value_dtype, max_key, max_value)
            opener: Any = lambda: lib.sg_map_open_typed(grid._handle(), cn, capacity or 0, max_key, max_value,
                                                        max_capacity or 0, kt, len(kt), vt, len(vt), out)
        else:
            opener = lambda: lib.sg_map_open(grid._handle(), cn, capacity or 0, max_key or 0, max_value or 0,
                                             max_capacity or 0, out)
        try:
            rc = opener()
        except OverflowError:
            raise _limits_error(capacity, max_key, max_value) from None
        if rc:
            raise_for(rc)
        h = ffi.gc(out[0], lib.sg_map_free)
        from .typed import TypedMap, types_of

        dtypes = None if raw else types_of(h)
        if dtypes is not None:
            cls = TypedMap
        m = cls.__new__(cls)
        m._kdt, m._vdt = dtypes or (None, None)
        m._grid = grid
        m._h = h
        m._name = name
        cap = ffi.new("uint64_t *")
        mk = ffi.new("uint32_t *")
        mv = ffi.new("uint32_t *")
        mc = ffi.new("uint64_t *")
        lib.sg_map_params(m._h, cap, mk, mv, mc)
        m._capacity, m._max_key, m._cap, m._max_capacity = cap[0], mk[0], mv[0], mc[0] or None
        m._tls = _PerThread(m._h, max(m._cap, 8))
        return m

    # ---- properties -----------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def capacity(self) -> int:
        """Keys the map's first table was sized for (it grows past them)."""
        return self._capacity

    @property
    def max_capacity(self) -> Optional[int]:
        """Keys growth stops at (rounded up to the table size), or None."""
        return self._max_capacity

    @property
    def max_key(self) -> int:
        return self._max_key

    @property
    def max_value(self) -> int:
        return self._cap

    @property
    def key_dtype(self) -> Any:
        """The numpy dtype of a typed map's keys, else None."""
        return self._kdt

    @property
    def value_dtype(self) -> Any:
        """The numpy dtype of a typed map's values, else None."""
        return self._vdt

    def raw(self) -> "Map":
        """This map with bytes keys and values: for a typed map, a handle
        that ignores its dtypes (for tools that move bytes between maps, such
        as the bridge); an untyped map returns itself."""
        if self._kdt is None:
            return self
        return Map._open(self._grid, self._name, None, None, None, None, raw=True)

    def watch(self, prefix: Optional[Key] = None) -> Any:
        """A :class:`~shmgrid.watch.Watch` of the changes made to this map
        (by any process on the host) from now on, for keys starting with
        ``prefix`` if given."""
        from .watch import Watch

        return Watch(self, _key(prefix) if prefix is not None else b"")

    def __repr__(self) -> str:
        return f"<shmgrid.Map {self._name!r} capacity={self._capacity} max_key={self._max_key} max_value={self._cap}>"

    # ---- reads ----------------------------------------------------------------

    def get(self, key: Key, default: Any = None, consistent: bool = False) -> Any:
        """The value of ``key``, or ``default`` if absent. On a mirrored map,
        the local copy (which may lag the owner); ``consistent=True`` asks
        the owner host instead."""
        if type(key) is not bytes:
            key = _key(key)
        if consistent and lib.sg_map_is_remote(self._h, key, len(key)):
            r = self._remote("get", key)
            return unb64(r["value"]) if r["ok"] else default
        io, view = self._tls.get_args
        n = _io_get(io, key, len(key))
        if n >= 0:
            return view[0:n]
        if n == _ABSENT:
            return default
        raise_for(n)

    def get_versioned(self, key: Key) -> Optional[Tuple[bytes, int]]:
        """``(value, version)`` of ``key``, or None if absent."""
        if type(key) is not bytes:
            key = _key(key)
        io, view = self._tls.get_args
        n = _io_get(io, key, len(key))
        if n >= 0:
            return view[0:n], io.version
        if n == _ABSENT:
            return None
        raise_for(n)

    def __getitem__(self, key: Key) -> bytes:
        v = self.get(key, _MISSING)
        if v is _MISSING:
            raise KeyError(key)
        return v  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        k = key if type(key) is bytes else _key(key)
        n = lib.sg_map_get(self._h, k, len(k), ffi.NULL, 0, ffi.NULL)
        if n >= 0:
            return True
        if n == _ABSENT:
            return False
        raise_for(n)

    def __len__(self) -> int:
        n = lib.sg_map_len(self._h)
        if n < 0:
            raise_for(n)
        return n  # type: ignore[no-any-return]

    # ---- writes ---------------------------------------------------------------

    def put(self, key: Key, value: BytesLike) -> int:
        """Store ``value`` under ``key``; returns the key's new version."""
        if type(key) is not bytes:
            key = _key(key)
        if type(value) is not bytes:
            value = _val(value)
        ver = _io_put(self._tls.io, key, len(key), value, len(value))
        if ver > 0:
            return ver  # type: ignore[no-any-return]
        if ver == _EREMOTE:
            return self._remote("put", key, value=value)["version"]  # type: ignore[no-any-return]
        raise_for(ver)

    def __setitem__(self, key: Key, value: BytesLike) -> None:
        self.put(key, value)

    def put_if_absent(self, key: Key, value: BytesLike) -> bool:
        """Store ``value`` only if ``key`` is absent; True if it was stored."""
        k = _key(key)
        v = _val(value)
        rc = lib.sg_map_put_if_absent(self._h, k, len(k), v, len(v), self._tls.ver)
        if rc == 0:
            return True
        if rc == _NO:
            return False
        if rc == _EREMOTE:
            return self._remote("put_if_absent", k, value=v)["ok"]  # type: ignore[no-any-return]
        raise_for(rc)

    def replace(self, key: Key, expected: BytesLike, new: BytesLike) -> bool:
        """Atomically set ``key`` to ``new`` if its value equals ``expected``."""
        k, e, v = _key(key), _val(expected), _val(new)
        rc = lib.sg_map_replace(self._h, k, len(k), e, len(e), v, len(v), self._tls.ver)
        if rc == 0:
            return True
        if rc == _NO:
            return False
        if rc == _EREMOTE:
            return self._remote("replace", k, expected=e, value=v)["ok"]  # type: ignore[no-any-return]
        raise_for(rc)

    def compare_and_set(self, key: Key, version: int, value: BytesLike) -> Optional[int]:
        """Set ``key`` to ``value`` if its version is ``version``; returns the
        new version, or None if the version did not match. ``version=0``
        means "only if the key is absent"."""
        if not isinstance(version, int) or not 0 <= version < 2**64:
            raise TypeError(f"version must be an int in [0, 2**64), got {version!r}")
        k, v = _key(key), _val(value)
        ver = self._tls.ver
        rc = lib.sg_map_compare_and_set(self._h, k, len(k), version, v, len(v), ver)
        if rc == 0:
            return ver[0]  # type: ignore[no-any-return]
        if rc == _NO:
            return None
        if rc == _EREMOTE:
            r = self._remote("compare_and_set", k, expected_version=version, value=v)
            return r["version"] if r["ok"] else None
        raise_for(rc)

    def delete(self, key: Key) -> bool:
        """Remove ``key``; True if it was present. Its version still grows."""
        k = _key(key)
        rc = lib.sg_map_delete(self._h, k, len(k), ffi.NULL, 0, ffi.NULL, self._tls.ver)
        if rc == 0:
            return True
        if rc == _NO:
            return False
        if rc == _EREMOTE:
            return self._remote("delete", k)["ok"]  # type: ignore[no-any-return]
        raise_for(rc)

    def __delitem__(self, key: Key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def pop(self, key: Key, default: Any = _MISSING) -> Any:
        """Atomically remove ``key`` and return the value it held."""
        k = _key(key)
        b = self._tls
        rc = lib.sg_map_delete(self._h, k, len(k), b.val, self._cap, b.len, b.ver)
        if rc == 0:
            return ffi.unpack(b.val, b.len[0])
        if rc == _EREMOTE:
            r = self._remote("pop", k)
            if r["ok"]:
                return unb64(r["value"])
            rc = _NO
        if rc == _NO:
            if default is _MISSING:
                raise KeyError(key)
            return default
        raise_for(rc)

    def incr(self, key: Key, delta: int = 1) -> int:
        """Atomically add ``delta`` to the int64 stored (8 bytes, little
        endian) under ``key``, absent counting as 0; returns the new value."""
        if not isinstance(delta, int) or not _I64_MIN <= delta <= _I64_MAX:
            raise TypeError(f"delta must be an int in the int64 range, got {delta!r}")
        if type(key) is not bytes:
            key = _key(key)
        io = self._tls.io
        rc = _io_incr(io, key, len(key), delta)
        if rc:
            if rc == _EREMOTE:
                return self._remote("incr", key, delta=delta)["result"]  # type: ignore[no-any-return]
            raise_for(rc)
        return io.result  # type: ignore[no-any-return]

    # ---- batches (shmgrid.batch) -------------------------------------------------
    #
    # One C call for the whole batch; each element has the single call's
    # semantics, the batch is not a transaction. Lists in and out on any map;
    # numpy arrays in and out on a typed map. See the README, "Batch calls".

    def get_many(self, keys: Any, default: Any = None, found: Any = None) -> Any:
        """The values of ``keys``; ``default`` for absent ones. On a typed
        map, a numpy array (absent keys hold ``default``, or zeros if None),
        and ``found``, a bool array of the keys' shape, if given, is set to
        which keys were present."""
        from . import batch

        return batch.get_many(self, keys, default, found)

    def put_many(self, keys: Any, values: Any) -> Any:
        """Store each value under its key; the keys' new versions (a uint64
        array on a typed map, where ``values`` may also be one value for all)."""
        from . import batch

        return batch.put_many(self, keys, values)

    def delete_many(self, keys: Any) -> Any:
        """Remove each key; whether each was present (a bool array on a
        typed map)."""
        from . import batch

        return batch.delete_many(self, keys)

    def incr_many(self, keys: Any, deltas: Any = 1) -> Any:
        """``incr`` each key by its delta (one int for all, or one per key);
        the new values (an int64 array on a typed map)."""
        from . import batch

        return batch.incr_many(self, keys, deltas)

    def _remote(self, op: str, key: bytes, value: Optional[bytes] = None, expected: Optional[bytes] = None,
                **args: Any) -> Dict[str, Any]:
        """Do ``op`` on the host that owns ``key``'s partition, through this
        host's bridge; returns once this host's mirror has the result."""
        req = {"op": op, "map": self._name, "key": b64(key), "value": b64(value), "expected": b64(expected), **args}
        return call(self._grid.name, req)

    def setdefault(self, key: Key, default: BytesLike = b"") -> bytes:  # type: ignore[override]
        """The value of ``key``, storing ``default`` first if it is absent (atomic)."""
        while True:
            if self.put_if_absent(key, default):
                return _val(default)
            v = self.get(key, _MISSING)
            if v is not _MISSING:
                return v  # type: ignore[no-any-return]

    def clear(self) -> None:
        """Delete every key present (not atomic as a whole)."""
        for k in list(self.keys()):
            self.delete(k)

    # ---- iteration ------------------------------------------------------------

    def _walk(self) -> Iterator[Tuple[bytes, bytes, int]]:
        out = ffi.new("sg_iter **")
        rc = lib.sg_iter_open(self._h, out)
        if rc:
            raise_for(rc)
        # Until the walk ends (or this generator is collected) the iterator
        # keeps the table it walks from being freed by a migration.
        it = ffi.gc(out[0], lib.sg_iter_free)
        b = _WalkBuffers(max(self._cap, 8), max(self._max_key, 1))
        try:
            while True:
                rc = lib.sg_iter_next(it, b.key, self._max_key, b.klen, b.val, self._cap, b.len, b.ver)
                if rc == _NO:
                    return
                if rc:
                    raise_for(rc)
                yield _unpack(b.key, b.klen[0]), _unpack(b.val, b.len[0]), b.ver[0]
        finally:
            ffi.release(it)

    def __iter__(self) -> Iterator[bytes]:
        for k, _, _ in self._walk():
            yield k

    def keys(self) -> List[bytes]:  # type: ignore[override]
        """The keys present, as a list (weakly consistent snapshot)."""
        return [k for k, _, _ in self._walk()]

    def values(self) -> List[bytes]:  # type: ignore[override]
        return [v for _, v, _ in self._walk()]

    def items(self) -> List[Tuple[bytes, bytes]]:  # type: ignore[override]
        return [(k, v) for k, v, _ in self._walk()]

    def items_versioned(self) -> List[Tuple[bytes, bytes, int]]:
        """(key, value, version) triples of the keys present."""
        return list(self._walk())

    # ---- maintenance ------------------------------------------------------------

    def compact(self) -> None:
        """Migrate now to a clean table, dropping the slots of deleted keys
        (the table keeps its size, or grows if the keys present need it),
        and return when the migration is complete.
        Other processes keep reading and writing meanwhile. Not needed for
        correctness: inserts migrate the table by themselves when it fills."""
        rc = lib.sg_map_compact(self._h)
        if rc:
            raise_for(rc)

    def validate(self, repair: bool = False) -> Dict[str, int]:
        """Walk the whole table and check every invariant; raise
        CorruptSegment if one is broken. Returns counts (live keys,
        tombstones, bound slots, bytes).

        A migration under way is finished first (this call helps copy).
        With ``repair=True``, also reset len()'s counter and the slot
        reservation count to what the walk found; do that only while no
        process writes the map (processes killed between their CAS and their
        counter update leave those counters off by one each).
        """
        out = ffi.new("sg_map_report *")
        rc = lib.sg_map_validate(self._h, 1 if repair else 0, out)
        if rc:
            raise_for(rc)
        return {f: getattr(out, f) for f in (
            "capacity", "nslots", "slot_limit", "used", "bound", "live", "tombstones",
            "live_counter", "block_bytes", "table_bytes", "generation", "version_floor",
            "retired_tables", "retired_bytes", "max_key", "max_value")}


def _limits_error(capacity: Optional[int], max_key: Optional[int], max_value: Optional[int]) -> Exception:
    return InvalidArgument(
        f"map parameters out of range: capacity={capacity}, max_key={max_key} (limit {lib.SG_MAX_KEY_LIMIT}), "
        f"max_value={max_value} (limit {lib.SG_MAX_VALUE_LIMIT})"
    )

