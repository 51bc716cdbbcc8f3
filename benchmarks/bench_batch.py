#!/usr/bin/env python3
"""Batch get/put of 1M int64 keys with float64 values: shmgrid's batch calls
on numpy arrays against the loop of single calls and a plain dict, measured
in one process and one run.

- shmgrid batch: a typed map (``grid.map(name, key_dtype="i8",
  value_dtype="f8", capacity=N)``), ``get_many(keys)`` / ``put_many(keys,
  values)`` on numpy arrays, one call for all N keys;
- shmgrid single calls, two loops: on the same typed map (``m[k]`` /
  ``m.put(k, v)`` with Python ints and floats, what a user holding numbers
  writes) and on an untyped map with the keys and values pre-encoded as
  8-byte ``bytes`` (``m.get(kb)`` / ``m.put(kb, vb)``, the fastest single
  call there is); a subset of --single keys, as keys/s;
- a plain dict of Python ints and floats: ``d.update(zip(keys, values))``
  and ``list(map(d.__getitem__, keys))`` on Python lists (the tolist()
  conversion not timed), the in-process ceiling.

Keys are N distinct random int64s. Two orders are timed, because they differ
by a factor on a machine without huge pages for shared memory: "write
order" (the keys in the order they were first stored: their key and value
blocks then lie in memory in that order, and only the hash-scattered slots
are random accesses) and "random order" (a fresh permutation, another one
for the get than for the put: slot, key block and value block are three
random accesses). Puts are overwrites of present keys; the first insertion of the N
keys into a fresh map (which also pays for the kernel zeroing the tmpfs
pages the map's blocks land on) is reported apart. Each repetition times
every peer once, in turn; figures are medians. A benchmark, not a test: the
exit status does not depend on the targets.

    python benchmarks/bench_batch.py [--quick] [--keys N] [--single N] [--reps N] [--json FILE]
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads would spin on the 2 CPUs

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import deque  # noqa: E402
from typing import Any, Callable, Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402

import shmgrid  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchcommon import OtherCpu, host  # noqa: E402

SEED = 20261121
# (figure, floor in keys/s) and (figure, peer, factor)
ABSOLUTE = [("batch get", 10e6), ("batch put", 5e6), ("batch get, write order", 10e6),
            ("batch put, write order", 5e6)]
RELATIVE = [(f"batch {op}{order}", f"single {op} ({form})", 10.0)
            for order in ("", ", write order") for form in ("typed", "bytes") for op in ("get", "put")]


def timed(fn: Callable[[], Any], n: int) -> float:
    """keys/s of one call of fn doing n keys (the collector off)."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t0)
    finally:
        gc.enable()


def bench(args: argparse.Namespace) -> Dict[str, Any]:
    n, s = args.keys, args.single
    rng = np.random.default_rng(SEED)
    keys = np.unique(rng.integers(-(2**62), 2**62, int(n * 1.01)))[:n]
    rng.shuffle(keys)  # write order
    n = len(keys)
    vals = rng.standard_normal(n)
    shuffled = rng.permutation(n)
    rkeys, rvals = keys[shuffled], vals[shuffled]
    # the random-order get walks another permutation than the put's: a put
    # reallocates value blocks in its own order, and a get in that same
    # order would find them in sequence (only the slot and key block random)
    gkeys = keys[rng.permutation(n)]
    kl, vl = keys.tolist(), vals.tolist()
    rkl = rkeys.tolist()
    sub = rng.choice(n, s, replace=False)  # the single-call loops' keys, in random order
    skl, svl = keys[sub].tolist(), vals[sub].tolist()
    skb, svb = [keys[i].tobytes() for i in sub], [vals[i].tobytes() for i in sub]

    name = f"bench-batch-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    grid = shmgrid.Grid.create(name, size=args.grid_size)
    figures: Dict[str, List[float]] = {}

    def record(label: str, v: float) -> None:
        figures.setdefault(label, []).append(v)

    other = OtherCpu()
    try:
        # two typed maps, so that the random-order puts of one do not scatter
        # the value blocks the write-order passes of the other walk in order
        m = grid.map("typed", key_dtype="i8", value_dtype="f8", capacity=n)
        mw = grid.map("typed-write-order", key_dtype="i8", value_dtype="f8", capacity=n)
        mb = grid.map("bytes", max_key=8, max_value=8, capacity=n)
        record("first insert (batch)", timed(lambda: m.put_many(keys, vals), n))
        mw.put_many(keys, vals)
        mb.put_many([k.tobytes() for k in keys], [v.tobytes() for v in vals])  # untimed
        assert np.array_equal(m.get_many(keys), vals)
        d: Dict[int, float] = {}
        # warm-up, untimed: every peer once
        m.get_many(gkeys), m.put_many(rkeys, rvals), mw.get_many(keys), mw.put_many(keys, vals)
        deque(map(m.get, skl[:1000]), 0), deque(map(mb.get, skb[:1000]), 0)
        d.update(zip(kl, vl))
        for _ in range(args.reps):
            record("batch get", timed(lambda: m.get_many(gkeys), n))
            record("batch put", timed(lambda: m.put_many(rkeys, rvals), n))
            record("batch get, write order", timed(lambda: mw.get_many(keys), n))
            record("batch put, write order", timed(lambda: mw.put_many(keys, vals), n))
            get, put, bget, bput = m.get, m.put, mb.get, mb.put
            record("single get (typed)", timed(lambda: deque(map(get, skl), 0), s))
            record("single put (typed)", timed(lambda: deque(map(put, skl, svl), 0), s))
            record("single get (bytes)", timed(lambda: deque(map(bget, skb), 0), s))
            record("single put (bytes)", timed(lambda: deque(map(bput, skb, svb), 0), s))
            record("dict get", timed(lambda: list(map(d.__getitem__, rkl)), n))
            record("dict put", timed(lambda: d.update(zip(kl, vl)), n))
        # the first insertion again, into fresh maps (fresh tmpfs pages each time)
        for r in range(min(args.reps, 3)):
            fresh = grid.map(f"fresh{r}", key_dtype="i8", value_dtype="f8", capacity=n)
            record("first insert (batch)", timed(lambda: fresh.put_many(keys, vals), n))
        assert np.array_equal(m.get_many(rkeys), rvals)
    finally:
        grid.close()
        shmgrid.Grid.unlink(name)
    return {"keys": n, "single_keys": s, "reps": args.reps, "other_cpus": round(other.cpus(), 2),
            "median": {k: statistics.median(v) for k, v in figures.items()}, "all": figures}


def report(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    med = res["median"]
    print(f"{res['keys']:,} int64 keys -> float64 values; single-call loops on {res['single_keys']:,} keys; "
          f"median of {res['reps']} reps; other processes used {res['other_cpus']} CPUs meanwhile")
    print(f"{'':34}{'keys/s':>14}{'vs dict':>10}")
    dict_of = {"get": med["dict get"], "put": med["dict put"]}
    for k, v in med.items():
        op = "get" if "get" in k else "put"
        print(f"{k:34}{v / 1e6:>12.2f} M{v / dict_of[op]:>9.2f}x")
    checks = []
    for fig, floor in ABSOLUTE:
        ok = med[fig] >= floor
        checks.append({"check": f"{fig} >= {floor / 1e6:.0f}M keys/s", "value": med[fig], "pass": ok})
    for fig, peer, factor in RELATIVE:
        ratio = med[fig] / med[peer]
        checks.append({"check": f"{fig} >= {factor:g}x {peer}", "value": ratio, "pass": ratio >= factor})
    print()
    for c in checks:
        v = c["value"]
        shown = f"{v / 1e6:.2f}M" if v > 1000 else f"{v:.1f}x"
        print(f"{'PASS' if c['pass'] else 'MISS'}  {c['check']:56} ({shown})")
    return checks


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Batch get/put of int64 -> float64 keys: batch, single calls, dict.")
    p.add_argument("--quick", action="store_true", help="a short run (100,000 keys, 3 reps)")
    p.add_argument("--keys", type=int, help="keys (default 1,000,000)")
    p.add_argument("--single", type=int, help="keys of the single-call loops (default 200,000)")
    p.add_argument("--reps", type=int, help="repetitions, median taken (default 5)")
    p.add_argument("--grid-size", default="2GiB", help="size of the benchmark's grid (default 2GiB, sparse)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    a = p.parse_args(argv)
    a.keys = a.keys or (100_000 if a.quick else 1_000_000)
    a.single = min(a.single or (50_000 if a.quick else 200_000), a.keys)
    a.reps = a.reps or (3 if a.quick else 5)
    return a


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    res = bench(args)
    checks = report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": host(), **res, "checks": checks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
