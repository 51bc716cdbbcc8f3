"""``shmgrid demo``: worker processes share one segment.

Stage 1, a shared map. Each worker attaches by name and runs a mix of put,
get, delete and incr on a shared key space. Values name the key they were
written for, so every read checks it got a value of its own key; counters
are incremented by all workers, and each worker keeps its own tally of the
increments it made. The parent prints throughput as it goes, then checks
that the counters add up exactly to the tallies and that the map validates.

Stage 2, a pipeline. Producers put numbered jobs into the ring "jobs" in
batches; workers take batches, square the numbers, put the results into
the ring "results" and add to the counter "processed"; the parent collects
every result, then broadcasts "stop" on the topic "control". It checks each
job came back exactly once with the right square.

Stage 3, a shared numpy array (needs numpy). One process publishes frames
into the array "frame": frame k holds k + 0, k + 1, ... so its first element
names it and every element proves it belongs to the same frame. Readers
take snapshots and check each is exactly the frame its version number says,
never a mix; the parent peeks at the live array meanwhile. Then the grid is
removed.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import struct
import sys
import time
from typing import Any, List

from .errors import Empty
from .grid import Grid

_FLUSH = 512  # ops between a worker's progress reports


def _reap(procs: List[Any]) -> List[int]:
    """Join a stage's processes (10 s each at most); kill and name the stuck."""
    for p in procs:
        p.join(timeout=10)
    stuck = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    return stuck


def _worker(grid_name: str, wid: int, keys: int, stop: Any, errors: Any) -> None:
    grid = Grid.attach(grid_name)
    data = grid.map("data")
    stats = grid.map("stats")
    rnd = random.Random(wid)
    ops = incrs = 0
    bad = 0
    seq = 0
    while not stop.is_set():
        for _ in range(_FLUSH):
            i = rnd.randrange(keys)
            key = b"key:%d" % i
            r = rnd.random()
            if r < 0.45:
                v = data.get(key)
                if v is not None and not v.startswith(key + b"|"):
                    bad += 1
            elif r < 0.75:
                seq += 1
                data.put(key, b"%s|w%d|%d" % (key, wid, seq))
            elif r < 0.85:
                data.delete(key)
            else:
                data.incr(b"counter:%d" % (i % 16))
                incrs += 1
        ops += _FLUSH
        stats.put(b"ops:%d" % wid, struct.pack("<q", ops))
    stats.put(b"incrs:%d" % wid, struct.pack("<q", incrs))
    if bad:
        with errors.get_lock():
            errors.value += bad
    grid.close()


_JOB = struct.Struct("<qq")


def _producer(grid_name: str, first: int, count: int) -> None:
    grid = Grid.attach(grid_name)
    jobs = grid.ring("jobs")
    for start in range(first, first + count, 256):
        n = min(256, first + count - start)
        jobs.put_many([_JOB.pack(i, i % 1000) for i in range(start, start + n)])
    grid.close()


def _pipeline_worker(grid_name: str) -> None:
    grid = Grid.attach(grid_name)
    jobs, results = grid.ring("jobs"), grid.ring("results")
    processed = grid.counter("processed")
    control = grid.topic("control").subscribe()
    while True:
        try:
            batch = jobs.get_many(256, timeout=0.05)
        except Empty:
            try:
                if control.get_nowait() == b"stop":
                    break
            except Empty:
                pass
            continue
        out = []
        for raw in batch:
            i, v = _JOB.unpack(raw)
            out.append(_JOB.pack(i, v * v))
        results.put_many(out)
        processed.add(len(out))
    control.close()
    grid.close()


def _pipeline(name: str, grid: Grid, workers: int, jobs_total: int) -> bool:
    grid.ring("jobs", slots=4096, slot_size=_JOB.size)
    results = grid.ring("results", slots=4096, slot_size=_JOB.size)
    processed = grid.counter("processed")
    control = grid.topic("control", capacity=16, max_message=16)
    ctx = mp.get_context("fork")
    print(f"pipeline: 2 producers -> ring 'jobs' -> {workers} workers (square) -> ring 'results' -> this process; "
          f"{jobs_total:,} jobs")
    ws = [ctx.Process(target=_pipeline_worker, args=(name,), daemon=True) for _ in range(workers)]
    for p in ws:
        p.start()
    half = jobs_total // 2
    ps = [ctx.Process(target=_producer, args=(name, 0, half), daemon=True),
          ctx.Process(target=_producer, args=(name, half, jobs_total - half), daemon=True)]
    t0 = last = time.monotonic()
    for p in ps:
        p.start()
    seen = bytearray(jobs_total)
    got = wrong = 0
    while got < jobs_total:
        try:
            batch = results.get_many(1024, timeout=5.0)
        except Empty:
            print("  no result for 5 s: giving up")
            break
        for raw in batch:
            i, sq = _JOB.unpack(raw)
            seen[i] += 1
            wrong += sq != (i % 1000) ** 2
        got += len(batch)
        if (now := time.monotonic()) - last >= 0.5:
            print(f"  {now - t0:5.1f} s  {got:10,} results   processed counter {processed.get():10,}   "
                  f"jobs queued {len(grid.ring('jobs')):5d}", flush=True)
            last = now
    elapsed = time.monotonic() - t0
    control.publish(b"stop")
    stuck = _reap(ps + ws)
    once = seen.count(1)
    ok = once == jobs_total and wrong == 0 and processed.get() == jobs_total and not stuck
    print(f"done: {got:,} results in {elapsed:.2f} s ({got / elapsed:,.0f} jobs/s through two rings)")
    print(f"check: {once:,} of {jobs_total:,} jobs came back exactly once, {wrong} wrong squares, "
          f"processed counter {processed.get():,}" + (f"; processes that did not stop: {stuck}" if stuck else ""))
    return ok


_FRAME = (512, 512)  # int64: 2 MiB a frame


def _frame_publisher(grid_name: str, stop: Any) -> None:
    import numpy as np

    grid = Grid.attach(grid_name)
    frame = grid.array("frame")
    base = np.arange(frame.size, dtype=np.int64).reshape(frame.shape)
    nxt = frame.version + 1
    while not stop.is_set():
        v = frame.publish(base + nxt)  # the single publisher: frame k is version k
        nxt = v + 1
    del frame
    grid.close()


def _frame_reader(grid_name: str, stop: Any) -> None:
    import numpy as np

    grid = Grid.attach(grid_name)
    frame = grid.array("frame")
    snaps, wrong = grid.counter("snapshots"), grid.counter("wrong")
    base = np.arange(frame.size, dtype=np.int64).reshape(frame.shape)
    out = np.empty_like(base)
    n = bad = 0
    last = 0
    while not stop.is_set():
        # wait for a version newer than the last one seen, then copy it
        try:
            frame.wait_version(last, timeout=0.1)
        except TimeoutError:
            continue
        _, v = frame.snapshot(out=out)
        bad += v < last or not np.array_equal(out, base + v)
        last = v
        n += 1
        if n % 64 == 0:
            snaps.add(64)
    snaps.add(n % 64)
    wrong.add(bad)
    del frame
    grid.close()


def _array_stage(name: str, grid: Grid, readers: int, seconds: float) -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        print("array stage: skipped (numpy is not importable here)")
        return True
    frame = grid.array("frame", _FRAME, "int64")
    snaps, wrong = grid.counter("snapshots"), grid.counter("wrong")
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    mb = frame.nbytes / 2**20
    print(f"array: 1 process publishes {_FRAME[0]}x{_FRAME[1]} int64 frames ({mb:g} MiB) into array 'frame', "
          f"{readers} processes snapshot each new version, for {seconds:g} s")
    procs = [ctx.Process(target=_frame_publisher, args=(name, stop), daemon=True)]
    procs += [ctx.Process(target=_frame_reader, args=(name, stop), daemon=True) for _ in range(readers)]
    for p in procs:
        p.start()
    t0 = last_t = time.monotonic()
    last_v = last_s = 0
    while (now := time.monotonic()) - t0 < seconds:
        time.sleep(min(0.5, max(0.05, seconds - (now - t0))))
        now = time.monotonic()
        v, s = frame.version, snaps.get()
        dt = max(now - last_t, 1e-9)
        print(f"  {now - t0:5.1f} s  version {v:8,}  {(v - last_v) / dt:8,.0f} publishes/s  "
              f"{(s - last_s) / dt:8,.0f} snapshots/s ({(s - last_s) * mb / 1024 / dt:5.2f} GiB/s)  "
              f"live frame[0, 0] = {frame[0, 0]}", flush=True)
        last_v, last_s, last_t = v, s, now
    stop.set()
    stuck = _reap(procs)
    snap, v = frame.snapshot()
    st = frame.stats()
    exact = snap[0, 0] == v and (snap.ravel() - snap.ravel()[0] == numpy.arange(snap.size)).all()
    ok = (not stuck and wrong.get() == 0 and bool(exact) and st["publishes"] == v and st["repairs"] == 0
          and snaps.get() > 0 and all(p.exitcode == 0 for p in procs))
    print(f"done: {v:,} versions published, {snaps.get():,} snapshots taken")
    print(f"check: {wrong.get()} snapshots were not exactly the frame their version names; the last version "
          f"{v:,} is {'whole' if exact else 'TORN'}; publishes counted {st['publishes']:,}"
          + (f"; processes that did not stop: {stuck}" if stuck else ""))
    del frame, snap
    return ok


def _read_int(m: Any, key: bytes) -> int:
    v = m.get(key)
    return struct.unpack("<q", v)[0] if v else 0


def run_demo(workers: int = 4, duration: float = 10.0, keys: int = 2000, jobs: int = 2_000_000) -> int:
    if workers < 1 or duration <= 0 or keys < 16 or jobs < 2:
        print("demo: need workers >= 1, duration > 0, keys >= 16, jobs >= 2", file=sys.stderr)
        return 2
    name = f"shmgrid-demo-{os.getpid()}"
    grid = Grid.create(name, size="64MiB")
    procs: List[Any] = []
    try:
        data = grid.map("data", capacity=keys + 64, max_key=32, max_value=64)
        stats = grid.map("stats", capacity=4 * workers + 16, max_key=32, max_value=8)
        ctx = mp.get_context("fork")
        stop = ctx.Event()
        errors = ctx.Value("q", 0)
        print(f"shmgrid demo: {workers} processes on grid '{name}', map 'data' of {keys} keys, "
              f"mixed get/put/delete/incr for {duration:g} s")
        procs = [ctx.Process(target=_worker, args=(name, w, keys, stop, errors), daemon=True)
                 for w in range(workers)]
        for p in procs:
            p.start()
        t0 = last_t = time.monotonic()
        last_ops = 0
        while (now := time.monotonic()) - t0 < duration:
            time.sleep(min(1.0, max(0.05, duration - (now - t0))))
            now = time.monotonic()
            total = sum(_read_int(stats, b"ops:%d" % w) for w in range(workers))
            rate = (total - last_ops) / max(now - last_t, 1e-9)
            print(f"  {now - t0:5.1f} s  {rate:12,.0f} ops/s   keys present {len(data):6d}   "
                  f"ops so far {total:,}", flush=True)
            last_ops, last_t = total, now
        stop.set()
        stuck = _reap(procs)
        elapsed = time.monotonic() - t0

        total_ops = sum(_read_int(stats, b"ops:%d" % w) for w in range(workers))
        tallied = sum(_read_int(stats, b"incrs:%d" % w) for w in range(workers))
        counted = sum(_read_int(data, b"counter:%d" % c) for c in range(16))
        report = data.validate()
        ok = not stuck and errors.value == 0 and tallied == counted and all(p.exitcode == 0 for p in procs)
        print(f"done: {total_ops:,} ops in {elapsed:.1f} s ({total_ops / elapsed:,.0f} ops/s over {workers} processes)")
        print(f"check: counters sum to {counted:,}, workers tallied {tallied:,} increments -> "
              f"{'exact' if tallied == counted else 'MISMATCH'}; reads of a wrong key's value: {errors.value}; "
              f"map validates ({report['live']} keys, {report['tombstones']} tombstones)")
        if stuck:
            print(f"workers that did not stop: {stuck}")
        print("map stage: " + ("PASS" if ok else "FAIL"))
        piped = _pipeline(name, grid, max(1, min(workers, 4)), jobs)
        print("pipeline stage: " + ("PASS" if piped else "FAIL"))
        arrayed = _array_stage(name, grid, max(2, min(workers, 4) - 1), min(duration, 2.0))
        print("array stage: " + ("PASS" if arrayed else "FAIL"))
        ok = ok and piped and arrayed
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        grid.close()
        Grid.unlink(name)
