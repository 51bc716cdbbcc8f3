#!/usr/bin/env python3
"""Throughput and round-trip latency of shmgrid's Ring (a bounded MPMC queue
in shared memory) and what a user would pick instead, measured in one run:

- shmgrid Ring (``grid.ring(name, slots=1024, slot_size=64)``, grid in /dev/shm);
- multiprocessing.Queue (default: unbounded, pickles every message);
- multiprocessing.Pipe(duplex=False) with send_bytes/recv_bytes (an OS pipe);
- faster-fifo Queue with dumps=bytes, loads=bytes (no pickling), room for
  1,024 64-byte messages;
- posix_ipc MessageQueue (a POSIX mq: as many messages as
  /proc/sys/fs/mqueue/msg_max allows, at most 1,024);
- pyzmq over ipc://: PUSH/PULL for throughput, PAIR for the ping-pong.

Three measurements, every one between two processes started for it
(multiprocessing, fork by default), which open the channel themselves:

1. single-call throughput: a producer puts N 64-byte messages one call each,
   a consumer gets them one call each;
2. batch throughput: shmgrid put_many/get_many and faster-fifo's
   put_many/get_many, batches of 256; the other peers have no batch form, and
   their single-call figure stands in for it (it is not measured again);
3. ping-pong: process A sends a message and waits for B's 64-byte reply,
   R round trips, each timed alone by A (perf_counter_ns); p50 and p99.

Fairness: every peer carries the same 64-byte messages (a seeded pool of
4,096, cycled; the first 8 bytes number them); both sides warm up on the same
channel (untimed), then meet at a barrier; the clock starts at the earlier
of the two sides' start and stops when the consumer has received the N-th
message (it counts them and checks the last one). The driving loops are the
same for every peer (C-level ``deque(map(...))`` loops, the collector off).
Each repetition runs every peer once per measurement, in turn; figures are
medians of the repetitions. A benchmark, not a test: the exit status does not
depend on the targets.

    python benchmarks/bench_queue.py [--quick] [--count N] [--reps N] [--json FILE]
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
import statistics
import struct
import sys
import tempfile
import time
import traceback
from array import array
from collections import deque
from dataclasses import dataclass
from functools import partial
from itertools import repeat, starmap
from typing import Any, Callable, Dict, List, Optional, Tuple

import shmgrid
from benchcommon import OtherCpu, cycled, die_with_parent, dist_version, host, pct

try:
    import faster_fifo
except ImportError:  # reported as "not installed"
    faster_fifo = None  # type: ignore[assignment]
try:
    import posix_ipc
except ImportError:
    posix_ipc = None  # type: ignore[assignment]
try:
    import zmq
except ImportError:
    zmq = None  # type: ignore[assignment]

MSG_BYTES = 64
POOL = 4096  # distinct messages, cycled
SLOTS = 1024  # shmgrid ring slots; faster-fifo is sized to hold as many messages
FF_BYTES_PER_MSG = MSG_BYTES + 8  # faster-fifo's room for one 64-byte message (measured: 72 bytes)
SEED = 20240611
CHILD_TIMEOUT = 300.0  # seconds one measurement may take before its processes are killed

# (measurement, peer, factor): shmgrid's throughput must be >= factor x the peer's
THROUGHPUT_TARGETS = [("single", "zmq", 1.5), ("single", "mpqueue", 8.0), ("batch", "mpqueue", 20.0)]
LATENCY_TARGET = ("posix", 0.25)  # shmgrid ping-pong p50 <= factor x the peer's
BATCH_AIM = 10_000_000  # msgs/s, shmgrid batch throughput (an aim, printed apart from the targets)


def message_pool() -> List[bytes]:
    rng = random.Random(SEED)
    return [struct.pack("<Q", i) + rng.randbytes(MSG_BYTES - 8) for i in range(POOL)]


REPLY = struct.pack("<Q", 2**64 - 1) + random.Random(SEED + 1).randbytes(MSG_BYTES - 8)


# ---- peers -----------------------------------------------------------------------
#
# create() runs in the parent before the two processes start and returns a
# spec they are given (names, addresses, or the multiprocessing objects);
# open() runs in each process and returns its Endpoint; destroy() runs in
# the parent once both are done, also on an error.

def _nothing() -> None:
    pass


def _same(x: Any) -> Any:
    return x


@dataclass
class Endpoint:
    """One process's end: the calls it makes (None where its role has none)."""
    send: Any  # send(message)
    recv: Any  # recv() -> what the peer returns (unwrap gives the bytes)
    send_many: Any = None  # send_many(list of messages)
    recv_many: Any = None  # recv_many() -> list, up to the batch size
    unwrap: Callable[[Any], bytes] = _same
    close: Callable[[], None] = _nothing


def _m(obj: Any, name: str) -> Any:
    """obj.name, or None without obj (``obj and obj.name`` would not do: an
    empty shmgrid Ring is falsy, it has a __len__)."""
    return None if obj is None else getattr(obj, name)


def _ends(role: str, chans: List[Any]) -> Tuple[Any, Any]:
    """(channel this process sends on, channel it receives on): producer and
    consumer use channel 0; ping sends on 0 and receives on 1, pong the other
    way round."""
    return {"producer": (chans[0], None), "consumer": (None, chans[0]),
            "ping": (chans[0], chans[1]), "pong": (chans[1], chans[0])}[role]


class Peer:
    key = ""
    label = ""
    capacity = ""
    batch = False  # has a batch form (put_many/get_many)

    def missing(self) -> Optional[str]:
        """Why this peer cannot run (None: it can)."""
        return None

    def version(self) -> str:
        return ""

    def create(self, tag: str, nchan: int) -> Any:
        raise NotImplementedError

    def open(self, spec: Any, role: str, batch: int) -> Endpoint:
        raise NotImplementedError

    def destroy(self, spec: Any) -> None:
        pass


class ShmgridRing(Peer):
    key, label, capacity, batch = "shmgrid", "shmgrid Ring", f"{SLOTS} msgs", True

    def __init__(self) -> None:
        self.grids: Dict[str, Any] = {}

    def version(self) -> str:
        return shmgrid.__version__

    def create(self, tag: str, nchan: int) -> Any:
        name = f"bench_queue_{tag}"
        grid = shmgrid.Grid.create(name, size=16 * 2**20)
        self.grids[name] = grid
        for i in range(nchan):
            grid.ring(f"c{i}", slots=SLOTS, slot_size=MSG_BYTES)
        return name, nchan

    def open(self, spec: Any, role: str, batch: int) -> Endpoint:
        name, nchan = spec
        grid = shmgrid.Grid.attach(name)
        rings = [grid.ring(f"c{i}") for i in range(nchan)] + [None]
        tx, rx = _ends(role, rings)
        return Endpoint(send=_m(tx, "put"), recv=_m(rx, "get"), send_many=_m(tx, "put_many"),
                        recv_many=None if rx is None else partial(rx.get_many, batch), close=grid.close)

    def destroy(self, spec: Any) -> None:
        name = spec[0]
        self.grids.pop(name).close()
        shmgrid.Grid.unlink(name)


class MpQueue(Peer):
    key, label, capacity = "mpqueue", "multiprocessing.Queue", "unbounded"

    def create(self, tag: str, nchan: int) -> Any:
        return [CTX.Queue() for _ in range(nchan)]

    def open(self, spec: Any, role: str, batch: int) -> Endpoint:
        tx, rx = _ends(role, spec + [None])
        return Endpoint(send=_m(tx, "put"), recv=_m(rx, "get"))

    def destroy(self, spec: Any) -> None:
        for q in spec:
            q.close()


class MpPipe(Peer):
    key, label, capacity = "pipe", "multiprocessing.Pipe", "64 KiB pipe"

    def create(self, tag: str, nchan: int) -> Any:
        return [CTX.Pipe(duplex=False) for _ in range(nchan)]  # (reader, writer)

    def open(self, spec: Any, role: str, batch: int) -> Endpoint:
        tx, rx = _ends(role, spec + [None])
        return Endpoint(send=None if tx is None else tx[1].send_bytes,
                        recv=None if rx is None else rx[0].recv_bytes)

    def destroy(self, spec: Any) -> None:
        for r, w in spec:
            r.close()
            w.close()


class FasterFifo(Peer):
    key, label, capacity, batch = "faster_fifo", "faster-fifo", f"{SLOTS} msgs", True

    def missing(self) -> Optional[str]:
        return None if faster_fifo else "not installed (pip install faster-fifo)"

    def version(self) -> str:
        return dist_version("faster-fifo")

    def create(self, tag: str, nchan: int) -> Any:
        # bytes in, bytes out: no pickling (dumps=bytes returns a bytes object itself)
        return [faster_fifo.Queue(max_size_bytes=SLOTS * FF_BYTES_PER_MSG, dumps=bytes, loads=bytes)
                for _ in range(nchan)]

    def open(self, spec: Any, role: str, batch: int) -> Endpoint:
        tx, rx = _ends(role, spec + [None])
        return Endpoint(send=_m(tx, "put"), recv=_m(rx, "get"), send_many=_m(tx, "put_many"),
                        recv_many=None if rx is None else partial(rx.get_many, max_messages_to_get=batch))


class PosixMq(Peer):
    key, label = "posix", "posix_ipc mq"

    def missing(self) -> Optional[str]:
        return None if posix_ipc else "not installed (pip install posix_ipc)"

    def version(self) -> str:
        return posix_ipc.VERSION

    @property
    def capacity(self) -> str:  # type: ignore[override]
        return f"{mq_max_messages()} msgs"

    def create(self, tag: str, nchan: int) -> Any:
        names = [f"/bench_queue_{tag}_{i}" for i in range(nchan)]
        for n in names:
            posix_ipc.MessageQueue(n, posix_ipc.O_CREX, max_messages=mq_max_messages(),
                                   max_message_size=MSG_BYTES).close()
        return names

    def open(self, spec: Any, role: str, batch: int) -> Endpoint:
        mqs = [posix_ipc.MessageQueue(n) for n in spec]
        tx, rx = _ends(role, mqs + [None])

        def close() -> None:
            for q in mqs:
                q.close()
        return Endpoint(send=_m(tx, "send"), recv=_m(rx, "receive"), unwrap=lambda r: r[0], close=close)

    def destroy(self, spec: Any) -> None:
        for n in spec:
            try:
                posix_ipc.unlink_message_queue(n)
            except posix_ipc.ExistentialError:
                pass


class Zmq(Peer):
    key, label, capacity = "zmq", "pyzmq ipc", "HWM 1000+1000"

    def missing(self) -> Optional[str]:
        return None if zmq else "not installed (pip install pyzmq)"

    def version(self) -> str:
        return f"{zmq.__version__} (libzmq {zmq.zmq_version()})"

    def create(self, tag: str, nchan: int) -> Any:
        d = tempfile.mkdtemp(prefix="bench_queue_zmq_")
        return d, f"ipc://{d}/sock"

    def open(self, spec: Any, role: str, batch: int) -> Endpoint:
        ctx = zmq.Context()
        kind, bind = {"producer": (zmq.PUSH, False), "consumer": (zmq.PULL, True),
                      "ping": (zmq.PAIR, False), "pong": (zmq.PAIR, True)}[role]
        s = ctx.socket(kind)
        s.linger = 0
        (s.bind if bind else s.connect)(spec[1])

        def close() -> None:
            s.close()
            ctx.term()
        return Endpoint(send=s.send, recv=s.recv, close=close)

    def destroy(self, spec: Any) -> None:
        shutil.rmtree(spec[0], ignore_errors=True)


PEERS: List[Peer] = [ShmgridRing(), MpQueue(), MpPipe(), FasterFifo(), PosixMq(), Zmq()]
BY_KEY = {p.key: p for p in PEERS}
CTX: Any = multiprocessing.get_context("fork")  # set from --start-method in main()


def mq_max_messages() -> int:
    """The POSIX mq depth: 1,024 if the system allows it, else its msg_max
    (10 by default; raising it needs CAP_SYS_RESOURCE or the sysctl)."""
    try:
        with open("/proc/sys/fs/mqueue/msg_max") as f:
            return min(SLOTS, int(f.read()))
    except OSError:
        return 10


# ---- the two processes ---------------------------------------------------------

@dataclass
class Plan:
    mode: str  # "single", "batch" or "pingpong"
    count: int  # messages (throughput) or round trips (ping-pong), timed
    warm: int  # the same, untimed, before the barrier
    batch: int


def _work(plan: Plan, msgs: List[bytes]) -> List[Any]:
    """What the producer hands to its send loop: the messages, or batches of
    them (built before the clock starts)."""
    if plan.mode == "batch":
        return [msgs[i:i + plan.batch] for i in range(0, len(msgs), plan.batch)]
    return msgs


def _send_all(ep: Endpoint, plan: Plan, work: List[Any]) -> None:
    deque(map(ep.send_many if plan.mode == "batch" else ep.send, work), maxlen=0)


def _recv_all(ep: Endpoint, plan: Plan, n: int) -> Tuple[int, Any]:
    """Receive n messages; returns (how many came, the last one)."""
    if plan.mode == "batch":
        got, last = 0, None
        recv_many = ep.recv_many
        while got < n:
            b = recv_many()
            got += len(b)
            last = b[-1]
        return got, last
    d = deque(starmap(ep.recv, repeat((), n)), maxlen=1)
    return n, d[0]


def _usage(ru0: Any) -> Dict[str, float]:
    """What this process (all its threads) used since ru0: CPU seconds and
    voluntary (it slept) and involuntary (it was preempted) context switches."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime,
            "vcsw": ru.ru_nvcsw - ru0.ru_nvcsw, "ivcsw": ru.ru_nivcsw - ru0.ru_nivcsw}


def producer(ep: Endpoint, plan: Plan, barrier: Any) -> Dict[str, Any]:
    pool = message_pool()
    warm, work = _work(plan, cycled(pool, plan.warm)), _work(plan, cycled(pool, plan.count))
    _send_all(ep, plan, warm)
    barrier.wait(timeout=CHILD_TIMEOUT)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    _send_all(ep, plan, work)
    return {"t0": t0, "t1": time.perf_counter(), **_usage(ru)}


def consumer(ep: Endpoint, plan: Plan, barrier: Any) -> Dict[str, Any]:
    expect = message_pool()[(plan.count - 1) % POOL]
    got, _ = _recv_all(ep, plan, plan.warm)
    barrier.wait(timeout=CHILD_TIMEOUT)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    got, last = _recv_all(ep, plan, plan.count)
    t1 = time.perf_counter()
    usage = _usage(ru)
    if got != plan.count or ep.unwrap(last) != expect:
        raise RuntimeError(f"consumer: got {got} messages of {plan.count}, the last one "
                           f"{'right' if ep.unwrap(last) == expect else 'WRONG'}")
    return {"t0": t0, "t1": t1, **usage}


def ping(ep: Endpoint, plan: Plan, barrier: Any) -> Dict[str, Any]:
    pool = message_pool()
    send, recv, pc = ep.send, ep.recv, time.perf_counter_ns
    for m in cycled(pool, plan.warm):
        send(m)
        recv()
    msgs = cycled(pool, plan.count)
    lat = array("q", bytes(8 * plan.count))
    r = None
    barrier.wait(timeout=CHILD_TIMEOUT)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(plan.count):
        m = msgs[i]
        t = pc()
        send(m)
        r = recv()
        lat[i] = pc() - t
    usage = _usage(ru)
    if ep.unwrap(r) != REPLY:
        raise RuntimeError("ping: the last reply is not the reply sent")
    return {"lat_ns": lat.tobytes(), **usage}


def pong(ep: Endpoint, plan: Plan, barrier: Any) -> Dict[str, Any]:
    send, recv = ep.send, ep.recv
    for _ in range(plan.warm):
        recv()
        send(REPLY)
    barrier.wait(timeout=CHILD_TIMEOUT)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    last = None
    for _ in range(plan.count):
        last = recv()
        send(REPLY)
    usage = _usage(ru)
    if ep.unwrap(last) != message_pool()[(plan.count - 1) % POOL]:
        raise RuntimeError("pong: the last message is not the one sent")
    return usage


ROLES = {"producer": producer, "consumer": consumer, "ping": ping, "pong": pong}


def _child(peer_key: str, spec: Any, role: str, plan: Plan, conn: Any, barrier: Any, parent: int) -> None:
    die_with_parent(parent)
    ep = None
    try:
        ep = BY_KEY[peer_key].open(spec, role, plan.batch)
        gc.disable()
        conn.send(("ok", ROLES[role](ep, plan, barrier)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{role}: {traceback.format_exc()}"))
    finally:
        if ep is not None:
            ep.close()
        conn.close()


def run_pair(peer: Peer, plan: Plan, tag: str) -> Dict[str, Dict[str, Any]]:
    """Start the two processes of one measurement on a fresh channel, and
    return each role's report; raises RuntimeError on a failure or time-out."""
    roles = ("ping", "pong") if plan.mode == "pingpong" else ("producer", "consumer")
    spec = peer.create(tag, 2 if plan.mode == "pingpong" else 1)
    procs: List[Any] = []
    try:
        barrier = CTX.Barrier(2)
        readers: Dict[Any, str] = {}
        for role in roles:
            r, w = CTX.Pipe(duplex=False)
            p = CTX.Process(target=_child, args=(peer.key, spec, role, plan, w, barrier, os.getpid()),
                            name=f"bench_queue {peer.key} {role}", daemon=True)
            p.start()
            w.close()
            procs.append(p)
            readers[r] = role
        reports: Dict[str, Dict[str, Any]] = {}
        deadline = time.monotonic() + CHILD_TIMEOUT
        while readers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no result after {CHILD_TIMEOUT:.0f} s from {', '.join(readers.values())}")
            ready: List[Any] = multiprocessing.connection.wait(list(readers), timeout=left)
            for r in ready:
                role = readers.pop(r)
                try:
                    status, rep = r.recv()
                except EOFError:
                    raise RuntimeError(f"the {role} process died without a report") from None
                finally:
                    r.close()
                if status != "ok":
                    raise RuntimeError(rep)
                reports[role] = rep
        for p in procs:
            p.join(timeout=CHILD_TIMEOUT)
        return reports
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        peer.destroy(spec)


def measure(peer: Peer, plan: Plan, tag: str) -> Dict[str, Any]:
    reps = run_pair(peer, plan, tag)
    if plan.mode == "pingpong":
        lat = sorted(array("q", reps["ping"]["lat_ns"]))
        a, b = reps["ping"], reps["pong"]
        return {"p50_ns": pct(lat, 50), "p99_ns": pct(lat, 99), "mean_ns": sum(lat) / len(lat),
                "max_ns": lat[-1], **_per(plan.count, a, b)}
    a, b = reps["producer"], reps["consumer"]
    start, end = min(a["t0"], b["t0"]), b["t1"]
    return {"msgs_per_sec": plan.count / (end - start), "seconds": end - start,
            "producer_seconds": a["t1"] - a["t0"], **_per(plan.count, a, b)}


def _per(n: int, a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, float]:
    """Per message (or round trip) of each side (a: producer or ping; b:
    consumer or pong): CPU ns and voluntary context switches."""
    return {"cpu_ns_a": 1e9 * a["cpu"] / n, "cpu_ns_b": 1e9 * b["cpu"] / n,
            "vcsw_a": a["vcsw"] / n, "vcsw_b": b["vcsw"] / n, "ivcsw_a": a["ivcsw"] / n, "ivcsw_b": b["ivcsw"] / n}


# ---- one process: what a call costs without any IPC -------------------------------

def call_costs(batch: int, rounds: int) -> Dict[str, Dict[str, float]]:
    """ns per message of put, get, put_many and get_many on shmgrid's Ring
    and faster-fifo's Queue, in one process (put 512, then get them; best of
    `rounds`): the floor each side of a two-process run pays per message."""
    pool = message_pool()
    n = 512
    msgs = pool[:n]
    batches = [msgs[i:i + batch] for i in range(0, n, batch)]

    def best(put: Callable[[bytes], Any], get: Callable[[], Any], put_many: Callable[[List[bytes]], Any],
             get_many: Callable[[], List[Any]]) -> Dict[str, float]:
        t = {"put": [], "get": [], "put_many": [], "get_many": []}  # type: Dict[str, List[float]]
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            deque(map(put, msgs), maxlen=0)
            t1 = time.perf_counter_ns()
            deque(starmap(get, repeat((), n)), maxlen=0)
            t2 = time.perf_counter_ns()
            deque(map(put_many, batches), maxlen=0)
            t3 = time.perf_counter_ns()
            got = 0
            while got < n:
                got += len(get_many())
            t4 = time.perf_counter_ns()
            for k, a, b in (("put", t0, t1), ("get", t1, t2), ("put_many", t2, t3), ("get_many", t3, t4)):
                t[k].append((b - a) / n)
        return {k: min(v) for k, v in t.items()}

    out: Dict[str, Dict[str, float]] = {}
    gc.disable()
    try:
        name = f"bench_queue_{os.getpid()}_calls"
        grid = shmgrid.Grid.create(name, size=16 * 2**20)
        try:
            r = grid.ring("c", slots=SLOTS, slot_size=MSG_BYTES)
            out["shmgrid"] = best(r.put, r.get, r.put_many, partial(r.get_many, batch))
            out["shmgrid_nowait"] = best(r.put_nowait, r.get_nowait, r.put_many, partial(r.get_many, batch))
        finally:
            grid.close()
            shmgrid.Grid.unlink(name)
        if faster_fifo:
            q = faster_fifo.Queue(max_size_bytes=SLOTS * FF_BYTES_PER_MSG, dumps=bytes, loads=bytes)
            out["faster_fifo"] = best(q.put, q.get, q.put_many, partial(q.get_many, max_messages_to_get=batch))
    finally:
        gc.enable()
    return out


# ---- the run -------------------------------------------------------------------------


def plans(args: argparse.Namespace) -> List[Plan]:
    return [pl for pl in (Plan("single", args.count, args.warm, args.batch),
                          Plan("batch", args.batch_count, args.warm, args.batch),
                          Plan("pingpong", args.round_trips, args.warm_round_trips, args.batch))
            if pl.mode in args.measure]


def bench(args: argparse.Namespace) -> Dict[str, Any]:
    peers = [p for p in PEERS if not p.missing() and p.key in args.peers]
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {p.key: {"single": [], "batch": [], "pingpong": []}
                                                        for p in peers}
    other: List[float] = []
    n = 0
    for i in range(args.reps):
        cpu = OtherCpu()
        for plan in plans(args):
            for peer in peers:
                if plan.mode == "batch" and not peer.batch:
                    continue
                print(f"rep {i + 1}/{args.reps}: {plan.mode:8} {peer.label:24}", end="\r", flush=True,
                      file=sys.stderr)
                n += 1
                try:
                    runs[peer.key][plan.mode].append(measure(peer, plan, f"{os.getpid()}_{n}"))
                except RuntimeError as e:
                    print(f"\n{peer.label} {plan.mode}: FAILED\n{e}", file=sys.stderr)
                    runs[peer.key][plan.mode].append({"error": str(e)})
        other.append(cpu.cpus())
    print(" " * 60, file=sys.stderr)
    return {"runs": runs, "other_cpus": other, "call_costs": call_costs(args.batch, 20)}


def figures(res: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per peer: medians over the repetitions that did not fail, and ranges."""
    out: Dict[str, Dict[str, Any]] = {}
    for key, modes in res["runs"].items():
        f: Dict[str, Any] = {}
        for mode, reps in modes.items():
            ok = [r for r in reps if "error" not in r]
            if reps and not ok:
                f[f"{mode}_error"] = reps[0]["error"].strip().splitlines()[-1]
            if not ok:
                continue
            for k in ok[0]:
                vals = [r[k] for r in ok]
                med = statistics.median(vals)
                f[f"{mode}_{k}"] = med
                f[f"{mode}_{k}_range"] = (max(vals) - min(vals)) / med if med else 0.0
        if "batch_msgs_per_sec" not in f and "single_msgs_per_sec" in f and not BY_KEY[key].batch:
            f["batch_msgs_per_sec"] = f["single_msgs_per_sec"]  # no batch form: its single calls stand in
            f["batch_is_single"] = True
        out[key] = f
    return out


def ratios(f: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """shmgrid / peer for each figure both have (throughput: higher is
    better for shmgrid; latency: lower is)."""
    s = f.get("shmgrid", {})
    out: Dict[str, Dict[str, float]] = {}
    for key, pf in f.items():
        if key == "shmgrid":
            continue
        out[key] = {k: s[k] / pf[k] for k in ("single_msgs_per_sec", "batch_msgs_per_sec", "pingpong_p50_ns",
                                                "pingpong_p99_ns") if k in s and k in pf}
    return out


def targets(f: Dict[str, Dict[str, Any]], rat: Dict[str, Dict[str, float]]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    for mode, peer, factor in THROUGHPUT_TARGETS:
        what = f"{mode}-call throughput >= {factor:g}x {BY_KEY[peer].label}" if mode == "single" else \
            f"batch throughput >= {factor:g}x {BY_KEY[peer].label}"
        r = rat.get(peer, {}).get(f"{mode}_msgs_per_sec")
        out.append({"target": what, "ratio": r, "pass": None if r is None else r >= factor,
                    "why": None if r is not None else BY_KEY[peer].missing() or "no figure"})
    peer, factor = LATENCY_TARGET
    r = rat.get(peer, {}).get("pingpong_p50_ns")
    out.append({"target": f"ping-pong p50 <= {factor:g}x {BY_KEY[peer].label}'s", "ratio": r,
                "pass": None if r is None else r <= factor,
                "why": None if r is not None else BY_KEY[peer].missing() or "no figure"})
    return out


# ---- report ----------------------------------------------------------------------------

def _rate(f: Dict[str, Any], mode: str) -> str:
    v = f.get(f"{mode}_msgs_per_sec")
    if v is None:
        return f"{'error' if f.get(mode + '_error') else '-':>12} {'':>5}"
    if mode == "batch" and f.get("batch_is_single"):
        return f"{v:12,.0f} {'(1)':>5}"
    return f"{v:12,.0f} {100 * f[mode + '_msgs_per_sec_range']:4.0f}%"


def _us(f: Dict[str, Any], k: str) -> str:
    v = f.get(f"pingpong_{k}")
    return f"{'-':>8}" if v is None else f"{v / 1e3:8.1f}"


def print_report(res: Dict[str, Any], f: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> List[Dict[str, Any]]:
    print(f"\n{MSG_BYTES}-byte messages; throughput: {args.count:,} messages one call each, {args.batch_count:,} "
          f"in batches of {args.batch}; ping-pong: {args.round_trips:,} round trips; median of {args.reps} reps; "
          f"processes started by {args.start_method}\n")
    print(f"{'peer':24} {'single msg/s':>12} {'range':>5} {'batch msg/s':>12} {'range':>5} "
          f"{'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'p50 rng':>7}  capacity")
    for p in PEERS:
        why = p.missing() or (None if p.key in f else "not run (--peers)")
        if why:
            print(f"{p.label:24} {why}")
            continue
        pf = f[p.key]
        rng = pf.get("pingpong_p50_ns_range")
        print(f"{p.label:24} {_rate(pf, 'single')} {_rate(pf, 'batch')} {_us(pf, 'p50_ns')} {_us(pf, 'p99_ns')} "
              f"{_us(pf, 'mean_ns')} {'' if rng is None else format(100 * rng, '6.0f') + '%'}  {p.capacity}")
        for mode in ("single", "batch", "pingpong"):
            if pf.get(f"{mode}_error"):
                print(f"{'':24} {mode} failed: {pf[mode + '_error']}")
    print("(1) no batch form: its single-call figure, not measured again")
    rat = ratios(f)
    print(f"\n{'shmgrid / peer':24} {'single':>8} {'batch':>8} {'p50 lat':>8} {'p99 lat':>8}   "
          "(throughput: > 1 is shmgrid faster; latency: < 1 is)")
    for p in PEERS:
        if p.key == "shmgrid" or p.key not in rat:
            continue
        r = rat[p.key]
        print(f"{p.label:24} " + " ".join(f"{r[k]:7.2f}x" if k in r else f"{'-':>8}" for k in
                                          ("single_msgs_per_sec", "batch_msgs_per_sec", "pingpong_p50_ns",
                                           "pingpong_p99_ns")))
    print("\nper message (throughput) or round trip (ping-pong), each side (producer/consumer, ping/pong): "
          "CPU ns, and context switches: voluntary (slept) + involuntary (preempted)")
    print(f"{'':24} " + " ".join(f"{m:>27}" for m in ("single", "batch", "ping-pong")))
    for p in PEERS:
        if p.key not in f:
            continue
        pf, cells = f[p.key], []
        for mode in ("single", "batch", "pingpong"):
            if f"{mode}_cpu_ns_a" not in pf:
                cells.append(f"{'-':>27}")
                continue
            cells.append(f"{pf[mode + '_cpu_ns_a']:6.0f}/{pf[mode + '_cpu_ns_b']:<6.0f} "
                         f"{pf[mode + '_vcsw_a'] + pf[mode + '_ivcsw_a']:6.3f}/"
                         f"{pf[mode + '_vcsw_b'] + pf[mode + '_ivcsw_b']:<6.3f}")
        print(f"{p.label:24} " + " ".join(cells))
    costs = res["call_costs"]
    print(f"\none process, no IPC: ns per message (best of 20 passes of 512; batches of {args.batch})")
    print(f"{'':24} {'put':>8} {'get':>8} {'put_many':>9} {'get_many':>9}")
    for k, label in (("shmgrid", "shmgrid Ring"), ("shmgrid_nowait", "shmgrid *_nowait"),
                     ("faster_fifo", "faster-fifo")):
        if k in costs:
            c = costs[k]
            print(f"{label:24} {c['put']:8.0f} {c['get']:8.0f} {c['put_many']:9.0f} {c['get_many']:9.0f}")
    other = res["other_cpus"]
    print(f"\nCPUs used by other processes during each rep: {', '.join(format(o, '.2f') for o in other)}")
    if max(other) > 0.1:
        print("WARNING: other processes used the CPU during the run; the figures are not from an idle machine")
    print()
    checks = targets(f, rat)
    for t in checks:
        if t["ratio"] is None:
            print(f"target {t['target']:52} {'':>8}  n/a: {t['why']}")
        else:
            print(f"target {t['target']:52} {t['ratio']:7.2f}x  {'PASS' if t['pass'] else 'MISS'}")
    b = f.get("shmgrid", {}).get("batch_msgs_per_sec")
    if b is not None:
        print(f"aim    shmgrid batch throughput >= {BATCH_AIM / 1e6:g}M msgs/s {'':>15} {b / 1e6:6.2f}M  "
              f"{'reached' if b >= BATCH_AIM else 'not reached'}")
    return checks


def machine() -> Dict[str, Any]:
    m: Dict[str, Any] = {**host(), "cffi": dist_version("cffi"), "mq_msg_max": mq_max_messages()}
    for p in PEERS[3:]:
        m[p.key] = p.missing() or p.version()
    return m


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Ring throughput and ping-pong latency: shmgrid vs multiprocessing "
                                            "Queue and Pipe, faster-fifo, posix_ipc and pyzmq.")
    p.add_argument("--quick", action="store_true", help="a short run (fewer messages and round trips)")
    p.add_argument("--count", type=int, help="messages per single-call throughput pass "
                                             "(default 1,000,000; 100,000 with --quick)")
    p.add_argument("--batch-count", type=int, help="messages per batch throughput pass (default 4x --count)")
    p.add_argument("--batch", type=int, default=256, help="messages per put_many/get_many (default 256)")
    p.add_argument("--round-trips", type=int, help="timed ping-pong round trips (default 20,000; 5,000 with --quick)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, median taken (default 3)")
    p.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                   help="how the two processes are started (default fork)")
    p.add_argument("--peers", help=f"comma-separated subset of the peers to run (default all: "
                                   f"{','.join(x.key for x in PEERS)})")
    p.add_argument("--measure", default="single,batch,pingpong",
                   help="comma-separated subset of single,batch,pingpong (default all three)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    a = p.parse_args(argv)
    a.measure = a.measure.split(",")
    if set(a.measure) - {"single", "batch", "pingpong"}:
        p.error("--measure: a subset of single,batch,pingpong")
    a.peers = a.peers.split(",") if a.peers else [x.key for x in PEERS]
    if set(a.peers) - set(BY_KEY):
        p.error(f"--peers: unknown {', '.join(sorted(set(a.peers) - set(BY_KEY)))}")
    a.count = a.count or (100_000 if a.quick else 1_000_000)
    a.batch_count = a.batch_count or 4 * a.count
    a.round_trips = a.round_trips or (5_000 if a.quick else 20_000)
    a.warm = min(a.count, 20_000)  # messages sent untimed before each throughput pass
    a.warm_round_trips = min(a.round_trips, 2_000)
    for name in ("count", "batch_count", "batch", "round_trips", "reps"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.batch > SLOTS:
        p.error(f"--batch must be at most the ring's {SLOTS} slots")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    global CTX
    args = parse_args(argv)
    CTX = multiprocessing.get_context(args.start_method)
    # SIGTERM unwinds like Ctrl-C, so every grid, mq and socket directory is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    res = bench(args)
    f = figures(res)
    checks = print_report(res, f, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "msg_bytes": MSG_BYTES, "count": args.count,
                       "batch_count": args.batch_count, "batch": args.batch, "round_trips": args.round_trips,
                       "warm": args.warm, "warm_round_trips": args.warm_round_trips, "reps": args.reps,
                       "start_method": args.start_method, "figures": f, "ratios": ratios(f), "targets": checks,
                       "call_costs": res["call_costs"], "other_cpus": res["other_cpus"], "runs": res["runs"]},
                      fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
