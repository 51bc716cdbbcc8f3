"""asyncio awaitables: many awaiters in one loop wake correctly, every
message is delivered exactly once, cancellation leaves nothing behind
(nothing taken, nothing registered, no lock held), timeouts, close while
awaited, fork, and the waiter thread's limits (more than futex_waitv's 128
words, no futex_waitv at all)."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import pytest
from workers import FORK, Workers, wait_for

import shmgrid
from shmgrid import Closed, Empty, Full, InvalidArgument, Lapped
from shmgrid import _async


def run(coro, timeout=60):
    """Run coro in a fresh loop, with a watchdog inside the loop too."""
    async def guarded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(guarded())


def registrations():
    return _async.waiter().registrations()


async def until_registered(n, timeout=20.0):
    """Let the loop run until n awaits are asleep in the waiter thread."""
    deadline = time.monotonic() + timeout
    while registrations() < n:
        assert time.monotonic() < deadline, f"{registrations()} of {n} awaits registered"
        await asyncio.sleep(0.005)
    assert registrations() == n


def waiter_threads():
    return [t for t in threading.enumerate() if t.name == "shmgrid-async-waiter"]


@pytest.fixture(autouse=True)
def _nothing_left_registered():
    yield
    assert registrations() == 0, "an await left a registration in the waiter thread"


# a killed lock holder or producer wakes nobody: only a probe finds it
_NEEDS_PROBES = {"test_acquire_async_recovers_a_killed_holder",
                 "test_awaiters_behind_a_dead_producers_cell_all_get_through"}


@pytest.fixture(autouse=True)
def _wake_ups_only(request, monkeypatch):
    """No probes (see shmgrid/_async.py) unless a test asks for them: a
    test then hangs, rather than passes slowly, if a wake-up is lost."""
    if request.node.name not in _NEEDS_PROBES:
        monkeypatch.setattr(_async, "SLICE", 3600.0)
        monkeypatch.setattr(_async, "LOCK_SLICE", 3600.0)


# ---- workers (forked) --------------------------------------------------------


def _produce(name, ring, lo, hi, pause):
    g = shmgrid.Grid.attach(name)
    r = g.ring(ring)
    for i in range(lo, hi):
        r.put(i.to_bytes(4, "little"), timeout=30)
        if pause and i % 7 == 0:
            time.sleep(pause)
    g.close()
    return hi - lo


def _consume(name, ring, n):
    g = shmgrid.Grid.attach(name)
    r = g.ring(ring)
    out = [r.get(timeout=30) for _ in range(n)]
    g.close()
    return out


def _publish(name, topic, n):
    g = shmgrid.Grid.attach(name)
    t = g.topic(topic)
    for i in range(n):
        t.publish(i.to_bytes(4, "little"), timeout=30)
    g.close()
    return n


def _write_map(name, m, n):
    g = shmgrid.Grid.attach(name)
    mp = g.map(m)
    for i in range(n):
        mp[f"k{i}"] = b"v"
    g.close()
    return n


def _hold_lock(name, lock, ready, hold):
    g = shmgrid.Grid.attach(name)
    lk = g.lock(lock)
    lk.acquire()
    ready.set()
    time.sleep(hold)
    lk.release()
    g.close()
    return True


def _async_lock_increments(name, tasks, rounds):
    g = shmgrid.Grid.attach(name)
    lk, c = g.lock("L"), g.counter("C")

    async def worker():
        for _ in range(rounds):
            async with lk:
                v = c.get()
                await asyncio.sleep(0)  # let the other tasks (and processes) run inside
                c.set(v + 1)

    async def main():
        await asyncio.gather(*(worker() for _ in range(tasks)))

    asyncio.run(main())
    g.close()
    return tasks * rounds


# ---- rings -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_200_getters_on_one_ring_each_message_once(grid, grid_name):
    r = grid.ring("r", slots=16, slot_size=8)
    n_getters, per_producer = 200, 100

    async def main():
        getters = [asyncio.create_task(r.get_async(timeout=60)) for _ in range(n_getters)]
        await until_registered(n_getters)  # all asleep, on one word
        assert len(waiter_threads()) == 1
        with Workers() as w:
            w.start("a", _produce, grid_name, "r", 0, per_producer, 0.001)
            w.start("b", _produce, grid_name, "r", per_producer, 2 * per_producer, 0.001)
            got = await asyncio.gather(*getters)
            while True:  # let the producers finish (they waited on a full ring too)
                if all(p.exitcode is not None for p in w.procs.values()):
                    break
                await asyncio.sleep(0.01)
            w.wait(["a", "b"])
        return got

    got = run(main())
    assert sorted(int.from_bytes(m, "little") for m in got) == list(range(2 * per_producer))
    assert len(r) == 0


def test_get_async_returns_at_once_when_a_message_is_there(grid):
    r = grid.ring("r", slots=4, slot_size=8)
    r.put(b"x")
    assert run(r.get_async()) == b"x"
    assert not waiter_threads() or registrations() == 0


def test_get_async_timeout_and_bad_timeouts(grid):
    r = grid.ring("r", slots=4, slot_size=8)

    async def main():
        t0 = time.monotonic()
        with pytest.raises(Empty):
            await r.get_async(timeout=0.1)
        assert time.monotonic() - t0 >= 0.09
        with pytest.raises(Empty):
            await r.get_async(timeout=0)
        with pytest.raises(InvalidArgument):
            await r.get_async(timeout=-1)
        with pytest.raises(TypeError):
            await r.get_async(timeout="1")

    run(main())


def test_put_async_on_full_ring_waits_for_room(grid, grid_name):
    r = grid.ring("r", slots=4, slot_size=8)
    for i in range(4):
        r.put(bytes([i]))

    async def main():
        puts = [asyncio.create_task(r.put_async(bytes([10 + i]), timeout=30)) for i in range(20)]
        await asyncio.sleep(0.05)
        assert not any(p.done() for p in puts)
        with Workers() as w:
            w.start("c", _consume, grid_name, "r", 24)
            await asyncio.gather(*puts)
            while w.procs["c"].exitcode is None:
                await asyncio.sleep(0.01)
            return w.wait(["c"])[0]

    got = run(main())
    assert got[:4] == [bytes([i]) for i in range(4)]
    assert sorted(got[4:]) == [bytes([10 + i]) for i in range(20)]


def test_put_async_timeout_enqueues_nothing(grid):
    r = grid.ring("r", slots=2, slot_size=8)
    r.put(b"a")
    r.put(b"b")

    async def main():
        with pytest.raises(Full):
            await r.put_async(b"c", timeout=0.05)
        with pytest.raises(shmgrid.ValueTooLarge):
            await r.put_async(b"x" * 9)

    run(main())
    assert [r.get_nowait(), r.get_nowait()] == [b"a", b"b"]
    with pytest.raises(Empty):
        r.get_nowait()


@pytest.mark.timeout(120)
def test_cancelled_getters_take_nothing(grid):
    """Cancel getters at random moments while a producer thread feeds the
    ring: every message is either returned by a getter that completed or
    still in the ring; none is lost, none is doubled."""
    r = grid.ring("r", slots=8, slot_size=8)
    n = 400
    rng = random.Random(7)

    def produce():
        for i in range(n):
            r.put(i.to_bytes(4, "little"), timeout=30)
            if i % 13 == 0:
                time.sleep(0.0005)

    async def main():
        got, cancelled = [], 0
        t = threading.Thread(target=produce)
        t.start()
        live = [asyncio.create_task(r.get_async(timeout=30)) for _ in range(50)]
        while t.is_alive() or live:
            await asyncio.sleep(rng.random() * 0.002)
            for task in rng.sample(live, min(len(live), 3)):
                task.cancel()
            done = [x for x in live if x.done()]
            live = [x for x in live if not x.done()]
            for x in done:
                if x.cancelled():
                    cancelled += 1
                else:
                    got.append(x.result())
            if t.is_alive():
                live += [asyncio.create_task(r.get_async(timeout=30)) for _ in range(len(done))]
            elif len(r) == 0 and not live:
                break
            elif len(r) == 0:
                for x in live:
                    x.cancel()
        await asyncio.gather(*live, return_exceptions=True)
        t.join()
        return got, cancelled

    got, cancelled = run(main())
    assert cancelled > 0
    rest = []
    while True:
        try:
            rest.append(r.get_nowait())
        except Empty:
            break
    assert sorted(int.from_bytes(m, "little") for m in got + rest) == list(range(n))


def test_cancelled_put_async_enqueues_nothing(grid):
    r = grid.ring("r", slots=2, slot_size=8)
    r.put(b"a")
    r.put(b"b")

    async def main():
        puts = [asyncio.create_task(r.put_async(b"c%d" % i)) for i in range(10)]
        await asyncio.sleep(0.02)
        for p in puts:
            p.cancel()
        res = await asyncio.gather(*puts, return_exceptions=True)
        assert all(isinstance(x, asyncio.CancelledError) for x in res)

    run(main())
    assert [r.get_nowait(), r.get_nowait()] == [b"a", b"b"]
    with pytest.raises(Empty):
        r.get_nowait()


def test_closing_the_grid_ends_awaits_with_closed(grid_name):
    g = shmgrid.Grid.create(grid_name, size="16MiB")
    r = g.ring("r", slots=4, slot_size=8)
    lk = g.lock("l")
    released = []

    def hold():  # (an assertion failing in a thread would only warn: record, check after join)
        lk.acquire()
        time.sleep(0.3)
        try:
            lk.release()  # the grid is gone by then
            released.append("released")
        except Closed:
            released.append("Closed")

    holder = threading.Thread(target=hold)

    async def main():
        holder.start()
        await asyncio.sleep(0.02)
        tasks = [asyncio.create_task(r.get_async()) for _ in range(5)]
        tasks.append(asyncio.create_task(lk.acquire_async()))
        await asyncio.sleep(0.05)
        g.close()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(x, Closed) for x in res), res
        with pytest.raises(Closed):
            await r.get_async()

    run(main())
    holder.join()
    assert released == ["Closed"]


def test_a_blocking_acquire_in_the_loop_thread_while_a_task_holds_the_lock_is_deadlock(grid):
    """README: the lock belongs to the loop's thread, so a blocking acquire
    there while a task of the loop holds it would wait on itself."""
    lk = grid.lock("l")

    async def main():
        assert await lk.acquire_async()
        with pytest.raises(shmgrid.Deadlock):
            lk.acquire(timeout=0)
        lk.release()

    run(main())
    assert lk.acquire(timeout=0)
    lk.release()


# ---- waiter thread limits ------------------------------------------------------


@pytest.mark.timeout(120)
def test_more_distinct_words_than_futex_waitv_takes(grid):
    rings = [grid.ring(f"r{i}", slots=2, slot_size=8) for i in range(_async.WAITV_MAX + 30)]

    async def main():
        tasks = [asyncio.create_task(r.get_async(timeout=30)) for r in rings]
        await until_registered(len(rings))
        order = list(range(len(rings)))
        random.Random(3).shuffle(order)
        threading.Thread(target=lambda: [rings[i].put(b"%d" % i) for i in order]).start()
        return await asyncio.gather(*tasks)

    assert run(main()) == [b"%d" % i for i in range(len(rings))]


def test_without_futex_waitv_words_are_polled(grid, monkeypatch):
    monkeypatch.setattr(_async.waiter(), "waitv", False)
    r = grid.ring("r", slots=8, slot_size=8)

    async def main():
        tasks = [asyncio.create_task(r.get_async(timeout=10)) for _ in range(5)]
        await asyncio.sleep(0.02)
        for i in range(5):
            r.put(bytes([i]))
        return await asyncio.gather(*tasks)

    assert sorted(run(main())) == [bytes([i]) for i in range(5)]


def test_waiter_thread_leaves_when_idle(grid, monkeypatch):
    monkeypatch.setattr(_async, "IDLE_EXIT", 0.05)
    r = grid.ring("r", slots=4, slot_size=8)

    async def main():
        with pytest.raises(Empty):
            await r.get_async(timeout=0.02)

    run(main())
    wait_for(lambda: not waiter_threads(), timeout=5, what="the idle waiter thread to leave")
    r.put(b"x")
    assert run(r.get_async(timeout=1)) == b"x"


def _child_loop(name):
    g = shmgrid.Grid.attach(name)
    r = g.ring("rc")

    async def main():
        threading.Thread(target=lambda: (time.sleep(0.05), r.put(b"from-child-thread"))).start()
        return await r.get_async(timeout=10)

    out = asyncio.run(main())
    n = registrations()
    g.close()
    return out, n


def test_fork_child_gets_its_own_waiter(grid, grid_name):
    r = grid.ring("r", slots=4, slot_size=32)
    grid.ring("rc", slots=4, slot_size=32)

    async def main():
        task = asyncio.create_task(r.get_async(timeout=30))  # the parent's thread sleeps on r at the fork
        await asyncio.sleep(0.02)
        with Workers() as w:
            w.start("child", _child_loop, grid_name)
            while w.procs["child"].exitcode is None:
                await asyncio.sleep(0.01)
            res = w.wait(["child"])[0]
        r.put(b"parent")
        return res, await task

    (child_got, child_regs), parent_got = run(main())
    assert child_got == b"from-child-thread" and child_regs == 0
    assert parent_got == b"parent"


# ---- topics --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_several_subscriptions_each_see_every_message(grid, grid_name):
    t = grid.topic("t", capacity=8, max_message=8)
    subs = [t.subscribe() for _ in range(6)]
    n = 200

    async def reader(s):
        return [await s.get_async(timeout=30) for _ in range(n)]

    async def main():
        tasks = [asyncio.create_task(reader(s)) for s in subs]
        await asyncio.sleep(0.02)
        with Workers() as w:
            w.start("p", _publish, grid_name, "t", n)
            got = await asyncio.gather(*tasks)
            while w.procs["p"].exitcode is None:
                await asyncio.sleep(0.01)
            w.wait(["p"])
        return got

    for got in run(main()):
        assert [int.from_bytes(m, "little") for m in got] == list(range(n))
    for s in subs:
        s.close()


def test_async_for_over_a_subscription_and_publish_async(grid):
    t = grid.topic("t", capacity=2, max_message=8)
    s = t.subscribe()

    async def main():
        async def pub():
            for i in range(10):
                await t.publish_async(bytes([i]), timeout=10)  # waits for the reader: capacity 2

        p = asyncio.create_task(pub())
        got = []
        async for m in s:
            got.append(m)
            if len(got) == 10:
                break
        await p
        return got

    assert run(main()) == [bytes([i]) for i in range(10)]
    s.close()


def test_lossy_subscription_get_async_reports_lapped(grid):
    t = grid.topic("t", capacity=4, max_message=8, lossless=False)
    s = t.subscribe()
    for i in range(10):
        t.publish(bytes([i]))

    async def main():
        with pytest.raises(Lapped) as e:
            await s.get_async()
        assert e.value.lost == 6
        return [await s.get_async() for _ in range(4)]

    assert run(main()) == [bytes([i]) for i in range(6, 10)]
    s.close()


def test_closing_a_subscription_ends_its_await(grid):
    t = grid.topic("t", capacity=4, max_message=8)
    s = t.subscribe()

    async def main():
        tasks = [asyncio.create_task(s.get_async()) for _ in range(3)]
        await asyncio.sleep(0.02)
        s.close()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(x, Closed) for x in res), res

    run(main())


def test_subscription_busy_in_another_thread_is_refused_not_shared(grid):
    t = grid.topic("t", capacity=4, max_message=8)
    s = t.subscribe()

    def blocker():
        try:
            s.get(timeout=0.5)  # holds the subscription while it waits
        except Empty:
            pass

    async def main():
        th = threading.Thread(target=blocker)
        th.start()
        await asyncio.sleep(0.05)
        with pytest.raises(shmgrid.Busy):
            await s.get_async(timeout=0.1)
        th.join()

    run(main())
    s.close()


# ---- watch -----------------------------------------------------------------------


def test_async_for_over_a_watch(grid, grid_name):
    m = grid.map("m")
    w = m.watch()
    n = 50

    async def main():
        got = []
        with Workers() as ws:
            ws.start("w", _write_map, grid_name, "m", n)
            async for ev in w:
                got.append(ev)
                if len(got) == n:
                    break
            while ws.procs["w"].exitcode is None:
                await asyncio.sleep(0.01)
            ws.wait(["w"])
        with pytest.raises(Empty):
            await w.get_async(timeout=0.05)
        return got

    got = run(main())
    assert [(e.kind, e.key) for e in got] == [("put", f"k{i}".encode()) for i in range(n)]
    w.close()


def test_closing_a_watch_ends_its_await(grid):
    w = grid.map("m").watch()

    async def main():
        task = asyncio.create_task(w.get_async())
        await asyncio.sleep(0.02)
        w.close()
        with pytest.raises(Closed):
            await task

    run(main())


# ---- locks -----------------------------------------------------------------------


def test_acquire_async_between_tasks(grid):
    lk, c = grid.lock("L"), grid.counter("C")

    async def worker():
        for _ in range(30):
            async with lk:
                v = c.get()
                await asyncio.sleep(0)
                c.set(v + 1)

    async def main():
        await asyncio.gather(*(worker() for _ in range(10)))

    run(main())
    assert c.get() == 300
    assert not lk.locked()


@pytest.mark.timeout(120)
def test_acquire_async_between_processes(grid, grid_name):
    grid.lock("L")
    c = grid.counter("C")
    with Workers() as w:
        for k in range(3):
            w.start(k, _async_lock_increments, grid_name, 4, 25)
        assert w.wait(range(3), timeout=90) == [100] * 3
    assert c.get() == 300
    assert not grid.lock("L").locked()


def test_acquire_async_timeout_then_success(grid, grid_name):
    lk = grid.lock("L")
    ready = FORK.Event()
    with Workers() as w:
        w.start("h", _hold_lock, grid_name, "L", ready, 0.4)
        assert ready.wait(10)

        async def main():
            assert await lk.acquire_async(timeout=0.05) is False
            # a second task queued behind the first timed-out one is not stuck
            assert await lk.acquire_async(timeout=10) is True
            assert lk.owner_died is False
            lk.release()

        run(main())
        w.wait(["h"])
    assert not lk.locked()


def test_acquire_async_recovers_a_killed_holder(grid, grid_name):
    lk = grid.lock("L")
    ready = FORK.Event()
    with Workers() as w:
        p = w.start("h", _hold_lock, grid_name, "L", ready, 60)
        assert ready.wait(10)

        async def main():
            task = asyncio.create_task(lk.acquire_async(timeout=10))
            await asyncio.sleep(0.05)
            os.kill(p.pid, signal.SIGKILL)  # no release, no wake-up: the probe finds it
            assert await task is True
            assert lk.owner_died is True
            lk.release()

        run(main())
    assert not lk.locked()


@pytest.mark.timeout(120)
def test_cancelled_acquire_async_never_holds_the_lock(grid):
    """A holder thread releases at a random moment while the loop cancels
    the waiting acquire_async at another: either the acquire returned True
    (and the loop thread holds the lock), or it was cancelled and the lock
    is not the loop thread's."""
    lk = grid.lock("L")
    rng = random.Random(11)
    me = threading.get_native_id()
    outcomes = {"acquired": 0, "cancelled": 0}

    async def one_round():
        held = threading.Event()
        delay = rng.random() * 0.004

        def holder():
            lk.acquire()
            held.set()
            time.sleep(delay)
            lk.release()

        th = threading.Thread(target=holder)
        th.start()
        held.wait()
        task = asyncio.create_task(lk.acquire_async(timeout=10))
        await asyncio.sleep(rng.random() * 0.004)
        task.cancel()
        try:
            assert await task is True
            outcomes["acquired"] += 1
            assert lk.stats()["owner_tid"] == me
            lk.release()
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
            assert lk.stats()["owner_tid"] != me
        th.join()
        # nothing is left queued in the loop's gate: an uncontended acquire is immediate
        assert await lk.acquire_async(timeout=0) is True
        lk.release()

    async def main():
        for _ in range(150):
            await one_round()

    run(main(), timeout=100)
    assert outcomes["acquired"] > 0 and outcomes["cancelled"] > 0, outcomes
    assert not lk.locked()


def test_cancelled_gate_waiter_hands_the_lock_on(grid):
    lk = grid.lock("L")

    async def main():
        await lk.acquire_async()
        queued = [asyncio.create_task(lk.acquire_async()) for _ in range(4)]
        await asyncio.sleep(0.01)
        queued[3].cancel()  # cancelled while queued: just leaves the queue
        lk.release()  # hands the loop's turn to queued[0]...
        queued[0].cancel()  # ...which is cancelled before it runs: the turn goes on
        await asyncio.sleep(0.01)
        assert queued[1].done() and queued[1].result() is True
        assert queued[0].cancelled() and queued[3].cancelled()
        lk.release()
        assert await queued[2] is True
        lk.release()

    run(main())
    assert not lk.locked()


def test_release_in_another_thread_is_refused(grid):
    lk = grid.lock("L")

    async def main():
        await lk.acquire_async()
        err = []
        th = threading.Thread(target=lambda: err.append(pytest.raises(shmgrid.LockNotHeld, lk.release)))
        th.start()
        th.join()
        assert err
        lk.release()

    run(main())


# ---- crash: a producer killed inside its claim -----------------------------------


@pytest.mark.timeout(120)
def test_awaiters_behind_a_dead_producers_cell_all_get_through(grid):
    """Freeze a producer between its claim and its publish, queue markers
    behind the claimed cell, and await them with several tasks; SIGKILL the
    producer. Nothing wakes the awaiters (the producer never publishes): the
    oldest one's probe skips the dead cell, and each one that gets through
    sends the next to re-try, so all the markers arrive within the bound
    the blocking readers meet (one probe slice, not one per awaiter)."""
    from test_messaging_crash import BIG, STUCK_SKIP_LIMIT, Procs, Shared, catch_mid_claim, frozen_producer, wait_ready

    rnd = random.Random(0xA57C)
    r = grid.ring("stuck", slots=128, slot_size=BIG)
    sh, procs = Shared(), Procs()
    n_markers = 6

    def drain():
        while True:
            try:
                r.get_nowait()
            except Empty:
                return

    def stuck():
        st = r.stats()
        return st["tail"] - st["head"]

    try:
        for _ in range(20):
            sh.reset()
            p = procs.start(frozen_producer, r, sh, 1)
            wait_ready(sh, {0: p})
            n = catch_mid_claim(p, drain, stuck, rnd)
            if n:
                break
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
            drain()
        else:
            pytest.skip("could not freeze a producer mid-claim")
        s0 = r.stats()
        for i in range(n_markers):
            r.put(b"marker%d" % i, timeout=1)

        async def main():
            tasks = [asyncio.create_task(r.get_async(timeout=10)) for _ in range(n_markers)]
            await until_registered(n_markers)
            await asyncio.sleep(0.02)
            assert not any(t.done() for t in tasks)  # stuck behind the live claimant
            t_kill = time.monotonic()
            os.kill(p.pid, signal.SIGKILL)
            got = await asyncio.gather(*tasks)
            return got, time.monotonic() - t_kill

        got, latency = run(main())
        p.join(5)
        assert sorted(got) == [b"marker%d" % i for i in range(n_markers)]
        assert r.stats()["skipped"] - s0["skipped"] == n
        assert latency < STUCK_SKIP_LIMIT, f"{latency * 1e3:.0f} ms to get past a dead producer's cell"
    finally:
        procs.kill_all()


@pytest.mark.timeout(30)
def test_a_grid_closed_between_check_and_registration_is_never_read(grid_name):
    """Grid.close() from another thread lands after an await checked the
    grid but before it registered its word: the registration must see the
    grid closed (it checks under the waiter's mutex), or the waiter thread
    would read the word after the unmap."""
    g = shmgrid.Grid.create(grid_name, size="8MiB")
    r = g.ring("r", slots=4, slot_size=64)
    orig = _async.Waiter.register

    def late_register(self, *a):
        time.sleep(0.3)  # the loop thread preempted here; close() runs meanwhile
        return orig(self, *a)

    _async.Waiter.register = late_register
    try:
        threading.Timer(0.1, g.close).start()

        async def main():
            with pytest.raises(Closed):
                await asyncio.wait_for(r.get_async(), 5)

        asyncio.run(main())
        time.sleep(0.3)  # the waiter thread would have read the unmapped word by now
        assert _async._waiter.registrations() == 0
    finally:
        _async.Waiter.register = orig
