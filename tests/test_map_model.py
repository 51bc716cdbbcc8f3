"""Property test: a Map against a Python model of values AND versions.

The model keeps, for every key ever written, its version (deleted keys
included: a tombstone keeps the version, and a re-insert continues from it)
and, for the keys present, their value. Each rule does one operation on the
map and the same on the model and compares results; the invariants compare
the whole map (len, membership, iteration, versions, validate's counts).

Keys come from a small alphabet so that collisions, deletes and re-inserts
of the same key happen often. Integer keys (only ever holding 8-byte int64
values) and bytes keys are separate pools, so ``incr`` is only exercised on
integers, except in the one rule that checks NotAnInteger.
"""
from __future__ import annotations

import struct

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import shmgrid
from conftest import unique_grid_name, unlink_quietly

MAX_KEY = 8
MAX_VALUE = 16
CAPACITY = 32
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

# "a" (str) and b"a" are the same key; "é" is two UTF-8 bytes; b"" and a key
# of exactly MAX_KEY bytes sit on the limits.
BYTES_KEYS = [b"a", "a", b"b", b"", b"ab\x00", "é", b"12345678"]
INT_KEYS = [b"n0", b"n1", "n2"]


def nk(k):
    """The key as the map stores it."""
    return k.encode("utf-8") if isinstance(k, str) else k


def i64(n: int) -> bytes:
    return struct.pack("<q", n)


def un64(b: bytes) -> int:
    return struct.unpack("<q", b)[0]


def differ(v: bytes) -> bytes:
    """A comparand that is certainly not ``v``."""
    return bytes([v[0] ^ 1]) + v[1:] if v else b"x"


bytes_keys = st.sampled_from(BYTES_KEYS)
int_keys = st.sampled_from(INT_KEYS)
any_key = st.sampled_from(BYTES_KEYS + INT_KEYS)
values = st.binary(max_size=MAX_VALUE)
int64s = st.integers(I64_MIN, I64_MAX)
# (key, value) with int keys only ever getting 8-byte int64 values
key_values = st.one_of(st.tuples(bytes_keys, values), st.tuples(int_keys, int64s.map(i64)))
deltas = st.one_of(st.integers(-3, 3), int64s)
MISSING = object()


class MapModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.name = unique_grid_name("model-")
        self.grid = shmgrid.Grid.create(self.name, size="8MiB")
        self.m = self.grid.map("model", capacity=CAPACITY, max_key=MAX_KEY, max_value=MAX_VALUE)
        self.vals: dict[bytes, bytes] = {}  # keys present -> value
        self.vers: dict[bytes, int] = {}  # every key ever written -> version

    def teardown(self):
        try:
            if not self.grid.closed:
                self.grid.close()
        finally:
            unlink_quietly(self.name)

    # ---- model helpers ----------------------------------------------------

    def ver(self, k) -> int:
        return self.vers.get(nk(k), 0)

    def change(self, k, v) -> int:
        """Record a change of ``k`` (v=None: delete); returns the new version."""
        k = nk(k)
        self.vers[k] = self.vers.get(k, 0) + 1
        if v is None:
            self.vals.pop(k, None)
        else:
            self.vals[k] = v
        return self.vers[k]

    def expect_state(self, k):
        """The map's view of ``k`` equals the model's."""
        k = nk(k)
        got = self.m.get_versioned(k)
        if k in self.vals:
            assert got == (self.vals[k], self.vers[k])
        else:
            assert got is None

    # ---- writes -----------------------------------------------------------

    @rule(kv=key_values)
    def put(self, kv):
        k, v = kv
        assert self.m.put(k, v) == self.change(k, v)

    @rule(kv=key_values)
    def setitem(self, kv):
        k, v = kv
        self.m[k] = v
        self.change(k, v)
        self.expect_state(k)

    @rule(kv=key_values)
    def put_if_absent(self, kv):
        k, v = kv
        absent = nk(k) not in self.vals
        assert self.m.put_if_absent(k, v) is absent
        if absent:
            self.change(k, v)
        self.expect_state(k)

    @rule(kv=key_values, guess=values)
    def replace_right(self, kv, guess):
        """replace() with the current value as comparand succeeds; on an
        absent key any comparand fails."""
        k, v = kv
        cur = self.vals.get(nk(k))
        if cur is None:
            assert self.m.replace(k, guess, v) is False
        else:
            assert self.m.replace(k, cur, v) is True
            self.change(k, v)
        self.expect_state(k)

    @rule(kv=key_values)
    def replace_wrong(self, kv):
        k, v = kv
        cur = self.vals.get(nk(k))
        wrong = differ(cur) if cur is not None else v
        assert self.m.replace(k, wrong, v) is False
        self.expect_state(k)

    @rule(kv=key_values)
    def cas_right(self, kv):
        """compare_and_set with the current version (0 when absent, also
        after a delete) succeeds and returns the next version."""
        k, v = kv
        cur = self.ver(k) if nk(k) in self.vals else 0
        new = self.m.compare_and_set(k, cur, v)
        assert new is not None
        assert new == self.change(k, v)
        self.expect_state(k)

    @rule(kv=key_values, data=st.data())
    def cas_wrong(self, kv, data):
        k, v = kv
        ver = self.ver(k)
        if nk(k) in self.vals:
            wrong = [0, ver - 1, ver + 1, 2**64 - 1]  # 0 = "only if absent": wrong when present
        else:
            wrong = [ver + 1, 2**64 - 1] + ([ver] if ver else [])  # a tombstone's version is not "present"
        bad = data.draw(st.sampled_from(wrong), label="wrong version")
        assert self.m.compare_and_set(k, bad, v) is None
        self.expect_state(k)

    @rule(k=any_key)
    def delete(self, k):
        present = nk(k) in self.vals
        assert self.m.delete(k) is present
        if present:
            self.change(k, None)
        self.expect_state(k)

    @rule(k=any_key)
    def delitem(self, k):
        if nk(k) in self.vals:
            del self.m[k]
            self.change(k, None)
        else:
            with pytest.raises(KeyError):
                del self.m[k]
        self.expect_state(k)

    @rule(k=any_key, with_default=st.booleans())
    def pop(self, k, with_default):
        cur = self.vals.get(nk(k))
        if cur is not None:
            got = self.m.pop(k, MISSING) if with_default else self.m.pop(k)
            assert got == cur
            self.change(k, None)
        elif with_default:
            assert self.m.pop(k, MISSING) is MISSING
        else:
            with pytest.raises(KeyError):
                self.m.pop(k)
        self.expect_state(k)

    @rule(kv=key_values)
    def reinsert_after_delete(self, kv):
        """Delete (if present) then store again: the version carries on from
        the tombstone's."""
        k, v = kv
        if nk(k) in self.vals:
            assert self.m.delete(k) is True
            self.change(k, None)
            assert k not in self.m
            assert self.m.get(k) is None
            assert self.m.get_versioned(k) is None
        before = self.ver(k)
        assert self.m.put(k, v) == self.change(k, v) == before + 1
        self.expect_state(k)

    # ---- incr -------------------------------------------------------------

    @rule(k=int_keys, delta=deltas)
    def incr(self, k, delta):
        cur = self.vals.get(nk(k))
        n = un64(cur) if cur is not None else 0
        if I64_MIN <= n + delta <= I64_MAX:
            assert self.m.incr(k, delta) == n + delta
            self.change(k, i64(n + delta))
        else:
            with pytest.raises(shmgrid.IntegerOverflow):
                self.m.incr(k, delta)
        self.expect_state(k)

    @rule(k=int_keys, top=st.booleans())
    def incr_overflow(self, k, top):
        edge, delta = (I64_MAX, 1) if top else (I64_MIN, -1)
        assert self.m.put(k, i64(edge)) == self.change(k, i64(edge))
        with pytest.raises(shmgrid.IntegerOverflow):
            self.m.incr(k, delta)
        self.expect_state(k)

    @rule(k=bytes_keys, v=values.filter(lambda b: len(b) != 8), delta=st.integers(-3, 3))
    def incr_not_an_integer(self, k, v, delta):
        """incr on a value that is not 8 bytes raises and changes nothing."""
        assert self.m.put(k, v) == self.change(k, v)
        with pytest.raises(shmgrid.NotAnInteger):
            self.m.incr(k, delta)
        self.expect_state(k)

    # ---- limits -----------------------------------------------------------

    @rule(kv=key_values, data=st.data())
    def too_large(self, kv, data):
        """An oversized key or value raises ValueTooLarge and writes nothing
        (no version bump, no slot taken)."""
        k, v = kv
        big_v = data.draw(st.binary(min_size=MAX_VALUE + 1, max_size=MAX_VALUE + 8), label="big value")
        big_k = data.draw(st.binary(min_size=MAX_KEY + 1, max_size=MAX_KEY + 8), label="big key")
        ops = [
            lambda: self.m.put(k, big_v),
            lambda: self.m.put_if_absent(k, big_v),
            lambda: self.m.replace(k, self.vals.get(nk(k), b""), big_v),
            lambda: self.m.compare_and_set(k, self.ver(k) if nk(k) in self.vals else 0, big_v),
            lambda: self.m.put(big_k, v),
            lambda: self.m.put_if_absent(big_k, v),
            lambda: self.m.incr(big_k, 1),
        ]
        op = data.draw(st.sampled_from(range(len(ops))), label="op")
        with pytest.raises(shmgrid.ValueTooLarge):
            ops[op]()
        self.expect_state(k)

    # ---- reads ------------------------------------------------------------

    @rule(k=any_key)
    def get(self, k):
        cur = self.vals.get(nk(k))
        assert self.m.get(k) == cur
        assert self.m.get(k, MISSING) is MISSING if cur is None else self.m.get(k, MISSING) == cur
        if cur is None:
            with pytest.raises(KeyError):
                self.m[k]
        else:
            assert self.m[k] == cur

    @rule(k=any_key)
    def get_versioned(self, k):
        self.expect_state(k)

    # ---- invariants ---------------------------------------------------------

    @invariant()
    def size_membership_iteration(self):
        assert len(self.m) == len(self.vals)
        for k in BYTES_KEYS + INT_KEYS:
            assert (k in self.m) is (nk(k) in self.vals)
        it = list(self.m)
        assert all(type(k) is bytes for k in it)
        assert len(it) == len(set(it)) == len(self.vals)
        assert set(it) == set(self.vals)
        assert sorted(self.m.keys()) == sorted(self.vals)
        assert sorted(self.m.values()) == sorted(self.vals.values())
        assert sorted(self.m.items()) == sorted(self.vals.items())
        assert {k: (v, ver) for k, v, ver in self.m.items_versioned()} == {
            k: (v, self.vers[k]) for k, v in self.vals.items()
        }

    @invariant()
    def validates(self):
        r = self.m.validate()
        ever = sum(1 for v in self.vers.values() if v > 0)
        assert r["live"] == r["live_counter"] == len(self.vals)
        assert r["tombstones"] == ever - len(self.vals)
        # a slot is bound exactly for each key ever written: failed writes take none
        assert r["bound"] == r["used"] == ever
        g = self.grid.validate()
        assert g["leaked_bytes"] == 0, g


TestMapModel = MapModel.TestCase
TestMapModel.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    report_multiple_bugs=False,  # shrink one failure, not several: keeps a failing run short
    suppress_health_check=[HealthCheck.too_slow],
)


def test_capacity_error_writes_nothing(grid):
    """Filling a map ends in CapacityError; the failed insert takes no slot,
    bumps no version, leaks nothing, and existing keys stay writable."""
    m = grid.map("full", capacity=8, max_key=16, max_value=16, max_capacity=64)
    stored = []
    with pytest.raises(shmgrid.CapacityError):
        for i in range(10_000):
            m.put(f"k{i}", b"v")
            stored.append(f"k{i}".encode())
    r = m.validate()
    assert r["bound"] == r["used"] == r["live"] == len(stored) == len(m)
    assert r["bound"] <= r["slot_limit"]
    missing = f"k{len(stored)}"
    assert m.get_versioned(missing) is None
    for op in (lambda: m.put_if_absent(missing, b"v"), lambda: m.incr(missing), lambda: m.compare_and_set(missing, 0, b"v")):
        with pytest.raises(shmgrid.CapacityError):
            op()
    assert m.validate() == r
    assert m.put(stored[0], b"w") == 2
    assert grid.validate()["leaked_bytes"] == 0


def test_quiet_grid_reports_no_leak(grid):
    """With no process ever killed, every carved byte is free or reachable:
    grid.validate() must report leaked_bytes == 0, whatever the order in
    which blocks of different sizes were carved."""
    a = grid.map("a", capacity=8, max_key=16, max_value=64)
    a.put(b"k", b"x" * 20)  # a value block that is not a multiple of 64 bytes
    assert grid.validate()["leaked_bytes"] == 0
    grid.map("b", capacity=64)  # then a large, cache-line-aligned table block
    report = grid.validate()
    assert report["leaked_bytes"] == 0, report
