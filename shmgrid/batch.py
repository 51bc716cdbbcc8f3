"""Batch map calls: one C call for a whole batch of keys.

``Map.get_many``, ``put_many``, ``delete_many`` and ``incr_many`` are thin
methods that land here. Two forms:

- any map: keys (and values) as Python sequences of bytes-like objects (or
  ``str`` keys), results as lists;
- a typed map (``grid.map(name, key_dtype=..., value_dtype=...)``): keys and
  values as numpy arrays of its dtypes (anything ``numpy.asarray`` turns
  into one), results as numpy arrays, with no Python object per element.

Each element has exactly the semantics of the single call and is
linearizable on its own key; the batch is not a transaction (another process
may see any part of it done, and a failing element does not undo the others).

Elements whose key belongs to a partition another host owns (a mirrored
map) go through the bridge one by one, as the single calls do.
"""
from __future__ import annotations

from array import array
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ._core import ffi, lib
from .errors import _BY_CODE, InvalidArgument, ShmgridError, raise_for
from .map import _key, _val

_EREMOTE = lib.SG_EREMOTE
_ENOKEY = lib.SG_ENOKEY
_GET_BUFFER = 1 << 20  # bytes of values per C call in the list form of get_many


def _np() -> Any:
    import numpy

    return numpy


# ---- packing ------------------------------------------------------------------


class _Packed:
    """Elements for the C call: concatenated bytes and their lengths (list
    form), or a contiguous array at a fixed width (typed form)."""

    __slots__ = ("items", "data", "lens", "width", "n", "keep")

    def __init__(self, items: Optional[List[bytes]], data: Any, lens: Any, width: int, n: int, keep: Any) -> None:
        self.items = items  # the elements as bytes (list form), for the per-key remote path
        self.data = data
        self.lens = lens
        self.width = width
        self.n = n
        self.keep = keep  # what must outlive the call

    @classmethod
    def of_list(cls, elems: List[bytes]) -> "_Packed":
        joined = b"".join(elems)
        lens = array("I", map(len, elems))
        return cls(elems, joined, ffi.from_buffer("uint32_t[]", lens) if elems else ffi.NULL, 0, len(elems),
                   (joined, lens))

    @classmethod
    def of_array(cls, arr: Any) -> "_Packed":
        return cls(None, ffi.from_buffer(arr) if arr.size else ffi.NULL, ffi.NULL, arr.dtype.itemsize, arr.size, arr)

    def item(self, i: int) -> bytes:
        if self.items is not None:
            return self.items[i]
        return self.keep[i:i + 1].tobytes()  # type: ignore[no-any-return]


def _exact(x: Any, dt: Any, what: str) -> Any:
    """``x`` as an array of ``dt``. Into an integer dtype only what it
    holds exactly: numpy's own cast wraps 2**32 + 5 to 5 in an int32 and
    truncates 1.5 to 1, which would write another key than the caller
    named. Into a float dtype, rounding as numpy rounds (the single calls
    do the same)."""
    np = _np()
    try:
        src = None if dt.kind not in "iub" else np.asarray(x)
        if src is None or src.dtype == dt or src.dtype.kind not in "biuf":
            return np.asarray(x, dtype=dt)
    except (OverflowError, ValueError, TypeError) as e:
        raise InvalidArgument(f"{what}: cannot be {dt}: {e}") from None
    with np.errstate(invalid="ignore", over="ignore"):
        arr = src.astype(dt, casting="unsafe")
        back = arr.astype(src.dtype, casting="unsafe")
    lost = back != src  # NaN, fractions and most values out of range come back different
    if src.dtype.kind in "iu" and dt.kind in "iu":  # a wrap keeps the bits: compare the values
        info = np.iinfo(dt)
        lost |= (src < info.min) | (src > info.max)
    if lost.any():
        i = np.flatnonzero(lost)[0]
        raise InvalidArgument(f"{what}: element {i} ({src.reshape(-1)[i]!r}) is not exactly a {dt} "
                              f"({np.count_nonzero(lost)} such)")
    return arr


def _typed_keys(m: Any, keys: Any) -> Tuple[Any, Any]:
    arr = _exact(keys, m._kdt, "keys")
    arr = _np().ascontiguousarray(arr)
    return arr.reshape(-1), arr.shape


def _typed_values(m: Any, values: Any, shape: Any) -> Any:
    np = _np()
    arr = _exact(values, m._vdt, "values")
    if arr.shape != shape:
        try:
            arr = np.broadcast_to(arr, shape)
        except ValueError:
            raise InvalidArgument(f"values of shape {arr.shape} for keys of shape {shape}") from None
    return np.ascontiguousarray(arr).reshape(-1)


def _pack_keys(m: Any, keys: Any) -> Tuple[_Packed, Any]:
    if m._kdt is not None:
        arr, shape = _typed_keys(m, keys)
        return _Packed.of_array(arr), shape
    if isinstance(keys, (str, bytes, bytearray, memoryview)):
        raise TypeError("keys must be a sequence of keys, not one key")
    return _Packed.of_list([_key(k) for k in keys]), None


# ---- per-element errors ---------------------------------------------------------


def _element_error(status: Any, failed: Sequence[int], results: Any, what: str) -> ShmgridError:
    """The exception for a batch with failed elements: the class of the first
    one's error (NotAnInteger, IntegerOverflow, CapacityError...), with
    ``failed`` (their indices, ascending) and ``results`` (what the call
    returns otherwise; failed elements hold 0 / None) attached."""
    first = failed[0]
    code = int(status[first])
    cls = _BY_CODE.get(code, ShmgridError)
    msg = ffi.string(lib.sg_errmsg()).decode("utf-8", "replace")
    e = cls(f"{what}: {len(failed)} of {len(status)} elements failed, the first at index {first}; the others "
            f"were done (last failure: {msg or code})")
    e.failed = list(failed)  # type: ignore[attr-defined]
    e.results = results  # type: ignore[attr-defined]
    return e


def _check(rc: int) -> None:
    if rc < 0:
        raise_for(rc)


class _Remote:
    """Elements refused with SG_EREMOTE go through the bridge one by one, in
    order; the first that fails (RemoteUnavailable: each other would wait
    for the same unreachable owner; or the owner's error) stops the rest,
    and is raised with ``failed`` listing every remote element not done."""

    def __init__(self, status: Any) -> None:
        if isinstance(status, array):
            self.idx = [i for i, s in enumerate(status) if s == _EREMOTE] if _EREMOTE in status else []
        else:
            self.idx = _np().nonzero(status == _EREMOTE)[0].tolist()

    def run(self, fn: Any) -> None:
        for j, i in enumerate(self.idx):
            try:
                fn(i)
            except ShmgridError as e:  # unreachable, or the owner refused it (too large, not an int...)
                e.failed = self.idx[j:]  # type: ignore[attr-defined]  # it, and the remote ones after it: not done
                raise


def _finish(status: Any, remote: Callable[[int], None], result: Callable[[], Any], what: str) -> Any:
    """The end of a write batch: its remote elements through the bridge,
    then an error for the failed elements, if any, else the results."""
    try:
        _Remote(status).run(remote)
    except ShmgridError as e:
        e.results = result()  # type: ignore[attr-defined]
        raise
    bad = _failures(status)
    if bad:
        raise _element_error(status, bad, result(), what)
    return result()


def _failures(status: Any, absent_ok: bool = False) -> List[int]:
    """Indices of the elements that failed: a negative status other than
    EREMOTE (handled apart) and, for get, ENOKEY (absent is an answer)."""
    if not isinstance(status, array):
        np = _np()
        bad = (status < 0) & (status != _EREMOTE)
        if absent_ok:
            bad &= status != _ENOKEY
        return [int(i) for i in np.nonzero(bad)[0]]
    return [i for i, s in enumerate(status) if s < 0 and s != _EREMOTE and not (absent_ok and s == _ENOKEY)]


# per-element outputs: (numpy dtype, array module code, C type)
_I32, _U64 = ("i4", "i", "int32_t[]"), ("u8", "Q", "uint64_t[]")


def _out(n: int, typed: bool, kind: Tuple[str, str, str]) -> Tuple[Any, Any]:
    """n zeroed outputs (a numpy array for a typed map, else an
    array.array) and the C pointer to them."""
    dtype, code, ctype = kind
    a = _np().zeros(n, dtype=dtype) if typed else array(code, bytes(n * _np().dtype(dtype).itemsize))
    return a, _c(ctype, a, n)


def _c(ctype: str, a: Any, n: int) -> Any:
    return ffi.from_buffer(ctype, a) if n else ffi.NULL


# ---- the calls --------------------------------------------------------------------


def get_many(m: Any, keys: Any, default: Any = None, found: Any = None) -> Any:
    pk, shape = _pack_keys(m, keys)
    n = pk.n
    typed = m._kdt is not None
    status, cst = _out(n, typed, _I32)
    if typed:
        np = _np()
        out = np.zeros(n, dtype=m._vdt)  # calloc: missing keys read as zeros unless default says otherwise
        w = m._vdt.itemsize
        rc = lib.sg_map_get_many(m._h, pk.data, pk.lens, pk.width, n, ffi.from_buffer(out) if n else ffi.NULL,
                                 n * w, w, cst, ffi.NULL)
        _check(rc)
        bad = _failures(status, absent_ok=True)
        if bad:
            raise _element_error(status, bad, out, "get_many")
        hit = status >= 0
        if default is not None:
            out[~hit] = default
        if found is not None:
            found[...] = hit.reshape(shape)
        return out.reshape(shape)
    # list form: values concatenated in a buffer, as many calls as it takes
    res: List[Any] = [default] * n
    # room for the whole batch at the largest value size, within a bound
    cap = max(min(_GET_BUFFER, n * m._cap), m._cap, 1)
    buf = ffi.new("char[]", cap)
    view = ffi.buffer(buf, cap)
    kbuf, lens = ffi.from_buffer(pk.data), pk.keep[1]
    done = koff = 0
    while done < n:  # each call does at least one element (cap >= max_value)
        got = lib.sg_map_get_many(m._h, kbuf + koff, pk.lens + done, 0, n - done, buf, cap, 0, cst + done,
                                  ffi.NULL)
        _check(got)
        koff += sum(lens[done:done + got])
        off = 0
        for i in range(done, done + got):
            s = status[i]
            if s >= 0:
                res[i] = view[off:off + s]  # one copy per value, out of the buffer
                off += s
        done += got
    if found is not None:
        for i in range(n):
            found[i] = status[i] >= 0
    return res


def put_many(m: Any, keys: Any, values: Any) -> Any:
    pk, shape = _pack_keys(m, keys)
    n = pk.n
    typed = m._kdt is not None
    if typed:
        pv = _Packed.of_array(_typed_values(m, values, shape))
    else:
        if isinstance(values, (bytes, bytearray, memoryview, str)):
            raise TypeError("values must be a sequence of values, not one value")
        pv = _Packed.of_list([_val(v) for v in values])
        if pv.n != n:
            raise InvalidArgument(f"{pv.n} values for {n} keys")
    status, cst = _out(n, typed, _I32)
    versions, cver = _out(n, typed, _U64)
    rc = lib.sg_map_put_many(m._h, pk.data, pk.lens, pk.width, pv.data, pv.lens, pv.width, n, cst, cver)
    _check(rc)

    def remote(i: int) -> None:
        versions[i] = m._remote("put", pk.item(i), value=pv.item(i))["version"]

    def result() -> Any:
        return versions.reshape(shape) if typed else list(versions)

    return _finish(status, remote, result, "put_many")


def delete_many(m: Any, keys: Any) -> Any:
    pk, shape = _pack_keys(m, keys)
    n = pk.n
    typed = m._kdt is not None
    status, cst = _out(n, typed, _I32)
    rc = lib.sg_map_delete_many(m._h, pk.data, pk.lens, pk.width, n, cst, ffi.NULL)
    _check(rc)
    remote_ok = {}

    def remote(i: int) -> None:
        remote_ok[i] = bool(m._remote("delete", pk.item(i))["ok"])

    def result() -> Any:
        if typed:
            r = status == 0
            for i, ok in remote_ok.items():
                r[i] = ok
            return r.reshape(shape)
        return [remote_ok.get(i, s == 0) for i, s in enumerate(status)]

    return _finish(status, remote, result, "delete_many")


def incr_many(m: Any, keys: Any, deltas: Any = 1) -> Any:
    pk, shape = _pack_keys(m, keys)
    n = pk.n
    typed = m._kdt is not None
    if typed:
        np = _np()
        m._check_int_values()
        d = np.asarray(deltas)
        if d.dtype.kind not in "iub":
            raise TypeError(f"deltas must be integers, not {d.dtype}")
        d = _exact(d, np.dtype("i8"), "deltas")
        try:
            d = np.ascontiguousarray(np.broadcast_to(d, shape)).reshape(-1)
        except ValueError:
            raise InvalidArgument(f"deltas of shape {d.shape} for keys of shape {shape}") from None
        results = np.zeros(n, dtype="i8")
    else:
        if isinstance(deltas, int):
            dl = [deltas] * n
        else:
            dl = list(deltas)
            if len(dl) != n:
                raise InvalidArgument(f"{len(dl)} deltas for {n} keys")
        for x in dl:
            if not isinstance(x, int) or isinstance(x, bool) or not -(2**63) <= x < 2**63:
                raise TypeError(f"deltas must be ints in the int64 range, got {x!r}")
        d = array("q", dl)
        results = array("q", bytes(8 * n))
    status, cst = _out(n, typed, _I32)
    rc = lib.sg_map_incr_many(m._h, pk.data, pk.lens, pk.width, n, _c("int64_t[]", d, n),
                              _c("int64_t[]", results, n), cst, ffi.NULL)
    _check(rc)

    def remote(i: int) -> None:
        results[i] = m._remote("incr", pk.item(i), delta=int(d[i]))["result"]

    def result() -> Any:
        return results.reshape(shape) if typed else list(results)

    return _finish(status, remote, result, "incr_many")
