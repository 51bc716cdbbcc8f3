"""Shared numpy arrays: create/open/mismatch and errors, a model test of
publish/snapshot/in-place writes, the mapping pinned by views, and
multi-process runs where publishers are SIGKILLed (at random and aimed into
their copy) or frozen mid-copy while readers snapshot.

Every version a test publishes carries its own proof of wholeness: word 0
is the writer, word 1 its sequence number, the body a pattern derived from
both, and the last word the wrapping sum of all the others. A reader that
got a mix of two versions (or a half-written one) finds a body or a sum that
does not fit. Readers also log which (writer, sequence) each version number
they saw held: a version number must never name two contents (a publisher
killed in its live-buffer copy had its number reused by the next publisher,
which is only right if no reader ever saw that number complete).
"""
from __future__ import annotations

import gc
import mmap
import multiprocessing as mp
import os
import pickle
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

np = pytest.importorskip("numpy")

import shmgrid  # noqa: E402
from shmgrid import Busy, Closed, InvalidArgument, ObjectMismatch  # noqa: E402
from shmgrid.array import SharedArray  # noqa: E402

FORK = mp.get_context("fork")


# ---------------------------------------------------------------------------
# create, open, mismatch, errors


def test_create_open_and_layout(grid):
    a = grid.array("a", (3, 4), "f4")
    assert isinstance(a, SharedArray) and isinstance(a, np.ndarray)
    assert a.shape == (3, 4) and a.dtype == np.float32 and a.version == 0 and a.name == "a"
    assert not a.any() and a.flags.c_contiguous and a.flags.writeable
    b = grid.array("a")  # opened as it is
    assert b.shape == (3, 4) and b.dtype == np.float32
    c = grid.array("a", [3, 4], np.float32)  # the same description, spelled differently
    a[1, 2] = 7.5
    assert b[1, 2] == 7.5 and c[1, 2] == 7.5  # one memory
    assert grid.array("d", 5).dtype == np.float64  # numpy's default
    assert grid.array("scalar", ()).shape == ()
    assert grid.array("empty", (0, 3), "i8").size == 0
    sub = grid.array("sub", 4, ("<f4", (2, 3)))  # a subarray dtype extends the shape, as numpy does
    assert sub.shape == (4, 2, 3) and sub.dtype == np.float32
    kinds = {o["name"]: o["kind"] for o in grid.objects()}
    assert kinds["a"] == "array"


@pytest.mark.parametrize("dtype", ["u1", "<i2", ">i4", "f8", "c16", "M8[ns]", "<U5", "S3", "V7", "?",
                                   [("x", "u1"), ("y", "<f8", (2,))]])
def test_every_dtype_is_64_byte_aligned_and_round_trips(grid, dtype):
    dt = np.dtype(dtype)
    for i, shape in enumerate([(1,), (7,), (3, 5)]):
        a = grid.array(f"a{i}", shape, dt)
        assert a.ctypes.data % 64 == 0
        b = grid.array(f"a{i}")
        assert b.dtype == dt and b.shape == shape


def test_structured_dtype_is_recorded_whole(grid):
    aligned = np.dtype([("id", "u1"), ("pos", "<f8", (3,)), ("tag", "S4")], align=True)
    packed = np.dtype([("id", "u1"), ("pos", "<f8", (3,)), ("tag", "S4")])
    a = grid.array("rec", 10, aligned)
    b = grid.array("rec")
    assert b.dtype == aligned and b.dtype.itemsize == aligned.itemsize
    assert b.dtype.fields["pos"][1] == aligned.fields["pos"][1]  # the offset, padding included
    with pytest.raises(ObjectMismatch, match="rec"):
        grid.array("rec", 10, packed)  # same fields, other offsets
    renamed = np.dtype([("ID", "u1"), ("pos", "<f8", (3,)), ("tag", "S4")], align=True)
    assert renamed.itemsize == aligned.itemsize
    with pytest.raises(ObjectMismatch):
        grid.array("rec", 10, renamed)  # same size, other names: still a mismatch
    a[3] = (1, (1.0, 2.0, 3.0), b"abcd")
    assert b[3]["tag"] == b"abcd"


def test_mismatch_and_errors(grid):
    grid.array("a", (3, 4), "f4")
    with pytest.raises(ObjectMismatch, match=r"\(\(3, 4\), '<f4'\).*\(\(4, 3\), '<f4'\)"):
        grid.array("a", (4, 3), "f4")
    with pytest.raises(ObjectMismatch):
        grid.array("a", (3, 4), "f8")
    with pytest.raises(ObjectMismatch):
        grid.array("a", (3, 4), ">f4")  # byte order is part of the dtype
    with pytest.raises(ObjectMismatch):
        grid.array("a", (3, 4))  # float64 by default
    grid.counter("c")
    with pytest.raises(ObjectMismatch, match="counter"):
        grid.array("c", 3)
    with pytest.raises(ObjectMismatch, match="array"):
        grid.counter("a")
    with pytest.raises(InvalidArgument, match="does not exist"):
        grid.array("missing")
    with pytest.raises(InvalidArgument, match="shape"):
        grid.array("missing", dtype="f4")
    with pytest.raises(InvalidArgument, match="objects"):
        grid.array("o", 3, object)
    with pytest.raises(InvalidArgument, match="objects"):
        grid.array("o", 3, [("a", "i4"), ("b", "O")])
    with pytest.raises(InvalidArgument, match="negative"):
        grid.array("n", (3, -1))
    with pytest.raises(TypeError):
        grid.array("n", (3, 1.5))
    with pytest.raises(TypeError):
        grid.array("n", True)
    with pytest.raises(InvalidArgument, match="limit"):
        grid.array("big", (1 << 20, 1 << 20))
    with pytest.raises(shmgrid.CapacityError):
        grid.array("toobig", 64 << 20, "u1")  # two buffers of 64 MiB in a 64 MiB grid
    with pytest.raises(shmgrid.InvalidName):
        grid.array("bad name", 3)
    many = np.dtype([(f"f{i}", "<i4") for i in range(400)])
    with pytest.raises(InvalidArgument, match="description"):
        grid.array("wide", 1, many)
    assert "missing" not in {o["name"] for o in grid.objects()}


def test_publish_snapshot_and_conversions(grid):
    a = grid.array("a", (2, 3), "i8")
    v = a.publish([[1, 2, 3], [4, 5, 6]])
    assert v == 1 and a.version == 1
    snap, ver = a.snapshot()
    assert ver == 1 and type(snap) is np.ndarray and snap.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert not np.may_share_memory(snap, a)
    assert a.publish(9) == 2 and (a == 9).all()  # broadcast
    assert a.publish(np.array([1, 2, 3], dtype="i2")) == 3 and a[1].tolist() == [1, 2, 3]  # widened
    with pytest.raises(TypeError, match="float64"):
        a.publish([[1.5, 2, 3], [4, 5, 6]])  # floats into ints: refused, not truncated
    with pytest.raises(TypeError, match="1.5"):
        a.publish(1.5)
    with pytest.raises(InvalidArgument, match=r"shape \(4,\)"):
        a.publish([1, 2, 3, 4])
    assert a.version == 3  # nothing half-published
    a.publish(a[::-1, ::-1])  # from a view of itself: copied out first
    assert a.tolist() == [[3, 2, 1], [3, 2, 1]]
    out = np.empty((2, 3), "i8")
    res, ver = a.snapshot(out=out)
    assert res is out and ver == 4 and out.tolist() == [[3, 2, 1], [3, 2, 1]]
    for bad in (np.empty((3, 2), "i8"), np.empty((2, 3), "i4"), np.empty((3, 2), "i8").T, a, [0] * 6):
        with pytest.raises(InvalidArgument):
            a.snapshot(out=bad)
    ro = np.empty((2, 3), "i8")
    ro.flags.writeable = False
    with pytest.raises(InvalidArgument):
        a.snapshot(out=ro)


def test_empty_and_zero_dimensional_arrays(grid):
    e = grid.array("e", (0, 3), "i8")
    snap, v = e.snapshot()
    assert snap.shape == (0, 3) and v == 0
    assert e.publish(np.zeros((0, 3), "i8")) == 1 and e.snapshot(out=np.empty((0, 3), "i8"))[1] == 1
    s = grid.array("s", (), "f8")
    assert s.publish(2.5) == 1
    snap, v = s.snapshot()
    assert snap.shape == () and float(snap) == 2.5 and float(s) == 2.5 and v == 1


def test_views_copies_and_pickles_are_plain(grid):
    a = grid.array("a", 4, "f8")
    a.publish([1, 2, 3, 4])
    for derived in (a[1:], a.copy(), a.reshape(2, 2)):
        with pytest.raises(TypeError, match="view or copy"):
            derived.snapshot()
        with pytest.raises(TypeError):
            derived.publish(0)
    assert type(a + 1) is np.ndarray and type(np.sqrt(a)) is np.ndarray
    assert a.sum() == 10.0 and not isinstance(a.sum(), np.ndarray)
    back = pickle.loads(pickle.dumps(a))
    assert type(back) is np.ndarray and back.tolist() == [1, 2, 3, 4] and not np.may_share_memory(back, a)


def test_wait_version(grid):
    a = grid.array("a", 3)
    with pytest.raises(Busy, match="no version above 0"):
        a.wait_version(0, timeout=0.05)
    a.publish(1)
    assert a.wait_version(0, timeout=0) == 1
    t = threading.Timer(0.1, lambda: a.publish(2))
    t.start()
    t0 = time.monotonic()
    assert a.wait_version(1, timeout=10) == 2
    assert time.monotonic() - t0 < 9  # woken by the publish, not by the timeout
    t.join()
    with pytest.raises(TypeError):
        a.wait_version(-1)


def _mapped(name: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(f"/dev/shm/{name}") for line in f)


def test_views_pin_the_mapping(grid_name):
    g = shmgrid.Grid.create(grid_name, size="8MiB")
    a = g.array("a", 1000, "i8")
    a.publish(np.arange(1000))
    view = a[10:20]
    del a
    gc.collect()
    g.close()
    assert g.closed and _mapped(grid_name)  # closed for calls, still mapped for the view
    assert view.tolist() == list(range(10, 20))
    view[0] = -1  # still our memory
    with pytest.raises(Closed):
        g.array("a")
    del view
    gc.collect()
    assert not _mapped(grid_name)  # the last view gone: unmapped

    g = shmgrid.Grid.attach(grid_name)
    a = g.array("a")
    assert a[10] == -1  # the write through the view reached the segment
    g.close()
    with pytest.raises(Closed):
        a.snapshot()
    with pytest.raises(Closed):
        a.publish(0)
    del a
    gc.collect()
    assert not _mapped(grid_name)


def test_an_unreferenced_grid_stays_mapped_for_its_arrays(grid_name):
    a = shmgrid.Grid.create(grid_name, size="8MiB").array("a", 100, "i4")  # the Grid object is dropped
    gc.collect()
    a.publish(np.arange(100))
    assert a.snapshot()[0].sum() == 4950
    del a
    gc.collect()
    assert not _mapped(grid_name)


def test_stat_and_validate_show_arrays(grid):
    import json
    import subprocess
    import sys

    a = grid.array("frame", (4, 8), "f4")
    a.publish(np.ones((4, 8)))
    a.publish(2)
    cli = [sys.executable, "-m", "shmgrid.cli"]
    r = subprocess.run([*cli, "stat", grid.name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("frame"))
    assert "array" in row and "4x8 float32 (128 B), version 2, publishes 2, repairs 0" in row
    st = json.loads(subprocess.run([*cli, "stat", grid.name, "--json"], capture_output=True, text=True,
                                   timeout=60).stdout)
    rep = st["objects"][0]["report"]
    assert (rep["version"], rep["shape"], rep["dtype"], rep["checked"]) == (2, [4, 8], "float32", True)
    assert st["heap"]["leaked_bytes"] == 0
    r = subprocess.run([*cli, "validate", grid.name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "array frame: 4x8 float32" in r.stdout
    r = subprocess.run([*cli, "ls"], capture_output=True, text=True, timeout=60)
    assert "1 array" in next(ln for ln in r.stdout.splitlines() if ln.startswith(grid.name))


# ---------------------------------------------------------------------------
# a model: publish, snapshot, in-place writes, several handles

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

from conftest import unique_grid_name, unlink_quietly  # noqa: E402

N_MODEL = 6


class ArrayModel(RuleBasedStateMachine):
    """A single-process model against two handles: the live contents (what
    the ndarray shows, in-place writes included), the last published
    contents (what a snapshot returns while no publish is under way: in-place
    writes are not part of any version) and the version."""

    @initialize()
    def setup(self):
        self.name = unique_grid_name("m")
        self.grid = shmgrid.Grid.create(self.name, size="4MiB")
        self.handles = [self.grid.array("x", N_MODEL, "i4"), self.grid.array("x")]
        self.contents = [0] * N_MODEL
        self.published = [0] * N_MODEL
        self.version = 0

    @rule(h=st.integers(0, 1), values=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=N_MODEL,
                                               max_size=N_MODEL))
    def publish(self, h, values):
        v = self.handles[h].publish(values)
        self.version += 1
        self.contents = list(values)
        self.published = list(values)
        assert v == self.version

    @rule(h=st.integers(0, 1), value=st.integers(-(2**31), 2**31 - 1))
    def publish_scalar(self, h, value):
        assert self.handles[h].publish(value) == self.version + 1
        self.version += 1
        self.contents = [value] * N_MODEL
        self.published = [value] * N_MODEL

    @rule(h=st.integers(0, 1), i=st.integers(0, N_MODEL - 1), value=st.integers(-(2**31), 2**31 - 1))
    def write_in_place(self, h, i, value):
        self.handles[h][i] = value  # not a version: the live contents change, nothing else
        self.contents[i] = value

    @rule(h=st.integers(0, 1))
    def publish_live(self, h):
        # committing in-place writes: publish the array's own contents
        assert self.handles[h].publish(self.handles[1 - h]) == self.version + 1
        self.version += 1
        self.published = list(self.contents)

    @rule(h=st.integers(0, 1))
    def snapshot(self, h):
        snap, v = self.handles[h].snapshot(timeout=1)
        assert (snap.tolist(), v) == (self.published, self.version)

    @rule()
    def reopen(self):
        self.handles[1] = self.grid.array("x", (N_MODEL,), "<i4")

    @rule(h=st.integers(0, 1))
    def repair_finds_nothing(self, h):
        assert self.handles[h].repair(timeout=1) is False

    @invariant()
    def views_agree(self):
        if hasattr(self, "handles"):
            assert self.handles[0].tolist() == self.handles[1].tolist() == self.contents
            assert self.handles[0].version == self.handles[1].version == self.version

    def teardown(self):
        if hasattr(self, "grid"):
            st_ = self.handles[0].stats()
            assert st_["publishes"] == self.version and st_["repairs"] == 0 and not st_["writer_tid"]
            self.handles = []
            gc.collect()
            self.grid.close()
            unlink_quietly(self.name)


TestArrayModel = ArrayModel.TestCase
TestArrayModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------------------
# multi-process: checksummed versions, readers, killed and frozen publishers

WORDS = 1 << 17  # 1 MiB of uint64: a copy lasts long enough to be caught in
MIX = np.uint64(0x9E3779B97F4A7C15)
BODY = np.arange(2, WORDS - 1, dtype=np.uint64)


def version_data(writer: int, seq: int):
    d = np.empty(WORDS, np.uint64)
    d[0], d[1] = writer, seq
    d[2:-1] = BODY * MIX + np.uint64(writer * 1_000_003 + seq)
    d[-1] = d[:-1].sum(dtype=np.uint64)  # wraps modulo 2**64
    return d


def is_whole(d) -> bool:
    if not d.any():
        return True  # version 0: all zeroes
    writer, seq = int(d[0]), int(d[1])
    if d[:-1].sum(dtype=np.uint64) != d[-1]:
        return False
    return bool((d[2:-1] == BODY * MIX + np.uint64(writer * 1_000_003 + seq)).all())


def shared_i64(n: int):
    """n zeroed int64 words shared with forked children (8-byte stores:
    SIGKILL cannot tear them)."""
    return memoryview(mmap.mmap(-1, 8 * n)).cast("q")


# per-reader record: snapshots, torn, went backwards, longest snapshot (us), log length, then the log
R_SNAPS, R_TORN, R_BACK, R_MAXUS, R_LOGN, R_HDR = 0, 1, 2, 3, 4, 5
LOGCAP = 1 << 16  # (version, writer, seq) triples per reader
# per-writer record: the last acknowledged publish, version << 32 | seq in
# one word (SIGKILL cannot separate the two)
W_ACK, W_HDR = 0, 1


def reader(grid_name: str, rec, stop) -> None:
    g = shmgrid.Grid.attach(grid_name)
    a = g.array("arr")
    out = np.empty(WORDS, np.uint64)
    last = -1
    while not stop[0]:
        t0 = time.monotonic()
        _, v = a.snapshot(out=out, timeout=30)
        us = int((time.monotonic() - t0) * 1e6)
        if us > rec[R_MAXUS]:
            rec[R_MAXUS] = us
        if not is_whole(out):
            rec[R_TORN] += 1
        if v < last:
            rec[R_BACK] += 1
        if v != last and rec[R_LOGN] < LOGCAP:
            n = rec[R_LOGN]
            rec[R_HDR + 3 * n: R_HDR + 3 * n + 3] = memoryview(
                np.array([v, int(out[0]), int(out[1])], dtype=np.int64).tobytes()).cast("q")
            rec[R_LOGN] = n + 1
        last = v
        rec[R_SNAPS] += 1
    os._exit(0)


def writer(grid_name: str, wid: int, rec, seq0: int) -> None:
    g = shmgrid.Grid.attach(grid_name)
    a = g.array("arr")
    seq = seq0
    while True:
        seq += 1
        v = a.publish(version_data(wid, seq), timeout=30)
        rec[W_ACK] = v << 32 | seq


def start(target, *args):
    p = FORK.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while True:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in "tT":
                return
        assert time.monotonic() < deadline, "SIGSTOP did not stop the process"
        time.sleep(0.0001)


def mid_copy(a, pid: int):
    """The buffer (0 live, 1 backup) that frozen publisher pid is copying
    into, or None if it is not inside a copy."""
    s = a.stats()
    if s["writer_tid"] != pid:
        return None
    odd = [i for i in (0, 1) if s["seq"][i] % 2]
    return odd[0] if odd else None


def freeze_mid_copy(a, p, rnd, tries=400):
    """Freeze p inside a copy: stop it at random moments until it is caught
    holding an odd buffer. Returns that buffer, or None (p left running)."""
    for _ in range(tries):
        time.sleep(rnd.uniform(0, 0.002))
        freeze(p.pid)
        where = mid_copy(a, p.pid)
        if where is not None:
            return where
        os.kill(p.pid, signal.SIGCONT)
    return None


def check_readers(recs, expect_snaps=True):
    seen = {}
    for r in recs:
        assert r[R_TORN] == 0, "a reader got a torn snapshot"
        assert r[R_BACK] == 0, "a reader's versions went backwards"
        assert r[R_SNAPS] > 0 or not expect_snaps
        for i in range(r[R_LOGN]):
            v, w, s = r[R_HDR + 3 * i: R_HDR + 3 * i + 3]
            assert seen.setdefault(v, (w, s)) == (w, s), f"version {v} held two contents: {seen[v]} and {(w, s)}"
    return seen


def progress_while(recs, seconds: float, what: str) -> None:
    """Every reader completes snapshots within `seconds` (liveness, not speed)."""
    before = [r[R_SNAPS] for r in recs]
    deadline = time.monotonic() + seconds
    while any(r[R_SNAPS] <= b for r, b in zip(recs, before)):
        assert time.monotonic() < deadline, f"readers made no progress {what}"
        time.sleep(0.002)


@pytest.mark.timeout(240)
def test_readers_never_see_torn_versions_while_publishers_are_killed(grid_name):
    """Two publishers, two readers; one publisher at a time is SIGKILLed,
    half of the kills aimed inside its copy (frozen there first), and
    replaced by a fresh one. Readers keep going throughout."""
    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    g = shmgrid.Grid.create(grid_name, size="32MiB")
    a = g.array("arr", WORDS, np.uint64)
    stop = shared_i64(1)
    recs = [shared_i64(R_HDR + 3 * LOGCAP) for _ in range(2)]
    readers = [start(reader, grid_name, r, stop) for r in recs]
    wrecs = [shared_i64(W_HDR) for _ in range(64)]
    writers = {0: start(writer, grid_name, 0, wrecs[0], 0), 1: start(writer, grid_name, 1, wrecs[1], 0)}
    aimed_at = {0: 0, 1: 0}
    kills, next_id = 0, 2
    try:
        deadline = time.monotonic() + 25
        while kills < 24 and time.monotonic() < deadline:
            time.sleep(rnd.uniform(0.001, 0.05))
            victim_id = rnd.choice(sorted(writers))
            p = writers.pop(victim_id)
            where = freeze_mid_copy(a, p, rnd) if kills % 2 else None
            if where is not None:
                aimed_at[where] += 1
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
            kills += 1
            if where is not None:
                # the dead publisher holds the writer lock and left a buffer
                # torn; the other publisher repairs it, readers never wait
                progress_while(recs, 5.0, "after a publisher died mid-copy")
            writers[next_id] = start(writer, grid_name, next_id, wrecs[next_id], 0)
            next_id += 1
        progress_while(recs, 5.0, "at the end")
    finally:
        stop[0] = 1
        for p in writers.values():
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        for p in readers:
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
    assert all(p.exitcode == 0 for p in readers), "a reader hung or failed"
    seen = check_readers(recs)
    assert kills >= 10 and aimed_at[0] + aimed_at[1] >= 3, (kills, aimed_at)
    # every acknowledged publish is what the readers saw under its number
    for wid in range(next_id):
        v, s = wrecs[wid][W_ACK] >> 32, wrecs[wid][W_ACK] & 0xFFFFFFFF
        if v and v in seen:
            assert seen[v] == (wid, s)
    # the last word: the array holds one whole version, the newest, and
    # every dead publisher's mess was repaired (or is repaired now)
    a.repair(timeout=5)
    snap, v = a.snapshot()
    assert is_whole(snap) and is_whole(np.asarray(a)) and v == a.version
    st_ = a.stats()
    assert st_["seq"][0] % 2 == 0 and st_["seq"][1] % 2 == 0 and st_["buffer_versions"] == [v, v]
    assert st_["repairs"] >= aimed_at[0] + aimed_at[1]  # each mid-copy death left a buffer to repair
    assert st_["owner_deaths"] >= aimed_at[0] + aimed_at[1]
    assert g.validate()["objects"]["arr"]["checked"]
    del a
    gc.collect()
    g.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("section", [0, 1], ids=["live", "backup"])
def test_a_publisher_killed_mid_copy_costs_readers_nothing(grid_name, section):
    """Freeze the only publisher inside its copy of one buffer, then kill
    it. With no other publisher around to repair, readers go on snapshotting
    the newest complete version; a publisher that arrives later repairs and
    goes on from there."""
    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    g = shmgrid.Grid.create(grid_name, size="32MiB")
    a = g.array("arr", WORDS, np.uint64)
    stop = shared_i64(1)
    recs = [shared_i64(R_HDR + 3 * LOGCAP) for _ in range(2)]
    readers = [start(reader, grid_name, r, stop) for r in recs]
    wrec = shared_i64(W_HDR)
    p = None
    try:
        for attempt in range(40):
            p = start(writer, grid_name, 7, wrec, (wrec[W_ACK] & 0xFFFFFFFF) + 1000)
            for _ in range(50):
                where = freeze_mid_copy(a, p, rnd)
                if where is None or where == section:
                    break
                os.kill(p.pid, signal.SIGCONT)  # in the other buffer's copy: let it go on
            if where == section:
                break
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        else:
            pytest.fail(f"never caught the publisher inside its copy of buffer {section}")
        frozen_at = a.stats()
        # frozen, not dead: readers go on, other publishers wait for it
        progress_while(recs, 5.0, "with a publisher frozen mid-copy")
        with pytest.raises(Busy):
            a.publish(0, timeout=0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
        assert frozen_at["seq"][section] % 2 == 1
        newest = a.version  # what was complete when it died
        progress_while(recs, 5.0, "with a publisher dead mid-copy")
        snap, v = a.snapshot(timeout=5)
        assert is_whole(snap) and v == newest
        if section == 1:  # it had finished the live buffer: that version is out
            assert v == frozen_at["buffer_versions"][0]
        else:  # it had not: its version number was never complete
            assert v == frozen_at["buffer_versions"][1] < frozen_at["buffer_versions"][0]
        dead = a.stats()
        assert dead["repairs"] == frozen_at["repairs"] and dead["writer_tid"] == p.pid and not dead["writer_alive"]
        # a new publisher takes the lock over from the dead one and repairs
        v2 = a.publish(version_data(8, 1), timeout=5)
        assert v2 == newest + 1
        st_ = a.stats()
        assert st_["repairs"] == dead["repairs"] + 1 and st_["owner_deaths"] == dead["owner_deaths"] + 1
        assert st_["buffer_versions"] == [v2, v2]
        progress_while(recs, 5.0, "after the repair")
    finally:
        stop[0] = 1
        if p is not None and p.is_alive():  # perhaps frozen: SIGKILL ends a stopped process too
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        for r in readers:
            r.join(10)
            if r.is_alive():
                os.kill(r.pid, signal.SIGKILL)
    assert all(r.exitcode == 0 for r in readers)
    check_readers(recs)
    del a
    gc.collect()
    g.close()


def _hammer(grid_name: str, stop) -> None:
    g = shmgrid.Grid.attach(grid_name)
    a = g.array("small")
    k = 0
    while not stop[0]:
        k += 1
        a.publish(np.full(512, k, np.int64))
    os._exit(0)


@pytest.mark.timeout(120)
def test_snapshots_finish_under_a_publisher_that_never_pauses(grid_name):
    """Two publishers rewrite a small array back to back; every snapshot
    still returns a whole version (through the seqlock or, after losing a
    few rounds, under the writer lock), and the version is monotonic."""
    g = shmgrid.Grid.create(grid_name, size="8MiB")
    a = g.array("small", 512, np.int64)
    stop = shared_i64(1)
    ps = [start(_hammer, grid_name, stop) for _ in range(2)]
    try:
        last, n = 0, 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            snap, v = a.snapshot(timeout=30)
            assert (snap == snap[0]).all() and v >= last
            last, n = v, n + 1
    finally:
        stop[0] = 1
        for p in ps:
            p.join(10)
    assert all(p.exitcode == 0 for p in ps)
    assert n > 0 and a.version >= last
    del a, snap
    gc.collect()
    g.close()


def _snapshot_forever(grid_name: str, count) -> None:
    g = shmgrid.Grid.attach(grid_name)
    a = g.array("small")
    out = np.empty(a.shape, a.dtype)
    while True:
        a.snapshot(out=out, timeout=30)
        assert (out == out[0]).all()
        count[0] += 1


@pytest.mark.timeout(120)
def test_readers_killed_anywhere_block_nobody(grid_name):
    """Readers that may be inside the writer lock (a snapshot that lost to
    the publishers is handed the lock) or registered for it are SIGKILLed
    at random moments while two publishers hammer the array: publishers go
    on, and a fresh reader still gets whole versions."""
    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    g = shmgrid.Grid.create(grid_name, size="8MiB")
    a = g.array("small", 512, np.int64)
    stop = shared_i64(1)
    pubs = [start(_hammer, grid_name, stop) for _ in range(2)]
    try:
        for _ in range(15):
            count = shared_i64(1)
            r = start(_snapshot_forever, grid_name, count)
            wait_deadline = time.monotonic() + 10
            while count[0] == 0:
                assert time.monotonic() < wait_deadline and r.is_alive(), "a reader made no snapshot"
                time.sleep(0.001)
            time.sleep(rnd.uniform(0, 0.03))
            os.kill(r.pid, signal.SIGKILL)
            r.join(5)
            v = a.version
            progress_deadline = time.monotonic() + 5
            while a.version == v:  # publishers are not held back by the dead reader
                assert time.monotonic() < progress_deadline, "publishers stopped after a reader was killed"
                time.sleep(0.001)
        snap, v = a.snapshot(timeout=10)
        assert (snap == snap[0]).all() and v >= 1
    finally:
        stop[0] = 1
        for p in pubs:
            p.join(10)
    assert all(p.exitcode == 0 for p in pubs)
    assert a.repair(timeout=5) in (True, False)  # the lock is free or recoverable
    assert not a.stats()["writer_tid"]
    del a, snap
    gc.collect()
    g.close()


@pytest.mark.parametrize("bad", [b"((7,), '<q9')", b"((7,), '|O8')", b"((-7,),'<i2')", b"(7 ,  '<i2')x", b"((15,),'<i1')"])
def test_a_damaged_description_is_corrupt_not_a_crash(grid, bad):
    grid.array("a", 7, "<i2")
    good = b"((7,), '<i2')"
    assert len(bad) == len(good)
    with open(f"/dev/shm/{grid.name}", "r+b") as f:
        data = f.read()
        assert data.count(good) == 1
        f.seek(data.index(good))
        f.write(bad)
    with pytest.raises(shmgrid.CorruptSegment, match="'a'"):
        grid.array("a")
    with pytest.raises(ObjectMismatch):  # asked for with the real description: it differs now
        grid.array("a", 7, "<i2")


# ---------------------------------------------------------------------------
# raw access to an array's shared header, to damage it or to leave the
# states a process killed (or stopped) at a chosen instruction leaves


class RawArray:
    """The array's words in the segment, through a second mapping.
    Offsets follow csrc/sg_layout.h (directory at 8192, 128-byte entries,
    the object offset at +80, params at +88; sg_array_hdr after the 16-byte
    block header)."""

    NBYTES, STRIDE, DATA, HASH, DESCLEN = 0, 8, 16, 24, 32
    OWNER = 64  # writer.owner
    SEQ0, VER0, SEQ1, VER1 = 128, 136, 144, 152
    VERSION = 192
    WANT = 256 + 16

    def __init__(self, grid_name, name):
        fd = os.open(f"/dev/shm/{grid_name}", os.O_RDWR)
        try:
            self.m = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        nb, off = name.encode(), 8192
        while True:
            kind, nlen = struct.unpack_from("<II", self.m, off + 8)
            if kind == 6 and nlen == len(nb) and self.m[off + 16: off + 16 + nlen] == nb:
                break
            off += 128
        self.dirent = off
        self.hdr = struct.unpack_from("<Q", self.m, off + 80)[0] + 16

    def __getitem__(self, field):
        return struct.unpack_from("<Q", self.m, self.hdr + field)[0]

    def __setitem__(self, field, v):
        struct.pack_into("<Q", self.m, self.hdr + field, v)

    def set_param(self, i, v):
        struct.pack_into("<Q", self.m, self.dirent + 88 + 8 * i, v)

    def close(self):
        self.m.close()


def thread_word(tid):
    """The lock-owner word of a thread (csrc: sg__thread_word)."""
    with open(f"/proc/{tid}/stat") as f:
        s = f.read()
    start = int(s[s.rindex(")") + 2:].split()[19])
    return ((start & ((1 << 40) - 1)) << 22) | tid


def _open_in_child(grid_name):
    """Open array 'a' in a fresh process: its exit code and output (a crash
    shows as a negative return code)."""
    code = ("import shmgrid\ng = shmgrid.Grid.attach(%r)\ntry:\n    g.array('a')\n"
            "except shmgrid.CorruptSegment as e:\n    print('CorruptSegment', e)\n" % grid_name)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("damage", ["nbytes", "nbytes_odd_seq", "data", "desc_len", "stride"])
def test_a_damaged_array_header_is_corrupt_not_a_crash(grid, damage):
    """Sizes in the header and its directory entry that wrap the payload
    arithmetic (nbytes = stride = 2**63 makes 2 * stride 0), or point the
    buffers outside the block or the segment, give CorruptSegment at open,
    in a fresh process (a crash would kill it), never a SIGSEGV."""
    a = grid.array("a", (8,), np.float64)
    a.publish(np.arange(8.0))
    raw = RawArray(grid.name, "a")
    try:
        big = 1 << 63
        if damage.startswith("nbytes"):
            raw[RawArray.NBYTES] = big
            raw.set_param(0, big)
            raw[RawArray.STRIDE] = big
            if damage == "nbytes_odd_seq":  # LIVE looks torn: open would repair it
                raw[RawArray.SEQ0] |= 1
        elif damage == "data":
            raw[RawArray.DATA] = (1 << 64) - 64 * 1024
        elif damage == "desc_len":
            struct.pack_into("<I", raw.m, raw.hdr + RawArray.DESCLEN, 1 << 20)
            raw.set_param(2, 1 << 20)
        else:
            raw[RawArray.STRIDE] = big
        rc, out = _open_in_child(grid.name)
        assert rc == 0 and out.startswith("CorruptSegment") and "'a'" in out, (rc, out)
    finally:
        raw.close()


@pytest.mark.timeout(60)
def test_version_and_wait_do_not_lag_a_publisher_killed_before_its_version_store(grid):
    """A publisher killed after its LIVE section and before its `version`
    store leaves LIVE holding v + 1 whole, BACKUP v and `version` v.
    snapshot() returns v + 1 then, so `version` says v + 1 too and
    wait_version(v) returns it, instead of sleeping until another
    publisher repairs; a waiter already asleep notices within its slice."""
    a = grid.array("a", (4,), np.float64)
    a.publish(np.full(4, 1.0))
    a.publish(np.full(4, 2.0))
    raw = RawArray(grid.name, "a")
    try:
        raw[RawArray.VERSION] = 1  # as if killed right after the LIVE section of version 2
        raw[RawArray.VER1] = 1
        snap, v = a.snapshot(timeout=5)
        assert v == 2 and (snap == 2.0).all()
        assert a.version == 2 and a.stats()["version"] == 2
        assert a.wait_version(1, timeout=1.0) == 2
        # a waiter asleep on version 2 when a publisher of 3 dies the same way
        got = []
        t = threading.Thread(target=lambda: got.append(a.wait_version(2, timeout=10)))
        t.start()
        time.sleep(0.2)
        assert t.is_alive()
        raw[RawArray.SEQ0] += 1  # the LIVE section of version 3 ...
        raw[RawArray.VER0] = 3
        raw[RawArray.SEQ0] += 1  # ... completes; no `version` store, no signal
        t.join(15)
        assert got == [3] and a.version == 3
        assert a.repair(timeout=5) is True  # the next writer-lock holder brings the rest up to it
        assert raw[RawArray.VERSION] == 3 and raw[RawArray.VER1] == 3
    finally:
        raw.close()


_READER = """\
import sys, time, shmgrid
g = shmgrid.Grid.attach(sys.argv[1])
a = g.array("a")
t = time.monotonic()
try:
    snap, v = a.snapshot(timeout=float(sys.argv[2]))
    print("snapshot", v, snap.tolist(), end=" ")
except shmgrid.Busy:
    print("Busy", end=" ")
print("after %.2f" % (time.monotonic() - t), flush=True)
sys.stdin.read()  # stays alive (its thread word too) until the test is done
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("holder", ["committed_then_taken_by_a_stopped_thread", "offered_then_killed"])
def test_a_registered_readers_timeout_holds_whatever_the_holder_did(grid_name, holder):
    """A reader that lost the seqlock to publishers registers for the writer
    lock (here: a live process X holds it and both seq words keep moving,
    so the reader stays registered). Then:

    - committed_then_taken_by_a_stopped_thread: the state the two-store
      hand-over left when its holder died between "want = R | HANDED" and
      "owner = R" and X (live, then stopped mid-copy) took the lock over:
      the reader once spun forever at 100% CPU. Its timeout must hold
      (Busy after 0.5 s), and a new snapshot then reads the buffer X is
      not writing.
    - offered_then_killed: the holder offered the lock to R (owner =
      R | OFFERED) and died. R takes it (or, if it went back to the
      seqlock first, the offer is stale and the next acquirer takes it):
      R gets a whole version and the lock does not stay with R.
    """
    g = shmgrid.Grid.create(grid_name, size="16MiB")
    x = subprocess.Popen(["sleep", "60"])
    r = None
    raw = None
    try:
        a = g.array("a", (8,), np.float64)
        a.publish(np.arange(8.0))
        raw = RawArray(grid_name, "a")
        raw[RawArray.OWNER] = thread_word(x.pid)  # X (alive) holds the writer lock ...
        raw[RawArray.SEQ0] |= 1  # ... and both buffers look mid-copy: the seqlock fails
        raw[RawArray.SEQ1] |= 1
        stop = threading.Event()

        def mover():  # X "publishing": the seq words move, so R keeps waiting for the lock
            while not stop.is_set():
                raw[RawArray.SEQ0] += 2
                raw[RawArray.SEQ1] += 2
                time.sleep(0.0005)

        t = threading.Thread(target=mover)
        t.start()
        try:
            r = subprocess.Popen([sys.executable, "-c", _READER, grid_name, "0.5"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 10
            while raw[RawArray.WANT] == 0:
                assert time.monotonic() < deadline, "the reader never registered for the writer lock"
            w = raw[RawArray.WANT]
            assert w & ((1 << 22) - 1) == r.pid
            if holder == "committed_then_taken_by_a_stopped_thread":
                raw[RawArray.WANT] = w | (1 << 63)
                time.sleep(1.0)
        finally:
            stop.set()
            t.join()
        raw[RawArray.SEQ1] += 1  # X stopped in LIVE's copy: BACKUP is whole
        if holder == "offered_then_killed":
            raw[RawArray.OWNER] = w | (1 << 63)
        ready, _, _ = select.select([r.stdout], [], [], 10)
        assert ready, "the reader's snapshot(timeout=0.5) has not returned after 10 s"
        line = r.stdout.readline()
        if holder == "committed_then_taken_by_a_stopped_thread":
            assert line.startswith("Busy after 0.") and float(line.split()[-1]) < 2.0, line
            snap, v = a.snapshot(timeout=5)
        else:
            assert line.startswith("snapshot 1 [0.0, 1.0, 2.0"), line
            assert a.repair(timeout=2) in (True, False)  # R released it, or the stale offer is taken over
            assert raw[RawArray.OWNER] == 0 and raw[RawArray.WANT] == 0
            snap, v = a.snapshot(timeout=5)
        assert v == 1 and snap.tolist() == list(np.arange(8.0))
    finally:
        if r is not None:
            r.stdin.close()
            try:
                r.wait(10)
            except subprocess.TimeoutExpired:
                r.kill()
                r.wait()
            r.stdout.close()
        x.kill()
        x.wait()
        if raw is not None:
            raw.close()
        g.close()
