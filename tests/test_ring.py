"""Functional tests of the Ring (bounded MPMC queue of byte messages).

- a stateful property test against a ``collections.deque`` model in one
  process (capacities 1..8, tiny slots, every put/get form);
- multi-process exactly-once delivery, FIFO per producer, with single and
  batched calls (consumers report through files, never through the ring);
- blocking: timeouts, wake-ups across processes, Ctrl-C in a blocked get;
- errors: mismatched parameters, wrong kinds, bad arguments, closed grids.

Workers are forked processes; every wait has a timeout, and a stuck or dead
worker is killed and fails the test instead of hanging it.
"""
from __future__ import annotations

import os
import queue
import random
import signal
import struct
import threading
import time
from collections import deque

import hypothesis.strategies as st
import pytest
from conftest import unique_grid_name, unlink_quietly
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from spawned import run_spawned
from workers import FORK, Workers, stats_include, wait_for

import shmgrid
from shmgrid import Closed, Empty, Full, InvalidArgument, ObjectMismatch, ValueTooLarge

PK = struct.Struct("<II")  # (producer id, sequence number)
END = b"END"  # the one message that is not 8 bytes long: "no more messages"


# ---- (1) model test -------------------------------------------------------------------

SLOT_MAX = 12
messages = st.binary(max_size=SLOT_MAX + 3)
wrappers = st.sampled_from([bytes, bytearray, memoryview])


class RingModel(RuleBasedStateMachine):
    """A Ring against a deque: same results, same exceptions, same length."""

    def __init__(self):
        super().__init__()
        self.name = unique_grid_name("ring-")
        self.grid = shmgrid.Grid.create(self.name, size="1MiB")
        self.grid2 = None
        self.ring = None
        self.model = deque()
        self.puts = self.gets = 0

    def teardown(self):
        try:
            self.grid.close()
            if self.grid2 is not None:
                self.grid2.close()
        finally:
            unlink_quietly(self.name)

    @initialize(slots=st.integers(1, 8), slot_size=st.integers(1, SLOT_MAX))
    def make(self, slots, slot_size):
        self.slots, self.slot_size = slots, slot_size
        self.ring = self.grid.ring("r", slots=slots, slot_size=slot_size)
        assert (self.ring.capacity, self.ring.slot_size, self.ring.name) == (slots, slot_size, "r")

    def full(self):
        return len(self.model) == self.slots

    # ---- puts

    @rule(data=messages, wrap=wrappers, how=st.sampled_from(["put", "put_nowait", "timeout0", "short"]))
    def put(self, data, wrap, how):
        r, x = self.ring, wrap(data)
        if how == "put" and self.full():
            how = "short"  # a put without timeout would wait for good
        call = {
            "put": lambda: r.put(x),
            "put_nowait": lambda: r.put_nowait(x),
            "timeout0": lambda: r.put(x, timeout=0),
            "short": lambda: r.put(x, timeout=0.001),
        }[how]
        if len(data) > self.slot_size:
            with pytest.raises(ValueTooLarge):
                call()
        elif self.full():
            with pytest.raises(Full):
                call()
        else:
            assert call() is None
            self.model.append(data)
            self.puts += 1

    @rule(datas=st.lists(messages, max_size=10), wait=st.booleans())
    def put_many(self, datas, wait):
        # bytes items only: bytearray/memoryview items of put_many have their
        # own test (test_put_many_accepts_bytes_like_items)
        xs = list(datas)
        free = self.slots - len(self.model)
        fits = all(len(d) <= self.slot_size for d in datas)
        if not fits:
            with pytest.raises(ValueTooLarge):
                self.ring.put_many(xs, timeout=0)
            return
        if not datas:
            assert self.ring.put_many(xs, timeout=0) == 0
            return
        if free == 0:
            with pytest.raises(Full):
                self.ring.put_many(xs, timeout=0)
            return
        if wait and len(datas) <= free:
            n = self.ring.put_many(iter(xs))  # any iterable; room for all: no waiting
        else:
            n = self.ring.put_many(xs, timeout=0)
        assert n == min(len(datas), free)
        self.model.extend(datas[:n])
        self.puts += n

    @rule(before=st.lists(st.binary(max_size=1), max_size=4), after=st.lists(st.binary(max_size=1), max_size=4),
          extra=st.integers(1, 3), timeout=st.sampled_from([0, 0.001, None]))
    def put_many_with_oversize_item(self, before, after, extra, timeout):
        """One oversize item anywhere: ValueTooLarge, and nothing enqueued,
        not even the items before it (full ring or not)."""
        items = before + [b"x" * (self.slot_size + extra)] + after
        with pytest.raises(ValueTooLarge):
            self.ring.put_many(items, timeout=timeout)

    # ---- gets

    @rule(how=st.sampled_from(["get", "get_nowait", "timeout0", "short"]))
    def get(self, how):
        r = self.ring
        if how == "get" and not self.model:
            how = "short"
        call = {
            "get": lambda: r.get(),
            "get_nowait": r.get_nowait,
            "timeout0": lambda: r.get(timeout=0),
            "short": lambda: r.get(timeout=0.001),
        }[how]
        if not self.model:
            with pytest.raises(Empty):
                call()
        else:
            got = call()
            assert type(got) is bytes
            assert got == self.model.popleft()
            self.gets += 1

    @rule(max_items=st.integers(1, 10), timeout=st.sampled_from([0, 0.001, None]))
    def get_many(self, max_items, timeout):
        if not self.model:
            if timeout is None:
                timeout = 0
            with pytest.raises(Empty):
                self.ring.get_many(max_items, timeout=timeout)
            return
        got = self.ring.get_many(max_items, timeout=timeout)
        k = min(max_items, len(self.model))
        assert got == [self.model.popleft() for _ in range(k)]
        assert all(type(g) is bytes for g in got)
        self.gets += k

    @rule(how=st.sampled_from(["params", "no-params", "attached"]))
    def reopen_handle(self, how):
        """Another handle on the same ring, or on the ring through a second
        attachment of the grid, sees the same queue."""
        if how == "params":
            self.ring = self.grid.ring("r", slots=self.slots, slot_size=self.slot_size)
        elif how == "no-params":
            self.ring = self.grid.ring("r")
        else:
            if self.grid2 is None:
                self.grid2 = shmgrid.Grid.attach(self.name)
            self.ring = self.grid2.ring("r")

    # ---- invariants

    @invariant()
    def same_length_and_stats(self):
        if self.ring is None:
            return
        assert len(self.ring) == len(self.model)
        s = self.ring.stats()
        stats_include(s, {"capacity": self.slots, "slot_size": self.slot_size, "head": self.gets, "tail": self.puts,
                                  "depth": len(self.model), "skipped": 0, "dropped": 0, "waiters": 0})


TestRingModel = pytest.mark.timeout(120)(RingModel.TestCase)
TestRingModel.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---- (2) MPMC exactly once, FIFO per producer --------------------------------------------

NPROD = NCONS = 3
NMSG = 100_000


def _producer(ring, pid, n, start, batch):
    start.wait(30)  # everyone starts together, so they really overlap
    pack = PK.pack
    if not batch:
        for i in range(n):
            ring.put(pack(pid, i))
        return n
    rnd = random.Random(pid)
    i = 0
    while i < n:
        k = min(n - i, rnd.randint(1, 300))  # sometimes over the ring's capacity
        assert ring.put_many([pack(pid, j) for j in range(i, i + k)]) == k
        i += k
    return n


def _consumer(ring, path, start, batch):
    """Take messages until END, which it puts back for the next consumer;
    write everything else, in the order received, to ``path``."""
    start.wait(30)
    got = []
    rnd = random.Random(str(path))
    while True:
        msgs = ring.get_many(rnd.randint(1, 100)) if batch else [ring.get()]
        if END in msgs:
            i = msgs.index(END)
            assert i == len(msgs) - 1, "a message came after END"
            got.extend(msgs[:i])
            ring.put(END)
            break
        got.extend(msgs)
    assert all(len(m) == PK.size for m in got), "a message of the wrong length"
    with open(path, "wb") as f:
        f.write(b"".join(got))
    return len(got)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch,slots", [(False, 256), (True, 64), (False, 4), (True, 4)],
                         ids=["single", "batched", "single-tiny-ring", "batched-tiny-ring"])
def test_mpmc_exactly_once_fifo_per_producer(grid, tmp_path, batch, slots):
    """A tiny ring keeps producers and consumers waiting on each other."""
    ring = grid.ring("mpmc", slots=slots, slot_size=PK.size)
    start = FORK.Barrier(NPROD + NCONS)
    paths = [tmp_path / f"consumer{c}" for c in range(NCONS)]
    with Workers() as w:
        for c in range(NCONS):
            w.start(("c", c), _consumer, ring, paths[c], start, batch)
        for p in range(NPROD):
            w.start(("p", p), _producer, ring, p, NMSG, start, batch)
        w.wait([("p", p) for p in range(NPROD)], timeout=90)
        ring.put(END)  # after every producer's last message
        counts = w.wait([("c", c) for c in range(NCONS)], timeout=60)
    assert ring.get_nowait() == END
    assert len(ring) == 0
    s = ring.stats()
    # every producer's messages, END from here and once back from each consumer
    assert s["tail"] == s["head"] == NPROD * NMSG + 1 + NCONS
    assert s["skipped"] == s["dropped"] == 0

    per_consumer = []
    for path, n in zip(paths, counts):
        data = path.read_bytes()
        assert len(data) == n * PK.size
        per_consumer.append(list(PK.iter_unpack(data)))
    assert sum(counts) == NPROD * NMSG, f"received {sum(counts)} messages, sent {NPROD * NMSG}"
    everything = sorted(m for msgs in per_consumer for m in msgs)
    assert everything == [(p, i) for p in range(NPROD) for i in range(NMSG)], "a message lost or duplicated"
    for c, msgs in enumerate(per_consumer):
        last = [-1] * NPROD
        for p, i in msgs:
            assert i > last[p], f"consumer {c} got producer {p}'s message {i} after {last[p]}"
            last[p] = i


def _spawned_echo(name, q):
    """Attach by name, open the ring with default parameters, answer."""
    with shmgrid.Grid.attach(name) as g:
        r = g.ring("echo")
        req = g.ring("reply")
        got = r.get_many(100, timeout=10)
        req.put_many([m.upper() for m in got], timeout=10)
        q.put((r.capacity, r.slot_size, got))


@pytest.mark.timeout(60)
def test_spawned_process_attaches_ring_by_name(grid, grid_name):
    r = grid.ring("echo", slots=16, slot_size=5)
    reply = grid.ring("reply", slots=16, slot_size=5)
    r.put_many([b"a", b"bb", b"", b"ccccc"])
    cap, size, got = run_spawned(_spawned_echo, grid_name)
    assert (cap, size, got) == (16, 5, [b"a", b"bb", b"", b"ccccc"])
    assert reply.get_many(16, timeout=5) == [b"A", b"BB", b"", b"CCCCC"]


# ---- (3) blocking ---------------------------------------------------------------------------


def _between(t, lo=0.04, hi=1.0):
    assert lo <= t <= hi, f"took {t:.3f} s, expected about 0.05 s"


@pytest.mark.timeout(30)
def test_timeouts_on_empty_and_full(grid):
    r = grid.ring("t", slots=2, slot_size=4)
    for call in (lambda: r.get(timeout=0.05), lambda: r.get_many(3, timeout=0.05)):
        t0 = time.monotonic()
        with pytest.raises(Empty):
            call()
        _between(time.monotonic() - t0)
    r.put(b"1")
    r.put(b"2")
    for call in (lambda: r.put(b"3", timeout=0.05), lambda: r.put_many([b"3", b"4"], timeout=0.05)):
        t0 = time.monotonic()
        with pytest.raises(Full):
            call()
        _between(time.monotonic() - t0)
    # the timeouts left the ring as it was
    assert r.get_many(10) == [b"1", b"2"]
    # put_many on timeout returns how many went in: the prefix that fitted
    r.put(b"0")
    t0 = time.monotonic()
    assert r.put_many([b"a", b"b", b"c"], timeout=0.05) == 1
    _between(time.monotonic() - t0)
    assert r.get_many(10) == [b"0", b"a"]
    # queue-module compatibility of the exceptions
    with pytest.raises(queue.Empty):
        r.get_nowait()
    r.put_many([b"x", b"y"])
    with pytest.raises(queue.Full):
        r.put_nowait(b"z")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeout", [0, -1, "1", True, float("nan")])
def test_bad_timeouts(grid, timeout):
    r = grid.ring("t", slots=2, slot_size=4)
    if timeout == 0 and not isinstance(timeout, bool):
        with pytest.raises(Empty):
            r.get(timeout=timeout)
        return
    for call in (lambda: r.get(timeout=timeout), lambda: r.put(b"x", timeout=timeout),
                 lambda: r.get_many(1, timeout=timeout), lambda: r.put_many([b"x"], timeout=timeout)):
        with pytest.raises((TypeError, InvalidArgument)):
            call()
    assert len(r) == 0


def _blocked_get(ring):
    t0 = time.monotonic()
    msg = ring.get()  # no timeout
    return msg, t0, time.monotonic()


def _blocked_put(ring):
    t0 = time.monotonic()
    ring.put(b"late")  # no timeout: waits for room
    return t0, time.monotonic()


@pytest.mark.timeout(30)
def test_blocked_get_wakes_on_put_from_another_process(grid):
    r = grid.ring("wake", slots=4, slot_size=8)
    with Workers() as w:
        w.start("g", _blocked_get, r)
        wait_for(lambda: r.stats()["waiters"] == 1, what="the child to sleep in get()")
        time.sleep(0.2)  # well past its spinning
        t_put = time.monotonic()
        r.put(b"hello")
        [(msg, t0, t1)] = w.wait(["g"], timeout=10)
    assert msg == b"hello"
    assert t1 - t0 >= 0.15, "get() returned before anything was put"
    assert 0 <= t1 - t_put < 1.0, f"the blocked get took {t1 - t_put:.3f} s to wake up"
    assert r.stats()["waiters"] == 0


@pytest.mark.timeout(30)
def test_blocked_put_wakes_on_get_from_another_process(grid):
    r = grid.ring("wake", slots=2, slot_size=8)
    r.put_many([b"1", b"2"])
    with Workers() as w:
        w.start("p", _blocked_put, r)
        wait_for(lambda: r.stats()["waiters"] == 1, what="the child to sleep in put()")
        time.sleep(0.2)
        assert len(r) == 2
        t_get = time.monotonic()
        assert r.get() == b"1"
        [(t0, t1)] = w.wait(["p"], timeout=10)
    assert t1 - t0 >= 0.15
    assert 0 <= t1 - t_get < 1.0, f"the blocked put took {t1 - t_get:.3f} s to wake up"
    assert r.get_many(5) == [b"2", b"late"]


def _interrupted_get(ring, timeout, sender, ready):
    """Block in get(); SIGINT comes from a timer thread here (sender
    "thread") or from the parent. Reports the time the exception arrived."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sent = []
    if sender == "thread":
        def fire():
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)
        timer = threading.Timer(0.3, fire)
        timer.start()
    ready.set()
    t0 = time.monotonic()
    try:
        ring.get(timeout=timeout)
    except KeyboardInterrupt:
        t1 = time.monotonic()
    else:
        return None
    if sender == "thread":
        timer.join()
    # still usable afterwards
    ring.put(b"after")
    after = ring.get(timeout=5)
    return t0, t1, (sent[0] if sent else None), after


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sender", ["thread", "parent"])
@pytest.mark.parametrize("timeout", [None, 30.0])
def test_keyboard_interrupt_reaches_blocked_get(grid, sender, timeout):
    r = grid.ring("intr", slots=4, slot_size=8)
    ready = FORK.Event()
    with Workers() as w:
        p = w.start("g", _interrupted_get, r, timeout, sender, ready)
        assert ready.wait(10)
        t_sent = None
        if sender == "parent":
            wait_for(lambda: r.stats()["waiters"] == 1, what="the child to sleep in get()")
            time.sleep(0.1)
            t_sent = time.monotonic()
            os.kill(p.pid, signal.SIGINT)
        [res] = w.wait(["g"], timeout=10)
    assert res is not None, "get() returned without the interrupt"
    t0, t1, t_thread, after = res
    t_sent = t_sent if t_sent is not None else t_thread
    if sender == "thread":
        assert t1 - t0 >= 0.25, "get() was interrupted before the signal"
    assert 0 <= t1 - t_sent < 0.5, f"KeyboardInterrupt took {t1 - t_sent:.3f} s to reach get()"
    assert after == b"after"


# ---- (4) errors and small API ---------------------------------------------------------------


def test_object_mismatch_on_other_parameters(grid):
    r = grid.ring("r", slots=8, slot_size=16)
    for kw in ({"slots": 16}, {"slot_size": 32}, {"slots": 8, "slot_size": 17}, {"slots": 4, "slot_size": 16}):
        with pytest.raises(ObjectMismatch):
            grid.ring("r", **kw)
    for kw in ({}, {"slots": 8}, {"slot_size": 16}, {"slots": 8, "slot_size": 16}):
        r2 = grid.ring("r", **kw)
        assert (r2.capacity, r2.slot_size) == (8, 16)
    r.put(b"shared")
    assert r2.get_nowait() == b"shared"


def test_other_kinds_under_the_name(grid):
    grid.map("m", capacity=16)
    with pytest.raises(ObjectMismatch):
        grid.ring("m")
    with pytest.raises(ObjectMismatch):
        grid.ring("m", slots=8, slot_size=8)
    grid.ring("r", slots=4, slot_size=4)
    for opener in (grid.map, grid.topic, grid.counter, grid.lock):
        with pytest.raises(ObjectMismatch):
            opener("r")
    assert {o["name"]: o["kind"] for o in grid.objects()} == {"m": "map", "r": "ring"}


@pytest.mark.parametrize("kw", [
    {"slots": 0}, {"slots": -1}, {"slots": True}, {"slots": "8"}, {"slots": 2.0},
    {"slot_size": 0}, {"slot_size": -5}, {"slot_size": False}, {"slot_size": "16"},
    {"slots": 2**33}, {"slots": 2**70}, {"slot_size": 2**25}, {"slot_size": 2**40},
])
def test_bad_ring_arguments(grid, kw):
    with pytest.raises((TypeError, InvalidArgument)):
        grid.ring("bad", **kw)
    assert grid.objects() == [], "a refused ring was created anyway"


def test_bad_names(grid):
    for name in ("", "a/b", "x" * 100, "nul\0"):
        with pytest.raises(shmgrid.InvalidName):
            grid.ring(name)
    with pytest.raises(TypeError):
        grid.ring(b"bytes-name")


def test_message_types(grid):
    r = grid.ring("types", slots=8, slot_size=4)
    for bad in ("str", 12, None, ["a"], 1.5):
        with pytest.raises(TypeError):
            r.put(bad)
        with pytest.raises(TypeError):
            r.put_nowait(bad)
        with pytest.raises(TypeError):
            r.put_many([b"ok", bad])
    assert len(r) == 0, "a refused put_many enqueued part of its items"
    r.put(bytearray(b"ba"))
    r.put(memoryview(b"mv"))
    r.put_nowait(memoryview(b"xyzzy")[1:4])  # a slice of a larger buffer
    r.put(b"")  # empty messages are messages
    assert r.get_many(10) == [b"ba", b"mv", b"yzz", b""]
    r.put(b"1234")
    with pytest.raises(ValueTooLarge):
        r.put(b"12345")
    with pytest.raises(ValueTooLarge):
        r.put_nowait(bytearray(5))
    assert r.get_nowait() == b"1234"
    for bad in (0, -1, True, "2", None):
        with pytest.raises(TypeError):
            r.get_many(bad)


def test_put_many_accepts_bytes_like_items(grid):
    """put_many takes the same messages as put: bytes, bytearray, memoryview."""
    r = grid.ring("types", slots=8, slot_size=4)
    assert r.put_many([bytearray(b"1"), memoryview(b"22"), b"333", memoryview(b"xyzzy")[1:4]]) == 4
    assert r.get_many(10) == [b"1", b"22", b"333", b"yzz"]
    with pytest.raises(ValueTooLarge):
        r.put_many([bytearray(b"1"), bytearray(5)])
    assert len(r) == 0


def test_stats_len_repr(grid):
    r = grid.ring("st", slots=4, slot_size=8)
    stats_include(r.stats(), {"capacity": 4, "slot_size": 8, "head": 0, "tail": 0, "depth": 0,
                              "skipped": 0, "dropped": 0, "waiters": 0})
    assert len(r) == 0 and r.capacity == 4 and r.slot_size == 8 and r.name == "st"
    assert "st" in repr(r) and "4" in repr(r)
    for i in range(10):  # wraps around the 4 cells twice
        r.put(bytes([i]))
        if i % 2:
            assert r.get() == bytes([i - 1])
            assert r.get() == bytes([i])
    r.put_many([b"a", b"b", b"c"])
    assert len(r) == 3
    s = r.stats()
    assert (s["tail"], s["head"], s["depth"]) == (13, 10, 3)
    r.put(b"d")
    assert len(r) == 4 == r.stats()["depth"]
    with pytest.raises(Full):
        r.put_nowait(b"e")
    assert r.stats()["tail"] == 14  # a refused put claims no position
    assert r.get_many(2) == [b"a", b"b"]
    assert len(r) == 2


def test_default_parameters(grid):
    r = grid.ring("defaults")
    assert (r.capacity, r.slot_size) == (1024, 256)
    r.put(b"x" * 256)
    with pytest.raises(ValueTooLarge):
        r.put(b"x" * 257)
    assert r.get() == b"x" * 256


def test_use_after_grid_close_raises_closed(grid_name):
    g = shmgrid.Grid.create(grid_name, size="1MiB")
    r = g.ring("r", slots=4, slot_size=8)
    r.put(b"before")
    g.close()
    for call in (lambda: r.put(b"x"), lambda: r.put_nowait(b"x"), lambda: r.put(b"x", timeout=0.01),
                 lambda: r.put_many([b"x", b"y"]), lambda: r.get(), lambda: r.get_nowait(),
                 lambda: r.get(timeout=0.01), lambda: r.get_many(4), r.stats, lambda: len(r),
                 lambda: g.ring("r"), lambda: g.ring("new")):
        with pytest.raises(Closed):
            call()
    # the data is still in the segment for whoever attaches
    with shmgrid.Grid.attach(grid_name) as g2:
        assert g2.ring("r").get_nowait() == b"before"


# ---- zero-copy reads -------------------------------------------------------------


def test_get_into_fills_any_writable_buffer(grid):
    import array

    r = grid.ring("zc", slots=4, slot_size=16)
    r.put(b"hello")
    ba = bytearray(16)
    assert r.get_into(ba) == 5 and ba[:5] == b"hello"
    r.put(b"\x01\x00\x00\x00\x02\x00\x00\x00")
    arr = array.array("i", [0] * 4)  # 16 bytes
    assert r.get_into(arr) == 8 and arr.tolist()[:2] == [1, 2]
    r.put(b"view")
    big = bytearray(64)
    mv = memoryview(big)[8:24]
    assert r.get_into(mv) == 4 and big[8:12] == b"view"


def test_get_into_too_small_or_read_only_loses_nothing(grid):
    r = grid.ring("zc", slots=4, slot_size=16)
    r.put(b"abc")
    with pytest.raises(InvalidArgument, match="slot_size"):
        r.get_into(bytearray(15))  # smaller than the largest message the ring may hold
    with pytest.raises(TypeError):
        r.get_into(b"x" * 16)
    with pytest.raises(TypeError):
        r.get_into(memoryview(bytearray(32))[::2])  # not contiguous
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="Python objects"):  # bytes over object pointers would crash
        r.get_into(np.empty(4, dtype=object))
    ro = np.zeros(16, dtype="u1")
    ro.flags.writeable = False
    with pytest.raises(TypeError):  # numpy says ValueError; the docs say TypeError
        r.get_into(ro)
    with pytest.raises(TypeError):
        r.get_into(np.zeros(32, dtype="u1")[::2])
    assert len(r) == 1 and r.get_nowait() == b"abc"


def test_get_into_times_out_like_get(grid):
    r = grid.ring("zc", slots=4, slot_size=16)
    with pytest.raises(Empty):
        r.get_into(bytearray(16), timeout=0.05)
    with pytest.raises(Empty):
        r.get_into(bytearray(16), timeout=0)


def test_get_view_is_readonly_and_reused_per_thread(grid):
    r = grid.ring("zc", slots=4, slot_size=16)
    r.put(b"first")
    r.put(b"second!")
    v1 = r.get_view()
    assert v1 == b"first" and v1.readonly
    with pytest.raises(TypeError):
        v1[0] = 0
    kept = bytes(v1)
    v2 = r.get_view()
    assert v2 == b"second!" and kept == b"first"
    assert bytes(v1) == b"secon"  # the same buffer: the old view sees the next message's bytes
    other = []
    r.put(b"thread")
    t = threading.Thread(target=lambda: other.append(r.get_view()))
    t.start()
    t.join()
    assert other[0] == b"thread" and v2 == b"second!"  # another thread has its own buffer


@pytest.mark.timeout(120)
def test_get_into_multiprocess_exactly_once(grid, grid_name):
    r = grid.ring("zc", slots=8, slot_size=64)
    n = 2000

    def produce(name, lo, hi):
        g = shmgrid.Grid.attach(name)
        q = g.ring("zc")
        for i in range(lo, hi):
            q.put(struct.pack("<I", i) * 16, timeout=30)
        g.close()
        return True

    with Workers() as w:
        w.start(0, produce, grid_name, 0, n // 2)
        w.start(1, produce, grid_name, n // 2, n)
        buf = bytearray(64)
        got = []
        for _ in range(n):
            k = r.get_into(buf, timeout=30)
            assert k == 64 and buf == buf[:4] * 16
            got.append(struct.unpack_from("<I", buf)[0])
        w.wait([0, 1])
    assert sorted(got) == list(range(n))
