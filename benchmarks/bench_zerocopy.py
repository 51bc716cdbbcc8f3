#!/usr/bin/env python3
"""What the zero-copy reads and the asyncio awaitables cost, in one run:

1. consumer cost of a large message: a ring of 64 KiB (and, for contrast,
   256-byte) messages is filled (untimed), then drained (timed) with each
   of ``get()`` (a new bytes object per message), ``get_view()`` (a view of
   a per-thread buffer) and ``get_into(bytearray)`` (straight into the
   caller's buffer); ns per message, median of the repetitions, one
   process, so only the read side is measured;
2. ping-pong between two processes over two rings: the echo side blocks in
   ``get``/``put``; the timed side is a plain blocking caller, or a
   coroutine using ``get_async``/``put_async`` in an asyncio loop (the
   wake-up then goes through the waiter thread and the loop's self-pipe).
   p50 and p99 of R round trips, each timed alone.

A benchmark, not a test: the exit status does not depend on the figures.

    python benchmarks/bench_zerocopy.py [--reps N] [--trips N] [--json FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import shmgrid
from benchcommon import OtherCpu, host

SIZES = (65536, 256)
SLOTS = 64


def drain_ns(ring: Any, msg: bytes, how: Callable[[], Any], reps: int) -> float:
    """Median ns per message of draining a full ring with how()."""
    per: List[float] = []
    for _ in range(reps):
        for _ in range(SLOTS):
            ring.put(msg)
        gc.disable()
        t0 = time.perf_counter_ns()
        for _ in range(SLOTS):
            how()
        t1 = time.perf_counter_ns()
        gc.enable()
        per.append((t1 - t0) / SLOTS)
    return statistics.median(per)


def bench_reads(grid: Any, reps: int) -> Dict[str, Dict[str, float]]:
    out: Dict[str, Dict[str, float]] = {}
    for size in SIZES:
        r = grid.ring(f"zc{size}", slots=SLOTS, slot_size=size)
        msg = os.urandom(size)
        buf = bytearray(size)
        ways = {"get": r.get, "get_view": r.get_view, "get_into": lambda: r.get_into(buf)}
        for name, how in ways.items():  # warm up, and check each returns the message
            r.put(msg)
            got = how()
            assert (buf if name == "get_into" else bytes(got)) == msg
        res: Dict[str, List[float]] = {k: [] for k in ways}
        for _ in range(5):  # interleave the ways, so drift hits all alike
            for name, how in ways.items():
                res[name].append(drain_ns(r, msg, how, max(1, reps // 5)))
        out[str(size)] = {k: statistics.median(v) for k, v in res.items()}
    return out


def _echo(name: str, trips: int) -> None:
    g = shmgrid.Grid.attach(name)
    ping, pong = g.ring("ping"), g.ring("pong")
    for _ in range(trips):
        pong.put(ping.get())
    g.close()


def _pingpong(grid: Any, name: str, trips: int, use_async: bool) -> Dict[str, float]:
    ping = grid.ring("ping", slots=16, slot_size=64)
    pong = grid.ring("pong", slots=16, slot_size=64)
    warm = trips // 10
    p = multiprocessing.get_context("fork").Process(target=_echo, args=(name, warm + trips))
    p.start()
    msg = b"x" * 64
    times: List[int] = []
    if use_async:
        async def main() -> None:
            for i in range(warm + trips):
                t0 = time.perf_counter_ns()
                await ping.put_async(msg)
                await pong.get_async()
                if i >= warm:
                    times.append(time.perf_counter_ns() - t0)
        asyncio.run(main())
    else:
        for i in range(warm + trips):
            t0 = time.perf_counter_ns()
            ping.put(msg)
            pong.get()
            if i >= warm:
                times.append(time.perf_counter_ns() - t0)
    p.join(30)
    times.sort()
    return {"p50_ns": times[len(times) // 2], "p99_ns": times[int(len(times) * 0.99)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=50, help="drains per read way and size (default 50)")
    ap.add_argument("--trips", type=int, default=5000, help="ping-pong round trips (default 5000)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    name = f"bench-zc-{os.getpid()}"
    other = OtherCpu()
    grid = shmgrid.Grid.create(name, size="256MiB")
    try:
        reads = bench_reads(grid, args.reps)
        pp = {"blocking": _pingpong(grid, name, args.trips, False),
              "asyncio": _pingpong(grid, name, args.trips, True)}
    finally:
        grid.close()
        shmgrid.Grid.unlink(name)
    busy = other.cpus()
    print("\nread side, ns per message (median), ring of", SLOTS, "slots, one process")
    print(f"{'message':>10} {'get':>10} {'get_view':>10} {'get_into':>10} {'get/view':>9} {'get/into':>9}")
    for size, r in reads.items():
        print(f"{int(size):>10,} {r['get']:10.0f} {r['get_view']:10.0f} {r['get_into']:10.0f} "
              f"{r['get'] / r['get_view']:8.2f}x {r['get'] / r['get_into']:8.2f}x")
    print("\nping-pong over two rings, 64-byte messages, the other side blocking; round trip in us")
    for k, v in pp.items():
        print(f"{k:>10}  p50 {v['p50_ns'] / 1000:7.1f}  p99 {v['p99_ns'] / 1000:7.1f}")
    print(f"\nCPUs used by other processes during the run: {busy:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"host": host(), "reads": reads, "pingpong": pp, "other_cpus": busy}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
