"""Batch map calls (get_many, put_many, delete_many, incr_many) and typed maps.

The reference for a batch is the loop of single calls it stands for: two
maps take the same random workload, one through batches and one through
single calls, and must agree element by element (values, versions, found,
errors) and in their whole state afterwards (versions included: the maps
are private to the test, so versions are deterministic). Error elements
have the documented behaviour: an oversize element refuses the whole batch
before anything is written; incr on a non-int64 value or an overflow fails
that element only (the others are done) and raises with ``failed`` and
``results``; missing keys read as ``default`` (and ``found`` False).
"""
from __future__ import annotations

import contextlib
import os
import signal
import struct
import time
import warnings

import hypothesis.strategies as st
import pytest
from conftest import unique_grid_name, unlink_quietly
from hypothesis import given, settings
from workers import Workers, run_all

import shmgrid
from shmgrid import mirror
from shmgrid._core import lib

np = pytest.importorskip("numpy")

MAX_KEY = 8
MAX_VALUE = 16
KEYS = [b"a", b"b", b"", b"ab\x00", b"12345678", b"n0", b"n1", b"n2"]
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def i64(n: int) -> bytes:
    return struct.pack("<q", n)


@contextlib.contextmanager
def fresh_pair(**kw):
    """Two empty maps of the same parameters, in a grid of their own."""
    name = unique_grid_name("batch")
    g = shmgrid.Grid.create(name, size="16MiB")
    try:
        yield g.map("batch", **kw), g.map("single", **kw)
    finally:
        g.close()
        unlink_quietly(name)


def state(m):
    return sorted(m.items_versioned())


# ---- the list form against the single calls --------------------------------------

keys_st = st.lists(st.one_of(st.sampled_from(KEYS), st.binary(max_size=MAX_KEY + 2)), max_size=12)
small_vals = st.one_of(st.binary(max_size=MAX_VALUE + 2), st.integers(I64_MIN, I64_MAX).map(i64))
op_st = st.one_of(
    st.tuples(st.just("get"), keys_st),
    st.tuples(st.just("put"), keys_st.flatmap(lambda ks: st.tuples(st.just(ks),
                                                                   st.lists(small_vals, min_size=len(ks),
                                                                            max_size=len(ks))))),
    st.tuples(st.just("delete"), keys_st),
    st.tuples(st.just("incr"), keys_st.flatmap(lambda ks: st.tuples(st.just(ks), st.lists(
        st.one_of(st.integers(-3, 3), st.sampled_from([I64_MAX, I64_MIN])), min_size=len(ks), max_size=len(ks))))),
)


def single(m, op, key, arg=None):
    """(result, error class) of one single call."""
    try:
        if op == "get":
            return m.get(key), None
        if op == "put":
            return m.put(key, arg), None
        if op == "delete":
            return m.delete(key), None
        return m.incr(key, arg), None
    except shmgrid.ShmgridError as e:
        return None, type(e)


def oversize(op, payload):
    ks = payload[0] if op in ("put", "incr") else payload
    if any(len(k) > MAX_KEY for k in ks):
        return shmgrid.ValueTooLarge
    if op == "put" and any(len(v) > MAX_VALUE for v in payload[1]):
        return shmgrid.ValueTooLarge
    return None


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op_st, max_size=12))
def test_list_batches_agree_with_single_calls(ops):
    with fresh_pair(max_key=MAX_KEY, max_value=MAX_VALUE, capacity=8) as (B, S):
        check_list_ops(B, S, ops)


def check_list_ops(B, S, ops):
    for op, payload in ops:
        ks, args = (payload if op in ("put", "incr") else (payload, [None] * len(payload)))
        before = state(B)
        if oversize(op, payload):
            # refused whole, before anything is written
            with pytest.raises(shmgrid.ValueTooLarge, match="exceeds this map's max_"):
                getattr(B, f"{op}_many")(*((ks, args) if op in ("put", "incr") else (ks,)))
            assert state(B) == before
            continue
        expect = [single(S, op, k, a) for k, a in zip(ks, args)]
        errors = [i for i, (_, err) in enumerate(expect) if err]
        try:
            if op == "get":
                found = [None] * len(ks)
                got = B.get_many(ks, found=found)
                assert found == [r is not None for r, _ in expect]
            elif op == "put":
                got = B.put_many(ks, args)
            elif op == "delete":
                got = B.delete_many(ks)
            else:
                got = B.incr_many(ks, args)
            assert not errors, f"{op}_many raised nothing where single calls failed at {errors}"
        except shmgrid.ShmgridError as e:
            assert errors, f"{op}_many raised {e!r} where no single call failed"
            assert e.failed == errors
            assert isinstance(e, expect[errors[0]][1])
            got = e.results
            for i in errors:  # failed elements read as 0 in the results
                assert got[i] == 0
                expect[i] = (0, None)
        assert got == [r for r, _ in expect], op
        assert state(B) == state(S)
    assert len(B) == len(S)
    assert B.validate()["live"] == len(S)


def test_get_many_list_form_spans_several_calls(grid):
    """Values of 400 KB: the 1 MiB buffer holds two at a time, so the call
    comes back for the rest (and for the absent keys in between)."""
    m = grid.map("big", max_value=400_000, capacity=16)
    vals = {b"k%d" % i: bytes([i]) * (400_000 - i) for i in range(7)}
    m.put_many(list(vals), list(vals.values()))
    keys = [b"k0", b"nope", b"k1", b"k2", b"k3", b"nope2", b"k4", b"k5", b"k6"]
    assert m.get_many(keys, default=b"?") == [vals.get(k, b"?") for k in keys]


def test_empty_batches(grid):
    m = grid.map("e")
    assert m.get_many([]) == [] and m.put_many([], []) == [] and m.delete_many([]) == []
    assert m.incr_many([], 1) == []
    t = grid.map("et", key_dtype="i8", value_dtype="f8")
    assert t.get_many(np.array([], "i8")).shape == (0,)
    assert t.put_many([], []).shape == (0,)


def test_bad_batch_arguments(grid):
    m = grid.map("bad", max_key=8, max_value=8)
    with pytest.raises(ValueError, match="2 values for 3 keys"):
        m.put_many([b"a", b"b", b"c"], [b"1", b"2"])
    with pytest.raises(TypeError):
        m.put_many(b"abc", [b"1"])
    with pytest.raises(TypeError):
        m.get_many([1, 2])
    with pytest.raises(TypeError, match="int64 range"):
        m.incr_many([b"a"], [2**63])
    # incr on a map whose values cannot hold an int64: refused whole
    small = grid.map("small", max_value=4)
    with pytest.raises(shmgrid.ValueTooLarge, match="8-byte"):
        small.incr_many([b"a"], 1)
    assert len(small) == 0


# ---- typed maps: numpy arrays against the single calls ------------------------------


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["get", "put", "delete"]),
                              st.lists(st.integers(-4, 4), max_size=20),
                              st.integers(0, 2**32)), max_size=10))
def test_typed_batches_agree_with_single_calls(ops):
    with fresh_pair(key_dtype="i8", value_dtype="f8", capacity=8) as (B, S):
        check_typed_ops(B, S, ops)


def check_typed_ops(B, S, ops):
    for op, ks, seed in ops:
        keys = np.array(ks, dtype="i8")
        vals = np.random.default_rng(seed).standard_normal(len(ks))
        if op == "get":
            found = np.zeros(len(ks), bool)
            got = B.get_many(keys, default=np.nan, found=found)
            want = [S.get(k) for k in ks]
            assert found.tolist() == [w is not None for w in want]
            assert np.array_equal(got, np.array([np.nan if w is None else w for w in want]), equal_nan=True)
            assert got.dtype == np.float64
        elif op == "put":
            got = B.put_many(keys, vals)
            assert got.dtype == np.uint64 and got.tolist() == [S.put(k, v) for k, v in zip(ks, vals)]
        else:
            got = B.delete_many(keys)
            assert got.dtype == bool and got.tolist() == [S.delete(k) for k in ks]
        assert state(B) == state(S)


def test_typed_incr_many_errors_are_per_element(grid):
    """Overflow fails its element only; the others (duplicates included,
    in order) are done, as their single calls would be."""
    m = grid.map("ti", key_dtype="i8", value_dtype="<i8")
    m.put_many(np.array([1, 2]), np.array([I64_MAX - 1, 5]))
    keys = np.array([1, 1, 2, 3, 1])
    with pytest.raises(shmgrid.IntegerOverflow) as e:
        m.incr_many(keys, 1)
    assert e.value.failed == [1, 4]  # the second and third +1 on key 1 overflow
    assert e.value.results.tolist() == [I64_MAX, 0, 6, 1, 0]
    assert [m[1], m[2], m[3]] == [I64_MAX, 6, 1]
    assert m.incr_many(np.array([2, 3]), np.array([10, -10])).tolist() == [16, -9]


def test_incr_on_a_typed_map_of_floats_is_refused(grid):
    m = grid.map("tf", key_dtype="i8", value_dtype="f8")
    with pytest.raises(shmgrid.NotAnInteger):
        m.incr_many(np.array([1]), 1)
    with pytest.raises(shmgrid.NotAnInteger):
        m.incr(1)
    assert len(m) == 0


def test_typed_single_calls(grid):
    m = grid.map("ts", key_dtype="i8", value_dtype="f4")
    m[7] = 1.25
    assert m[7] == np.float32(1.25) and type(m[7]) is np.float32
    assert m.get(8) is None and 7 in m and 8 not in m
    assert m.put_if_absent(np.int64(8), 2) and not m.put_if_absent(8, 3)
    assert m.replace(8, 2.0, 4.5) and m[8] == 4.5
    assert m.get_versioned(8)[1] == 2
    assert m.compare_and_set(8, 2, 5.0) == 3
    assert sorted(m.keys()) == [7, 8] and sorted(m.values()) == [1.25, 5.0]
    assert m.pop(7) == 1.25 and m.pop(7, None) is None
    assert m.setdefault(9, 0.5) == 0.5 and m.setdefault(9, 1.0) == 0.5
    del m[8]
    assert dict(m.items()) == {9: 0.5}
    with pytest.raises(TypeError, match="one key"):
        m.get([1, 2])
    # the same bytes either way: a batch sees what single calls wrote
    assert m.get_many(np.array([9, 7])).tolist() == [0.5, 0.0]


def test_structured_dtype(grid):
    rec = np.dtype([("x", "<f4"), ("n", "<i8"), ("tag", "S3")])
    m = grid.map("rec", key_dtype=[("a", "<i4"), ("b", "<i4")], value_dtype=rec)
    assert m.max_key == 8 and m.max_value == rec.itemsize
    keys = np.array([(1, 2), (3, 4)], dtype=m.key_dtype)
    vals = np.array([(1.5, 7, b"abc"), (2.5, 8, b"de")], dtype=rec)
    m.put_many(keys, vals)
    got = m.get_many(keys)
    assert got.dtype == rec and got.tolist() == vals.tolist()
    assert m[(3, 4)]["n"] == 8 and m[(3, 4)]["tag"] == b"de"
    # reopened without dtypes, the map keeps its own
    again = grid.map("rec")
    assert again.key_dtype == m.key_dtype and again.value_dtype == rec
    assert again.get_many(keys).tolist() == vals.tolist()


def test_raw_handle_of_a_typed_map(grid):
    """raw(): the same map in bytes, as the bridge uses it."""
    m = grid.map("raw", key_dtype="i8", value_dtype="f8")
    m[5] = 2.5
    r = m.raw()
    assert type(r) is shmgrid.Map and r.key_dtype is None and r.raw() is r
    k5 = np.int64(5).tobytes()
    assert r.keys() == [k5] and r.get(k5) == np.float64(2.5).tobytes()
    r.put(np.int64(6).tobytes(), np.float64(-1.0).tobytes())
    assert m[6] == -1.0 and r.get_many([k5]) == [np.float64(2.5).tobytes()]


def test_dtypes_are_recorded_and_checked(grid):
    grid.map("d", key_dtype="i8", value_dtype="f8")
    assert grid.map("d", key_dtype=np.int64, value_dtype="<f8").value_dtype == np.float64
    with pytest.raises(shmgrid.ObjectMismatch):
        grid.map("d", key_dtype="u8", value_dtype="f8")  # same width, other type
    with pytest.raises(shmgrid.ObjectMismatch):
        grid.map("d", key_dtype="i8", value_dtype="i4")
    grid.map("plain", max_key=8, max_value=8)
    with pytest.raises(shmgrid.ObjectMismatch, match="without types"):
        grid.map("plain", key_dtype="i8", value_dtype="f8")
    assert grid.map("plain").key_dtype is None
    with pytest.raises(shmgrid.InvalidArgument, match="itemsize"):
        grid.map("w", key_dtype="i8", value_dtype="f8", max_key=16)
    with pytest.raises(shmgrid.InvalidArgument, match="fixed-width"):
        grid.map("o", key_dtype="i8", value_dtype=object)
    with pytest.raises(shmgrid.InvalidArgument, match="both"):
        grid.map("h", key_dtype="i8")


def test_a_value_of_another_width_in_a_typed_map(grid):
    """Written past the type (the C API takes any bytes): that element of a
    get_many fails with ValueTooLarge, the others are read."""
    m = grid.map("ww", key_dtype="i8", value_dtype="i8")
    m.put_many(np.arange(3), np.arange(3) + 10)
    k = np.int64(1).tobytes()
    assert lib.sg_map_put(m._h, k, 8, b"abc", 3, shmgrid._core.ffi.NULL) == 0
    with pytest.raises(shmgrid.ValueTooLarge, match="element 1 holds a value of 3 bytes, not 8") as e:
        m.get_many(np.arange(3))
    assert e.value.failed == [1] and e.value.results.tolist() == [10, 0, 12]
    with pytest.raises(shmgrid.ValueTooLarge, match="3 bytes"):  # the single call says the same
        m[1]
    assert m[2] == 12


def test_typed_values_broadcast_and_shapes(grid):
    m = grid.map("sh", key_dtype="i8", value_dtype="f8")
    keys = np.arange(6).reshape(2, 3)
    assert m.put_many(keys, 1.5).shape == (2, 3)
    assert m.get_many(keys).tolist() == [[1.5] * 3] * 2
    with pytest.raises(ValueError, match="values"):
        m.put_many(np.arange(3), np.arange(2.0))


# ---- mirrored maps: remote elements go through the bridge -----------------------------


def test_remote_elements_without_a_bridge(grid):
    """Half the partitions are another host's and no bridge runs: the local
    elements are done as single calls would do them, the remote ones raise
    RemoteUnavailable (none of them applied), and reads stay local."""
    m = grid.map("mir", max_key=16, max_value=16)
    mask = mirror.PartitionMask(8, [0, 2, 4, 6])
    assert lib.sg_map_set_mirror(m._h, mask.partitions, mask.c) == 0
    keys = [b"key%d" % i for i in range(40)]
    remote = [i for i, k in enumerate(keys) if mirror.partition_of(k, 8) not in mask]
    assert 5 < len(remote) < 35
    with pytest.raises(shmgrid.RemoteUnavailable, match="no bridge") as e:
        m.put_many(keys, [b"v%d" % i for i in range(40)])
    assert e.value.failed == remote  # the first refusal stops the rest: none was applied
    versions = e.value.results
    for i, k in enumerate(keys):
        if i in remote:
            assert m.get(k) is None and versions[i] == 0
        else:
            assert m.get(k) == b"v%d" % i and versions[i] == 1
    assert m.get_many(keys) == [None if i in remote else b"v%d" % i for i in range(40)]
    with pytest.raises(shmgrid.RemoteUnavailable):
        m.incr_many([keys[remote[0]]], 1)
    with pytest.raises(shmgrid.RemoteUnavailable) as e:
        m.delete_many(keys)
    assert e.value.failed == remote
    assert m.get_many(keys) == [None] * 40
    assert lib.sg_map_set_mirror(m._h, 0, mask.c) == 0  # not mirrored any more: all local
    assert m.put_many(keys[:3], [b"x"] * 3)


@pytest.mark.parametrize("typed", [False, True])
def test_remote_elements_go_through_the_bridge_path(grid, monkeypatch, typed):
    """Each remote element goes to Map._remote (the bridge) with its own key
    and value, in order, and its answer lands at its index; the local
    elements are done here."""
    calls = []

    def fake_remote(self, op, key, value=None, expected=None, **args):
        calls.append((op, key, value, args))
        return {"ok": True, "version": 1000 + len(calls), "result": -len(calls)}

    monkeypatch.setattr(shmgrid.Map, "_remote", fake_remote)
    if typed:
        m = grid.map("mirt", key_dtype="i8", value_dtype="<i8")
        keys = np.arange(30, dtype="i8") * 1001
        enc = [k.tobytes() for k in keys]
        vals = np.arange(30, dtype="i8") + 7
        venc = [v.tobytes() for v in vals]
    else:
        m = grid.map("mirb", max_key=16, max_value=16)
        keys = enc = [b"key%d" % i for i in range(30)]
        vals = venc = [i64(i + 7) for i in range(30)]
    mask = mirror.PartitionMask(4, [1, 3])
    assert lib.sg_map_set_mirror(m._h, mask.partitions, mask.c) == 0
    remote = [i for i, k in enumerate(enc) if mirror.partition_of(k, 4) not in mask]
    assert 5 < len(remote) < 25

    versions = m.put_many(keys, vals)
    assert calls == [("put", enc[i], venc[i], {}) for i in remote]
    assert [int(v) for v in versions] == [1001 + remote.index(i) if i in remote else 1 for i in range(30)]
    calls.clear()
    results = m.incr_many(keys, 2)
    assert calls == [("incr", enc[i], None, {"delta": 2}) for i in remote]
    assert [int(r) for r in results] == [-(remote.index(i) + 1) if i in remote else i + 9 for i in range(30)]
    calls.clear()
    found = m.delete_many(keys)
    assert calls == [("delete", enc[i], None, {}) for i in remote] and all(found)

    def refusing_remote(self, op, key, value=None, expected=None, **args):  # the owner's error on the 2nd
        calls.append(op)
        if len(calls) == 2:
            raise shmgrid.NotAnInteger("the owner's value is not an int64")
        return {"ok": True, "version": 1, "result": 1}

    monkeypatch.setattr(shmgrid.Map, "_remote", refusing_remote)
    calls.clear()
    with pytest.raises(shmgrid.NotAnInteger) as e:
        m.incr_many(keys, 1)
    assert e.value.failed == remote[1:] and len(calls) == 2  # it and the remote ones after it: not done
    assert len(e.value.results) == 30  # the results of what was done


# ---- many processes ---------------------------------------------------------------------------


def _incr_many_worker(start, m, keys, reps, delta):
    start.wait()
    last = None
    for _ in range(reps):
        last = m.incr_many(keys, delta)
    return last.tolist()


@pytest.mark.timeout(120)
def test_incr_many_from_four_processes_gives_exact_totals(grid):
    """4 processes incr_many the same numpy key array (duplicates inside
    it too): every total is exact, and each key got one version per incr."""
    m = grid.map("cnt", key_dtype="i8", value_dtype="i8", capacity=512)
    keys = np.concatenate([np.arange(300), np.arange(0, 300, 7)]).astype("i8")
    reps = 200
    out = run_all(_incr_many_worker, [(m, keys, reps, w + 1) for w in range(4)], timeout=100)
    per_call = np.bincount(keys, minlength=300)
    total = per_call * reps * (1 + 2 + 3 + 4)
    got = m.get_many(np.arange(300))
    assert got.tolist() == total.tolist()
    assert all(m.get_versioned(int(k))[1] == per_call[k] * reps * 4 for k in range(0, 300, 13))
    assert max(max(r) for r in out) <= total.max()
    r = m.validate()
    assert r["live"] == r["live_counter"] == 300


def _grow_worker(start, m, wid, n, rounds):
    start.wait()
    keys = np.arange(n, dtype="i8") * 4 + wid  # disjoint key sets
    for r in range(rounds):
        m.put_many(keys, keys * 10 + r)
        got = m.get_many(keys)
        assert (got == keys * 10 + r).all(), "a batch did not read back its own writes"
        m.delete_many(keys[::3])
    return int(len(keys) - len(keys[::3]))


@pytest.mark.timeout(120)
def test_batches_from_four_processes_across_migrations(grid):
    """4 processes put, read back and delete batches of disjoint keys in a
    map created for 64 keys: it migrates many times under the batches, and
    every key ends with its last value."""
    m = grid.map("grow", key_dtype="i8", value_dtype="i8", capacity=64)
    n, rounds = 20_000, 3
    live = run_all(_grow_worker, [(m, w, n, rounds) for w in range(4)], timeout=100)
    keys = np.arange(4 * n, dtype="i8")
    found = np.zeros(len(keys), bool)
    got = m.get_many(keys, found=found)
    expect_found = (keys // 4) % 3 != 0
    assert (found == expect_found).all()
    assert (got[found] == keys[found] * 10 + rounds - 1).all()
    r = m.validate()
    assert r["live"] == r["live_counter"] == sum(live) and r["generation"] > 5


def _put_many_forever(m, n):
    keys = np.arange(n, dtype="i8")
    i = 1
    while True:
        m.put_many(keys, float(i))
        i += 1


@pytest.mark.timeout(120)
def test_sigkill_during_put_many(grid):
    """A batch killed at a random moment leaves each key at one of the two
    rounds, the done ones a prefix of the batch (elements go in order), and
    a map that validates; batches from others go on."""
    n = 20_000
    m = grid.map("kill", key_dtype="i8", value_dtype="f8", capacity=n)
    m.put_many(np.arange(n, dtype="i8"), 0.0)
    for delay in (0.05, 0.13, 0.21):
        with Workers() as w:
            p = w.start("writer", _put_many_forever, m, n)
            time.sleep(delay)
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
        vals = m.get_many(np.arange(n, dtype="i8"))
        top = vals.max()
        rounds = np.unique(vals)
        assert len(rounds) <= 2, rounds
        if len(rounds) == 2:
            done = vals == top
            j = int(np.argmin(done))  # first element still at the earlier round
            assert done[:j].all() and not done[j:].any()
        m.validate(repair=True)  # a writer killed between its CAS and its count leaves len() off by one
        assert m.validate()["live"] == n
        m.put_many(np.arange(n, dtype="i8"), 0.0)


def test_typed_keys_and_values_convert_only_when_exact(grid):
    """numpy's own cast would write key 5 for 2**32 + 5 in an int32 map and
    1 for 1.5: another key than the caller named. Batches and single calls
    refuse it, and write nothing."""
    np = pytest.importorskip("numpy")
    m = grid.map("exact", key_dtype="i4", value_dtype="i8")
    with pytest.raises(shmgrid.InvalidArgument, match="element 1"):
        m.put_many(np.array([1, 2**32 + 5], dtype="i8"), [10, 20])
    with pytest.raises(shmgrid.InvalidArgument):
        m.put_many([1.5], [10])
    with pytest.raises(shmgrid.InvalidArgument):
        m.put_many([3], [2.7])
    with pytest.raises(shmgrid.InvalidArgument):
        m.put(2**40, 1)
    with pytest.raises(shmgrid.InvalidArgument):
        m.put(1.5, 1)
    assert len(m) == 0
    m.put_many(np.array([1.0, 2.0]), np.array([10, 20], dtype="u8"))  # exact: fine
    m.put(np.int64(5), 2.0)
    assert m.get_many([1, 2, 5]).tolist() == [10, 20, 2]
    assert m.incr_many([1], np.array([1], dtype="u8")).tolist() == [11]
    with pytest.raises(shmgrid.InvalidArgument, match="deltas"):
        m.incr_many([1], np.array([2**63], dtype="u8"))
    f = grid.map("floats", key_dtype="i8", value_dtype="f4")
    f.put_many([1], [0.1])  # into a float, rounding as numpy rounds (the single call does too)
    assert f.get(1) == np.float32(0.1)


def test_recorded_dtypes_are_checked_when_read_back(grid):
    """A map whose recorded dtype is not fixed-width data (another program,
    damage) is refused with CorruptSegment: an object dtype would make
    get_many hand numpy's object pointers to C."""
    from shmgrid._core import ffi

    out = ffi.new("sg_map **")
    for name, kt, vt in (("obj", b"'<i8'", b"'|O'"), ("width", b"'<i8'", b"'<i4'"), ("garbage", b"'<i8'", b"((")):
        assert lib.sg_map_open_typed(grid._handle(), name.encode(), 0, 8, 8, 0, kt, len(kt), vt, len(vt), out) == 0
        lib.sg_map_free(out[0])
        with pytest.raises(shmgrid.CorruptSegment):
            grid.map(name)


def test_put_many_past_max_capacity_fails_those_elements_only(grid):
    """README: put_many reports CapacityError per element, like incr_many's
    errors: the keys that fit are stored, e.failed names the others."""
    m = grid.map("full", capacity=4, max_capacity=4, max_key=8, max_value=8)
    keys = [b"k%d" % i for i in range(8)]
    with pytest.raises(shmgrid.CapacityError) as e:
        m.put_many(keys, [b"v"] * 8)
    failed = e.value.failed
    assert failed and failed == list(range(8 - len(failed), 8))  # in order: the ones past the room
    assert list(e.value.results) == [1] * (8 - len(failed)) + [0] * len(failed)
    assert sorted(m.keys()) == sorted(keys[:8 - len(failed)])


@pytest.mark.parametrize("kdt, vdt, values", [
    ("f4", "f4", [0.0, -0.0, 1e100, -1e100, 1.5, 2**40]),
    ("i4", "f8", [0, -1, 2**31 - 1, 7.0]),
])
def test_single_calls_convert_as_batches_do(grid, kdt, vdt, values):
    """README: the single calls convert keys and values the same way the
    batch calls do (0.0 and -0.0 are two keys; 1e100 is inf in a float32)."""
    a = grid.map("single", key_dtype=kdt, value_dtype=vdt)
    b = grid.map("batch", key_dtype=kdt, value_dtype=vdt)
    with np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 1e100 overflows a float32 to inf, as numpy says
        for v in values:
            a[v] = v
        b.put_many(values, values)
    assert sorted(a.raw().items()) == sorted(b.raw().items())
    if kdt == "f4":
        assert len(a) == len(values)  # 0.0 and -0.0: two keys; 1e100 and -1e100: +inf and -inf
    for bad in (2**40, 1.5):
        if kdt == "i4":
            with pytest.raises(shmgrid.InvalidArgument):
                a[bad] = 1
            with pytest.raises(shmgrid.InvalidArgument):
                b.put_many([bad], [1])
