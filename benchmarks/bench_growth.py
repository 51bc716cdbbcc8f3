#!/usr/bin/env python3
"""What online growth costs a shmgrid.Map, measured in one run:

1. put throughput of inserting N distinct keys into a map created with
   capacity 1,024 (it migrates, online, to larger tables as it fills) and
   into a map pre-sized with capacity N, from one process;
2. the latency of every single put of that workload, for both maps, and
   for the growing map restricted to the puts that ran while a migration
   was under way (or that started or finished one, or freed an old table);
3. the total put throughput of 2 processes (fork) each inserting its own
   half of the keys, into a growing and into a pre-sized map.

Every measurement inserts into a fresh grid (created, with its map, before
the timing; removed after it), so both maps pay the same for the heap their
keys and values take, and the pre-sized map's table is allocated and backed
when it is created, untimed: what pre-sizing buys. Each repetition
runs every measurement once, growing and pre-sized back to back; the
figures are medians of the repetitions. A benchmark, not a test: the exit
status does not depend on the targets.

    python benchmarks/bench_growth.py [--quick] [--keys N] [--reps N] [--json FILE]
"""
from __future__ import annotations

import argparse
import bisect
import gc
import json
import math
import mmap
import multiprocessing
import os
import queue
import random
import resource
import signal
import statistics
import struct
import sys
import time
import traceback
from array import array
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import shmgrid
from benchcommon import OtherCpu, die_with_parent, host
from shmgrid._core import lib

KEY_BYTES, VALUE_BYTES = 16, 32
SEED = 20240606
GROWING_CAPACITY = 1024
TARGET_RATIO = 2.0  # pre-sized put throughput / growing put throughput, at most
TARGET_WAIT_NS = 1_000_000  # no put that meets a migration takes longer
PERCENTILES = (50.0, 99.0, 99.9, 99.99)
CHILD_TIMEOUT = 300.0  # seconds a 2-process fill may take before it is killed

FORK = multiprocessing.get_context("fork")


# ---- grids -------------------------------------------------------------------

_grid_seq = 0


@contextmanager
def fresh_map(nkeys: int, capacity: int) -> Iterator[Tuple[str, Any]]:
    """A new grid holding one empty map "m" (the capacity given); yields
    (grid name, map). The grid is closed and unlinked on the way out, also
    on an error. Grids are sparse: only pages touched cost memory."""
    global _grid_seq
    _grid_seq += 1
    name = f"bench_growth_{os.getpid()}_{_grid_seq}"
    # keys and values take ~80 bytes a key, tables at most ~90 (growth to 4x
    # the slots needed), the tables a growing map left behind ~30
    grid = shmgrid.Grid.create(name, size=64 * 2**20 + nkeys * 512)
    try:
        yield name, grid.map("m", capacity=capacity, max_key=KEY_BYTES, max_value=VALUE_BYTES)
    finally:
        grid.close()
        shmgrid.Grid.unlink(name)


class TableProbe:
    """Reads the map's table state straight from the segment, read-only and
    in ~100 ns, because ``Map.validate()`` walks the whole table and first
    finishes any migration under way (far too slow and too intrusive to call
    between puts). Depends on the segment layout in csrc/sg_layout.h
    (sg_dirent.obj, sg_map_hdr.table / .retired, sg_table_hdr.nslots /
    .generation / .next); ``check`` compares it with ``validate()``."""

    BLOCK_HDR = 16  # sg_block: meta, word; the payload follows
    DIRENT_OBJ = 80  # offsetof(sg_dirent, obj)
    MAP_TABLE, MAP_RETIRED = 64, 72  # offsetof(sg_map_hdr, table / retired)
    TAB_NSLOTS, TAB_GENERATION, TAB_NEXT = 0, 8, 16  # offsetof(sg_table_hdr, ...)

    def __init__(self, grid_name: str, map_name: str = "m") -> None:
        fd = os.open(os.path.join(shmgrid.grid.SHM_DIR, grid_name), os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        u64 = struct.Struct("<Q").unpack_from
        hdr = None
        for i in range(lib.SG_DIR_SIZE):
            off = lib.SG_DIR_OFFSET + i * lib.SG_DIRENT_SIZE
            state, _kind, name_len = struct.unpack_from("<QII", self.mm, off)
            if state == 2 and self.mm[off + 16:off + 16 + name_len] == map_name.encode():
                hdr = u64(self.mm, off + self.DIRENT_OBJ)[0] + self.BLOCK_HDR
                break
        if hdr is None:
            raise RuntimeError(f"TableProbe: no map {map_name!r} in the directory of grid {grid_name!r}")
        self.table_word = hdr + self.MAP_TABLE
        self.retired_word = hdr + self.MAP_RETIRED
        self.u64 = u64

    def head(self) -> int:
        """Offset of the head table (sg_table_hdr = offset + BLOCK_HDR)."""
        return self.u64(self.mm, self.table_word)[0]  # type: ignore[no-any-return]

    def table_field(self, table: int, field: int) -> int:
        return self.u64(self.mm, table + self.BLOCK_HDR + field)[0]  # type: ignore[no-any-return]

    def generation(self) -> int:
        return self.table_field(self.head(), self.TAB_GENERATION)

    def check(self, m: Any) -> None:
        """The probe reads what validate() reports (no migration under way)."""
        rep = m.validate()
        t = self.head()
        mine = (self.table_field(t, self.TAB_GENERATION), self.table_field(t, self.TAB_NSLOTS))
        if mine != (rep["generation"], rep["nslots"]) or self.table_field(t, self.TAB_NEXT):
            raise RuntimeError(f"TableProbe reads generation/slots {mine}, validate() says "
                               f"{(rep['generation'], rep['nslots'])}: the segment layout changed, update the probe")

    def close(self) -> None:
        self.mm.close()


# ---- timing ------------------------------------------------------------------

@contextmanager
def gc_off() -> Iterator[None]:
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def ops_per_sec(op: Callable[..., Any], *columns: List[bytes]) -> float:
    """Call op once per row of the columns and return calls per second. The
    loop is C (map drained by a deque), so the driver's cost is small and
    the same for both maps; the collector is off while timing."""
    with gc_off():
        t0 = time.perf_counter()
        deque(map(op, *columns), maxlen=0)
        elapsed = time.perf_counter() - t0
    return len(columns[0]) / elapsed


# flags of one put in the latency pass
MIGRATING = 1  # a migration was under way when the put began or ended (it helped copy)
STARTED = 2  # the put began a migration (published the next table)
FINISHED = 4  # the put finished a migration (swung the map to the next table)
FREED = 8  # the put freed a retired table (walks the old table's slots)
FLAG_NAMES = [(STARTED, "started a migration"), (FINISHED, "finished a migration"),
              (FREED, "freed an old table"), (MIGRATING, "helped a migration")]


def timed_puts(m: Any, probe: TableProbe, keys: List[bytes], values: List[bytes]
               ) -> Tuple[array, bytearray, array]:
    """Put every key, timing each put alone with perf_counter_ns. Returns
    the latencies (ns), per-put flags (see MIGRATING...) read from the
    segment after each put, outside the timed window, and the generation
    after each put."""
    n = len(keys)
    lat = array("q", bytes(8 * n))
    flags = bytearray(n)
    gens = array("H", bytes(2 * n))
    pc, put = time.perf_counter_ns, m.put
    u64, mm, tw, rw, hdr = probe.u64, probe.mm, probe.table_word, probe.retired_word, probe.BLOCK_HDR
    next_at, gen_at = hdr + probe.TAB_NEXT, hdr + probe.TAB_GENERATION
    tab = u64(mm, tw)[0]
    nxt = u64(mm, tab + next_at)[0]
    ret = u64(mm, rw)[0]
    gen = u64(mm, tab + gen_at)[0]
    with gc_off():
        for i in range(n):
            k, v = keys[i], values[i]
            t0 = pc()
            put(k, v)
            t1 = pc()
            lat[i] = t1 - t0
            tab2 = u64(mm, tw)[0]
            nxt2 = u64(mm, tab2 + next_at)[0]
            ret2 = u64(mm, rw)[0]
            f = 0
            if nxt or nxt2 or tab2 != tab:
                f = MIGRATING
                if tab2 != tab:
                    f |= FINISHED
                    gen = u64(mm, tab2 + gen_at)[0]
                if nxt2 and nxt2 != nxt and tab2 == tab:
                    f |= STARTED
            if tab2 != tab:  # it retired the old head onto the list: did it free it (or another) too?
                if ret2 != tab:
                    f |= FREED
            elif ret2 != ret:
                f |= FREED
            flags[i] = f
            gens[i] = gen
            tab, nxt, ret = tab2, nxt2, ret2
    return lat, flags, gens


def timer_overhead_ns(samples: int = 100_000) -> int:
    """Median of back-to-back perf_counter_ns pairs: the floor of a latency."""
    pc = time.perf_counter_ns
    lat = array("q", bytes(8 * samples))
    with gc_off():
        for i in range(samples):
            t0 = pc()
            t1 = pc()
            lat[i] = t1 - t0
    return int(statistics.median(lat))


def percentile(sorted_vals: List[int], p: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    if not sorted_vals:
        return 0
    return sorted_vals[max(0, math.ceil(p / 100 * len(sorted_vals)) - 1)]


def summary(vals: List[int]) -> Dict[str, Any]:
    s = sorted(vals)
    out: Dict[str, Any] = {f"p{p:g}": percentile(s, p) for p in PERCENTILES}
    out["max"] = s[-1] if s else 0
    out["count"] = len(s)
    out["over_1ms"] = len(s) - bisect.bisect_right(s, TARGET_WAIT_NS)
    return out


def describe(flag: int) -> str:
    names = [name for bit, name in FLAG_NAMES if flag & bit and not (bit == MIGRATING and flag & (STARTED | FINISHED))]
    return ", ".join(names) or "no migration"


# ---- the three measurements ----------------------------------------------------

def fill_throughput(keys: List[bytes], values: List[bytes], capacity: int) -> Dict[str, Any]:
    with fresh_map(len(keys), capacity) as (_, m):
        rate = ops_per_sec(m.put, keys, values)
        if m.get(keys[-1]) != values[-1] or len(m) != len(keys):
            raise RuntimeError("fill: the map does not hold every key")
        return {"ops_per_sec": rate, "generation": m.validate()["generation"]}


def fill_latency(keys: List[bytes], values: List[bytes], capacity: int) -> Dict[str, Any]:
    with fresh_map(len(keys), capacity) as (name, m):
        probe = TableProbe(name)
        try:
            probe.check(m)
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            lat, flags, gens = timed_puts(m, probe, keys, values)
            elapsed = time.perf_counter() - t0
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            probe.check(m)
            generation = probe.generation()
        finally:
            probe.close()
    during = [lat[i] for i in range(len(lat)) if flags[i]]
    top = sorted(range(len(lat)), key=lat.__getitem__, reverse=True)[:10]
    return {
        "all": summary(list(lat)),
        "migrating": summary(during),
        "generation": generation,
        "elapsed_s": elapsed,
        "minor_faults": ru1.ru_minflt - ru0.ru_minflt,
        "invol_switches": ru1.ru_nivcsw - ru0.ru_nivcsw,
        "migration_puts": sum(1 for f in flags if f & MIGRATING),
        "top": [{"index": i, "ns": lat[i], "flags": flags[i], "what": describe(flags[i]), "generation": gens[i]}
                for i in top],
        "slow": [{"index": i, "ns": lat[i], "what": describe(flags[i]), "generation": gens[i]}
                 for i in range(len(lat)) if lat[i] > TARGET_WAIT_NS],
    }


def _child(m: Any, keys: List[bytes], values: List[bytes], lo: int, hi: int, barrier: Any, q: Any,
           parent: int) -> None:
    die_with_parent(parent)
    try:
        ks, vs = keys[lo:hi], values[lo:hi]  # touch the inherited objects before timing (copy-on-write)
        gc.disable()
        barrier.wait(timeout=CHILD_TIMEOUT)
        t0 = time.perf_counter()
        deque(map(m.put, ks, vs), maxlen=0)
        t1 = time.perf_counter()
        q.put(("ok", t0, t1))
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put(("error", traceback.format_exc(), 0.0))
        raise SystemExit(1) from None


def collect(procs: List[Any], q: Any) -> List[Tuple[str, Any, float]]:
    """One report from each process; fails, instead of hanging, if one
    dies without reporting or the time limit passes."""
    reports: List[Tuple[str, Any, float]] = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    while len(reports) < len(procs):
        try:
            reports.append(q.get(timeout=0.5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a 2-process fill child died with exit code {dead[0]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"2-process fill: no result after {CHILD_TIMEOUT:.0f} s") from None
    return reports


def fill_two_processes(keys: List[bytes], values: List[bytes], capacity: int) -> Dict[str, Any]:
    """2 forked processes, each putting its own half of the keys, started
    together; throughput = all keys / (last end - first start)."""
    nproc = 2
    with fresh_map(len(keys), capacity) as (name, m):
        barrier, q = FORK.Barrier(nproc + 1), FORK.Queue()
        bounds = [(len(keys) * i // nproc, len(keys) * (i + 1) // nproc) for i in range(nproc)]
        gc.collect()
        gc.freeze()  # the children's collector never touches (and copies) the parent's objects
        procs = [FORK.Process(target=_child, args=(m, keys, values, lo, hi, barrier, q, os.getpid()), daemon=True)
                 for lo, hi in bounds]
        try:
            for p in procs:
                p.start()
            barrier.wait(timeout=CHILD_TIMEOUT)
            reports = collect(procs, q)
            for p in procs:
                p.join(timeout=CHILD_TIMEOUT)
        finally:
            gc.unfreeze()
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        errors = [r[1] for r in reports if r[0] != "ok"]
        if errors:
            raise RuntimeError("a 2-process fill failed:\n" + "\n".join(errors))
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a 2-process fill child exited with {[p.exitcode for p in procs]}")
        start, end = min(r[1] for r in reports), max(r[2] for r in reports)
        if len(m) != len(keys) or m.get(keys[0]) != values[0] or m.get(keys[-1]) != values[-1]:
            raise RuntimeError("2-process fill: the map does not hold every key")
        return {"ops_per_sec": len(keys) / (end - start), "generation": m.validate()["generation"],
                "per_process_s": [r[2] - r[1] for r in reports]}


def bench(args: argparse.Namespace) -> Dict[str, Any]:
    rng = random.Random(SEED)
    keys = list({rng.randbytes(KEY_BYTES): None for _ in range(args.keys)})  # distinct
    while len(keys) < args.keys:  # (a collision of 16 random bytes: never, in practice)
        k = rng.randbytes(KEY_BYTES)
        if k not in keys:
            keys.append(k)
    values = [rng.randbytes(VALUE_BYTES) for _ in range(len(keys))]
    sizes = {"growing": GROWING_CAPACITY, "presized": len(keys)}
    reps: List[Dict[str, Any]] = []
    # warm-up: one small untimed fill of each kind (code paths, allocator)
    for cap in sizes.values():
        fill_throughput(keys[:20_000], values[:20_000], min(cap, 20_000))
    for i in range(args.reps):
        rep: Dict[str, Any] = {"load_before": os.getloadavg()[0]}
        other = OtherCpu()
        for part, fn in (("throughput", fill_throughput), ("latency", fill_latency),
                         ("two_procs", fill_two_processes)):
            for kind, cap in sizes.items():
                print(f"rep {i + 1}/{args.reps}: {part}, {kind}      ", end="\r", flush=True, file=sys.stderr)
                rep[f"{part}_{kind}"] = fn(keys, values, cap)
        rep["other_cpus"] = other.cpus()
        reps.append(rep)
    print(file=sys.stderr)
    return {"reps": reps, "timer_overhead_ns": timer_overhead_ns()}


# ---- report --------------------------------------------------------------------

def med(reps: List[Dict[str, Any]], *path: str) -> float:
    """Median over the repetitions of the figure at path (keys)."""
    vals: List[float] = []
    for rep in reps:
        v: Any = rep
        for key in path:
            v = v[key]
        vals.append(v)
    return statistics.median(vals)


def figures(res: Dict[str, Any]) -> Dict[str, Any]:
    reps = res["reps"]
    f: Dict[str, Any] = {}
    for part in ("throughput", "two_procs"):
        for kind in ("growing", "presized"):
            f[f"{part}_{kind}"] = med(reps, f"{part}_{kind}", "ops_per_sec")
        f[f"{part}_ratio"] = f[f"{part}_presized"] / f[f"{part}_growing"]
    for row, (part, subset) in {"growing": ("latency_growing", "all"),
                                "growing_migrating": ("latency_growing", "migrating"),
                                "presized": ("latency_presized", "all")}.items():
        f[f"latency_{row}"] = {k: med(reps, part, subset, k) for k in
                               [f"p{p:g}" for p in PERCENTILES] + ["max", "count", "over_1ms"]}
        f[f"latency_{row}"]["max_worst"] = max(r[part][subset]["max"] for r in reps)
    f["generations"] = reps[0]["throughput_growing"]["generation"]
    return f


def targets(f: Dict[str, Any]) -> List[Dict[str, Any]]:
    worst = f["latency_growing_migrating"]["max_worst"]
    return [
        {"target": f"put throughput pre-sized / growing <= {TARGET_RATIO:g}x (1 process)",
         "measured": f"{f['throughput_ratio']:.2f}x", "pass": f["throughput_ratio"] <= TARGET_RATIO},
        {"target": f"put throughput pre-sized / growing <= {TARGET_RATIO:g}x (2 processes)",
         "measured": f"{f['two_procs_ratio']:.2f}x", "pass": f["two_procs_ratio"] <= TARGET_RATIO},
        {"target": "no put doing growth work takes > 1 ms (worst of all reps)",
         "measured": f"{worst / 1e3:,.0f} us", "pass": worst <= TARGET_WAIT_NS},
    ]


def us(ns: float) -> str:
    return f"{ns / 1e3:,.1f}"


def print_report(res: Dict[str, Any], f: Dict[str, Any], args: argparse.Namespace) -> List[Dict[str, Any]]:
    reps = res["reps"]
    print(f"\n{args.keys:,} distinct {KEY_BYTES}-byte keys, {VALUE_BYTES}-byte values; growing map: capacity "
          f"{GROWING_CAPACITY:,} ({f['generations']} tables); pre-sized: capacity {args.keys:,}; "
          f"median of {args.reps} reps\n")
    print(f"{'put throughput (ops/s)':28} {'growing':>12} {'pre-sized':>12} {'pre-sized/growing':>18}")
    for part, label in (("throughput", "1 process"), ("two_procs", "2 processes (total)")):
        print(f"{label:28} {f[part + '_growing']:12,.0f} {f[part + '_presized']:12,.0f} "
              f"{f[part + '_ratio']:17.2f}x")
    print(f"\nsingle-put latency (us; timer overhead {res['timer_overhead_ns']} ns included)")
    print(f"{'':28} {'puts':>9} " + " ".join(f"{'p' + format(p, 'g'):>8}" for p in PERCENTILES)
          + f" {'max':>8} {'worst max':>10} {'> 1 ms':>7}")
    for row, label in (("growing", "growing, all puts"), ("growing_migrating", "growing, growth work"),
                       ("presized", "pre-sized, all puts")):
        r = f[f"latency_{row}"]
        print(f"{label:28} {r['count']:9,.0f} " + " ".join(f"{us(r[f'p{p:g}']):>8}" for p in PERCENTILES)
              + f" {us(r['max']):>8} {us(r['max_worst']):>10} {r['over_1ms']:7,.0f}")
    print("\nslowest puts of the growing map, by rep (us, what the put did, generation after it):")
    for i, r in enumerate(reps):
        top = r["latency_growing"]["top"][:5]
        print(f"  rep {i + 1}: " + "; ".join(f"{us(t['ns'])} ({t['what']}, gen {t['generation']})" for t in top))
    slow = [(i, s) for i, r in enumerate(reps) for s in r["latency_growing"]["slow"]]
    slow_pre = sum(len(r["latency_presized"]["slow"]) for r in reps)
    print(f"puts over 1 ms, all reps: growing map {len(slow)}, pre-sized map {slow_pre}")
    for i, s in slow[:20]:
        print(f"  rep {i + 1}, put #{s['index']:,}: {us(s['ns'])} us, {s['what']}, gen {s['generation']}")
    print(f"load average (1 min) before each rep: {', '.join(format(r['load_before'], '.2f') for r in reps)}; "
          f"CPUs used by other processes during each rep: {', '.join(format(r['other_cpus'], '.2f') for r in reps)}")
    if max(r["other_cpus"] for r in reps) > 0.1:
        print("WARNING: other processes used the CPU during the run; the figures are not from an idle machine")
    print()
    checks = targets(f)
    for t in checks:
        print(f"target {t['target']:62} {t['measured']:>10}  {'PASS' if t['pass'] else 'MISS'}")
    return checks


def machine() -> Dict[str, Any]:
    return host()


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Map growth: put throughput and single-put latency, growing vs pre-sized.")
    p.add_argument("--quick", action="store_true", help="a short run (100,000 keys)")
    p.add_argument("--keys", type=int, help="distinct keys inserted (default 1,000,000; 100,000 with --quick)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, median taken (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    a = p.parse_args(argv)
    a.keys = a.keys or (100_000 if a.quick else 1_000_000)
    if a.keys < 2 * GROWING_CAPACITY:
        p.error(f"--keys must be at least {2 * GROWING_CAPACITY}, so that the map grows")
    if a.reps <= 0:
        p.error("--reps must be positive")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every grid is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    res = bench(args)
    f = figures(res)
    checks = print_report(res, f, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "key_bytes": KEY_BYTES, "value_bytes": VALUE_BYTES, "keys": args.keys,
                       "growing_capacity": GROWING_CAPACITY, "reps": args.reps, "figures": f, "targets": checks,
                       "timer_overhead_ns": res["timer_overhead_ns"], "runs": res["reps"]}, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
