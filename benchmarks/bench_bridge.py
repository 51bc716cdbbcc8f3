#!/usr/bin/env python3
"""The bridge (shmgrid.bridge: map partitions mirrored between hosts) on
loopback, and a Redis primary with one replica beside it, in one run.

Two grids, ``a`` and ``b``, each with its bridge (``python -m
shmgrid.bridge run --config FILE``, as tests/test_bridge_loopback.py starts
them); one map whose partitions are all owned by ``a`` (``owners = [...]``),
so ``b`` mirrors all of it over one link. Redis: two redis-server processes
on 127.0.0.1 (``--save '' --appendonly no``), the second started with
``--replicaof`` the first.

1. Replication throughput: writer processes on ``a`` put 32-byte values to
   16-byte keys (a key space of 100,000, cycled) as fast as they can, N
   updates in all, then each writes a marker key; the clock stops when
   ``b`` holds every update (a process on ``b`` polls for the markers every
   millisecond; the parent then checks every key's version on ``b`` against
   ``a``). Redis: the same writes to the primary through redis-py, in
   pipelined batches (commands packed before the clock starts, sent with
   ``send_packed_command``, replies read per batch); the clock stops when
   the replica holds the markers (Redis replicates one ordered stream, so
   then it holds every write before them; the parent checks every key).
1b. Sustained: the same updates offered at a fixed rate (200,000/s,
   paced like the lag writer below) for a few seconds; did the mirror keep
   up (everything there within 100 ms of the last write, no resync)? The
   bridge ships the current state of changed keys, and a mirror that falls
   more than the change feed (8,192 changes) behind gets a snapshot
   instead (a resync): pass 1 reports how many, and how many records b
   received per update; Redis ships every command.
2. Mirror lag at a fixed offered load (50,000 updates/s): a writer on ``a``
   paces itself (the updates due so far, then a 0.1 ms sleep) and embeds
   ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process on
   the host) in each value; a process on ``b`` watches the map
   (``m.watch(prefix)``), and for each change takes the time, reads the key
   and records now - embedded. Redis: the writer sends the updates due at
   each tick as one pipeline; a process subscribed to the replica's keyspace
   notifications (``notify-keyspace-events K$``, set on the replica for this
   measurement only) takes the time as each notification arrives, then
   reads the values of the batch it has (one MGET) for their embedded times.
   Both readers are told of a change by their server and stamp it on
   receipt; neither polls.
3. Remote-write round trip: a process on ``b`` puts to keys owned by ``a``
   (b's bridge -> a -> back; the put returns once b's mirror holds the new
   version). Redis analogue: SET to the primary followed by ``WAIT 1 0``
   (returns once the replica acknowledged), the two pipelined in one send;
   SET alone is printed as well.

Each repetition runs every measurement for both systems in turn; figures are
medians of the repetitions. Also printed, to explain the figures: CPU of
each bridge thread group (event loop, executor threads) and of each
redis-server, and the time they waited for a CPU; RECORDS frames and
records per frame; the owner's ChangeStream.next calls (how many came back
empty, their CPU) and the gap between one call's return and the next call
(the executor hop, framing and the socket write); for the lag keys, the age
of a frame's oldest record when a's next() returned it and when b applied
it; resyncs, and b's time in snapshot bookkeeping (prune; the snapshot's
key hashes come out of the apply itself); the
part of a remote write b's bridge spent after its mirror had the record;
the collector's pauses in the bridges; and the CPU other processes used
meanwhile. The counters come from a thin wrapper that runs the bridge's own
``main`` with timers around those functions (``--plain-bridges``: ``python
-m shmgrid.bridge``, without them). A benchmark, not a test: the exit
status does not depend on the targets.

    python benchmarks/bench_bridge.py [--quick] [--updates N] [--reps N] [--json FILE]
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from array import array
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Tuple

import shmgrid
from benchcommon import OtherCpu, cycled, die_with_parent, dist_version, host, pct

try:
    import redis
except ImportError:  # reported: the Redis side is skipped
    redis = None  # type: ignore[assignment]

MAP = "bench"
PARTS = 16
KEYSPACE = 100_000  # throughput keys, cycled
LAG_KEYS = 65_536  # lag keys, cycled (at 50,000/s a key comes back every 1.3 s)
RT_KEYS = 1_000
VALUE_BYTES = 32
POOL = 4096  # distinct throughput values, cycled
SEED = 20240611
CAPACITY = 262_144  # the map is pre-sized: no growth while timing
CHILD_TIMEOUT = 120.0
REDIS_BATCH = 1000  # SETs per pipelined batch (throughput)
TICK = 0.0001  # the paced writers' sleep between ticks

TARGET_RATE = 200_000  # updates/s replicated on one link
TARGET_LAG_P99_MS = 5.0  # at LAG_RATE
LAG_RATE = 50_000

_pack_lag = struct.Struct("<qQ")  # monotonic ns, sequence number (then padding to VALUE_BYTES)
_LAG_PAD = b"\0" * (VALUE_BYTES - _pack_lag.size)


def tput_keys() -> List[bytes]:
    return [b"u:%014d" % i for i in range(KEYSPACE)]


def lag_keys() -> List[bytes]:
    return [b"lag:%012d" % i for i in range(LAG_KEYS)]


def value_pool() -> List[bytes]:
    rng = random.Random(SEED)
    return [rng.randbytes(VALUE_BYTES) for _ in range(POOL)]


# ---- processes, CPU ---------------------------------------------------------------

MAIN_PID = os.getpid()


def _preexec() -> None:  # for subprocess.Popen (servers): die with us, and not on the terminal's Ctrl-C
    die_with_parent(MAIN_PID)
    os.setsid()


def thread_cpu(pid: int) -> Dict[str, float]:
    """CPU seconds of a process, its main thread and its other threads; and
    the seconds each group spent runnable but waiting for a CPU (run-queue
    wait, from /proc/PID/task/TID/schedstat)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"main": 0.0, "other": 0.0, "main_wait": 0.0, "other_wait": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                s = fh.read()
        except OSError:
            continue
        f = s[s.rindex(")") + 2:].split()
        group = "main" if int(tid) == pid else "other"
        out[group] += (int(f[11]) + int(f[12])) / tick
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                out[group + "_wait"] += int(fh.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            pass
    return out


def stop_procs(procs: Dict[str, "subprocess.Popen[Any]"]) -> None:
    """SIGTERM every process, then SIGKILL what is left after 5 s; forget them."""
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    procs.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lat_figures(lat_ns: Any) -> Dict[str, float]:
    s = sorted(lat_ns)
    if not s:
        return {}
    return {"p50_ms": pct(s, 50) / 1e6, "p99_ms": pct(s, 99) / 1e6, "p999_ms": pct(s, 99.9) / 1e6,
            "max_ms": s[-1] / 1e6, "mean_ms": sum(s) / len(s) / 1e6, "samples": len(s)}


# ---- the bridges --------------------------------------------------------------------

# Runs the bridge's own main with timers around ChangeStream.next (owner:
# calls, empty ones, their wall and CPU time, and the gap from one return to
# the next call: executor hop, framing, socket write, drain) and around
# apply_records (mirror: frames, records, time). For a frame whose first
# record is a lag key (its value starts with the writer's monotonic_ns), the
# age of that record when next() returned it on a and when apply_records
# took it on b (the oldest record of the frame: the worst one). Durations go
# into histograms (counters per bucket), so a measurement's share is the
# difference of two readings. The counters go into the bridge's Metrics, so
# /status shows them; they are created up front, so the dictionary never
# changes size while /status serialises it.
BUCKETS_MS = (0.25, 1.0, 5.0, 20.0)
BRIDGE_MAIN = r'''
import struct, sys, time
from shmgrid import mirror
from shmgrid.bridge import daemon
from shmgrid.bridge.__main__ import main

BUCKETS = (0.25e-3, 1e-3, 5e-3, 20e-3)
HISTS = ("gap", "age_shipped", "age_applied")
KEYS = ("bench_next_calls", "bench_next_empty", "bench_next_wall", "bench_next_cpu", "bench_next_bytes",
        "bench_gap_seconds", "bench_apply_frames", "bench_apply_records", "bench_apply_seconds",
        "bench_age_shipped_seconds", "bench_age_applied_seconds", "bench_prune_seconds",
        "bench_rw_count", "bench_rw_seconds", "bench_rw_after_apply_seconds", "bench_gc_over_1ms",
        "bench_gc_over_5ms") + tuple(f"bench_gc{g}_{k}" for g in range(3) for k in ("count", "seconds")) + tuple(
        f"bench_{h}_le{i}" for h in HISTS for i in range(len(BUCKETS) + 1))
M = []
_init = daemon.Metrics.__init__
def init(self):
    _init(self)
    for k in KEYS:
        self.c[k] = 0.0
    M.append(self)
daemon.Metrics.__init__ = init

NAMES = {h: tuple(f"bench_{h}_le{i}" for i in range(len(BUCKETS) + 1)) for h in HISTS}
def bucket(c, h, v):
    names = NAMES[h]
    for i, b in enumerate(BUCKETS):
        if v <= b:
            c[names[i]] += 1
            return
    c[names[-1]] += 1

hdr = struct.Struct("<HBBIQ")
ts_of = struct.Struct("<q").unpack_from
def age(recs, now):
    """The age of the first record if it is a lag key's (else None)."""
    if len(recs) < 28 or recs[16:20] != b"lag:":
        return None
    klen = hdr.unpack_from(recs, 0)[0]
    return (now - ts_of(recs, 16 + klen)[0]) / 1e9

pc, tt, mono = time.perf_counter, time.thread_time, time.monotonic_ns

GC_T0 = [0.0]
def on_gc(phase, info):
    """The collector's pauses (it runs in whichever thread allocated)."""
    if phase == "start":
        GC_T0[0] = pc()
        return
    if not M:
        return
    d = pc() - GC_T0[0]
    c, g = M[0].c, info["generation"]
    c[f"bench_gc{g}_count"] += 1
    c[f"bench_gc{g}_seconds"] += d
    if d > 1e-3:
        c["bench_gc_over_1ms"] += 1
    if d > 5e-3:
        c["bench_gc_over_5ms"] += 1
import gc
gc.callbacks.append(on_gc)
_next, _apply, last = mirror.ChangeStream.next, mirror.apply_records, {}
def next_(self, timeout=None):
    c = M[0].c
    t0, u0 = pc(), tt()
    end = last.get(id(self))
    if end is not None:
        c["bench_gap_seconds"] += t0 - end
        bucket(c, "gap", t0 - end)
    r = _next(self, timeout)
    t1 = pc()
    last[id(self)] = t1
    c["bench_next_calls"] += 1
    c["bench_next_wall"] += t1 - t0
    c["bench_next_cpu"] += tt() - u0
    if r[0]:
        c["bench_next_bytes"] += len(r[0])
        a = age(r[0], mono())
        if a is not None:
            c["bench_age_shipped_seconds"] += a
            bucket(c, "age_shipped", a)
    else:
        c["bench_next_empty"] += 1
    return r
mirror.ChangeStream.next = next_

LAST_APPLY = [0.0]
def apply_(m, records, mask=None, seen=None):
    c = M[0].c
    a = age(records, mono())
    if a is not None:
        c["bench_age_applied_seconds"] += a
        bucket(c, "age_applied", a)
    t0 = pc()
    r = _apply(m, records, mask, seen)
    LAST_APPLY[0] = t1 = pc()
    c["bench_apply_seconds"] += t1 - t0
    c["bench_apply_frames"] += 1
    c["bench_apply_records"] += r[0]
    return r
mirror.apply_records = apply_

def timed(name, fn):
    def wrapper(*a, **k):
        t0 = pc()
        try:
            return fn(*a, **k)
        finally:
            M[0].c[name] += pc() - t0
    return wrapper
mirror.prune = timed("bench_prune_seconds", mirror.prune)  # mirror: after each snapshot (a pool thread)

_rw = daemon.Bridge._remote_write
async def remote_write(self, req):
    """A remote write on the mirror side: its time, and how much of it came
    after the mirror had applied the last frame (exact for one sequential
    client: the wait for read-your-writes beyond the record's arrival)."""
    t0 = pc()
    r = await _rw(self, req)
    t1 = pc()
    c = M[0].c
    c["bench_rw_count"] += 1
    c["bench_rw_seconds"] += t1 - t0
    if LAST_APPLY[0] > t0:
        c["bench_rw_after_apply_seconds"] += t1 - LAST_APPLY[0]
    return r
daemon.Bridge._remote_write = remote_write

sys.exit(main(["run", "--config", sys.argv[1], "--log-level", "WARNING"]))
'''


class Bridges:
    """Two grids and their bridges on 127.0.0.1: ``a`` owns every partition
    of the map, ``b`` mirrors it."""

    def __init__(self, plain: bool) -> None:
        self.plain = plain
        self.dir = tempfile.mkdtemp(prefix="bench_bridge_")
        with open(os.path.join(self.dir, "cluster.key"), "w") as fh:
            fh.write(os.urandom(32).hex())
        self.grids = {h: f"bench_bridge_{os.getpid()}_{h}" for h in "ab"}
        self.ports = {h: free_port() for h in "ab"}
        self.mports = {h: free_port() for h in "ab"}
        self.procs: Dict[str, subprocess.Popen] = {}
        hosts = "\n".join(f'{h} = "127.0.0.1:{p}"' for h, p in self.ports.items())
        owners = ", ".join(['"a"'] * PARTS)
        for h in "ab":
            with open(self.config(h), "w") as fh:
                fh.write(f'''name = "{h}"
grid = "{self.grids[h]}"
grid_size = "512MiB"
secret_file = "cluster.key"
metrics = "127.0.0.1:{self.mports[h]}"
timeout = 5.0

[hosts]
{hosts}

[maps.{MAP}]
partitions = {PARTS}
owners = [{owners}]
capacity = {CAPACITY}
max_key = 32
max_value = 64
''')

    def config(self, h: str) -> str:
        return os.path.join(self.dir, f"{h}.toml")

    def start(self, h: str) -> None:
        log = open(os.path.join(self.dir, f"{h}.log"), "a")
        cmd = [sys.executable, "-m", "shmgrid.bridge", "run", "--config", self.config(h), "--log-level", "WARNING"] \
            if self.plain else [sys.executable, "-c", BRIDGE_MAIN, self.config(h)]
        self.procs[h] = subprocess.Popen(cmd, stdout=log, stderr=log, preexec_fn=_preexec)
        log.close()
        deadline = time.monotonic() + 30
        while True:  # ready when its metrics answer
            try:
                self.status(h)
                return
            except OSError:
                if self.procs[h].poll() is not None:
                    raise RuntimeError(f"bridge {h} exited:\n{self.log(h)}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bridge {h} did not come up:\n{self.log(h)}") from None
                time.sleep(0.05)

    def start_all(self) -> None:
        self.start("a")
        self.start("b")
        deadline = time.monotonic() + 30
        while not self.status("b")["peers"].get("a", {}).get("connected"):
            if time.monotonic() > deadline:
                raise RuntimeError("bridge b did not connect to a:\n" + self.log("b"))
            time.sleep(0.02)

    def log(self, h: str) -> str:
        try:
            with open(os.path.join(self.dir, f"{h}.log")) as fh:
                return fh.read()[-4000:]
        except OSError:
            return ""

    def status(self, h: str) -> Dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.mports[h]}/status", timeout=5) as r:
            return json.load(r)  # type: ignore[no-any-return]

    def counters(self) -> Dict[str, float]:
        """Both bridges' counters, labels dropped (summed), prefixed a_/b_."""
        out: Dict[str, float] = {}
        for h in "ab":
            for k, v in self.status(h)["counters"].items():
                name = f"{h}_{k.split('{')[0]}"
                out[name] = max(out.get(name, 0.0), v) if name.endswith("_max") else out.get(name, 0.0) + v
        return out

    def cpu(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for h, p in self.procs.items():
            for k, v in thread_cpu(p.pid).items():
                out[f"{h}_{k}"] = v
        return out

    def pids(self) -> List[int]:
        return [p.pid for p in self.procs.values()]

    def close(self) -> None:
        stop_procs(self.procs)
        for g in self.grids.values():
            try:
                shmgrid.Grid.unlink(g)
            except shmgrid.ShmgridError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    """A redis-server primary and one replica on 127.0.0.1, no persistence."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.dir = tempfile.mkdtemp(prefix="bench_bridge_redis_")
        self.ports = {"primary": free_port(), "replica": free_port()}
        self.procs: Dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        for role in ("primary", "replica"):
            cmd = [self.server, "--port", str(self.ports[role]), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", self.dir, "--logfile", os.path.join(self.dir, f"{role}.log")]
            if role == "replica":
                cmd += ["--replicaof", "127.0.0.1", str(self.ports["primary"])]
            self.procs[role] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                preexec_fn=_preexec)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.client("replica").info("replication").get("master_link_status") == "up":
                    self.client("primary").ping()
                    return
            except redis.ConnectionError:
                pass
            for role, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"redis {role} exited:\n{self.log(role)}")
            if time.monotonic() > deadline:
                raise RuntimeError("the redis replica did not connect:\n" + self.log("replica"))
            time.sleep(0.02)

    def client(self, role: str) -> Any:
        return redis.Redis(host="127.0.0.1", port=self.ports[role], socket_timeout=30)

    def log(self, role: str) -> str:
        try:
            with open(os.path.join(self.dir, f"{role}.log")) as fh:
                return fh.read()[-4000:]
        except OSError:
            return ""

    def version(self) -> str:
        return str(self.client("primary").info("server")["redis_version"])

    def cpu(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for role, p in self.procs.items():
            c = thread_cpu(p.pid)
            out[role], out[role + "_wait"] = c["main"] + c["other"], c["main_wait"] + c["other_wait"]
        return out

    def pids(self) -> List[int]:
        return [p.pid for p in self.procs.values()]

    def close(self) -> None:
        stop_procs(self.procs)
        shutil.rmtree(self.dir, ignore_errors=True)


def _rconn(port: int) -> Any:
    # RESP2: redis-py 8 speaks RESP3 by default, where a subscriber's
    # messages are push frames that read_response() does not return
    c = redis.Connection(host="127.0.0.1", port=port, socket_timeout=30, protocol=2)
    c.connect()
    return c


# ---- worker processes ------------------------------------------------------------------

def _usage(ru0: Any) -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime


def shm_writer(grid: str, w: int, nw: int, n: int, rep: int, barrier: Any) -> Dict[str, Any]:
    """Throughput: put n updates as fast as it can, to this writer's share
    of the key space (cycled), then its marker."""
    pool = value_pool()
    mine = list(range(w, KEYSPACE, nw))
    allk = tput_keys()
    keys = cycled([allk[i] for i in mine], n)
    vals = cycled([pool[i % POOL] for i in mine], n)
    with shmgrid.Grid.attach(grid) as g:
        m = g.map(MAP)
        barrier.wait(timeout=CHILD_TIMEOUT)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        deque(map(m.put, keys, vals), maxlen=0)
        t1 = time.perf_counter()
        m.put(b"done:%d" % w, struct.pack("<QQ", rep, n))
        return {"t0": t0, "t1": t1, "cpu": _usage(ru)}


def shm_marker_waiter(grid: str, nw: int, n_each: int, rep: int, barrier: Any) -> Dict[str, Any]:
    """Throughput: on b, poll every millisecond for every writer's marker."""
    want = [(b"done:%d" % w, struct.pack("<QQ", rep, n_each)) for w in range(nw)]
    with shmgrid.Grid.attach(grid) as g:
        m = g.map(MAP)
        barrier.wait(timeout=CHILD_TIMEOUT)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not all(m.get(k) == v for k, v in want):
            if time.monotonic() > deadline:
                raise RuntimeError("markers did not reach b")
            time.sleep(0.001)
        return {"t": time.perf_counter(), "cpu": _usage(ru)}


def redis_writer(port: int, w: int, nw: int, n: int, rep: int, barrier: Any) -> Dict[str, Any]:
    """Throughput: the same updates as shm_writer, SETs in pipelined batches
    of REDIS_BATCH, packed before the clock starts (one key-space cycle's
    worth, sent round and round); each batch's replies are read before the
    next is sent."""
    pool = value_pool()
    mine = list(range(w, KEYSPACE, nw))
    allk = tput_keys()
    keys = [allk[i] for i in mine]
    c = _rconn(port)
    batches = []
    for i in range(0, len(mine), REDIS_BATCH):
        cmds = [("SET", keys[j], pool[mine[j] % POOL]) for j in range(i, min(i + REDIS_BATCH, len(mine)))]
        batches.append((c.pack_commands(cmds), len(cmds)))
    plan: List[Tuple[Any, int]] = []
    left = n
    while left > 0:
        for packed, k in batches:
            if left <= 0:
                break
            if k > left:  # the last, partial batch
                cmds = [("SET", keys[j], pool[mine[j] % POOL]) for j in range(left)]
                packed, k = c.pack_commands(cmds), left
            plan.append((packed, k))
            left -= k
    send, read = c.send_packed_command, c.read_response
    barrier.wait(timeout=CHILD_TIMEOUT)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for packed, k in plan:
        send(packed, check_health=False)
        for _ in range(k):
            read()
    t1 = time.perf_counter()
    send(c.pack_command("SET", b"done:%d" % w, struct.pack("<QQ", rep, n)), check_health=False)
    read()
    c.disconnect()
    return {"t0": t0, "t1": t1, "cpu": _usage(ru)}


def redis_marker_waiter(port: int, nw: int, n_each: int, rep: int, barrier: Any) -> Dict[str, Any]:
    """Throughput: poll the replica every millisecond for every marker."""
    keys = [b"done:%d" % w for w in range(nw)]
    want = [struct.pack("<QQ", rep, n_each)] * nw
    r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
    barrier.wait(timeout=CHILD_TIMEOUT)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while r.mget(keys) != want:
        if time.monotonic() > deadline:
            raise RuntimeError("markers did not reach the replica")
        time.sleep(0.001)
    return {"t": time.perf_counter(), "cpu": _usage(ru)}


def _paced(rate: int, n: int, emit: Callable[[int, int], None]) -> Tuple[float, int]:
    """Call emit(first, last) with the updates due so far, then sleep a tick,
    until n are done; (seconds, ticks)."""
    t0 = time.monotonic_ns()
    i = ticks = 0
    while i < n:
        due = min(n, (time.monotonic_ns() - t0) * rate // 1_000_000_000 + 1)
        if due > i:
            emit(i, due)
            i = due
            ticks += 1
        time.sleep(TICK)
    return (time.monotonic_ns() - t0) / 1e9, ticks


def shm_paced_writer(grid: str, rate: int, n: int, rep: int, barrier: Any) -> Dict[str, Any]:
    """Sustained: the throughput updates at a fixed rate, then the marker."""
    keys, pool = tput_keys(), value_pool()
    with shmgrid.Grid.attach(grid) as g:
        m = g.map(MAP)
        put = m.put

        def emit(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                put(keys[i % KEYSPACE], pool[i % POOL])
        barrier.wait(timeout=CHILD_TIMEOUT)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        _paced(rate, n, emit)
        t1 = time.perf_counter()
        m.put(b"done:0", struct.pack("<QQ", rep, n))
        return {"t0": t0, "t1": t1, "cpu": _usage(ru)}


def redis_paced_writer(port: int, rate: int, n: int, rep: int, barrier: Any) -> Dict[str, Any]:
    """Sustained: the same, the updates due at each tick as one pipeline."""
    keys, pool = tput_keys(), value_pool()
    c = _rconn(port)
    packc, send, read = c.pack_commands, c.send_packed_command, c.read_response

    def emit(lo: int, hi: int) -> None:
        send(packc([("SET", keys[i % KEYSPACE], pool[i % POOL]) for i in range(lo, hi)]), check_health=False)
        for _ in range(hi - lo):
            read()
    barrier.wait(timeout=CHILD_TIMEOUT)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    _paced(rate, n, emit)
    t1 = time.perf_counter()
    send(c.pack_command("SET", b"done:0", struct.pack("<QQ", rep, n)), check_health=False)
    read()
    c.disconnect()
    return {"t0": t0, "t1": t1, "cpu": _usage(ru)}


def shm_lag_writer(grid: str, rate: int, n: int, barrier: Any) -> Dict[str, Any]:
    keys = lag_keys()
    pack, now, pad = _pack_lag.pack, time.monotonic_ns, _LAG_PAD
    with shmgrid.Grid.attach(grid) as g:
        put = g.map(MAP).put

        def emit(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                put(keys[i % LAG_KEYS], pack(now(), i) + pad)
        barrier.wait(timeout=CHILD_TIMEOUT)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        secs, ticks = _paced(rate, n, emit)
        return {"seconds": secs, "ticks": ticks, "cpu": _usage(ru)}


def shm_lag_reader(grid: str, n: int, warm: int, barrier: Any) -> Dict[str, Any]:
    """On b: watch the lag keys; per change, now - the embedded time."""
    lat, seqs = array("q"), array("q")
    lost = superseded = 0
    seen = 0
    unpack, now = _pack_lag.unpack_from, time.monotonic_ns
    with shmgrid.Grid.attach(grid) as g:
        m = g.map(MAP)
        getv = m.get_versioned
        with m.watch(b"lag:") as w:
            get = w.get
            barrier.wait(timeout=CHILD_TIMEOUT)
            ru = resource.getrusage(resource.RUSAGE_SELF)
            while True:
                try:
                    ev = get(5.0)
                except shmgrid.Empty:
                    break
                t = now()
                if ev.kind == "lost":
                    lost += ev.lost
                    continue
                got = getv(ev.key)
                if got is None or got[1] != ev.version:
                    superseded += 1  # written again since: its value is not this change's
                    continue
                ts, seq = unpack(got[0])
                seen += 1
                if seq >= warm:
                    lat.append(t - ts)
                    seqs.append(seq)
                if seq == n - 1:
                    break
            return {"lat_ns": lat.tobytes(), "seq": seqs.tobytes(), "lost": lost, "superseded": superseded,
                    "seen": seen,
                    "cpu": _usage(ru)}


def redis_lag_writer(port: int, rate: int, n: int, barrier: Any) -> Dict[str, Any]:
    keys = lag_keys()
    pack, now, pad = _pack_lag.pack, time.monotonic_ns, _LAG_PAD
    c = _rconn(port)
    packc, send, read = c.pack_commands, c.send_packed_command, c.read_response

    def emit(lo: int, hi: int) -> None:
        send(packc([("SET", keys[i % LAG_KEYS], pack(now(), i) + pad) for i in range(lo, hi)]), check_health=False)
        for _ in range(hi - lo):
            read()
    barrier.wait(timeout=CHILD_TIMEOUT)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    secs, ticks = _paced(rate, n, emit)
    c.disconnect()
    return {"seconds": secs, "ticks": ticks, "cpu": _usage(ru)}


def redis_lag_reader(port: int, n: int, warm: int, barrier: Any) -> Dict[str, Any]:
    """Subscribed to the replica's keyspace notifications for the lag keys:
    stamp each notification as it is read, then one MGET for the values of
    the batch read so far."""
    prefix = b"__keyspace@0__:"
    sub = _rconn(port)
    sub.send_command("PSUBSCRIBE", prefix + b"lag:*")
    sub.read_response()
    r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
    lat, seqs = array("q"), array("q")
    seen_seq = set()
    seen = superseded = 0
    unpack, now = _pack_lag.unpack_from, time.monotonic_ns
    read, can_read = sub.read_response, sub.can_read
    barrier.wait(timeout=CHILD_TIMEOUT)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    done = False
    while not done:
        if not can_read(timeout=5.0):
            break
        batch = []
        while True:
            msg = read()
            batch.append((msg[2][len(prefix):], now()))
            if len(batch) >= 256 or not can_read(timeout=0):
                break
        vals = r.mget([k for k, _ in batch])
        for (k, t), v in zip(batch, vals):
            ts, seq = unpack(v)
            if seq in seen_seq:
                superseded += 1  # written again before we read it: counted once, at its first sighting
                continue
            seen_seq.add(seq)
            seen += 1
            if seq >= warm:
                lat.append(t - ts)
                seqs.append(seq)
            if seq == n - 1:
                done = True
    sub.disconnect()
    return {"lat_ns": lat.tobytes(), "seq": seqs.tobytes(), "lost": 0, "superseded": superseded, "seen": seen,
            "cpu": _usage(ru)}


def shm_round_trips(grid: str, count: int, warm: int, barrier: Any) -> Dict[str, Any]:
    """On b: put to keys a owns; each put returns once b's mirror holds it."""
    pool = value_pool()
    keys = [b"rt:%013d" % i for i in range(RT_KEYS)]
    lat = array("q", bytes(8 * count))
    pc = time.perf_counter_ns
    with shmgrid.Grid.attach(grid) as g:
        m = g.map(MAP)
        put, getv = m.put, m.get_versioned
        for i in range(warm):
            put(keys[i % RT_KEYS], pool[i % POOL])
        barrier.wait(timeout=CHILD_TIMEOUT)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(count):
            k, v = keys[i % RT_KEYS], pool[i % POOL]
            t = pc()
            ver = put(k, v)
            lat[i] = pc() - t
        cpu = _usage(ru)
        got = getv(k)
        if got != (v, ver):
            raise RuntimeError(f"remote put: b's mirror holds {got}, not {(v, ver)}, when put returned")
        return {"lat_ns": lat.tobytes(), "cpu": cpu}


def redis_round_trips(port: int, count: int, warm: int, barrier: Any) -> Dict[str, Any]:
    """SET then WAIT 1 0, pipelined in one send; and SET alone."""
    pool = value_pool()
    keys = [b"rt:%013d" % i for i in range(RT_KEYS)]
    c = _rconn(port)
    packc, send, read = c.pack_commands, c.send_packed_command, c.read_response
    out: Dict[str, Any] = {}
    pc = time.perf_counter_ns
    for mode in ("wait", "set"):
        lat = array("q", bytes(8 * count))
        for i in range(warm):
            send(packc([("SET", keys[i % RT_KEYS], pool[i % POOL])] + [("WAIT", 1, 0)] * (mode == "wait")),
                 check_health=False)
            read()
            if mode == "wait":
                read()
        if mode == "wait":
            barrier.wait(timeout=CHILD_TIMEOUT)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        acked = count
        for i in range(count):
            k, v = keys[i % RT_KEYS], pool[i % POOL]
            t = pc()
            if mode == "wait":
                send(packc([("SET", k, v), ("WAIT", 1, 0)]), check_health=False)
                read()
                acked = min(acked, read())
            else:
                send(packc([("SET", k, v)]), check_health=False)
                read()
            lat[i] = pc() - t
        if acked < 1:
            raise RuntimeError("WAIT 1 0 returned 0 replicas")
        out[mode] = {"lat_ns": lat.tobytes(), "cpu": _usage(ru)}
    c.disconnect()
    return out


def _child(fn: Callable[..., Any], args: Tuple[Any, ...], conn: Any, barrier: Any, parent: int) -> None:
    die_with_parent(parent)
    try:
        gc.disable()
        conn.send(("ok", fn(*args, barrier)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        barrier.abort()  # nobody waits for us at the barrier
        conn.send(("error", f"{fn.__name__}: {traceback.format_exc()}"))
    finally:
        conn.close()


def run_workers(jobs: List[Tuple[str, Callable[..., Any], Tuple[Any, ...]]],
                at_start: Optional[Callable[[], Any]] = None) -> Tuple[Dict[str, Any], Any]:
    """Fork one process per job; they meet the parent at a barrier. Returns
    ({name: report}, what at_start() returned, called right after the
    barrier). Raises RuntimeError on a failure or time-out."""
    barrier = CTX.Barrier(len(jobs) + 1)
    procs, readers = [], {}
    try:
        for name, fn, args in jobs:
            r, w = CTX.Pipe(duplex=False)
            p = CTX.Process(target=_child, args=(fn, args, w, barrier, os.getpid()), name=f"bench_bridge {name}", daemon=True)
            p.start()
            w.close()
            procs.append(p)
            readers[r] = name
        started = None
        try:
            barrier.wait(timeout=CHILD_TIMEOUT)
            started = at_start() if at_start else None
        except threading.BrokenBarrierError:  # a process failed: its report says why
            pass
        reports: Dict[str, Any] = {}
        deadline = time.monotonic() + CHILD_TIMEOUT
        while readers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no result after {CHILD_TIMEOUT:.0f} s from {', '.join(readers.values())}")
            for r in multiprocessing.connection.wait(list(readers), timeout=left):
                name = readers.pop(r)
                try:
                    status, rep = r.recv()
                except EOFError:
                    raise RuntimeError(f"the {name} process died without a report") from None
                finally:
                    r.close()
                if status != "ok":
                    raise RuntimeError(rep)
                reports[name] = rep
        for p in procs:
            p.join(timeout=CHILD_TIMEOUT)
        return reports, started
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        for r in readers:
            r.close()


CTX: Any = multiprocessing.get_context("fork")


# ---- measurements ----------------------------------------------------------------------

def _state(m: Any, keys: List[bytes]) -> List[Optional[int]]:
    getv = m.get_versioned
    return [None if (x := getv(k)) is None else x[1] for k in keys]


def shm_load(br: Bridges) -> None:
    """Store every key once (throughput, lag and round-trip keys) and wait
    until b holds them: the timed passes only overwrite."""
    pool = value_pool()
    keys = tput_keys() + lag_keys()
    with shmgrid.Grid.attach(br.grids["a"]) as ga, shmgrid.Grid.attach(br.grids["b"]) as gb:
        A, B = ga.map(MAP), gb.map(MAP)
        for i, k in enumerate(keys):
            A.put(k, pool[i % POOL])
        want = _state(A, keys)
        deadline = time.monotonic() + 60
        while _state(B, keys) != want:
            if time.monotonic() > deadline:
                raise RuntimeError("b did not get the initial keys")
            time.sleep(0.05)


def _diff(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) if not k.endswith("_max") else after.get(k, 0.0)
            for k in set(before) | set(after)}


def _shm_replicate(br: Bridges, writers: List[Tuple[str, Callable[..., Any], Tuple[Any, ...]]], n: int,
                   marker: Tuple[int, int, int]) -> Dict[str, Any]:
    """Run the writer jobs on a and the marker waiter on b; then check that
    b's version of every throughput key equals a's."""
    c0 = br.counters()
    cpu0: Dict[str, float] = {}
    jobs = writers + [("waiter", shm_marker_waiter, (br.grids["b"], *marker))]
    reps, _ = run_workers(jobs, lambda: cpu0.update(br.cpu()))
    cpu1 = br.cpu()
    t_marker = reps["waiter"]["t"]
    keys = tput_keys()
    with shmgrid.Grid.attach(br.grids["a"]) as ga, shmgrid.Grid.attach(br.grids["b"]) as gb:
        want = _state(ga.map(MAP), keys)
        B = gb.map(MAP)
        checks = 0
        deadline = time.monotonic() + 60
        while True:
            checks += 1
            t_check = time.perf_counter()
            if _state(B, keys) == want:
                t_checked = time.perf_counter()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("b's versions never matched a's")
            time.sleep(0.001)
    cnt = _diff(c0, br.counters())
    ws = [reps[name] for name, _, _ in writers]
    t0, t_written = min(w["t0"] for w in ws), max(w["t1"] for w in ws)
    # With no resync, b applies a's changes in the order a's feed took them,
    # and the markers were written after the updates: b holding the markers
    # means it held every update. A resync (a snapshot) carries keys in no
    # such order: then the end is when the check found b complete (the
    # check reads every key: its duration is the resolution).
    ordered = cnt.get("a_resyncs_total", 0) == 0 and checks == 1
    t_end = t_marker if ordered else t_checked
    return {"updates": n, "seconds": t_end - t0, "updates_per_sec": n / (t_end - t0),
            "written_per_sec": n / (t_written - t0), "tail_seconds": max(0.0, t_end - t_written),
            "end_by": "markers" if ordered else "check", "checks": checks, "check_seconds": t_checked - t_check,
            "writer_cpu": sum(w["cpu"] for w in ws), "cpu": _diff(cpu0, cpu1), "counters": cnt}


def _redis_replicate(rd: Redis, writers: List[Tuple[str, Callable[..., Any], Tuple[Any, ...]]], n: int,
                     marker: Tuple[int, int, int]) -> Dict[str, Any]:
    """Run the writer jobs against the primary and the marker waiter on the
    replica; then check every throughput key on the replica."""
    cpu0: Dict[str, float] = {}
    off0 = rd.client("primary").info("replication")["master_repl_offset"]
    jobs = writers + [("waiter", redis_marker_waiter, (rd.ports["replica"], *marker))]
    reps, _ = run_workers(jobs, lambda: cpu0.update(rd.cpu()))
    cpu1 = rd.cpu()
    off1 = rd.client("primary").info("replication")["master_repl_offset"]
    keys = tput_keys()
    p, r = rd.client("primary"), rd.client("replica")
    for i in range(0, len(keys), 5000):
        if p.mget(keys[i:i + 5000]) != r.mget(keys[i:i + 5000]):
            raise RuntimeError("the replica does not hold what the primary holds after the markers")
    ws = [reps[name] for name, _, _ in writers]
    t0, t_written = min(w["t0"] for w in ws), max(w["t1"] for w in ws)
    t_end = reps["waiter"]["t"]
    return {"updates": n, "seconds": t_end - t0, "updates_per_sec": n / (t_end - t0),
            "written_per_sec": n / (t_written - t0), "tail_seconds": max(0.0, t_end - t_written),
            "end_by": "markers", "writer_cpu": sum(w["cpu"] for w in ws), "cpu": _diff(cpu0, cpu1),
            "repl_bytes": off1 - off0}


def shm_throughput(br: Bridges, args: argparse.Namespace, rep: int) -> Dict[str, Any]:
    nw, n_each = args.writers, args.updates // args.writers
    jobs = [(f"writer{w}", shm_writer, (br.grids["a"], w, nw, n_each, rep)) for w in range(nw)]
    return _shm_replicate(br, jobs, n_each * nw, (nw, n_each, rep))


def redis_throughput(rd: Redis, args: argparse.Namespace, rep: int) -> Dict[str, Any]:
    nw, n_each = args.writers, args.updates // args.writers
    jobs = [(f"writer{w}", redis_writer, (rd.ports["primary"], w, nw, n_each, rep)) for w in range(nw)]
    return _redis_replicate(rd, jobs, n_each * nw, (nw, n_each, rep))


def shm_sustained(br: Bridges, args: argparse.Namespace, rep: int) -> Dict[str, Any]:
    n = int(args.sustained_rate * args.sustained_seconds)
    tag = 1000 + rep  # its markers differ from the throughput pass's
    jobs = [("writer0", shm_paced_writer, (br.grids["a"], args.sustained_rate, n, tag))]
    return _shm_replicate(br, jobs, n, (1, n, tag))


def redis_sustained(rd: Redis, args: argparse.Namespace, rep: int) -> Dict[str, Any]:
    n = int(args.sustained_rate * args.sustained_seconds)
    tag = 1000 + rep
    jobs = [("writer0", redis_paced_writer, (rd.ports["primary"], args.sustained_rate, n, tag))]
    return _redis_replicate(rd, jobs, n, (1, n, tag))


def _lag_result(reps: Dict[str, Any], n: int, warm: int, cpu: Dict[str, float],
                cnt: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    rd = reps["reader"]
    lat, seq = array("q"), array("q")
    lat.frombytes(rd["lat_ns"])
    seq.frombytes(rd["seq"])
    out = {"offered": n / reps["writer"]["seconds"], "updates": n, "timed": n - warm, **lat_figures(lat),
           **stalls(seq, lat, n / reps["writer"]["seconds"]),
           "seen": rd["seen"], "lost": rd["lost"], "superseded": rd["superseded"],
           "writer_cpu": reps["writer"]["cpu"], "reader_cpu": rd["cpu"], "ticks": reps["writer"]["ticks"],
           "cpu": cpu}
    if cnt is not None:
        out["counters"] = cnt
    return out


STALL_MS = 5.0


def stalls(seq: Any, lat: Any, rate: float) -> Dict[str, Any]:
    """Episodes of updates (in write order) whose lag was over STALL_MS:
    how many, the longest lag, and the updates caught in them; and when
    each began (seconds into the timed part)."""
    order = sorted(range(len(seq)), key=seq.__getitem__)
    eps: List[List[float]] = []
    prev = -2
    for i in order:
        if lat[i] > STALL_MS * 1e6:
            if seq[i] - prev > 1 or not eps:
                eps.append([seq[i], 0.0, 0])
            eps[-1][1] = max(eps[-1][1], lat[i] / 1e6)
            eps[-1][2] += 1
            prev = seq[i]
    first = min(seq) if len(seq) else 0
    return {"stalls": len(eps), "stalled_updates": sum(e[2] for e in eps),
            "stall_starts": [round((e[0] - first) / rate, 3) for e in eps][:20],
            "stall_peaks_ms": [round(e[1], 2) for e in eps][:20]}


def shm_lag(br: Bridges, args: argparse.Namespace, rep: int) -> Dict[str, Any]:
    n, warm = int(args.lag_rate * (args.lag_seconds + 0.5)), int(args.lag_rate * 0.5)
    c0 = br.counters()
    cpu0: Dict[str, float] = {}
    jobs = [("reader", shm_lag_reader, (br.grids["b"], n, warm)),
            ("writer", shm_lag_writer, (br.grids["a"], args.lag_rate, n))]
    reps, _ = run_workers(jobs, lambda: cpu0.update(br.cpu()))
    return _lag_result(reps, n, warm, _diff(cpu0, br.cpu()), _diff(c0, br.counters()))


def redis_lag(rd: Redis, args: argparse.Namespace, rep: int) -> Dict[str, Any]:
    n, warm = int(args.lag_rate * (args.lag_seconds + 0.5)), int(args.lag_rate * 0.5)
    replica = rd.client("replica")
    replica.config_set("notify-keyspace-events", "K$")
    cpu0: Dict[str, float] = {}
    try:
        jobs = [("reader", redis_lag_reader, (rd.ports["replica"], n, warm)),
                ("writer", redis_lag_writer, (rd.ports["primary"], args.lag_rate, n))]
        reps, _ = run_workers(jobs, lambda: cpu0.update(rd.cpu()))
    finally:
        replica.config_set("notify-keyspace-events", "")
    return _lag_result(reps, n, warm, _diff(cpu0, rd.cpu()))


def shm_rtt(br: Bridges, args: argparse.Namespace, rep: int) -> Dict[str, Any]:
    c0 = br.counters()
    reps, _ = run_workers([("rt", shm_round_trips, (br.grids["b"], args.round_trips, args.warm_round_trips))])
    lat = array("q")
    lat.frombytes(reps["rt"]["lat_ns"])
    return {**lat_figures(lat), "cpu_us": 1e6 * reps["rt"]["cpu"] / args.round_trips,
            "counters": _diff(c0, br.counters())}


def redis_rtt(rd: Redis, args: argparse.Namespace, rep: int) -> Dict[str, Any]:
    reps, _ = run_workers([("rt", redis_round_trips, (rd.ports["primary"], args.round_trips,
                                                       args.warm_round_trips))])
    out: Dict[str, Any] = {}
    for mode in ("wait", "set"):
        lat = array("q")
        lat.frombytes(reps["rt"][mode]["lat_ns"])
        f = lat_figures(lat)
        out.update({(k if mode == "wait" else f"set_{k}"): v for k, v in f.items()})
    return out


# ---- the run -------------------------------------------------------------------------------

MEASURES = ("throughput", "sustained", "lag", "rtt")


def bench(args: argparse.Namespace) -> Dict[str, Any]:
    systems = [s for s in ("shmgrid", "redis") if s in args.systems]
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {s: {m: [] for m in args.measure} for s in systems}
    br: Optional[Bridges] = None
    rd: Optional[Redis] = None
    other: List[float] = []
    info: Dict[str, Any] = {}
    try:
        if "shmgrid" in systems:
            br = Bridges(args.plain_bridges)
            t = time.monotonic()
            br.start_all()
            shm_load(br)
            info["bridges_up_seconds"] = time.monotonic() - t
        if "redis" in systems:
            rd = Redis(args.redis_server)
            rd.start()
            info["redis_version"] = rd.version()
            p = rd.client("primary").pipeline(transaction=False)
            pool = value_pool()
            for i, k in enumerate(tput_keys() + lag_keys()):
                p.set(k, pool[i % POOL])
            p.execute()
        fns = {("shmgrid", "throughput"): shm_throughput, ("shmgrid", "sustained"): shm_sustained,
               ("shmgrid", "lag"): shm_lag, ("shmgrid", "rtt"): shm_rtt,
               ("redis", "throughput"): redis_throughput, ("redis", "sustained"): redis_sustained,
               ("redis", "lag"): redis_lag, ("redis", "rtt"): redis_rtt}
        servers = lambda: (br.pids() if br else []) + (rd.pids() if rd else [])  # noqa: E731
        for i in range(args.reps):
            cpu = OtherCpu(lambda: sum(c["main"] + c["other"] for c in map(thread_cpu, servers())))
            for m in args.measure:
                for s in systems:
                    print(f"rep {i + 1}/{args.reps}: {m:10} {s:8}", end="\r", flush=True, file=sys.stderr)
                    try:
                        runs[s][m].append(fns[(s, m)](br if s == "shmgrid" else rd, args, i + 1))
                    except RuntimeError as e:
                        print(f"\n{s} {m}: FAILED\n{traceback.format_exc()}", file=sys.stderr)
                        if s == "shmgrid" and br is not None:
                            print("bridge logs:\n" + br.log("a") + br.log("b"), file=sys.stderr)
                        runs[s][m].append({"error": str(e)})
            other.append(cpu.cpus())
        print(" " * 60, file=sys.stderr)
        if br is not None:
            info["final_counters"] = br.counters()
            info["bridge_cpu_total"] = br.cpu()
            for h in "ab":
                if br.procs[h].poll() is not None:
                    info[f"bridge_{h}_exited"] = br.procs[h].returncode
            info["bridge_logs"] = {h: br.log(h) for h in "ab"}
    finally:
        if br is not None:
            br.close()
        if rd is not None:
            rd.close()
    return {"runs": runs, "other_cpus": other, "info": info}


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    out: Dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = v
    return out


def figures(res: Dict[str, Any]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per system and measurement: medians over the repetitions that did not
    fail (nested counters flattened to 'counters.NAME'), and ranges."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for s, ms in res["runs"].items():
        out[s] = {}
        for m, reps in ms.items():
            ok = [_flat(r) for r in reps if "error" not in r]
            f: Dict[str, Any] = {}
            if reps and not ok:
                f["error"] = (reps[0]["error"].strip().splitlines() or ["?"])[-1]
            if ok:
                for k in ok[0]:
                    vals = [r[k] for r in ok if k in r]
                    med = statistics.median(vals)
                    f[k] = med
                    f[k + "_range"] = (max(vals) - min(vals)) / med if med else 0.0
                f["end_by"] = ",".join(sorted({str(r.get("end_by")) for r in reps if "error" not in r}))
            out[s][m] = f
    return out


def targets(f: Dict[str, Dict[str, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    s, r = f.get("shmgrid", {}), f.get("redis", {})
    out = []
    v = s.get("throughput", {}).get("updates_per_sec")
    rs = s.get("throughput", {}).get("counters.a_resyncs_total")
    out.append({"target": f"replicated >= {TARGET_RATE:,} updates/s on one link", "value": v,
                "shown": None if v is None else f"{v:,.0f}/s" + (f" ({rs:.0f} resyncs)" if rs else ""),
                "pass": None if v is None else v >= TARGET_RATE})
    v = s.get("lag", {}).get("p99_ms")
    off = s.get("lag", {}).get("offered")
    out.append({"target": f"mirror lag p99 < {TARGET_LAG_P99_MS:g} ms at {LAG_RATE:,} updates/s", "value": v,
                "shown": None if v is None else f"{v:.2f} ms (offered {off:,.0f}/s)",
                "pass": None if v is None else v < TARGET_LAG_P99_MS})
    a, b = s.get("throughput", {}).get("updates_per_sec"), r.get("throughput", {}).get("updates_per_sec")
    ratio = None if a is None or b is None else a / b
    out.append({"target": "catch-up faster than the Redis replica (replicated updates/s, ratio)", "value": ratio,
                "shown": None if ratio is None else f"{ratio:.2f}x", "pass": None if ratio is None else ratio > 1})
    return out


def shipped(t: Dict[str, Any]) -> str:
    """Records b received per update written (shmgrid; Redis ships every command: 1)."""
    rec = t.get("counters.b_records_received_total")
    if rec is None:
        return "1 (every cmd)" if "repl_bytes" in t else "-"
    return format(rec / t["updates"], ".2f") if t.get("updates") else "-"


def kept_up(t: Dict[str, Any]) -> bool:
    return t.get("tail_seconds", 1.0) < 0.1 and not t.get("counters.a_resyncs_total")


def _g(f: Dict[str, Any], k: str, fmt: str, scale: float = 1.0) -> str:
    v = f.get(k)
    return "-" if v is None else format(v * scale, fmt)


def print_report(res: Dict[str, Any], f: Dict[str, Dict[str, Dict[str, Any]]], args: argparse.Namespace
                 ) -> List[Dict[str, Any]]:
    label = {"shmgrid": "shmgrid bridge", "redis": "Redis replica"}

    def rows(measure: str, fmt: Callable[[Dict[str, Any]], str]) -> None:
        """One row per system for a measure: its figures, or why it failed."""
        for system in f:
            t = f[system].get(measure, {})
            if "error" in t:
                print(f"{label[system]:16} FAILED: {t['error']}")
            elif t:
                print(f"{label[system]:16} {fmt(t)}")

    print(f"\nloopback, {PARTS} partitions all owned by a; 16-byte keys, {VALUE_BYTES}-byte values; "
          f"median of {args.reps} reps")
    if "throughput" in args.measure:
        print(f"\n1. replication throughput: {args.updates:,} updates over {KEYSPACE:,} keys, {args.writers} "
              f"writer process(es); Redis: pipelined batches of {REDIS_BATCH} (pre-packed)")
        print(f"{'':16} {'replicated/s':>12} {'range':>6} {'written/s':>11} {'tail ms':>8} {'writer CPU s':>12} "
              f"{'resyncs':>7} {'shipped/updates':>15}  end by")
        rows("throughput", lambda t: (
            f"{_g(t, 'updates_per_sec', '12,.0f')} {_g(t, 'updates_per_sec_range', '5.0%')} "
            f"{_g(t, 'written_per_sec', '11,.0f')} {_g(t, 'tail_seconds', '8.1f', 1e3)} {_g(t, 'writer_cpu', '12.2f')} "
            f"{t.get('counters.a_resyncs_total', 0):7.0f} {shipped(t):>15}  {t.get('end_by')}"))
    if "sustained" in args.measure:
        print(f"\n1b. sustained: {args.sustained_rate:,} updates/s offered (paced) for {args.sustained_seconds:g} s; "
              "kept up = the mirror/replica held everything within 100 ms of the last write, with no resync")
        print(f"{'':16} {'offered/s':>10} {'tail ms':>8} {'resyncs':>7} {'shipped/updates':>15}  kept up")
        rows("sustained", lambda t: (
            f"{_g(t, 'written_per_sec', '10,.0f')} {_g(t, 'tail_seconds', '8.1f', 1e3)} "
            f"{t.get('counters.a_resyncs_total', 0):7.0f} {shipped(t):>15}  {'yes' if kept_up(t) else 'NO'}"))
    if "lag" in args.measure:
        print(f"\n2. mirror lag at {args.lag_rate:,} updates/s offered for {args.lag_seconds:g} s (after 0.5 s "
              "untimed): now - time embedded by the writer, at the reader on b / the replica")
        print(f"{'':16} {'offered/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8} {'mean ms':>8} "
              f"{'p99 rng':>7} {'seen':>8} {'lost':>6} {'stalls':>6}")
        rows("lag", lambda t: (
            f"{_g(t, 'offered', '10,.0f')} {_g(t, 'p50_ms', '8.3f')} {_g(t, 'p99_ms', '8.3f')} "
            f"{_g(t, 'p999_ms', '9.3f')} {_g(t, 'max_ms', '8.2f')} {_g(t, 'mean_ms', '8.3f')} "
            f"{_g(t, 'p99_ms_range', '6.0%')} {_g(t, 'seen', '8.0f')} {_g(t, 'lost', '6.0f')} "
            f"{_g(t, 'stalls', '6.0f')}"))
    if "rtt" in args.measure:
        print(f"\n3. remote-write round trip, {args.round_trips:,} sequential writes: shmgrid put on b to a key a owns "
              "(returns when b's mirror holds it); Redis SET + WAIT 1 0 (pipelined)")
        print(f"{'':16} {'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'max ms':>8}")
        rows("rtt", lambda t: (
            f"{_g(t, 'p50_ms', '8.0f', 1e3)} {_g(t, 'p99_ms', '8.0f', 1e3)} "
            f"{_g(t, 'mean_ms', '8.0f', 1e3)} {_g(t, 'max_ms', '8.2f')}"))
        t = f.get("redis", {}).get("rtt", {})
        if "set_p50_ms" in t:
            print(f"{'  (SET alone)':16} {_g(t, 'set_p50_ms', '8.0f', 1e3)} {_g(t, 'set_p99_ms', '8.0f', 1e3)} "
                  f"{_g(t, 'set_mean_ms', '8.0f', 1e3)} {_g(t, 'set_max_ms', '8.2f')}")
    s, r = f.get("shmgrid", {}), f.get("redis", {})
    rows = [("replicated updates/s", "throughput", "updates_per_sec", True),
            ("tail after last write", "throughput", "tail_seconds", False),
            ("lag p50", "lag", "p50_ms", False), ("lag p99", "lag", "p99_ms", False),
            ("round trip p50", "rtt", "p50_ms", False), ("round trip p99", "rtt", "p99_ms", False)]
    lines = []
    for what, m, k, higher in rows:
        a, b = s.get(m, {}).get(k), r.get(m, {}).get(k)
        if a and b:
            lines.append(f"  {what:22} {a / b:7.2f}x   ({'> 1' if higher else '< 1'}: shmgrid better)")
    if lines:
        print("\nshmgrid / Redis")
        print("\n".join(lines))
    print_internals(res, f, args)
    other = res["other_cpus"]
    if other:
        print(f"\nCPUs used by other processes during each rep: {', '.join(format(o, '.2f') for o in other)}")
        if max(other) > 0.1:
            print("WARNING: other processes used the CPU during the run; the figures are not from an idle machine")
    print()
    checks = targets(f)
    for t in checks:
        if t["value"] is None:
            print(f"target {t['target']:70} n/a")
        else:
            print(f"target {t['target']:70} {t['shown']:>28}  {'PASS' if t['pass'] else 'MISS'}")
    t = f.get("shmgrid", {}).get("sustained")
    if t and "error" not in t:
        print(f"(info) {args.sustained_rate:,} updates/s offered, paced, {args.sustained_seconds:g} s: the mirror "
              f"{'kept up' if kept_up(t) else 'fell behind'} (tail {1e3 * t.get('tail_seconds', 0):.1f} ms, "
              f"{t.get('counters.a_resyncs_total', 0):.0f} resyncs)")
    return checks


def print_internals(res: Dict[str, Any], f: Dict[str, Dict[str, Dict[str, Any]]], args: argparse.Namespace) -> None:
    s = f.get("shmgrid", {})
    if not s:
        return
    print("\nwhere the bridge spends its time (medians; CPU seconds from /proc: loop = main thread, exec = executor "
          "threads; rq wait = seconds the bridges' threads were runnable but waiting for a CPU)")
    print(f"{'':12} {'secs':>6} {'a loop':>7} {'a exec':>7} {'b loop':>7} {'b exec':>7} {'rq wait':>7} {'frames':>8} "
          f"{'rec/frame':>9} "
          f"{'resyncs':>7} {'next calls':>10} {'empty':>6} {'next CPU us':>11} {'gap us':>7} {'apply us':>8}")
    for m in ("throughput", "sustained", "lag", "rtt"):
        t = s.get(m)
        if not t or "error" in t:
            continue
        secs = t.get("seconds") or (t.get("updates", 0) / t["offered"] if t.get("offered") else None)
        c = {k[len("counters."):]: v for k, v in t.items() if k.startswith("counters.") and not k.endswith("_range")}
        frames, recs = c.get("b_bench_apply_frames"), c.get("b_bench_apply_records")
        calls, empty = c.get("a_bench_next_calls"), c.get("a_bench_next_empty")
        busy = (calls - empty) if calls is not None and empty is not None else None

        def per(x: Optional[float], y: Optional[float], scale: float = 1.0, fmt: str = "7.1f") -> str:
            return "-" if x is None or not y else format(scale * x / y, fmt)
        cpu = [t.get(f"cpu.{h}", 0.0) for h in ("a_main", "a_other", "b_main", "b_other")]
        cpu.append(sum(t.get(f"cpu.{h}_wait", 0.0) for h in ("a_main", "a_other", "b_main", "b_other")))
        print(f"{m:12} {'-' if secs is None else format(secs, '6.2f')} " + " ".join(f"{x:7.2f}" for x in cpu) +
              f" {'-' if frames is None else format(frames, '8,.0f')} {per(recs, frames, fmt='9.1f')} "
              f"{c.get('a_resyncs_total', 0):7.0f} {'-' if calls is None else format(calls, '10,.0f')} "
              f"{'-' if empty is None else format(empty, '6,.0f')} "
              f"{per(c.get('a_bench_next_cpu'), busy, 1e6, '11.1f')} "
              f"{per(c.get('a_bench_gap_seconds'), calls, 1e6, '7.1f')} "
              f"{per(c.get('b_bench_apply_seconds'), frames, 1e6, '8.1f')}")
    names = [f"<={b:g}ms" for b in BUCKETS_MS] + [f">{BUCKETS_MS[-1]:g}ms"]
    for m in ("throughput", "sustained", "lag", "rtt"):
        t = s.get(m)
        if not t or "error" in t or "counters.a_bench_gap_le0" not in t:
            continue
        for h, what in (("gap", "a: next() return -> next call (executor hop, frame, write, drain)"),
                        ("age_shipped", "a: age of a frame's first lag record when next() returned it"),
                        ("age_applied", "b: age of a frame's first lag record when b applied it")):
            if h != "gap" and m != "lag":
                continue  # elsewhere the lag keys travel only in snapshots: their age means nothing
            counts = [t.get(f"counters.{'a' if h != 'age_applied' else 'b'}_bench_{h}_le{i}", 0)
                      for i in range(len(BUCKETS_MS) + 1)]
            tot = sum(counts)
            if not tot:
                continue
            print(f"{m:10} {what:70} " + " ".join(f"{nm} {100 * c / tot:5.1f}%" for nm, c in zip(names, counts)))
    gc_line = []
    for m in ("throughput", "sustained", "lag", "rtt"):
        t = s.get(m)
        if not t or "error" in t or "counters.a_bench_gc0_count" not in t:
            continue
        n = sum(t.get(f"counters.{h}_bench_gc{i}_count", 0) for h in "ab" for i in range(3))
        ms = 1e3 * sum(t.get(f"counters.{h}_bench_gc{i}_seconds", 0) for h in "ab" for i in range(3))
        over = sum(t.get(f"counters.{h}_bench_gc_over_1ms", 0) for h in "ab")
        gc_line.append(f"{m} {n:.0f} collections, {ms:.1f} ms, {over:.0f} over 1 ms")
    if gc_line:
        print("garbage collector in the bridges: " + "; ".join(gc_line))
    for m in ("lag",):
        t = s.get(m)
        if t and "cpu.a_main_wait" in t:
            print(f"{m:10} run-queue wait: a loop {t['cpu.a_main_wait']:.2f} s, a exec {t['cpu.a_other_wait']:.2f} s, "
                  f"b loop {t['cpu.b_main_wait']:.2f} s (of {t.get('updates', 0) / max(t.get('offered', 1), 1):.1f} s)")
    t = s.get("lag", {})
    if t.get("stalls"):
        print(f"lag: {t['stalls']:.0f} stall(s) over {STALL_MS:g} ms (median over reps), "
              f"{t.get('stalled_updates', 0):.0f} "
              "updates caught in them; per rep: " + "; ".join(
                  f"starts {r.get('stall_starts')} s, peaks {r.get('stall_peaks_ms')} ms"
                  for r in res['runs']['shmgrid'].get('lag', []) if r.get("stalls")))
    for m in ("throughput", "sustained"):
        t = s.get(m, {})
        snaps = t.get("counters.a_snapshots_sent_total")
        if snaps and "counters.b_bench_prune_seconds" in t:
            print(f"{m}: {snaps:.0f} snapshot(s) sent by a; b spent "
                  f"{t.get('counters.b_bench_prune_seconds', 0):.2f} s in prune (in a pool thread); "
                  f"{t.get('cpu.b_main', 0):.2f} s of loop CPU")
    t = s.get("rtt", {})
    if t.get("counters.b_bench_rw_count"):
        n = t["counters.b_bench_rw_count"]
        print(f"rtt: b's bridge spent {1e6 * t.get('counters.b_bench_rw_seconds', 0) / n:.0f} us per remote write, "
              f"{1e6 * t.get('counters.b_bench_rw_after_apply_seconds', 0) / n:.0f} us of it after its mirror had "
              "applied the write's record (the read-your-writes wait)")
    t = s.get("throughput", {})
    if t.get("counters.b_records_applied_total") is not None:
        print(f"throughput: records received by b {t.get('counters.b_records_received_total', 0):,.0f}, applied "
              f"{t.get('counters.b_records_applied_total', 0):,.0f} (updates written {t.get('updates', 0):,.0f}); "
              f"bytes shipped {t.get('counters.a_bytes_shipped_total', 0) / 2**20:,.1f} MiB")
    if "redis" in f and f["redis"].get("throughput"):
        r = f["redis"]["throughput"]
        print(f"redis throughput: CPU primary {r.get('cpu.primary', 0):.2f} s, replica {r.get('cpu.replica', 0):.2f} s "
              f"over {r.get('seconds', 0):.2f} s; replication stream {r.get('repl_bytes', 0) / 2**20:,.1f} MiB")
    if "redis" in f and f["redis"].get("lag"):
        r = f["redis"]["lag"]
        print(f"redis lag: CPU primary {r.get('cpu.primary', 0):.2f} s, replica {r.get('cpu.replica', 0):.2f} s, "
              f"reader {r.get('reader_cpu', 0):.2f} s; shmgrid lag reader "
              f"{s.get('lag', {}).get('reader_cpu', 0):.2f} s")


def machine(info: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    try:
        server = subprocess.run([args.redis_server, "--version"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        server = "not found"
    return {**host(), "redis_server": info.get("redis_version") or server,
            "redis_py": dist_version("redis", "not installed"), "hiredis": dist_version("hiredis", "not installed")}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="shmgrid bridge replication on loopback (throughput, mirror lag, "
                                            "remote-write round trip) beside a Redis primary and replica.")
    p.add_argument("--quick", action="store_true", help="a short run (fewer updates, shorter lag run, 1 rep)")
    p.add_argument("--updates", type=int, help="updates per throughput pass (default 2,000,000; 400,000 with --quick)")
    p.add_argument("--writers", type=int, default=1, help="writer processes for the throughput pass (default 1)")
    p.add_argument("--sustained-rate", type=int, default=TARGET_RATE,
                   help=f"offered updates/s of the sustained pass (default {TARGET_RATE:,})")
    p.add_argument("--sustained-seconds", type=float,
                   help="seconds of the sustained pass (default 3; 1.5 with --quick)")
    p.add_argument("--lag-rate", type=int, default=LAG_RATE, help=f"offered updates/s for the lag pass "
                                                                   f"(default {LAG_RATE:,})")
    p.add_argument("--lag-seconds", type=float, help="timed seconds of the lag pass (default 4; 2 with --quick)")
    p.add_argument("--round-trips", type=int, help="timed remote writes (default 5,000; 1,000 with --quick)")
    p.add_argument("--reps", type=int, help="repetitions, median taken (default 3; 1 with --quick)")
    p.add_argument("--systems", default="shmgrid,redis", help="comma-separated subset of shmgrid,redis")
    p.add_argument("--measure", default=",".join(MEASURES), help="comma-separated subset of throughput,lag,rtt")
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server",
                   help="the redis-server binary (default: from PATH)")
    p.add_argument("--plain-bridges", action="store_true",
                   help="run the bridges as `python -m shmgrid.bridge`, without the timing wrapper")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    a = p.parse_args(argv)
    a.measure = a.measure.split(",")
    if set(a.measure) - set(MEASURES):
        p.error(f"--measure: a subset of {','.join(MEASURES)}")
    a.systems = a.systems.split(",")
    if set(a.systems) - {"shmgrid", "redis"}:
        p.error("--systems: a subset of shmgrid,redis")
    a.updates = a.updates or (400_000 if a.quick else 2_000_000)
    a.lag_seconds = a.lag_seconds or (2.0 if a.quick else 4.0)
    a.sustained_seconds = a.sustained_seconds or (1.5 if a.quick else 3.0)
    a.round_trips = a.round_trips or (1_000 if a.quick else 5_000)
    a.reps = a.reps or (1 if a.quick else 3)
    a.warm_round_trips = min(a.round_trips, 300)
    for name in ("updates", "writers", "sustained_rate", "lag_rate", "round_trips", "reps"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if "redis" in a.systems:
        why = None if redis else "redis-py is not installed (pip install redis hiredis)"
        if why is None and not shutil.which(a.redis_server) and not os.path.exists(a.redis_server):
            why = f"{a.redis_server} not found (apt-get install redis-server)"
        if why:
            print(f"Redis side skipped: {why}", file=sys.stderr)
            a.systems.remove("redis")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the bridges, redis-servers and grids are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    res = bench(args)
    f = figures(res)
    m = machine(res["info"], args)
    print(f"\nmachine: {m['cpu']}, {m['cpus']} CPUs{' (virtualized)' if m['virtualized'] else ''}, Linux "
          f"{m['kernel']}, Python {m['python']}, shmgrid {m['shmgrid']} ({m['commit']}), redis-server "
          f"{m['redis_server']}, redis-py {m['redis_py']}, hiredis {m['hiredis']}")
    checks = print_report(res, f, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": m, "args": {k: v for k, v in vars(args).items()}, "figures": f,
                       "targets": checks, "other_cpus": res["other_cpus"],
                       "runs": {s: {ms: [{k: v for k, v in r.items() if k != "lat_ns"} for r in reps]
                                    for ms, reps in d.items()} for s, d in res["runs"].items()},
                       "info": {k: v for k, v in res["info"].items() if k != "bridge_logs"}}, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
