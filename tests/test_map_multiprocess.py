"""Multi-process stress of the Map with exact invariants.

Workers are separate processes ("fork", and one test with "spawn" attaching
by name). Each reports one result through a multiprocessing.Queue; every
wait has a timeout, and a stuck worker is killed and fails the test instead
of hanging it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import signal
import struct
import time
import traceback

import pytest

import shmgrid

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")
NPROC = 4


def i64(n: int) -> bytes:
    return struct.pack("<q", n)


def un64(b: bytes) -> int:
    return struct.unpack("<q", b)[0]


# ---- running workers ----------------------------------------------------------


def _entry(target, q, idx, args, start):
    """Process body: wait until every worker is up, run target(*args), put
    (idx, ok, result-or-traceback)."""
    try:
        start.wait(60)  # all start together, so they really overlap
        res = target(*args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((idx, False, traceback.format_exc()))
        raise SystemExit(1)
    q.put((idx, True, res))


def run_workers(ctx, target, args_list, timeout=120.0):
    """Run target(*args) in one process per args; return their results in
    order. Fails (never hangs) if a worker errs, dies or is stuck."""
    q, start = ctx.Queue(), ctx.Barrier(len(args_list))
    procs = [
        ctx.Process(target=_entry, args=(target, q, i, args, start), daemon=True) for i, args in enumerate(args_list)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < len(procs):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                idx, ok, res = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                # a worker that died without reporting will never report
                dead = [p for i, p in enumerate(procs) if i not in results and p.exitcode not in (None, 0)]
                if dead and q.empty():
                    time.sleep(0.2)  # let a last message through the pipe
                    if q.empty():
                        break
                continue
            if ok:
                results[idx] = res
            else:
                errors.append(f"worker {idx}:\n{res}")
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        stuck = [p for p in procs if p.is_alive()]
        for p in stuck:
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        q.close()
    assert not errors, "\n".join(errors)
    assert not stuck, f"{len(stuck)} worker(s) still running after {timeout} s: killed"
    missing = [i for i in range(len(procs)) if i not in results]
    assert not missing, f"workers {missing} reported nothing (exit codes {[procs[i].exitcode for i in missing]})"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [results[i] for i in range(len(procs))]


# ---- (a) incr: exact totals -----------------------------------------------------


def _incr_worker(m, seed, n, nkeys):
    rnd = random.Random(seed)
    keys = [f"k{i}".encode() for i in range(nkeys)]
    returned = [[] for _ in range(nkeys)]
    for _ in range(n):
        i = rnd.randrange(nkeys)
        returned[i].append(m.incr(keys[i]))
    return returned


@pytest.mark.timeout(180)
def test_incr_exact_totals(grid):
    n, nkeys = 50_000, 64
    m = grid.map("incr", capacity=256, max_key=16, max_value=8)
    leaked = grid.validate()["leaked_bytes"]
    out = run_workers(FORK, _incr_worker, [(m, 1000 + w, n, nkeys) for w in range(NPROC)])
    total = 0
    for i in range(nkeys):
        rets = [r for w in range(NPROC) for r in out[w][i]]
        count = len(rets)
        total += count
        got = m.get_versioned(f"k{i}")
        assert got == (i64(count), count), (i, got, count)  # value, and one version per incr
        # linearizable: the values incr returned on one key are exactly 1..count
        assert sorted(rets) == list(range(1, count + 1)), f"key k{i}: duplicate or missing incr results"
        for w in range(NPROC):
            assert out[w][i] == sorted(out[w][i]), "one process saw its own increments go backwards"
    assert total == NPROC * n == 200_000
    assert sum(un64(v) for v in m.values()) == 200_000
    r = m.validate()
    assert r["live"] == r["live_counter"] == nkeys
    assert grid.validate()["leaked_bytes"] == leaked, "blocks lost without any process dying"


# ---- (b) put_if_absent: one winner per key --------------------------------------


def _pia_worker(m, wid, nkeys, order_seed):
    keys = list(range(nkeys))
    if order_seed is not None:
        random.Random(order_seed).shuffle(keys)
    return [k for k in keys if m.put_if_absent(f"key{k}", i64(wid))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("order", ["same", "shuffled"])
def test_put_if_absent_one_winner(grid, order):
    nkeys = 1000
    for rnd in range(3):
        m = grid.map(f"pia{rnd}", capacity=2 * nkeys, max_key=16, max_value=8)
        leaked = grid.validate()["leaked_bytes"]
        args = [(m, w + 1, nkeys, None if order == "same" else 10 * rnd + w) for w in range(NPROC)]
        wins = run_workers(FORK, _pia_worker, args)
        sets = [set(w) for w in wins]
        assert sum(len(s) for s in sets) == nkeys, "a key had no winner or two winners"
        assert set().union(*sets) == set(range(nkeys))
        for w, s in enumerate(sets):
            for k in s:
                assert m.get_versioned(f"key{k}") == (i64(w + 1), 1)
        r = m.validate()
        assert r["live"] == r["live_counter"] == r["bound"] == r["used"] == nkeys
        # the losers' key and value blocks all went back to the heap
        assert grid.validate()["leaked_bytes"] == leaked, "blocks lost without any process dying"


# ---- (c) replace / compare_and_set retry loops --------------------------------------


def _replace_worker(m, n):
    written, retries = [], 0
    for _ in range(n):
        while True:
            old = m.get(b"ctr")
            new = str(int(old) + 1).encode()  # decimal text: the length changes as it grows
            if m.replace(b"ctr", old, new):
                written.append(int(new))
                break
            retries += 1
    return written, retries


@pytest.mark.timeout(180)
def test_replace_loop_counter_is_exact(grid):
    n = 20_000
    m = grid.map("repl", capacity=16, max_key=8, max_value=16)
    assert m.put(b"ctr", b"0") == 1
    leaked = grid.validate()["leaked_bytes"]
    out = run_workers(FORK, _replace_worker, [(m, n) for _ in range(NPROC)])
    written = [v for w, _ in out for v in w]
    assert m.get_versioned(b"ctr") == (str(NPROC * n).encode(), NPROC * n + 1)
    # each successful replace moved the counter by exactly one step
    assert sorted(written) == list(range(1, NPROC * n + 1))
    m.validate()
    assert grid.validate()["leaked_bytes"] == leaked, "blocks lost without any process dying"


def _cas_worker(m, n):
    retries = 0
    for _ in range(n):
        while True:
            got = m.get_versioned(b"ctr")
            if got is None:
                new = m.compare_and_set(b"ctr", 0, i64(1))
            else:
                new = m.compare_and_set(b"ctr", got[1], i64(un64(got[0]) + 1))
            if new is not None:
                break
            retries += 1
    return retries


@pytest.mark.timeout(180)
def test_compare_and_set_loop_counter_is_exact(grid):
    n = 20_000
    m = grid.map("cas", capacity=16, max_key=8, max_value=8)
    run_workers(FORK, _cas_worker, [(m, n) for _ in range(NPROC)])
    assert m.get_versioned(b"ctr") == (i64(NPROC * n), NPROC * n)
    m.validate()


# ---- (d) fork after open ------------------------------------------------------------


def _forked_child(grid, m, q, go):
    try:
        m.put(b"child", str(os.getpid()).encode())
        q.put(("hello", os.getpid(), grid.info()["proc_slot"], grid.processes()))
        if not go.wait(30):
            raise TimeoutError("parent never said go")
        m.incr(b"done")
        grid.close()
        q.put(("bye", None, None, None))
    except BaseException:
        q.put(("error", traceback.format_exc(), None, None))
        raise


@pytest.mark.timeout(60)
def test_grid_opened_before_fork_works_in_child(grid):
    m = grid.map("fork", capacity=16, max_key=8, max_value=16)
    m.put(b"parent", b"1")
    me, my_slot = os.getpid(), grid.info()["proc_slot"]
    q, go = FORK.Queue(), FORK.Event()
    p = FORK.Process(target=_forked_child, args=(grid, m, q, go), daemon=True)
    p.start()
    try:
        tag, pid, slot, seen = q.get(timeout=30)
        assert tag == "hello", pid
        assert pid == p.pid
        assert slot != my_slot, "the forked child kept the parent's process-table slot"
        for view in (seen, grid.processes()):
            alive = {e["pid"]: e["slot"] for e in view if e["alive"]}
            assert alive.get(me) == my_slot and alive.get(pid) == slot, view
        assert m.get(b"child") == str(pid).encode()
        go.set()
        tag, err, _, _ = q.get(timeout=30)
        assert tag == "bye", err
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
    assert m.get(b"done") == i64(1)
    # the child's close freed its own slot only; the parent's grid still works
    slots = {e["slot"]: e for e in grid.processes()}
    assert slot not in slots and slots[my_slot]["pid"] == me and slots[my_slot]["alive"]
    m.put(b"parent", b"2")
    assert m.get_versioned(b"parent") == (b"2", 2)
    m.validate()


# ---- spawn: attach by name ----------------------------------------------------------


def _spawned(name, wid, n, attached):
    with shmgrid.Grid.attach(name) as g:
        attached.wait(60)  # both spawned processes are attached at once
        m = g.map("spawn")
        assert m.get(b"hello") == b"from parent"
        won = m.put_if_absent(b"first", i64(wid))
        for i in range(n):
            m.incr(f"k{i % 8}")
        pid_seen = any(e["pid"] == os.getpid() and e["alive"] for e in g.processes())
        return won, pid_seen, g.info()["proc_slot"]


@pytest.mark.timeout(120)
def test_spawned_processes_attach_by_name(grid, grid_name):
    n = 4_000
    m = grid.map("spawn", capacity=64, max_key=16, max_value=16)
    m.put(b"hello", b"from parent")
    attached = SPAWN.Barrier(2)
    out = run_workers(SPAWN, _spawned, [(grid_name, w + 1, n, attached) for w in range(2)], timeout=90)
    assert sum(won for won, _, _ in out) == 1
    assert all(seen for _, seen, _ in out)
    assert len({slot for _, _, slot in out} | {grid.info()["proc_slot"]}) == 3
    assert un64(m.get(b"first")) in (1, 2)
    assert sum(un64(m.get(f"k{i}")) for i in range(8)) == 2 * n
    # the spawned processes closed their grids: only this process is left
    assert [e["pid"] for e in grid.processes()] == [os.getpid()]
    r = m.validate()
    assert r["live"] == r["live_counter"] == 10
