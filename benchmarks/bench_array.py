#!/usr/bin/env python3
"""Snapshot throughput of shmgrid's shared arrays and what a user would pick
instead, measured in one run:

- shmgrid ``a.snapshot(out=buf)`` of an array from ``grid.array()``
  (two seqlocked buffers; no lock taken unless publishers keep winning);
- a numpy array over ``multiprocessing.shared_memory.SharedMemory``, copied
  with ``np.copyto(buf, shared)`` while holding a ``multiprocessing.Lock``
  (the writer holds the same lock while it copies a new version in);
- ``np.copyto(buf, private)`` of an ordinary array: the memory-bandwidth
  ceiling (nothing shared, nothing checked).

Sizes: 4 KiB, 1 MiB, 64 MiB of uint8. Two situations: idle (nobody
writes), and with one other process publishing new versions back to back
(shmgrid ``publish``; for the lock peer, lock + copyto + unlock, in a loop).
The reader is this process; the publisher is a forked process that opens
the array itself. Each figure is the median of the repetitions of one timed
pass of ~0.4 s (a repetition runs every peer in turn); a snapshot copies the
whole array into the same preallocated buffer each time. With --check every
snapshot taken under a publisher is verified (all bytes of a version are
equal): slower, so not the default. A benchmark, not a test.

    python benchmarks/bench_array.py [--quick] [--reps N] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing import shared_memory
from typing import Any, Callable, Dict, List, Optional

import numpy as np

import shmgrid
from benchcommon import OtherCpu, dist_version, host

SIZES = [("4 KiB", 4 << 10), ("1 MiB", 1 << 20), ("64 MiB", 64 << 20)]
PASS_S = 0.4
CTX = mp.get_context("fork")


def timed(op: Callable[[], Any], seconds: float) -> float:
    """Calls of op per second over a pass of about `seconds`."""
    op()  # warm: pages touched, caches as in steady state
    n, batch = 0, 1
    t0 = time.perf_counter()
    while True:
        for _ in range(batch):
            op()
        n += batch
        el = time.perf_counter() - t0
        if el >= seconds:
            return n / el
        if el < seconds / 20:
            batch *= 2


def _flag() -> memoryview:
    return memoryview(mmap.mmap(-1, 16)).cast("q")  # [stop, publishes]


def _shmgrid_publisher(grid_name: str, flag: memoryview) -> None:
    g = shmgrid.Grid.attach(grid_name)
    a = g.array("bench")
    k = 0
    srcs = [np.full(a.shape, i, np.uint8) for i in (1, 2)]
    while not flag[0]:
        a.publish(srcs[k & 1])
        k += 1
        flag[1] = k
    os._exit(0)


def _lock_publisher(shm_name: str, nbytes: int, lock: Any, flag: memoryview) -> None:
    shm = shared_memory.SharedMemory(shm_name)
    arr = np.ndarray((nbytes,), np.uint8, buffer=shm.buf)
    k = 0
    srcs = [np.full(nbytes, i, np.uint8) for i in (1, 2)]
    while not flag[0]:
        with lock:
            np.copyto(arr, srcs[k & 1])
        k += 1
        flag[1] = k
    os._exit(0)


class Peer:
    def __init__(self, label: str) -> None:
        self.label = label

    def setup(self, nbytes: int) -> None: ...
    def snapshot(self) -> None: ...
    def start_publisher(self) -> Optional[Any]: return None
    def check(self) -> bool: return True
    def teardown(self) -> None: ...


class Shmgrid(Peer):
    def setup(self, nbytes: int) -> None:
        self.name = f"bench-array-{os.getpid()}"
        self.grid = shmgrid.Grid.create(self.name, size=max(64 << 20, 3 * nbytes + (16 << 20)))  # two copies, in a block of a size class (up to +25%)
        self.a = self.grid.array("bench", nbytes, np.uint8)
        self.a.publish(np.zeros(nbytes, np.uint8))
        self.out = np.empty(nbytes, np.uint8)

    def snapshot(self) -> None:
        self.a.snapshot(out=self.out)

    def check(self) -> bool:
        return bool((self.out == self.out[0]).all())

    def start_publisher(self, flag: memoryview) -> Any:
        p = CTX.Process(target=_shmgrid_publisher, args=(self.name, flag), daemon=True)
        p.start()
        return p

    def teardown(self) -> None:
        del self.a
        self.grid.close()
        shmgrid.Grid.unlink(self.name)


class LockedSharedMemory(Peer):
    def setup(self, nbytes: int) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=nbytes)
        self.arr = np.ndarray((nbytes,), np.uint8, buffer=self.shm.buf)
        self.arr[:] = 0
        self.lock = CTX.Lock()
        self.out = np.empty(nbytes, np.uint8)
        self.nbytes = nbytes

    def snapshot(self) -> None:
        with self.lock:
            np.copyto(self.out, self.arr)

    def check(self) -> bool:
        return bool((self.out == self.out[0]).all())

    def start_publisher(self, flag: memoryview) -> Any:
        p = CTX.Process(target=_lock_publisher, args=(self.shm.name, self.nbytes, self.lock, flag), daemon=True)
        p.start()
        return p

    def teardown(self) -> None:
        del self.arr
        self.shm.close()
        self.shm.unlink()


class PlainCopy(Peer):
    def setup(self, nbytes: int) -> None:
        self.src = np.zeros(nbytes, np.uint8)
        self.out = np.empty(nbytes, np.uint8)

    def snapshot(self) -> None:
        np.copyto(self.out, self.src)


PEERS = [("shmgrid", "shmgrid snapshot()", Shmgrid), ("mp_lock", "SharedMemory + mp.Lock + copyto", LockedSharedMemory),
         ("np_copy", "np.copyto, private (ceiling)", PlainCopy)]


def bench(args: argparse.Namespace) -> Dict[str, Any]:
    sizes = SIZES[:2] if args.quick else SIZES
    reps = args.reps
    runs: Dict[str, List[Dict[str, Any]]] = {}
    cpu = OtherCpu()
    for rep in range(reps):
        for size_label, nbytes in sizes:
            for key, label, cls in PEERS:
                for mode in ("idle", "publisher"):
                    if mode == "publisher" and key == "np_copy":
                        continue
                    print(f"rep {rep + 1}/{reps}: {size_label:7} {mode:9} {label:34}", end="\r", flush=True,
                          file=sys.stderr)
                    peer = cls(label)
                    peer.setup(nbytes)
                    flag, proc, torn = _flag(), None, 0
                    try:
                        if mode == "publisher":
                            proc = peer.start_publisher(flag)
                            while flag[1] < 2:  # it is going
                                time.sleep(0.001)
                        if args.check and mode == "publisher":
                            def op() -> None:
                                nonlocal torn
                                peer.snapshot()
                                torn += not peer.check()
                        else:
                            op = peer.snapshot
                        p0 = flag[1]
                        t0 = time.perf_counter()
                        rate = timed(op, args.seconds)
                        pub_rate = (flag[1] - p0) / (time.perf_counter() - t0)
                    finally:
                        flag[0] = 1
                        if proc is not None:
                            proc.join(10)
                        peer.teardown()
                    runs.setdefault(f"{key}|{size_label}|{mode}", []).append(
                        {"snapshots_s": rate, "gb_s": rate * nbytes / 1e9, "publishes_s": pub_rate, "torn": torn})
    print(" " * 80, end="\r", file=sys.stderr)
    figures = {}
    for k, rs in runs.items():
        key, size_label, mode = k.split("|")
        med = statistics.median(r["snapshots_s"] for r in rs)
        rates = [r["snapshots_s"] for r in rs]
        figures[k] = {"peer": key, "size": size_label, "mode": mode, "snapshots_s": med,
                      "gb_s": med * dict(SIZES)[size_label] / 1e9,
                      "range": (max(rates) - min(rates)) / med if med else 0.0,
                      "publishes_s": statistics.median(r["publishes_s"] for r in rs),
                      "torn": sum(r["torn"] for r in rs)}
    machine = {**host(), "numpy": dist_version("numpy"), "other_cpus_busy": round(cpu.cpus(), 2)}
    return {"figures": figures, "runs": runs, "machine": machine, "reps": reps, "seconds": args.seconds,
            "checked": bool(args.check)}


def report(res: Dict[str, Any]) -> None:
    f = res["figures"]
    m = res["machine"]
    print(f"machine: {m['cpu']}, {m['cpus']} CPUs{' (virtualized)' if m['virtualized'] else ''}, kernel "
          f"{m['kernel']}, Python {m['python']}, numpy {m['numpy']}, shmgrid {m['commit']}; other processes kept "
          f"{m['other_cpus_busy']} CPUs busy")
    print(f"medians of {res['reps']} repetitions, passes of {res['seconds']} s")
    print(f"| size | situation | peer | snapshots/s | GB/s | range | publishes/s{' | torn' if res['checked'] else ''} |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---:" + (" | ---:" if res["checked"] else "") + " |")
    sizes = [s for s, _ in SIZES if any(v["size"] == s for v in f.values())]
    for size in sizes:
        for mode in ("idle", "publisher"):
            for key, label, _ in PEERS:
                v = f.get(f"{key}|{size}|{mode}")
                if not v:
                    continue
                pub = f"{v['publishes_s']:,.0f}" if mode == "publisher" else "-"
                print(f"| {size} | {mode} | {label} | {v['snapshots_s']:,.0f} | {v['gb_s']:.2f} | {v['range']:.0%} | "
                      f"{pub}" + (f" | {v['torn']}" if res["checked"] else "") + " |")
    print()
    print("| size | situation | shmgrid / SharedMemory+Lock | shmgrid / np.copyto |")
    print("| --- | --- | ---: | ---: |")
    for size in sizes:
        for mode in ("idle", "publisher"):
            s = f.get(f"shmgrid|{size}|{mode}")
            lk = f.get(f"mp_lock|{size}|{mode}")
            cp = f.get(f"np_copy|{size}|idle")
            if s and lk and cp:
                print(f"| {size} | {mode} | {s['snapshots_s'] / lk['snapshots_s']:.2f}x | "
                      f"{s['snapshots_s'] / cp['snapshots_s']:.2f}x |")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 KiB and 1 MiB only, 3 repetitions")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5; 3 with --quick)")
    p.add_argument("--seconds", type=float, default=PASS_S, help="length of one timed pass")
    p.add_argument("--check", action="store_true", help="verify every snapshot taken under a publisher")
    p.add_argument("--json", help="write figures, every repetition and the machine to this file")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    res = bench(args)
    report(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
