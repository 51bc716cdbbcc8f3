"""Functional tests of the Topic (publish/subscribe) and its Subscriptions.

- a stateful property test of lossless and lossy topics against a Python
  model with several subscriptions in one process;
- publishers and subscribers in separate processes: lossless delivery of
  everything to everyone in one total order, FIFO per publisher;
- lossy topics: exact lost counts (received + lost == published);
- closing (or killing) a subscriber releases blocked publishers; iteration;
  max_subscribers; timeouts; errors.

Workers are forked processes; every wait has a timeout, and a stuck or dead
worker is killed and fails the test instead of hanging it.
"""
from __future__ import annotations

import itertools
import os
import queue
import signal
import struct
import threading
import time

import hypothesis.strategies as st
import pytest
from conftest import unique_grid_name, unlink_quietly
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from workers import FORK, Workers, stats_include, wait_for

import shmgrid
from shmgrid import CapacityError, Closed, Empty, Full, InvalidArgument, Lapped, ObjectMismatch, ValueTooLarge

PK = struct.Struct("<II")  # (publisher id, sequence number)
SEQ = struct.Struct("<Q")


# ---- (1) model test -------------------------------------------------------------------

MSG_MAX = 8
messages = st.binary(max_size=MSG_MAX + 2)
wrappers = st.sampled_from([bytes, bytearray, memoryview])
which = st.integers(0, 15)  # a subscription, modulo how many were made


class SubModel:
    def __init__(self, sub, cursor):
        self.sub, self.cursor, self.open = sub, cursor, True


class TopicModel(RuleBasedStateMachine):
    """Publishing is appending to ``pub``; a subscription is a cursor into
    it. Lossless: publish is refused (Full) exactly when an open
    subscription is ``capacity`` behind. Lossy: a subscription more than
    ``capacity`` behind gets Lapped(tail - capacity - cursor) and continues
    at tail - capacity."""

    def __init__(self):
        super().__init__()
        self.name = unique_grid_name("topic-")
        self.grid = shmgrid.Grid.create(self.name, size="1MiB")
        self.topic = None
        self.pub = []
        self.subs = []

    def teardown(self):
        try:
            for s in self.subs:
                s.sub.close()
            self.grid.close()
        finally:
            unlink_quietly(self.name)

    @initialize(cap=st.integers(1, 6), max_message=st.integers(1, MSG_MAX), lossless=st.booleans(),
                max_subs=st.integers(1, 4))
    def make(self, cap, max_message, lossless, max_subs):
        self.cap, self.max_message, self.lossless, self.max_subs = cap, max_message, lossless, max_subs
        self.topic = self.grid.topic("t", capacity=cap, max_message=max_message, lossless=lossless,
                                     max_subscribers=max_subs)
        assert (self.topic.capacity, self.topic.max_message, self.topic.lossless) == (cap, max_message, lossless)

    @property
    def tail(self):
        return len(self.pub)

    def open_subs(self):
        return [s for s in self.subs if s.open]

    def blocked(self):
        return self.lossless and any(self.tail - s.cursor >= self.cap for s in self.open_subs())

    # ---- publishing

    @rule(data=messages, wrap=wrappers, how=st.sampled_from(["timeout0", "short", "wait"]))
    def publish(self, data, wrap, how):
        x = wrap(data)
        if how == "wait" and self.blocked():
            how = "short"  # publish without timeout would wait for good
        call = {
            "timeout0": lambda: self.topic.publish(x, timeout=0),
            "short": lambda: self.topic.publish(x, timeout=0.001),
            "wait": lambda: self.topic.publish(x),
        }[how]
        if len(data) > self.max_message:
            with pytest.raises(ValueTooLarge):
                call()
        elif self.blocked():
            with pytest.raises(Full):
                call()
        else:
            assert call() is None
            self.pub.append(data)

    # ---- subscriptions

    @rule()
    def subscribe(self):
        if len(self.open_subs()) == self.max_subs:
            with pytest.raises(CapacityError):
                self.topic.subscribe()
        else:
            self.subs.append(SubModel(self.topic.subscribe(), self.tail))

    @precondition(lambda self: self.subs)
    @rule(i=which, how=st.sampled_from(["get_nowait", "timeout0", "short", "get"]))
    def get(self, i, how):
        s = self.subs[i % len(self.subs)]
        if how == "get" and s.cursor == self.tail:
            how = "short"
        call = {
            "get_nowait": s.sub.get_nowait,
            "timeout0": lambda: s.sub.get(timeout=0),
            "short": lambda: s.sub.get(timeout=0.001),
            "get": s.sub.get,
        }[how]
        if not s.open:
            with pytest.raises(Closed):
                call()
        elif s.cursor == self.tail:
            with pytest.raises(Empty):
                call()
        elif self.tail - s.cursor > self.cap:
            assert not self.lossless, "a lossless subscriber fell more than capacity behind"
            with pytest.raises(Lapped) as ei:
                call()
            assert ei.value.lost == self.tail - self.cap - s.cursor
            s.cursor = self.tail - self.cap
        else:
            got = call()
            assert type(got) is bytes
            assert got == self.pub[s.cursor]
            s.cursor += 1

    @precondition(lambda self: self.subs)
    @rule(i=which)
    def pending(self, i):
        s = self.subs[i % len(self.subs)]
        if s.open:
            assert s.sub.pending() == self.tail - s.cursor
        else:
            with pytest.raises(Closed):
                s.sub.pending()

    @precondition(lambda self: self.subs)
    @rule(i=which, as_context=st.booleans())
    def close(self, i, as_context):
        s = self.subs[i % len(self.subs)]
        if as_context:
            with s.sub:
                pass
        else:
            s.sub.close()
        s.open = False

    @rule()
    def reopen_topic(self):
        self.topic = self.grid.topic("t")

    # ---- invariants

    @invariant()
    def stats_agree(self):
        if self.topic is None:
            return
        st_ = self.topic.stats()
        cursors = [s.cursor for s in self.open_subs()]
        stats_include(st_, {
            "capacity": self.cap, "max_message": self.max_message, "lossless": self.lossless,
            "max_subscribers": self.max_subs, "published": self.tail, "subscribers": len(cursors),
            "lag": self.tail - min(cursors) if cursors else 0, "skipped": 0, "removed": 0, "waiters": 0,
        })


TestTopicModel = pytest.mark.timeout(120)(TopicModel.TestCase)
TestTopicModel.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---- (2) lossless: everyone gets everything, in one order -----------------------------------

NPUB, NSUB, NPER = 2, 3, 20_000


def _subscriber(topic, total, path, ready):
    sub = topic.subscribe()
    ready.wait(30)  # subscribed before any publisher starts
    got = [sub.get(timeout=30) for _ in range(total)]
    with pytest.raises(Empty):
        sub.get(timeout=0.05)  # nothing more
    sub.close()
    with open(path, "wb") as f:
        f.write(b"".join(got))
    return len(got)


def _publisher(topic, pid, n, ready):
    ready.wait(30)
    pack = PK.pack
    for i in range(n):
        topic.publish(pack(pid, i))
    return n


@pytest.mark.timeout(120)
@pytest.mark.parametrize("capacity", [256, 4])
def test_lossless_every_subscriber_sees_everything_in_one_order(grid, tmp_path, capacity):
    topic = grid.topic("news", capacity=capacity, max_message=PK.size, lossless=True)
    ready = FORK.Barrier(NPUB + NSUB)
    paths = [tmp_path / f"sub{s}" for s in range(NSUB)]
    with Workers() as w:
        for s in range(NSUB):
            w.start(("s", s), _subscriber, topic, NPUB * NPER, paths[s], ready)
        for p in range(NPUB):
            w.start(("p", p), _publisher, topic, p, NPER, ready)
        w.wait([("p", p) for p in range(NPUB)], timeout=90)
        counts = w.wait([("s", s) for s in range(NSUB)], timeout=60)
    assert counts == [NPUB * NPER] * NSUB
    seqs = [list(PK.iter_unpack(path.read_bytes())) for path in paths]
    assert seqs[0] == seqs[1] == seqs[2], "subscribers saw different orders"
    assert sorted(seqs[0]) == [(p, i) for p in range(NPUB) for i in range(NPER)], "a message lost or duplicated"
    last = [-1] * NPUB
    for p, i in seqs[0]:
        assert i == last[p] + 1, f"publisher {p}: message {i} after {last[p]}"
        last[p] = i
    s = topic.stats()
    assert s["published"] == NPUB * NPER
    assert s["subscribers"] == 0 and s["skipped"] == 0 and s["removed"] == 0


# ---- (3) lossy: exact lost counts ----------------------------------------------------------


def lossy_msg(pid, i):
    """Messages of varied length whose body is derived from the header, so a
    torn or mixed-up copy is seen."""
    return PK.pack(pid, i) + bytes([(i * 7 + pid) & 0xFF]) * (i % 57)


LOSSY_MAX = PK.size + 56


def _lossy_subscriber(topic, npub, per, sleep_every, ready):
    """Account for every position: a Lapped skips exactly ``lost`` of them,
    every message is intact, in order per publisher, and (one publisher)
    exactly the next position. Ends when all npub * per are accounted for."""
    sub = topic.subscribe()
    ready.set()
    total = npub * per
    pos = received = lost = laps = 0
    last = [-1] * npub
    while pos < total:
        try:
            msg = sub.get(timeout=10)
        except Lapped as e:
            assert e.lost > 0, "Lapped with nothing lost"
            pos += e.lost
            lost += e.lost
            laps += 1
            continue
        pid, i = PK.unpack_from(msg)
        assert msg == lossy_msg(pid, i), f"torn message {msg!r}"
        assert i > last[pid], f"publisher {pid}: message {i} after {last[pid]}"
        if npub == 1:
            assert i == pos, f"got message {i}, expected {pos} (after {lost} lost in {laps} laps)"
        last[pid] = i
        pos += 1
        received += 1
        if sleep_every and received % sleep_every == 0:
            time.sleep(0.001)
    assert pos == total, f"accounted for {pos} positions, {total} were published"
    with pytest.raises(Empty):
        sub.get_nowait()
    sub.close()
    return received, lost, laps


def _lossy_publisher(topic, pid, per, go, timeout):
    assert go.wait(10)
    for i in range(per):
        topic.publish(lossy_msg(pid, i), timeout=timeout)
    return per


@pytest.mark.timeout(60)
@pytest.mark.parametrize("npub,per", [(1, 100_000), (2, 50_000)])
def test_lossy_lost_counts_are_exact(grid, npub, per):
    cap = 64
    topic = grid.topic("ticks", capacity=cap, max_message=LOSSY_MAX, lossless=False)
    go = FORK.Event()
    with Workers() as w:
        for key, sleep_every in (("slow", 20), ("fast", 0)):
            ready = FORK.Event()
            w.start(key, _lossy_subscriber, topic, npub, per, sleep_every, ready)
            assert ready.wait(10)
        # A lone publisher never waits on a lossy topic: timeout=0 must not
        # raise Full. Several may briefly wait for each other (one preempted
        # between claiming a cell and finishing it), so they may block.
        timeout = 0 if npub == 1 else None
        for p in range(npub):
            w.start(("p", p), _lossy_publisher, topic, p, per, go, timeout)
        go.set()
        w.wait([("p", p) for p in range(npub)], timeout=45)
        (slow_recv, slow_lost, slow_laps), (fast_recv, fast_lost, _) = w.wait(["slow", "fast"], timeout=45)
    assert slow_recv + slow_lost == npub * per
    assert fast_recv + fast_lost == npub * per
    assert slow_lost > 0 and slow_laps > 0, "the slow subscriber was never lapped"
    assert slow_recv >= cap and fast_recv >= cap, "after the last lap it reads all that is retained"
    s = topic.stats()
    assert s["published"] == npub * per and s["skipped"] == 0


def test_lossy_lapped_in_one_process(grid):
    t = grid.topic("lap", capacity=4, max_message=8, lossless=False)
    sub = t.subscribe()
    for i in range(10):
        t.publish(SEQ.pack(i), timeout=0)
    assert sub.pending() == 10
    with pytest.raises(Lapped) as ei:
        sub.get()
    assert ei.value.lost == 6 and "6" in str(ei.value)
    assert [SEQ.unpack(sub.get_nowait())[0] for _ in range(4)] == [6, 7, 8, 9]
    with pytest.raises(Empty):
        sub.get_nowait()
    # exactly capacity behind is not lapped
    for i in range(10, 14):
        t.publish(SEQ.pack(i))
    assert SEQ.unpack(sub.get())[0] == 10


# ---- (4) closing, iteration, limits, timeouts, errors ---------------------------------------


def _blocked_publish(topic, msg):
    t0 = time.monotonic()
    topic.publish(msg)  # no timeout
    return t0, time.monotonic()


@pytest.mark.timeout(30)
def test_closing_subscription_releases_blocked_publisher(grid):
    t = grid.topic("slow", capacity=4, max_message=8, lossless=True)
    sub = t.subscribe()
    for i in range(4):
        t.publish(bytes([i]), timeout=0)
    with pytest.raises(Full):
        t.publish(b"x", timeout=0)
    t0 = time.monotonic()
    with pytest.raises(Full):
        t.publish(b"x", timeout=0.05)
    assert 0.04 <= time.monotonic() - t0 <= 1.0
    with Workers() as w:
        w.start("pub", _blocked_publish, t, b"after")
        wait_for(lambda: t.stats()["waiters"] == 1, what="the publisher to sleep")
        time.sleep(0.1)
        assert t.stats()["published"] == 4
        t_close = time.monotonic()
        sub.close()
        [(p0, p1)] = w.wait(["pub"], timeout=10)
    assert p1 - p0 >= 0.05
    assert 0 <= p1 - t_close < 1.0, f"the blocked publisher took {p1 - t_close:.3f} s to go on"
    assert t.stats()["published"] == 5
    with pytest.raises(Closed):
        sub.get_nowait()
    sub.close()  # idempotent


@pytest.mark.timeout(30)
def test_reading_releases_blocked_publisher(grid):
    t = grid.topic("slow", capacity=2, max_message=8, lossless=True)
    sub = t.subscribe()
    t.publish(b"0")
    t.publish(b"1")
    with Workers() as w:
        w.start("pub", _blocked_publish, t, b"2")
        wait_for(lambda: t.stats()["waiters"] == 1, what="the publisher to sleep")
        assert sub.get() == b"0"
        w.wait(["pub"], timeout=10)
    assert [sub.get_nowait(), sub.get_nowait()] == [b"1", b"2"]


def _subscribe_and_hang(topic, ready):
    sub = topic.subscribe()
    ready.set()
    time.sleep(60)
    sub.close()


@pytest.mark.timeout(30)
def test_dead_subscriber_stops_holding_publishers_back(grid):
    t = grid.topic("dead", capacity=4, max_message=8, lossless=True)
    ready = FORK.Event()
    p = FORK.Process(target=_subscribe_and_hang, args=(t, ready), daemon=True)
    p.start()
    try:
        assert ready.wait(10)
        for i in range(4):
            t.publish(bytes([i]), timeout=0)
        with pytest.raises(Full):
            t.publish(b"x", timeout=0)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        t0 = time.monotonic()
        t.publish(b"x", timeout=2)
        assert time.monotonic() - t0 < 2
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(5)
    s = t.stats()
    assert s["published"] == 5 and s["subscribers"] == 0 and s["removed"] == 1


def _hang_subscribed(topic, ready):
    sub = topic.subscribe()
    ready.set()
    time.sleep(60)
    sub.close()


@pytest.mark.timeout(30)
def test_dead_subscribers_record_is_reused(grid):
    t = grid.topic("reuse", capacity=4, max_message=8, max_subscribers=1)
    ready = FORK.Event()
    p = FORK.Process(target=_hang_subscribed, args=(t, ready), daemon=True)
    p.start()
    try:
        assert ready.wait(10)
        with pytest.raises(CapacityError):
            t.subscribe()
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(5)
    assert t.stats()["subscribers"] == 0
    sub = t.subscribe()  # takes over the dead process's record
    t.publish(b"x", timeout=0)
    assert sub.get_nowait() == b"x"


def _interrupted_sub_get(topic):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sub = topic.subscribe()
    sent = []

    def fire():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(0.3, fire)
    timer.start()
    t0 = time.monotonic()
    try:
        sub.get()
    except KeyboardInterrupt:
        t1 = time.monotonic()
    else:
        return None
    timer.join()
    return t0, t1, sent[0]


@pytest.mark.timeout(30)
def test_keyboard_interrupt_reaches_blocked_subscriber(grid):
    t = grid.topic("intr", capacity=4, max_message=8)
    with Workers() as w:
        w.start("s", _interrupted_sub_get, t)
        [res] = w.wait(["s"], timeout=10)
    assert res is not None, "get() returned without the interrupt"
    t0, t1, sent = res
    assert t1 - t0 >= 0.25
    assert 0 <= t1 - sent < 0.5, f"KeyboardInterrupt took {t1 - sent:.3f} s to reach get()"


def test_iteration(grid):
    t = grid.topic("it", capacity=8, max_message=8)
    sub = t.subscribe()
    for i in range(5):
        t.publish(b"m%d" % i)
    assert list(itertools.islice(sub, 5)) == [b"m%d" % i for i in range(5)]

    # iteration blocks for the next message
    def later():
        time.sleep(0.1)
        t.publish(b"late")
    th = threading.Thread(target=later)
    th.start()
    assert next(iter(sub)) == b"late"
    th.join()


def test_iteration_resumes_after_lapped(grid):
    t = grid.topic("itlap", capacity=2, max_message=8, lossless=False)
    sub = t.subscribe()
    for i in range(5):
        t.publish(b"m%d" % i)
    it = iter(sub)
    with pytest.raises(Lapped) as ei:
        next(it)
    assert ei.value.lost == 3
    assert list(itertools.islice(iter(sub), 2)) == [b"m3", b"m4"]


def test_subscribe_sees_only_later_messages(grid):
    t = grid.topic("later", capacity=8, max_message=8)
    t.publish(b"before")
    sub = t.subscribe()
    assert sub.pending() == 0
    with pytest.raises(Empty):
        sub.get_nowait()
    t.publish(b"after")
    assert sub.pending() == 1
    assert sub.get_nowait() == b"after"


def test_max_subscribers(grid):
    t = grid.topic("few", capacity=4, max_message=8, max_subscribers=2)
    a, b = t.subscribe(), t.subscribe()
    with pytest.raises(CapacityError):
        t.subscribe()
    assert t.stats()["subscribers"] == 2
    a.close()
    c = t.subscribe()
    with pytest.raises(CapacityError):
        t.subscribe()
    t.publish(b"x")
    assert b.get_nowait() == c.get_nowait() == b"x"


@pytest.mark.timeout(30)
def test_empty_on_timeout(grid):
    t = grid.topic("quiet", capacity=4, max_message=8)
    sub = t.subscribe()
    for call in (lambda: sub.get(timeout=0.05),):
        t0 = time.monotonic()
        with pytest.raises(Empty):
            call()
        assert 0.04 <= time.monotonic() - t0 <= 1.0
    for call in (sub.get_nowait, lambda: sub.get(timeout=0)):
        with pytest.raises(queue.Empty):
            call()


def test_no_subscribers_never_blocks_lossless(grid):
    t = grid.topic("nobody", capacity=2, max_message=8, lossless=True)
    for i in range(10):
        t.publish(bytes([i]), timeout=0)
    assert t.stats()["published"] == 10 and t.stats()["lag"] == 0


def test_topic_parameters_and_mismatch(grid):
    t = grid.topic("p", capacity=8, max_message=16, lossless=False, max_subscribers=3)
    assert (t.capacity, t.max_message, t.lossless, t.name) == (8, 16, False, "p")
    assert "lossy" in repr(t)
    for kw in ({"capacity": 16}, {"max_message": 8}, {"lossless": True}, {"max_subscribers": 4}):
        with pytest.raises(ObjectMismatch):
            grid.topic("p", **kw)
    for kw in ({}, {"capacity": 8}, {"lossless": False}, {"capacity": 8, "max_message": 16, "max_subscribers": 3}):
        assert grid.topic("p", **kw).stats()["max_subscribers"] == 3
    d = grid.topic("defaults")
    assert (d.capacity, d.max_message, d.lossless, d.stats()["max_subscribers"]) == (1024, 256, True, 64)
    grid.ring("r")
    with pytest.raises(ObjectMismatch):
        grid.topic("r")
    with pytest.raises(ObjectMismatch):
        grid.ring("p")


@pytest.mark.parametrize("kw", [
    {"capacity": 0}, {"capacity": -1}, {"capacity": True}, {"capacity": "8"},
    {"max_message": 0}, {"max_message": False}, {"max_message": 2**25}, {"max_message": 2**40},
    {"max_subscribers": 0}, {"max_subscribers": 100_000}, {"max_subscribers": 2**40},
    {"lossless": 1}, {"lossless": "yes"}, {"capacity": 2**33}, {"capacity": 2**70},
])
def test_bad_topic_arguments(grid, kw):
    with pytest.raises((TypeError, InvalidArgument)):
        grid.topic("bad", **kw)
    assert grid.objects() == []


def test_message_types_and_sizes(grid):
    t = grid.topic("types", capacity=8, max_message=4)
    sub = t.subscribe()
    for bad in ("str", 1, None):
        with pytest.raises(TypeError):
            t.publish(bad)
    with pytest.raises(ValueTooLarge):
        t.publish(b"12345")
    for x in (bytearray(b"ba"), memoryview(b"mv"), memoryview(b"xyzzy")[1:4], b"", b"1234"):
        t.publish(x)
    assert [sub.get_nowait() for _ in range(5)] == [b"ba", b"mv", b"yzz", b"", b"1234"]
    assert t.stats()["published"] == 5


def test_use_after_grid_close_raises_closed(grid_name):
    g = shmgrid.Grid.create(grid_name, size="1MiB")
    t = g.topic("t", capacity=4, max_message=8)
    sub = t.subscribe()
    t.publish(b"x")
    g.close()
    for call in (lambda: t.publish(b"y"), lambda: t.publish(b"y", timeout=0), t.subscribe, t.stats,
                 sub.get, sub.get_nowait, lambda: sub.get(timeout=0.01), lambda: g.topic("t")):
        with pytest.raises(Closed):
            call()
    sub.close()  # no crash, idempotent
    sub.close()
    with pytest.raises(Closed):
        sub.get_nowait()


def test_pending_after_grid_close_raises_closed(grid_name):
    """Objects taken from a closed grid raise Closed (Grid's lifecycle
    contract), pending() included: it must not answer 0 as if all was read."""
    g = shmgrid.Grid.create(grid_name, size="1MiB")
    t = g.topic("t", capacity=4, max_message=8)
    sub = t.subscribe()
    t.publish(b"x")
    assert sub.pending() == 1
    g.close()
    with pytest.raises(Closed):
        sub.pending()


@pytest.mark.timeout(30)
def test_second_thread_on_a_subscription_is_refused(grid):
    t = grid.topic("busy", capacity=8)
    sub = t.subscribe()
    entered = threading.Event()
    out = []

    def reader():
        entered.set()
        out.append(sub.get(timeout=5))

    th = threading.Thread(target=reader)
    th.start()
    entered.wait()
    time.sleep(0.05)  # the reader is asleep inside get()
    with pytest.raises(shmgrid.Busy, match="another thread"):
        sub.get_nowait()
    with pytest.raises(shmgrid.Busy):
        sub.pending()
    t.publish(b"one")
    th.join(5)
    assert out == [b"one"] and sub.pending() == 0


@pytest.mark.timeout(30)
def test_close_from_another_thread_ends_a_blocked_get(grid):
    t = grid.topic("closer", capacity=8)
    sub = t.subscribe()
    caught = []

    def reader():
        try:
            for _ in sub:
                pass
        except Exception as e:  # noqa: BLE001 - the test looks at what arrived
            caught.append((type(e), time.monotonic()))

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.15)
    t0 = time.monotonic()
    sub.close()  # waits for the reader's slice, never frees the handle under it
    th.join(5)
    assert not th.is_alive() and caught and caught[0][0] is Closed
    assert caught[0][1] - t0 < 0.5
    assert t.stats()["subscribers"] == 0
    with pytest.raises(Closed):
        sub.get_nowait()


# ---- zero-copy reads -------------------------------------------------------------


def test_subscription_get_into_and_get_view(grid):
    t = grid.topic("zc", capacity=4, max_message=16)
    s = t.subscribe()
    t.publish(b"one")
    t.publish(b"two!")
    t.publish(b"three")
    buf = bytearray(16)
    assert s.get_into(buf) == 3 and buf[:3] == b"one"
    v = s.get_view()
    assert v == b"two!" and v.readonly
    assert s.get() == b"three"
    assert bytes(v) == b"thre"  # the subscription's buffer, overwritten by the next read
    with pytest.raises(Empty):
        s.get_into(buf, timeout=0.02)
    s.close()
    with pytest.raises(Closed):
        s.get_into(buf)


def test_subscription_get_into_too_small_keeps_the_message(grid):
    t = grid.topic("zc", capacity=4, max_message=16)
    s = t.subscribe()
    t.publish(b"kept")
    with pytest.raises(InvalidArgument, match="max_message"):
        s.get_into(bytearray(8))
    with pytest.raises(TypeError):
        s.get_into(bytes(16))
    assert s.pending() == 1 and s.get_nowait() == b"kept"
    s.close()


def test_subscription_get_into_reports_lapped(grid):
    t = grid.topic("zc", capacity=2, max_message=8, lossless=False)
    s = t.subscribe()
    for i in range(5):
        t.publish(bytes([i]))
    buf = bytearray(8)
    with pytest.raises(Lapped) as e:
        s.get_into(buf)
    assert e.value.lost == 3
    assert [s.get_into(buf) and buf[0] for _ in range(2)] == [3, 4]
    s.close()
