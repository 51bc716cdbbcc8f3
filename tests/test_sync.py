"""Functional tests of Counter (atomic int64) and Lock (robust inter-process
mutex): exact totals and one winner per race across processes, overflow,
mutual exclusion, timeouts, ownership errors, and recovery from holders that
died (SIGKILLed processes, exited threads).

Workers are forked processes; every wait has a timeout, and a stuck or dead
worker is killed and fails the test instead of hanging it.
"""
from __future__ import annotations

import os
import signal
import struct
import threading
import time

import pytest
from workers import FORK, Workers, run_all, stats_include, wait_for

import shmgrid
from shmgrid import Closed, Deadlock, IntegerOverflow, InvalidArgument, LockNotHeld, LockOwnerDied, ObjectMismatch

NPROC = 4
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def i64(n: int) -> bytes:
    return struct.pack("<q", n)


def un64(b: bytes) -> int:
    return struct.unpack("<q", b)[0]


# ---- Counter --------------------------------------------------------------------------------


def _adder(start, c, n):
    start.wait(30)
    out = [c.add(1) for _ in range(n)]
    return out[0], out[-1], all(a < b for a, b in zip(out, out[1:])), sum(out)


@pytest.mark.timeout(60)
def test_counter_add_exact_total(grid):
    n = 50_000
    c = grid.counter("hits")
    res = run_all(_adder, [(c, n)] * NPROC)
    assert c.get() == NPROC * n
    # each process saw its own adds in increasing order
    assert all(increasing for _, _, increasing, _ in res)
    # add returned every value 1..total exactly once (sum check plus bounds)
    total = NPROC * n
    assert sum(s for *_, s in res) == total * (total + 1) // 2
    assert min(first for first, *_ in res) >= 1 and max(last for _, last, *_ in res) == total


def _cas_rounds(start, c, rounds):
    """Round r: wait until the counter reaches r, then race CAS r -> r + 1."""
    start.wait(30)
    won = []
    for r in range(rounds):
        while c.get() < r:
            os.sched_yield()
        if c.compare_and_set(r, r + 1):
            won.append(r)
    return won


@pytest.mark.timeout(60)
def test_counter_compare_and_set_one_winner_per_round(grid):
    rounds = 2_000
    c = grid.counter("race")
    wins = run_all(_cas_rounds, [(c, rounds)] * NPROC)
    assert c.get() == rounds
    everyone = sorted(r for w in wins for r in w)
    assert everyone == list(range(rounds)), "a round had no winner or two winners"


def _cas_increments(start, c, n):
    start.wait(30)
    retries = 0
    for _ in range(n):
        while True:
            v = c.get()
            if c.compare_and_set(v, v + 1):
                break
            retries += 1
    return retries


@pytest.mark.timeout(60)
def test_counter_compare_and_set_loop_exact(grid):
    n = 10_000
    c = grid.counter("casloop")
    run_all(_cas_increments, [(c, n)] * NPROC)
    assert c.get() == NPROC * n


def test_counter_basics(grid):
    c = grid.counter("c")
    assert c.get() == 0 and c.name == "c" and "c" in repr(c)
    assert c.add() == 1
    assert c.add(41) == 42
    assert c.add(-50) == -8
    assert c.add(0) == -8
    c.set(7)
    assert c.get() == 7
    assert c.compare_and_set(7, 9) is True
    assert c.compare_and_set(7, 10) is False
    assert c.get() == 9
    # another handle on the same name sees the same word
    c2 = grid.counter("c")
    assert c2.get() == 9
    c2.add(1)
    assert c.get() == 10
    assert grid.counter("other").get() == 0


def test_counter_overflow_leaves_the_value(grid):
    c = grid.counter("big")
    c.set(I64_MAX)
    with pytest.raises(IntegerOverflow):
        c.add(1)
    assert c.get() == I64_MAX
    with pytest.raises(OverflowError):  # IntegerOverflow is an OverflowError
        c.add(I64_MAX)
    assert c.get() == I64_MAX
    assert c.add(-1) == I64_MAX - 1
    c.set(I64_MIN)
    with pytest.raises(IntegerOverflow):
        c.add(-1)
    assert c.get() == I64_MIN
    assert c.add(I64_MAX) == -1
    c.set(I64_MIN + 5)
    with pytest.raises(IntegerOverflow):
        c.add(I64_MIN)
    assert c.get() == I64_MIN + 5
    assert c.compare_and_set(I64_MIN + 5, I64_MAX)
    assert c.get() == I64_MAX


@pytest.mark.parametrize("bad", [2**63, -(2**63) - 1, 2**100])
def test_counter_out_of_int64_arguments(grid, bad):
    c = grid.counter("c")
    c.set(3)
    for call in (lambda: c.add(bad), lambda: c.set(bad), lambda: c.compare_and_set(3, bad),
                 lambda: c.compare_and_set(bad, 4)):
        with pytest.raises(InvalidArgument):
            call()
    assert c.get() == 3


@pytest.mark.parametrize("bad", [1.0, "1", None, True, b"1"])
def test_counter_non_int_arguments(grid, bad):
    c = grid.counter("c")
    for call in (lambda: c.add(bad), lambda: c.set(bad), lambda: c.compare_and_set(0, bad),
                 lambda: c.compare_and_set(bad, 1)):
        with pytest.raises(TypeError):
            call()
    assert c.get() == 0


def test_counter_and_lock_kinds(grid):
    grid.counter("c")
    grid.lock("l")
    grid.map("m", capacity=16)
    for opener, name in ((grid.lock, "c"), (grid.counter, "l"), (grid.counter, "m"), (grid.lock, "m"),
                         (grid.ring, "c"), (grid.map, "l")):
        with pytest.raises(ObjectMismatch):
            opener(name)


def test_use_after_grid_close(grid_name):
    g = shmgrid.Grid.create(grid_name, size="1MiB")
    c, lk = g.counter("c"), g.lock("l")
    c.add(5)
    g.close()
    for call in (c.get, c.add, lambda: c.set(1), lambda: c.compare_and_set(5, 6), lk.acquire,
                 lambda: lk.acquire(timeout=0), lk.release, lk.stats, lk.locked, lambda: g.counter("c"),
                 lambda: g.lock("l")):
        with pytest.raises(Closed):
            call()


# ---- Lock: mutual exclusion -------------------------------------------------------------------


def _locked_increments(start, lock, m, inside, n):
    start.wait(30)
    for _ in range(n):
        with lock:
            assert inside.add(1) == 1, "two holders at once"
            v = un64(m.get(b"k"))  # a read-modify-write that only the lock makes safe
            m.put(b"k", i64(v + 1))
            assert inside.add(-1) == 0, "two holders at once"
        assert lock.owner_died is False
    return n


@pytest.mark.timeout(60)
def test_lock_mutual_exclusion_across_processes(grid):
    n = 2_000
    lock, inside = grid.lock("mx"), grid.counter("inside")
    m = grid.map("m", capacity=16, max_key=8, max_value=8)
    m.put(b"k", i64(0))
    run_all(_locked_increments, [(lock, m, inside, n)] * NPROC)
    assert un64(m.get(b"k")) == NPROC * n
    s = lock.stats()
    assert s["owner_tid"] == 0 and s["owner_deaths"] == 0 and s["waiters"] == 0
    assert s["acquisitions"] == NPROC * n


@pytest.mark.timeout(60)
def test_lock_mutual_exclusion_across_threads(grid):
    n, nthreads = 2_000, 4
    lock = grid.lock("threads")
    box = {"v": 0, "inside": 0}
    errors = []

    def work():
        try:
            for _ in range(n):
                with lock:
                    box["inside"] += 1
                    assert box["inside"] == 1
                    v = box["v"]
                    time.sleep(0) if v % 97 == 0 else None  # let other threads run inside
                    box["v"] = v + 1
                    box["inside"] -= 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not errors, errors
    assert box["v"] == n * nthreads
    assert not lock.locked()


# ---- Lock: timeouts and ownership --------------------------------------------------------------


def _hold_until(start, lock, held, release):
    start.wait(30)
    lock.acquire()
    held.set()
    assert release.wait(30)
    lock.release()
    return threading.get_native_id()


@pytest.mark.timeout(30)
def test_lock_timeout_when_held_by_another_process(grid):
    lock = grid.lock("held")
    held, release = FORK.Event(), FORK.Event()
    start = FORK.Barrier(1)
    with Workers() as w:
        p = w.start("h", _hold_until, start, lock, held, release)
        assert held.wait(10)
        t0 = time.monotonic()
        assert lock.acquire(timeout=0.05) is False
        assert 0.04 <= time.monotonic() - t0 <= 1.0
        t0 = time.monotonic()
        assert lock.acquire(timeout=0) is False
        assert time.monotonic() - t0 < 0.5
        s = lock.stats()
        assert s["owner_tid"] == p.pid and s["owner_alive"] is True
        assert lock.locked()
        with pytest.raises(LockNotHeld):
            lock.release()  # held by the other process
        assert lock.stats()["owner_tid"] == p.pid, "a refused release changed the owner"
        release.set()
        assert lock.acquire(timeout=10) is True
        assert lock.owner_died is False
        [tid] = w.wait(["h"], timeout=10)
    assert tid == p.pid
    assert lock.stats()["owner_tid"] == threading.get_native_id()
    lock.release()


def test_lock_deadlock_on_reacquire(grid):
    lock = grid.lock("re")
    assert lock.acquire() is True
    for call in (lock.acquire, lambda: lock.acquire(timeout=0), lambda: lock.acquire(timeout=1)):
        t0 = time.monotonic()
        with pytest.raises(Deadlock):
            call()
        assert time.monotonic() - t0 < 0.5, "Deadlock should be raised at once, not after waiting"
    with pytest.raises(RuntimeError), lock:  # Deadlock is a RuntimeError
        pass
    # still held, once
    assert lock.stats()["owner_tid"] == threading.get_native_id()
    lock.release()
    assert not lock.locked()
    with pytest.raises(LockNotHeld):
        lock.release()


def test_lock_release_when_not_held(grid):
    lock = grid.lock("nh")
    with pytest.raises(LockNotHeld):
        lock.release()
    with pytest.raises(RuntimeError):  # LockNotHeld is a RuntimeError
        lock.release()
    # held by another thread of this process
    held, done = threading.Event(), threading.Event()

    def holder():
        lock.acquire()
        held.set()
        done.wait(10)
        lock.release()

    th = threading.Thread(target=holder)
    th.start()
    try:
        assert held.wait(10)
        with pytest.raises(LockNotHeld):
            lock.release()
        assert lock.stats()["owner_tid"] == th.native_id
        assert lock.acquire(timeout=0.01) is False
    finally:
        done.set()
        th.join(10)
    assert lock.acquire(timeout=5) is True and lock.owner_died is False
    lock.release()


def test_lock_stats_and_context_manager(grid):
    lock = grid.lock("st")
    stats_include(lock.stats(), {"owner_tid": 0, "owner_alive": False, "acquisitions": 0, "owner_deaths": 0,
                                  "waiters": 0})
    assert not lock.locked() and lock.name == "st" and "st" in repr(lock)
    with lock as got:
        assert got is lock
        s = lock.stats()
        assert s["owner_tid"] == threading.get_native_id() and s["owner_alive"] is True
        assert s["acquisitions"] == 1
        assert lock.locked()
        assert grid.lock("st").locked()  # another handle, same lock
    assert lock.stats()["owner_tid"] == 0
    assert lock.acquire(timeout=0) is True
    lock.release()
    assert lock.stats()["acquisitions"] == 2
    with pytest.raises(ValueError), lock:
        raise ValueError("released on the way out")
    assert not lock.locked()


def _wait_for_lock(start, lock, got):
    start.wait(30)
    t0 = time.monotonic()
    lock.acquire()
    got.set()
    t1 = time.monotonic()
    lock.release()
    return t0, t1, lock.owner_died


@pytest.mark.timeout(30)
def test_lock_waiter_in_another_process_wakes_on_release(grid):
    lock = grid.lock("wake")
    lock.acquire()
    got = FORK.Event()
    with Workers() as w:
        w.start("w", _wait_for_lock, FORK.Barrier(1), lock, got)
        wait_for(lambda: lock.stats()["waiters"] == 1, what="the waiter to sleep")
        time.sleep(0.1)
        assert not got.is_set()
        t_rel = time.monotonic()
        lock.release()
        [(t0, t1, died)] = w.wait(["w"], timeout=10)
    assert t1 - t0 >= 0.1
    assert 0 <= t1 - t_rel < 1.0, f"the waiter took {t1 - t_rel:.3f} s to get the released lock"
    assert died is False
    assert lock.stats()["waiters"] == 0


# ---- Lock: dead holders -------------------------------------------------------------------------


def _hold_forever(lock, held):
    lock.acquire()
    held.set()
    time.sleep(60)


def _start_holder(lock):
    held = FORK.Event()
    p = FORK.Process(target=_hold_forever, args=(lock, held), daemon=True)
    p.start()
    assert held.wait(10), "the holder never got the lock"
    return p


def _kill(p):
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
    p.join(10)


@pytest.mark.timeout(30)
def test_lock_of_killed_process_goes_to_next_acquirer(grid):
    lock = grid.lock("robust")
    p = _start_holder(lock)
    try:
        assert lock.stats()["owner_tid"] == p.pid
        assert lock.acquire(timeout=0) is False  # alive: not taken over
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert lock.stats()["owner_alive"] is False
        assert lock.acquire(timeout=5) is True
        assert lock.owner_died is True
        s = lock.stats()
        assert s["owner_tid"] == threading.get_native_id() and s["owner_deaths"] == 1
        lock.release()
        assert lock.acquire(timeout=5) is True
        assert lock.owner_died is False, "owner_died must describe the last acquire only"
        lock.release()
    finally:
        _kill(p)


@pytest.mark.timeout(30)
def test_lock_of_killed_process_raise_if_owner_died(grid):
    lock = grid.lock("robust")
    p = _start_holder(lock)
    try:
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        with pytest.raises(LockOwnerDied):
            lock.acquire(timeout=5, raise_if_owner_died=True)
        # raised WITH the lock held
        assert lock.owner_died is True
        assert lock.stats()["owner_tid"] == threading.get_native_id()
        with pytest.raises(Deadlock):
            lock.acquire(timeout=0)
        lock.release()
        assert lock.acquire(timeout=0, raise_if_owner_died=True) is True
        lock.release()
    finally:
        _kill(p)


@pytest.mark.timeout(30)
def test_blocked_waiter_gets_lock_when_holder_is_killed(grid):
    """The holder is killed while we wait (and left a zombie: not reaped
    until afterwards); the waiter gets the lock within a bounded time."""
    lock = grid.lock("robust")
    p = _start_holder(lock)
    killed = []

    def kill_later():
        killed.append(time.monotonic())
        os.kill(p.pid, signal.SIGKILL)

    timer = threading.Timer(0.3, kill_later)
    try:
        t0 = time.monotonic()
        timer.start()
        assert lock.acquire(timeout=10) is True
        t1 = time.monotonic()
        timer.join()
        assert lock.owner_died is True
        assert t1 - t0 >= 0.25, "acquired before the holder was killed"
        assert t1 - killed[0] < 2.0, f"took {t1 - killed[0]:.3f} s after the kill"
        lock.release()
    finally:
        timer.cancel()
        _kill(p)
    assert lock.stats()["owner_deaths"] == 1


def _killed_holder_waiter(start, lock):
    start.wait(30)
    t0 = time.monotonic()
    ok = lock.acquire(timeout=20)
    t1 = time.monotonic()
    died = lock.owner_died
    lock.release()
    return ok, died, t0, t1


@pytest.mark.timeout(30)
def test_waiter_process_gets_lock_when_holder_process_is_killed(grid):
    lock = grid.lock("robust")
    p = _start_holder(lock)
    try:
        with Workers() as w:
            w.start("w", _killed_holder_waiter, FORK.Barrier(1), lock)
            wait_for(lambda: lock.stats()["waiters"] == 1, what="the waiter to sleep")
            time.sleep(0.1)
            t_kill = time.monotonic()
            os.kill(p.pid, signal.SIGKILL)
            [(ok, died, t0, t1)] = w.wait(["w"], timeout=15)
    finally:
        _kill(p)
    assert ok is True and died is True
    assert t1 - t0 >= 0.1, "acquired before the holder was killed"
    assert 0 <= t1 - t_kill < 2.0, f"took {t1 - t_kill:.3f} s after the kill"


@pytest.mark.timeout(30)
def test_thread_exiting_while_holding(grid):
    lock = grid.lock("thread")
    tids = []

    def grab():
        lock.acquire()
        tids.append(threading.get_native_id())

    th = threading.Thread(target=grab)
    th.start()
    th.join(10)
    assert lock.stats()["owner_tid"] == tids[0]
    wait_for(lambda: lock.stats()["owner_alive"] is False, what="the exited thread to be seen dead")
    assert lock.acquire(timeout=2) is True
    assert lock.owner_died is True
    s = lock.stats()
    assert s["owner_tid"] == threading.get_native_id() and s["owner_deaths"] == 1
    lock.release()
    assert lock.acquire(timeout=2) is True and lock.owner_died is False
    lock.release()


@pytest.mark.timeout(30)
def test_thread_exiting_while_holding_waiter_thread_blocked(grid):
    """A thread waits (blocked) while another thread holds the lock and exits."""
    lock = grid.lock("thread2")
    go = threading.Event()
    res = {}

    def holder():
        lock.acquire()
        go.set()
        time.sleep(0.3)  # then exits holding it

    def waiter():
        go.wait(10)
        res["ok"] = lock.acquire(timeout=10)
        res["died"] = lock.owner_died
        res["t"] = time.monotonic()
        lock.release()

    h, w = threading.Thread(target=holder), threading.Thread(target=waiter)
    h.start()
    w.start()
    h.join(10)
    t_exit = time.monotonic()
    w.join(10)
    assert res.get("ok") is True and res["died"] is True
    assert res["t"] - t_exit < 2.0


def _interrupted_acquire(start, lock, timeout):
    start.wait(30)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sent = []

    def fire():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(0.3, fire)
    timer.start()
    t0 = time.monotonic()
    try:
        lock.acquire(timeout=timeout)
    except KeyboardInterrupt:
        t1 = time.monotonic()
    else:
        return None
    timer.join()
    # the interrupted acquire took nothing: the parent still holds the lock
    return t0, t1, sent[0], lock.stats()["owner_tid"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeout", [None, 30.0])
def test_keyboard_interrupt_reaches_blocked_acquire(grid, timeout):
    lock = grid.lock("intr")
    lock.acquire()
    try:
        [res] = run_all(_interrupted_acquire, [(lock, timeout)], timeout=10)
    finally:
        lock.release()
    assert res is not None, "acquire() returned without the interrupt"
    t0, t1, sent, owner = res
    assert t1 - t0 >= 0.25
    assert 0 <= t1 - sent < 0.5, f"KeyboardInterrupt took {t1 - sent:.3f} s to reach acquire()"
    assert owner == threading.get_native_id()
