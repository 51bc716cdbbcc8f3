"""``shmgrid demo``: worker processes share one map on one segment.

Each worker attaches by name and runs a mix of put, get, delete and incr on
a shared key space. Values name the key they were written for, so every
read checks it got a value of its own key; counters are incremented by all
workers, and each worker keeps its own tally of the increments it made.
The parent prints throughput as it goes, then checks that the counters add
up exactly to the tallies and that the map validates, and removes the grid.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import struct
import sys
import time
from typing import Any, List

from .grid import Grid

_FLUSH = 512  # ops between a worker's progress reports


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


def _read_int(m: Any, key: bytes) -> int:
    v = m.get(key)
    return struct.unpack("<q", v)[0] if v else 0


def run_demo(workers: int = 4, duration: float = 10.0, keys: int = 2000) -> int:
    if workers < 1 or duration <= 0 or keys < 16:
        print("demo: need workers >= 1, duration > 0, keys >= 16", file=sys.stderr)
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
        for p in procs:
            p.join(timeout=10)
        stuck = [p.pid for p in procs if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
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
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        grid.close()
        Grid.unlink(name)
