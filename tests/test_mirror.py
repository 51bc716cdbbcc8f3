"""The bridge's data path: snapshot, change stream and apply, in buffers
of records, between two grids on this host."""
from __future__ import annotations

import random
import struct

import pytest
from conftest import unique_grid_name, unlink_quietly
from hypothesis import given, settings
from hypothesis import strategies as st

import shmgrid
from shmgrid import InvalidArgument, mirror


@pytest.fixture
def two_grids():
    names = [unique_grid_name(), unique_grid_name()]
    grids = [shmgrid.Grid.create(n, size="64MiB") for n in names]
    yield grids
    for g in grids:
        g.close()
    for n in names:
        unlink_quietly(n)


def state(m, mask):
    return {k: m.get_versioned(k) for k in m.keys() if mirror.partition_of(k, mask.partitions) in mask}


def sync(owner, mirror_map, mask):
    n = 0
    for chunk in mirror.snapshot(owner, mask):
        n += mirror.apply_records(mirror_map, chunk, mask)[0]
    return n


def test_snapshot_then_stream_converges_with_versions(two_grids):
    a, b = two_grids
    A = a.map("m", capacity=2048, max_value=64)
    B = b.map("m", capacity=2048, max_value=64)
    mask = mirror.PartitionMask(8, [1, 3, 4, 6])
    rnd = random.Random(7)
    keys = [b"key-%d" % i for i in range(500)]
    for k in keys:
        A[k] = b"v0"
    stream = mirror.ChangeStream(A, mask)  # opened before the snapshot: nothing falls between
    for _ in range(2000):  # changes before and during the snapshot
        k = rnd.choice(keys)
        if rnd.random() < 0.2:
            A.pop(k, None)
        else:
            A[k] = b"v%d" % rnd.randrange(1000)
    sync(A, B, mask)
    for _ in range(3000):  # changes after it
        k = rnd.choice(keys)
        if rnd.random() < 0.2:
            A.pop(k, None)
        else:
            A[k] = b"w%d" % rnd.randrange(1000)
    while True:
        recs, lost = stream.next(timeout=0.05)
        assert lost == 0
        if not recs:
            break
        mirror.apply_records(B, recs, mask)
    assert state(B, mask) == state(A, mask)  # values and versions
    mine = [k for k in keys if mirror.partition_of(k, 8) in mask]
    # deletes arrive as tombstones with the owner's versions
    for k in mine:
        assert B.get_versioned(k) == A.get_versioned(k)
    assert not any(mirror.partition_of(k, 8) not in mask for k in B.keys())


def test_apply_keeps_only_newer_and_replays_are_harmless(two_grids):
    a, b = two_grids
    A, B = a.map("m"), b.map("m")
    A["k"] = b"1"
    old = b"".join(mirror.snapshot(A, mirror.PartitionMask(1, [0])))
    A["k"] = b"2"
    del A["k"]
    A["k"] = b"3"
    new = b"".join(mirror.snapshot(A, mirror.PartitionMask(1, [0])))
    assert mirror.apply_records(B, new) == (1, 1)
    assert mirror.apply_records(B, old) == (1, 0)  # older: not applied
    assert mirror.apply_records(B, new) == (1, 0)  # the same: not applied again
    assert B.get_versioned("k") == (b"3", 4)
    del A["k"]
    tomb = b"".join(mirror.snapshot(A, mirror.PartitionMask(1, [0])))
    assert mirror.apply_records(B, tomb) == (1, 1)
    assert B.get("k") is None and mirror.apply_records(B, new) == (1, 0)  # the delete stays


def test_reset_forgets_the_partitions_tombstones_included(two_grids):
    """What a mirror does before following a grid whose versions are
    unrelated to its own: every key of the partitions becomes a version-0
    tombstone, so the new owner's version 1 wins; other partitions stay."""
    a, b = two_grids
    A, B = a.map("m"), b.map("m")
    keys = [b"r%d" % i for i in range(300)]
    for k in keys:
        for _ in range(3):
            A[k] = b"old"
    for k in keys[:30]:
        del A[k]
    mirror.apply_records(B, b"".join(mirror.snapshot(A, mirror.PartitionMask(1, [0]))))
    gone = mirror.PartitionMask(4, [1, 3])
    in_gone = {k for k in keys if mirror.partition_of(k, 4) in gone}
    w = B.watch()
    assert mirror.reset_partitions(B, gone) == len(in_gone)  # the 30 tombstones too
    seen = []
    while True:  # README: watchers see each forgotten key as a delete at version 0
        try:
            seen.append(w.get(0))
        except shmgrid.Empty:
            break
    assert {(e.kind, e.key, e.version) for e in seen} == {("delete", k, 0) for k in in_gone}
    assert len(seen) == len(in_gone)
    w.close()
    assert mirror.reset_partitions(B, gone) == 0  # nothing left to forget
    assert B.validate()["tombstones"] >= len(in_gone)  # version-0 tombstones are not damage
    assert set(B.keys()) == {k for k in keys[30:] if k not in in_gone}
    assert all(B.get_versioned(k) == (b"old", 3) for k in keys[30:] if k not in in_gone)
    C = b.map("c", capacity=16)  # a fresh owner: version 1 for every key
    for k in keys:
        C[k] = b"new"
    n, applied = mirror.apply_records(B, b"".join(mirror.snapshot(C, gone)), gone)
    assert n == applied == len(in_gone)
    assert all(B.get_versioned(k) == (b"new", 1) for k in in_gone)
    B.put(next(iter(in_gone)), b"local")  # a local write after a reset starts from version 1
    assert B.get_versioned(next(iter(in_gone)))[1] == 2


def test_prune_deletes_what_a_snapshot_no_longer_carries(two_grids):
    """The owner deleted keys and a migration dropped their tombstones: the
    snapshot does not carry them, and prune deletes them on the mirror,
    just above the version held; keys it carried, and keys newer than the
    owner's floor, stay."""
    a, b = two_grids
    A, B = a.map("m"), b.map("m")
    keys = [b"p%d" % i for i in range(500)]
    for k in keys:
        A[k] = b"v"
    everything = mirror.PartitionMask(1, [0])
    mirror.apply_records(B, b"".join(mirror.snapshot(A, everything)))
    for k in keys[:100]:
        del A[k]
    A.compact()  # drops the tombstones, raising the version floor
    floor = shmgrid._core.lib.sg_map_version_floor(A._h)
    assert floor >= 2
    B[b"newer"] = b"x"  # not in the snapshot, but no older than the floor: kept
    B.put(b"newer", b"y")
    seen = mirror.SeenKeys()
    for buf in mirror.snapshot(A, everything):
        mirror.apply_records(B, buf, everything, seen)
    assert seen.n == 400
    assert mirror.prune(B, everything, seen, floor) == 100
    assert set(B.keys()) == set(keys[100:]) | {b"newer"}
    assert all(B.get_versioned(k) is None for k in keys[:100])
    assert mirror.prune(B, everything, seen, floor) == 0


def test_lost_changes_are_reported(two_grids):
    a, _ = two_grids
    A = a.map("m", capacity=128)
    stream = mirror.ChangeStream(A, mirror.PartitionMask(1, [0]))
    for i in range(shmgrid.watch.FEED_SLOTS + 10):
        A[b"k%d" % (i % 50)] = b"x"
    recs, lost = stream.next(timeout=0.1)
    assert lost == 10


def _record(key, value=b"", version=1, flags=0, klen=None, vlen=None):
    klen = len(key) if klen is None else klen
    vlen = len(value) if vlen is None else vlen
    return struct.pack("<HBBIQ", klen, flags, 0, vlen, version) + key + value


@pytest.mark.parametrize("buf,what", [
    (_record(b"k", b"v", version=0), "bad header"),
    (_record(b"k", b"v", flags=2), "bad header"),
    (_record(b"k", b"v", flags=1), "bad header"),  # a tombstone with a value
    (_record(b"k", b"v", klen=300), "bad header"),  # over max_key
    (_record(b"k", b"v")[:-1], "truncated body"),
    (_record(b"k", b"v")[:10], "truncated header"),
    (_record(b"k", b"v", version=2**63), "bad header"),
])
def test_malformed_records_are_refused(two_grids, buf, what):
    _, b = two_grids
    B = b.map("m", max_key=32, max_value=32)
    good = _record(b"first", b"ok", version=5)
    with pytest.raises(InvalidArgument, match=what):
        mirror.apply_records(B, good + buf)
    assert B.get_versioned("first") == (b"ok", 5)  # what came before is applied (harmless)
    assert len(B) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes(garbage):
    name = unique_grid_name()
    try:
        with shmgrid.Grid.create(name, size="8MiB") as g:
            m = g.map("m", capacity=64, max_key=16, max_value=16)
            try:
                n, applied = mirror.apply_records(m, garbage)
            except InvalidArgument:
                return
            assert applied <= n and len(m) <= n
            m.validate()
    finally:
        unlink_quietly(name)


def test_the_mirror_descriptor_is_kept_across_bridge_restarts(grid):
    """A bridge restarted with the same configuration sets the same
    partitions again: no new block each time (it used to leak one)."""
    from shmgrid._core import lib

    m = grid.map("m")
    mask = mirror.PartitionMask(64, range(0, 64, 2))
    assert lib.sg_map_set_mirror(m._h, 64, mask.c) == 0
    brk = grid.info()["heap_brk"]
    for _ in range(100):
        assert lib.sg_map_set_mirror(m._h, 64, mask.c) == 0
    assert grid.info()["heap_brk"] == brk
    other = mirror.PartitionMask(64, range(1, 64, 2))
    assert lib.sg_map_set_mirror(m._h, 64, other.c) == 0  # a new configuration takes effect
    k = next(k for k in (b"k%d" % i for i in range(100)) if mirror.partition_of(k, 64) % 2 == 0)
    with pytest.raises(shmgrid.RemoteUnavailable):  # now owned elsewhere, and no bridge runs
        m.put(k, b"x")
