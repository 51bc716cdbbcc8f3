"""Grid lifecycle and every error path a user can hit: names, sizes, missing
or existing segments, damaged or hostile segments, permissions, limits,
use after close, fork and spawn."""
import multiprocessing as mp
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest

import shmgrid
from shmgrid import (
    CapacityError,
    Closed,
    Grid,
    IncompatibleSegment,
    InvalidArgument,
    InvalidName,
    ObjectMismatch,
    PermissionDenied,
    SegmentExists,
    SegmentNotFound,
    ShmgridError,
    ValueTooLarge,
)
from shmgrid._core import lib

SHM = "/dev/shm"


def shm_path(name):
    return os.path.join(SHM, name)


# ---- lifecycle --------------------------------------------------------------


def test_create_attach_open_close_unlink(grid_name):
    with Grid.create(grid_name, size="2MiB") as g:
        assert g.size == 2 * 1024 * 1024
        g.map("m")["k"] = b"v"
        with Grid.attach(grid_name) as g2:
            assert g2.map("m")["k"] == b"v"
        with Grid.open(grid_name) as g3:
            assert g3.map("m")["k"] == b"v"
    assert g.closed
    # close never unlinks
    with Grid.attach(grid_name) as g:
        assert g.map("m")["k"] == b"v"
        g.unlink()
    with pytest.raises(SegmentNotFound):
        Grid.attach(grid_name)


def test_open_creates_when_missing(grid_name):
    with Grid.open(grid_name, size=1 << 20) as g:
        assert g.size == 1 << 20
    Grid.unlink(grid_name)
    with pytest.raises(SegmentNotFound):
        Grid.unlink(grid_name)


def test_default_mode_is_0600(grid_name):
    old = os.umask(0)
    try:
        with Grid.create(grid_name, size="1MiB"):
            assert os.stat(shm_path(grid_name)).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_mode_is_applied_despite_umask(grid_name):
    old = os.umask(0o077)
    try:
        with Grid.create(grid_name, size="1MiB", mode=0o660):
            assert os.stat(shm_path(grid_name)).st_mode & 0o777 == 0o660
    finally:
        os.umask(old)


@pytest.mark.parametrize("size,expect", [
    (1 << 20, 1 << 20), ("1MiB", 1 << 20), ("2M", 2 << 20), ("1.5 MiB", 3 << 19),
    ("1GiB", 1 << 30), ("4000000", 4000000), ("3MB", 3_000_000),
])
def test_parse_size(size, expect):
    assert shmgrid.parse_size(size) == expect


@pytest.mark.parametrize("size", ["", "12 parsecs", "-1MiB", "MiB", 0, -5, 1.5])
def test_bad_sizes(size):
    with pytest.raises((InvalidArgument, TypeError)):
        shmgrid.parse_size(size)


def test_size_limits(grid_name):
    with pytest.raises(InvalidArgument, match="out of range"):
        Grid.create(grid_name, size=4096)
    with pytest.raises(CapacityError, match="free in /dev/shm"):
        Grid.create(grid_name, size="1000TiB")
    assert not os.path.exists(shm_path(grid_name))


@pytest.mark.parametrize("name", ["", "a/b", "x" * 201, "..", ".", "sp ace", "é", "nul\0"])
def test_invalid_grid_names(name):
    with pytest.raises(InvalidName):
        Grid.create(name, size="1MiB")
    with pytest.raises(InvalidName):
        Grid.attach(name)


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, "..", "tab\t", "nul\0"])
def test_invalid_object_names(grid, name):
    with pytest.raises(InvalidName):
        grid.map(name)


def test_longest_names(grid_name):
    long_grid = (grid_name + "x" * 200)[:200]
    try:
        with Grid.create(long_grid, size="1MiB") as g:
            g.map("y" * 64)["k"] = b"v"
            assert g.objects()[0]["name"] == "y" * 64
    finally:
        Grid.unlink(long_grid)


def test_missing_and_existing(grid_name):
    with pytest.raises(SegmentNotFound) as ei:
        Grid.attach(grid_name)
    assert isinstance(ei.value, FileNotFoundError)
    with Grid.create(grid_name, size="1MiB"):
        with pytest.raises(SegmentExists) as ei:
            Grid.create(grid_name, size="1MiB")
        assert isinstance(ei.value, FileExistsError)


def test_use_after_close(grid_name):
    g = Grid.create(grid_name, size="1MiB")
    m = g.map("m")
    m["k"] = b"v"
    g.close()
    g.close()  # idempotent
    for call in (lambda: m.get("k"), lambda: m.put("k", b"x"), lambda: len(m), lambda: m.incr("n"),
                 lambda: list(m), lambda: m.validate(), lambda: g.map("m"), lambda: g.info(),
                 lambda: g.validate(), lambda: "k" in m, lambda: m.delete("k")):
        with pytest.raises(Closed):
            call()
    # the segment itself is untouched
    with Grid.attach(grid_name) as g2:
        assert g2.map("m")["k"] == b"v"


# ---- object declarations ---------------------------------------------------


def test_map_redeclaration(grid):
    m = grid.map("m", capacity=100, max_key=16, max_value=32)
    assert (m.capacity, m.max_key, m.max_value) == (100, 16, 32)
    same = grid.map("m")  # no parameters: take the existing ones
    assert (same.capacity, same.max_key, same.max_value) == (100, 16, 32)
    assert grid.map("m", capacity=100).capacity == 100
    for kw in ({"capacity": 101}, {"max_key": 17}, {"max_value": 33}):
        with pytest.raises(ObjectMismatch, match=next(iter(kw))):
            grid.map("m", **kw)


@pytest.mark.parametrize("kw", [{"capacity": 0}, {"max_key": -1}, {"max_value": "big"}, {"capacity": True}])
def test_map_bad_parameters(grid, kw):
    with pytest.raises(TypeError):
        grid.map("m", **kw)


def test_map_parameter_limits(grid):
    with pytest.raises(InvalidArgument, match="max_key"):
        grid.map("a", max_key=lib.SG_MAX_KEY_LIMIT + 1)
    with pytest.raises(InvalidArgument, match="max_value"):
        grid.map("b", max_value=lib.SG_MAX_VALUE_LIMIT + 1)
    with pytest.raises(CapacityError, match="heap exhausted"):
        grid.map("c", capacity=10_000_000)  # 256 MiB of slots in a 64 MiB grid
    assert [o["name"] for o in grid.objects()] == []  # failed creations leave no entry


def test_oversize_writes_change_nothing(grid):
    m = grid.map("m", capacity=16, max_key=8, max_value=16)
    m["k"] = b"v"
    before = m.get_versioned("k")
    for call in (
        lambda: m.put("k" * 9, b"v"),
        lambda: m.put("k", b"x" * 17),
        lambda: m.put_if_absent("new", b"x" * 17),
        lambda: m.replace("k", b"v", b"x" * 17),
        lambda: m.compare_and_set("k", before[1], b"x" * 17),
        lambda: m.get("k" * 9),
        lambda: m.incr("k" * 9),
    ):
        with pytest.raises(ValueTooLarge) as ei:
            call()
        assert isinstance(ei.value, ValueError)
        assert "max_key of 8" in str(ei.value) or "max_value of 16" in str(ei.value)
    assert m.get_versioned("k") == before
    assert len(m) == 1 and "new" not in m
    assert m.validate()["bound"] == 1  # the rejected new key took no slot


def test_map_full_at_max_capacity(grid):
    m = grid.map("m", capacity=10, max_key=16, max_value=8, max_capacity=100)
    assert m.max_capacity >= 100
    stored = 0
    with pytest.raises(CapacityError, match="max_capacity"):
        for i in range(10_000):
            m.put(f"k{i}", b"v")
            stored += 1
    assert stored >= 100
    assert len(m) == stored
    # what is stored stays readable and writable; the failed key took nothing
    assert all(m[f"k{i}"] == b"v" for i in range(stored))
    assert f"k{stored}" not in m
    m.put("k0", b"w")
    assert m.validate()["live"] == stored


def test_max_capacity_alone_on_open_and_on_create(grid):
    """Reopening a map with just its own max_capacity is not refused against
    the default capacity it was never created with; creating with just a
    max_capacity below the default sizes the first table for it."""
    grid.map("m", capacity=1000, max_capacity=5000)
    assert grid.map("m", max_capacity=5000).capacity == 1000
    with pytest.raises(shmgrid.ObjectMismatch):
        grid.map("m", max_capacity=6000)
    assert grid.map("small", max_capacity=500).capacity == 500


def test_map_full_when_heap_is(grid_name):
    with Grid.create(grid_name, size="1MiB") as g:
        m = g.map("m", capacity=64, max_key=16, max_value=64)
        stored = 0
        with pytest.raises(CapacityError, match="heap"):
            for i in range(1_000_000):
                m.put(b"%d" % i, b"v" * 64)
                stored += 1
        assert stored > 1000 and len(m) == stored
        assert m.validate()["live"] == stored


def test_key_and_value_types(grid):
    m = grid.map("m")
    m["s"] = b"1"
    m[b"b"] = bytearray(b"2")
    m[bytearray(b"ba")] = memoryview(b"3")
    assert m[b"s"] == b"1" and m["b"] == b"2" and m[memoryview(b"ba")] == b"3"
    assert sorted(m) == [b"b", b"ba", b"s"]
    with pytest.raises(TypeError, match="values are bytes-like"):
        m["x"] = "text"
    with pytest.raises(TypeError, match="keys are bytes-like or str"):
        m[1] = b"x"
    with pytest.raises(KeyError):
        m["missing"]
    with pytest.raises(KeyError):
        del m["missing"]
    assert m.pop("missing", None) is None
    assert "é" not in m
    m["é"] = b"utf8"
    assert m["é".encode()] == b"utf8"


# ---- damaged and hostile segments ----------------------------------------------


def _raw_segment(name, data):
    with open(shm_path(name), "wb") as f:
        f.write(data)
    os.chmod(shm_path(name), 0o600)


def _patch(name, offset, fmt, value):
    with open(shm_path(name), "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def test_truncated_segment(grid_name):
    with Grid.create(grid_name, size="2MiB") as g:
        g.map("m")["k"] = b"v"
    os.truncate(shm_path(grid_name), 1 << 20)
    with pytest.raises(IncompatibleSegment, match="truncated"):
        Grid.attach(grid_name)
    os.truncate(shm_path(grid_name), 100)
    with pytest.raises(IncompatibleSegment, match="truncated"):
        Grid.attach(grid_name)


def test_not_a_grid(grid_name):
    _raw_segment(grid_name, b"hello world" * 100_000)
    with pytest.raises(IncompatibleSegment, match="not a shmgrid segment"):
        Grid.attach(grid_name)


@pytest.mark.parametrize("offset,fmt,value,match", [
    (0, "<Q", 0x1122334455667788, "bad magic"),
    (8, "<I", 999, "format version 999"),
    (12, "<I", 0xDEADBEEF, "layout signature"),
    (16, "<Q", 1 << 40, "truncated or damaged"),
    (64, "<Q", 7, "damaged header"),
])
def test_bad_header_fields(grid_name, offset, fmt, value, match):
    with Grid.create(grid_name, size="1MiB"):
        pass
    _patch(grid_name, offset, fmt, value)
    with pytest.raises(IncompatibleSegment, match=match):
        Grid.attach(grid_name)


def _dead_pid():
    p = mp.get_context("fork").Process(target=os._exit, args=(0,))
    p.start()
    p.join()
    return p.pid


def test_creator_died_before_ready(grid_name):
    with Grid.create(grid_name, size="1MiB"):
        pass
    _patch(grid_name, 32, "<I", 0)            # ready = 0
    _patch(grid_name, 24, "<Q", _dead_pid())  # creator = a reaped process
    with pytest.raises(IncompatibleSegment, match="died before marking it ready"):
        Grid.attach(grid_name)


@pytest.mark.timeout(30)
def test_never_written_segment(grid_name):
    _raw_segment(grid_name, bytes(1 << 20))  # ftruncate'd, creator gone before writing a byte
    with pytest.raises(IncompatibleSegment, match="creator died before writing it"):
        Grid.attach(grid_name)


def _fuzz_child(name, seed, rounds, clean):
    """Damage random bytes of a good segment and use it; anything but a
    ShmgridError (a crash above all) is a failure."""
    rnd = random.Random(seed)
    path = shm_path(name)
    heap = lib.SG_HEAP_OFFSET
    regions = [(0, 64), (64, lib.SG_DIR_OFFSET), (lib.SG_DIR_OFFSET, lib.SG_PROC_OFFSET),
               (lib.SG_PROC_OFFSET, heap), (heap, heap + 200_000)]
    for _ in range(rounds):
        with open(path, "r+b") as f:
            f.write(clean)
            lo, hi = rnd.choice(regions)
            for _ in range(rnd.randint(1, 16)):
                f.seek(rnd.randrange(lo, hi))
                f.write(bytes([rnd.randrange(256)]) * rnd.choice((1, 1, 2, 8)))
        try:
            with Grid.attach(name) as g:
                g.info()
                g.objects()
                m = g.map("m")
                for i in range(50):
                    m.get(b"k%d" % i)
                    m.put(b"k%d" % i, b"x" * (i % 40))
                    m.incr(b"n")
                list(m.items())
                m.validate()
                g.validate()
        except ShmgridError:
            pass
    os._exit(0)


@pytest.mark.timeout(120)
def test_hostile_segment_never_crashes(grid_name):
    with Grid.create(grid_name, size="1MiB") as g:
        m = g.map("m", capacity=256, max_key=16, max_value=64)
        for i in range(200):
            m.put(b"k%d" % i, b"v" * (i % 60))
        for i in range(0, 200, 3):
            m.delete(b"k%d" % i)
    with open(shm_path(grid_name), "rb") as f:
        clean = f.read()
    ctx = mp.get_context("fork")
    for seed in range(4):
        p = ctx.Process(target=_fuzz_child, args=(grid_name, seed, 150, clean))
        p.start()
        p.join(100)
        assert p.exitcode == 0, f"seed {seed}: the child died with {p.exitcode} (negative = signal)"


# ---- permissions -----------------------------------------------------------------


def _attach_as_nobody(name, q):
    try:
        os.setgid(65534)
        os.setuid(65534)
        with Grid.attach(name) as g:
            q.put(("ok", g.map("m").get("k")))
    except PermissionDenied as e:
        q.put(("denied", str(e), isinstance(e, PermissionError)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(("error", repr(e)))


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to user nobody needs root")
@pytest.mark.parametrize("mode,expect", [(0o600, "denied"), (0o666, "ok")])
def test_mode_protects_segment(grid_name, mode, expect):
    with Grid.create(grid_name, size="1MiB", mode=mode) as g:
        g.map("m")["k"] = b"v"
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_attach_as_nobody, args=(grid_name, q))
        p.start()
        outcome = q.get(timeout=30)
        p.join(30)
    assert outcome[0] == expect, outcome
    if expect == "denied":
        assert grid_name in outcome[1] and outcome[2]  # named, and catchable as PermissionError
    else:
        assert outcome[1] == b"v"


# ---- directory races and dead creators ---------------------------------------------


def _open_and_incr(name, q):
    with Grid.open(name, size="4MiB") as g:
        q.put(g.map("shared", capacity=64).incr("hits"))


@pytest.mark.timeout(60)
def test_concurrent_open_gets_one_object(grid_name):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_open_and_incr, args=(grid_name, q)) for _ in range(6)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(30)
    assert results == [1, 2, 3, 4, 5, 6]
    with Grid.attach(grid_name) as g:
        assert [o["name"] for o in g.objects()] == ["shared"]


def test_object_whose_creator_died_is_recreated(grid):
    name = "orphan"
    idx = lib.sg_hash64(name.encode(), len(name)) % lib.SG_DIR_SIZE
    dead_word = _dead_pid()  # start time 0: never matches a live process
    path = shm_path(grid.name)
    _patch(grid.name, lib.SG_DIR_OFFSET + idx * lib.SG_DIRENT_SIZE, "<Q", (dead_word << 2) | 1)  # CREATING by a dead process
    assert grid.objects()[0]["kind"] == "creating"
    m = grid.map(name)
    m["k"] = b"v"
    assert [o["name"] for o in grid.objects()] == [name]
    assert os.path.exists(path)


# ---- fork and spawn ------------------------------------------------------------------


def _spawned(name, q):
    with Grid.attach(name) as g:
        m = g.map("m")
        q.put((m.get("parent"), m.put("child", b"hello"), os.getpid()))


@pytest.mark.timeout(60)
def test_spawn_attaches_by_name(grid):
    grid.map("m")["parent"] = b"p"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_spawned, args=(grid.name, q))
    p.start()
    got = q.get(timeout=50)
    p.join(10)
    assert got[0] == b"p" and got[1] == 1
    assert grid.map("m")["child"] == b"hello"


def test_process_table_reuses_dead_slots(grid):
    base = len(grid.processes())
    ctx = mp.get_context("fork")
    for _ in range(3 * lib.SG_PROC_TABLE_SIZE // 2):  # more children than slots
        p = ctx.Process(target=lambda: grid.map("m").incr("n"))
        p.start()
        p.join(30)
        assert p.exitcode == 0
    assert grid.map("m").get("n") == struct.pack("<q", 3 * lib.SG_PROC_TABLE_SIZE // 2)
    assert sum(p["alive"] for p in grid.processes()) == base


# ---- a full /dev/shm --------------------------------------------------------------

_FILL_TWO_GRIDS = """
import shmgrid
grids = [shmgrid.Grid.create(f"g{i}", size="6MiB") for i in range(2)]  # 12 MiB on an 8 MiB tmpfs
errors = []
for g in grids:
    m = g.map("m", capacity=64, max_key=16, max_value=256)
    try:
        for i in range(1_000_000):
            m.put(b"%d" % i, b"v" * 256)
    except shmgrid.CapacityError as e:
        errors.append(str(e))
    assert len(m) > 100 and m.get(b"1") == b"v" * 256
    m.validate()
print("ERRORS", errors)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
@pytest.mark.timeout(120)
def test_full_dev_shm_is_an_error_not_sigbus():
    """Grids are sparse, so two can overcommit /dev/shm; filling them must
    end in CapacityError, never in SIGBUS."""
    script = f"mount -t tmpfs -o size=8m tmpfs /dev/shm && {sys.executable} -c '{_FILL_TWO_GRIDS}'"
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "/dev/shm has no memory left" in r.stdout, r.stdout


def _child_after_fork_with_iterator(m, it, q):
    try:
        try:
            next(it)
            q.put("iterated")
        except InvalidArgument as e:
            q.put("refused: " + str(e))
        del it
        m.put("child", b"c")  # the child's own slot still works after dropping the iterator
        q.put(m.get("child"))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(repr(e))


@pytest.mark.timeout(60)
def test_fork_with_an_open_iterator(grid):
    """A forked child holds no pin: it must not use or release the parent's."""
    m = grid.map("m", capacity=64)
    for i in range(20):
        m[b"k%d" % i] = b"v"
    it = iter(m)
    next(it)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_after_fork_with_iterator, args=(m, it, q))
    p.start()
    first, second = q.get(timeout=30), q.get(timeout=30)
    p.join(30)
    assert first.startswith("refused: iterator was opened in the parent"), first
    assert second == b"c", second
    rest = set(list(it)) - {b"child"}  # the walk goes on; it may or may not see the child's new key
    assert len(rest) == 19 and all(k.startswith(b"k") for k in rest)
