#!/usr/bin/env python3
"""Single-operation get/put throughput of shmgrid.Map and what a user would
pick instead, measured in one process and one run:

- shmgrid Map (a grid in /dev/shm);
- LMDB through py-lmdb, one transaction per operation, environment in a
  temporary directory on /dev/shm (flags in LMDB_FLAGS);
- multiprocessing.Manager().dict() (fewer keys and a time box: one IPC
  round trip per call);
- a plain dict, the in-process ceiling.

Every peer gets the same pre-generated 16-byte keys and 32-byte values. The
keys are stored first (that pass is the put warm-up), then each repetition
times one pass of ``get`` and one of ``put`` (overwriting keys that exist)
over the keys in a shuffled order, after an untimed warm-up pass of each.
The figure is the median of the repetitions. A benchmark, not a test: the
exit status does not depend on the targets.

    python benchmarks/bench_map.py [--quick] [--ops N] [--json FILE]
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import lmdb

import shmgrid

KEY_BYTES, VALUE_BYTES = 16, 32
LMDB_FLAGS = {"sync": False, "metasync": False, "writemap": True}
SEED = 20240601

# (operation, peer, factor): shmgrid's figure must be >= factor x the peer's
TARGETS = [("get", "lmdb", 1.3), ("put", "lmdb", 3.0), ("get", "manager", 100.0), ("put", "manager", 100.0)]

Ops = Tuple[Callable[..., Any], Callable[..., Any]]  # (get(key), put(key, value))


# ---- peers: each opens a store for n keys, yields its (get, put), cleans up ----

@contextmanager
def shmgrid_map(nkeys: int) -> Iterator[Ops]:
    name = f"bench_map_{os.getpid()}"
    grid = shmgrid.Grid.create(name, size=64 * 2**20 + nkeys * 512)
    try:
        m = grid.map("bench", capacity=nkeys, max_key=KEY_BYTES, max_value=VALUE_BYTES)
        yield m.get, m.put
    finally:
        grid.close()
        shmgrid.Grid.unlink(name)


@contextmanager
def lmdb_env(nkeys: int) -> Iterator[Ops]:
    path = tempfile.mkdtemp(prefix="bench_map_lmdb_", dir="/dev/shm")
    try:
        env = lmdb.open(path, map_size=64 * 2**20 + nkeys * 1024, **LMDB_FLAGS)
        try:
            begin = env.begin

            def get(key: bytes) -> Optional[bytes]:
                with begin() as txn:
                    return txn.get(key)  # type: ignore[no-any-return]

            def put(key: bytes, value: bytes) -> None:
                with begin(write=True) as txn:
                    txn.put(key, value)

            yield get, put
        finally:
            env.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def manager_dict(nkeys: int) -> Iterator[Ops]:
    # spawn: the server must not inherit the grid or the LMDB environment
    with multiprocessing.get_context("spawn").Manager() as manager:
        d = manager.dict()
        yield d.get, d.__setitem__


@contextmanager
def plain_dict(nkeys: int) -> Iterator[Ops]:
    d: Dict[bytes, bytes] = {}
    yield d.get, d.__setitem__


@dataclass
class Peer:
    key: str
    label: str
    open: Callable[[int], Any]
    slow: bool = False  # gets --manager-keys keys and a time box per pass


PEERS = [
    Peer("shmgrid", "shmgrid Map", shmgrid_map),
    Peer("lmdb", "LMDB, 1 txn/op", lmdb_env),
    Peer("manager", "Manager().dict()", manager_dict, slow=True),
    Peer("dict", "dict (1 process)", plain_dict),
]


# ---- timing ----------------------------------------------------------------

def ops_per_sec(op: Callable[..., Any], *columns: List[bytes]) -> float:
    """Call op once per row of the columns (op(k) or op(k, v)) and return
    calls per second. The loop is C (map drained by a deque), so every peer
    pays the same, small, driver cost; the collector is off while timing."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        deque(map(op, *columns), maxlen=0)
        elapsed = time.perf_counter() - t0
    finally:
        if gc_was_on:
            gc.enable()
    return len(columns[0]) / elapsed


def shuffled(keys: List[bytes], n: int, rng: random.Random) -> List[bytes]:
    """n keys: whole shuffled passes over `keys`, cut to length."""
    out: List[bytes] = []
    while len(out) < n:
        chunk = keys[:]
        rng.shuffle(chunk)
        out.extend(chunk)
    return out[:n]


class Run:
    """One peer's store, filled and warmed up, with its access order; each
    call of rep() times one get pass and one put pass."""

    def __init__(self, peer: Peer, ops: Ops, keys: List[bytes], values: List[bytes], new_values: List[bytes],
                 args: argparse.Namespace) -> None:
        self.peer, (self.get, self.put) = peer, ops
        fill_rate = ops_per_sec(self.put, keys, values)  # store every key: also the put warm-up
        if self.get(keys[0]) != values[0] or self.get(keys[-1]) != values[-1]:
            raise RuntimeError(f"{peer.label}: a stored value does not read back")
        nops = args.ops
        if peer.slow:  # time box: about args.budget seconds per timed pass
            nops = max(min(nops, int(fill_rate * args.budget)), 100)
        self.keys = len(keys)
        self.order = shuffled(keys, nops, random.Random(SEED + 1))
        self.values = new_values[:nops]
        ops_per_sec(self.get, self.order)  # warm-up
        ops_per_sec(self.put, self.order, self.values)
        self.gets: List[float] = []
        self.puts: List[float] = []

    def rep(self) -> None:
        self.gets.append(ops_per_sec(self.get, self.order))
        self.puts.append(ops_per_sec(self.put, self.order, self.values))

    def result(self) -> Dict[str, Any]:
        if self.get(self.order[-1]) != self.values[-1]:
            raise RuntimeError(f"{self.peer.label}: the last value put does not read back")
        return {"label": self.peer.label, "keys": self.keys, "ops_per_rep": len(self.order),
                "get": statistics.median(self.gets), "put": statistics.median(self.puts),
                "get_reps": self.gets, "put_reps": self.puts}


def bench(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Open every peer, fill and warm each up, then time them in turns: each
    repetition runs every peer once, so a drift of the machine's speed during
    the run falls on all of them alike rather than on one."""
    rng = random.Random(SEED)
    keys = [rng.randbytes(KEY_BYTES) for _ in range(args.keys)]
    values = [rng.randbytes(VALUE_BYTES) for _ in range(len(keys))]
    new_values = [rng.randbytes(VALUE_BYTES) for _ in range(args.ops)]
    with ExitStack() as stack:  # closes and removes every store, also on error
        runs = []
        for peer in PEERS:
            n = min(len(keys), args.manager_keys) if peer.slow else len(keys)
            ops = stack.enter_context(peer.open(n))
            runs.append(Run(peer, ops, keys[:n], values[:n], new_values, args))
        for i in range(args.reps):
            print(f"rep {i + 1}/{args.reps}", end="\r", flush=True, file=sys.stderr)
            for run in runs:
                run.rep()
        print(file=sys.stderr)
        return {run.peer.key: run.result() for run in runs}


# ---- report ----------------------------------------------------------------

def ratios(results: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    return {f"{op}_vs_{peer}": results["shmgrid"][op] / results[peer][op]
            for peer in ("lmdb", "manager") for op in ("get", "put")}


def targets(r: Dict[str, float]) -> List[Dict[str, Any]]:
    return [{"op": op, "peer": peer, "factor": f, "ratio": r[f"{op}_vs_{peer}"], "pass": r[f"{op}_vs_{peer}"] >= f}
            for op, peer, f in TARGETS]


def spread(reps: List[float]) -> str:
    med = statistics.median(reps)
    return f"{100 * (max(reps) - min(reps)) / med:.0f}%"


def print_report(results: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> List[Dict[str, Any]]:
    print(f"\n{KEY_BYTES}-byte keys, {VALUE_BYTES}-byte values; median of {args.reps} reps; "
          f"LMDB flags: {', '.join(f'{k}={v}' for k, v in LMDB_FLAGS.items())}\n")
    print(f"{'':18} {'get ops/s':>12} {'(range)':>8} {'put ops/s':>12} {'(range)':>8} {'keys':>8} {'ops/rep':>8}")
    for r in results.values():
        print(f"{r['label']:18} {r['get']:12,.0f} {spread(r['get_reps']):>8} {r['put']:12,.0f} "
              f"{spread(r['put_reps']):>8} {r['keys']:8,} {r['ops_per_rep']:8,}")
    rat = ratios(results)
    print(f"\n{'shmgrid / LMDB':18} get {rat['get_vs_lmdb']:8.2f}x   put {rat['put_vs_lmdb']:8.2f}x")
    print(f"{'shmgrid / Manager':18} get {rat['get_vs_manager']:8.1f}x   put {rat['put_vs_manager']:8.1f}x\n")
    checks = targets(rat)
    for t in checks:
        what = f"{t['op']} >= {t['factor']:g}x {results[t['peer']]['label'].split(',')[0]} {t['op']}"
        print(f"target {what:32} {t['ratio']:10.2f}x  {'PASS' if t['pass'] else 'MISS'}")
    return checks


def machine() -> Dict[str, str]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu, "cpus": str(os.cpu_count()), "kernel": platform.release(),
            "python": platform.python_version(), "shmgrid": shmgrid.__version__, "lmdb": lmdb.__version__,
            "lmdb_c": ".".join(map(str, lmdb.version()))}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Single-op get/put throughput: shmgrid Map, LMDB, Manager dict, dict.")
    p.add_argument("--quick", action="store_true", help="a short run (fewer keys, ops and reps)")
    p.add_argument("--ops", type=int, help="operations per timed pass (default: the key count)")
    p.add_argument("--keys", type=int, help="distinct keys (default 100,000; 20,000 with --quick)")
    p.add_argument("--reps", type=int, help="timed repetitions, median taken (default 7; 3 with --quick)")
    p.add_argument("--manager-keys", type=int, help="keys for the Manager dict (default 10,000; 2,000 with --quick)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    a = p.parse_args(argv)
    a.keys = a.keys or (20_000 if a.quick else 100_000)
    a.ops = a.ops or a.keys
    a.reps = a.reps or (3 if a.quick else 7)
    a.manager_keys = a.manager_keys or (2_000 if a.quick else 10_000)
    a.budget = 0.2 if a.quick else 1.0  # seconds per timed pass of the Manager dict
    for name in ("keys", "ops", "reps", "manager_keys"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the grid and the LMDB directory are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results = bench(args)
    checks = print_report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "key_bytes": KEY_BYTES, "value_bytes": VALUE_BYTES,
                       "keys": args.keys, "ops": args.ops, "reps": args.reps, "lmdb_flags": LMDB_FLAGS,
                       "results": results, "ratios": ratios(results), "targets": checks}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
