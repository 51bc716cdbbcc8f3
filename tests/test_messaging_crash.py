"""Crash tests for the messaging structures: SIGKILL ring producers and
consumers, topic publishers and subscribers, and lock holders at random
moments (1-50 ms into their work), then check exactly what was delivered,
what was lost, what the recovery counters say, and that nothing blocks.

Bookkeeping that survives SIGKILL, as in test_map_crash: workers write int64
words in an anonymous shared mapping (inherited by fork; each element store
is one aligned 8-byte store, which SIGKILL cannot tear) and never take a
lock or a queue. A producer stores the last sequence number whose put()
RETURNED (acknowledged). A consumer appends what it received to its own log
(entries first, then the count word), before its next get. So, per round:

* every acknowledged message was received, except the ones a killed
  consumer was taking (claimed inside get, ``dropped``) or had taken but not
  yet logged: at most its batch size per killed consumer;
* no message was received twice, and each consumer got each producer's
  messages in increasing order (FIFO per producer);
* a killed producer's messages past its acknowledged one: at most its batch;
* positions add up exactly: tail = received + skipped + dropped + the few
  taken-but-unlogged ones (bounded as above).

The ring is drained at the end of each round, and then lapped once by the
parent (put/get of ``capacity`` messages), which frees every cell a dead
consumer still held, so ``dropped`` is final before the accounting.

A claim lasts a few hundred nanoseconds of C amid microseconds of Python and
sleeping, so plain random kills almost never land in one: half of the kills
are aimed (ClaimPeek: freeze the victim, kill it if it holds a claim), and
three tests freeze a producer, a consumer or a publisher with SIGSTOP inside
its claim, kill it there and check the recovery exactly.

Blocking is bounded: consumers drain a ring whose producers are all done
or dead within DRAIN_LIMIT; a reader stuck behind a dead producer's claimed
cell, or a producer behind a dead consumer's, gets past it within
STUCK_SKIP_LIMIT of the death; a lossless publisher held back by a
subscriber gets going again within UNBLOCK_LIMIT of that subscriber's
death; a lock held by a dead process is handed to the next acquirer with
``owner_died``.

numpy is deliberately not used: it is not a test dependency of the project
(``.[test]``); memoryview.cast("q") over mmap gives the same int64 stores.
"""
from __future__ import annotations

import array
import mmap
import multiprocessing as mp
import os
import random
import signal
import struct
import threading
import time
from collections import Counter

import pytest

import shmgrid

FORK = mp.get_context("fork")
KILL_MIN, KILL_MAX = 0.001, 0.050  # kill this long after the worker got going
DRAIN_LIMIT = 3.0  # s: readers finish what is left once every writer is done or dead
STUCK_SKIP_LIMIT = 0.35  # s: the 100 ms of the guarantee + slack for a loaded 2-core box
UNBLOCK_LIMIT = 2.0  # s: a publisher held back by a dead subscriber goes on
LOGCAP = 1 << 19  # log entries per reader per round

# error codes a worker writes to errs[slot]
E_TORN, E_LOGFULL, E_STALL, E_MUTEX, E_OTHER = 1, 2, 3, 4, 5
# flags
STOP_W, STOP_R = 0, 1  # stop writers (producers, publishers) / readers


def shared_i64(n: int):
    """n zeroed int64 words shared with forked children."""
    return memoryview(mmap.mmap(-1, 8 * n)).cast("q")


def i64(n: int) -> bytes:
    return struct.pack("<q", n)


def un64(b) -> int:
    return 0 if b is None else struct.unpack("<q", b)[0]


# ---- messages: (producer, seq) plus a padding derived from both --------------------

_HDR = struct.Struct("<II")
MAX_PAD = 4000  # messages of 8 to 4008 bytes: long copies, so kills land inside claims too
MAX_MSG = 8 + MAX_PAD
_BYTES = bytes(range(256)) * (MAX_PAD // 256 + 2)
_PAD = [_BYTES[b : b + MAX_PAD] for b in range(256)]  # _PAD[b][i] == (b + i) & 0xFF


def msg(p: int, s: int) -> bytes:
    return _HDR.pack(p, s) + _PAD[(p + s) & 0xFF][: (p * 31 + s * 7) % (MAX_PAD + 1)]


def unmsg(m: bytes):
    """(p, s) if m is exactly msg(p, s), else None (torn or mixed up)."""
    if len(m) < 8:
        return None
    p, s = _HDR.unpack_from(m)
    return (p, s) if m == msg(p, s) else None


def entry(p: int, s: int) -> int:
    return (p << 32) | s


def unentry(e: int):
    return e >> 32, e & 0xFFFFFFFF


class Shared:
    """The words workers write and the parent reads."""

    def __init__(self, nlogs: int = 0, nids: int = 1024, nslots: int = 8):
        self.ready, self.errs, self.info = shared_i64(nslots), shared_i64(nslots), shared_i64(nslots)
        self.flags = shared_i64(4)
        self.ack = shared_i64(nids)
        self.nlogs = nlogs
        self.log = shared_i64(nlogs * (LOGCAP + 1)) if nlogs else None

    def reset(self):
        for a in (self.ready, self.errs, self.info, self.flags):
            for i in range(len(a)):
                a[i] = 0
        for c in range(self.nlogs):
            self.log[c * (LOGCAP + 1)] = 0

    def append(self, c: int, n: int, ents: array.array) -> int:
        """Log ents after the n entries reader c has logged; returns the new n."""
        base = c * (LOGCAP + 1)
        k = len(ents)
        self.log[base + 1 + n : base + 1 + n + k] = ents
        self.log[base] = n + k  # the count last: a kill before it loses only this batch
        return n + k

    def logged(self, c: int) -> list:
        base = c * (LOGCAP + 1)
        return self.log[base + 1 : base + 1 + self.log[base]].tolist()


# ---- process handling ---------------------------------------------------------------


class Procs:
    """Every process a test starts, SIGKILLed at the end whatever happened."""

    def __init__(self):
        self.all = []

    def start(self, target, *args):
        p = FORK.Process(target=target, args=args, daemon=True)
        p.start()
        self.all.append(p)
        return p

    def kill_all(self):
        for p in self.all:
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.join(5)


def wait_ready(sh: Shared, procs: dict, guard: float = 20.0) -> float:
    """Wait until every slot in procs {slot: process} set ready; returns the time."""
    deadline = time.monotonic() + guard
    while True:
        now = time.monotonic()
        if all(sh.ready[s] for s in procs):
            return now
        for s, p in procs.items():
            assert p.exitcode is None or sh.ready[s], f"worker {s} exited with {p.exitcode} before it got going"
        assert now < deadline, "a worker never got going"
        time.sleep(0.0005)


class ClaimPeek:
    """A read-only look at the process table, to aim kills into claims.

    A claim (ring put/get, topic publish) lasts a few hundred nanoseconds of
    C amid microseconds of Python and long sleeps, so kills at random
    moments almost never land inside one. An aimed kill freezes its victim (SIGSTOP)
    at the scheduled moment, reads the victim's claim record and kills it
    frozen if it holds a claim; else it lets it run a little and looks
    again, a few times, then kills it wherever it is. Layout (sg_layout.h,
    static-asserted there): sg_proc[256] at 0xA000, one 64-byte line each,
    owner at +0 (pid in bits 0-21), claim_obj at +24 (role in bits 0-3)."""

    PROC_OFF, NPROC, LINE = 0xA000, 256, 64

    def __init__(self, grid_name: str, rnd: random.Random, share: float = 0.5, tries: int = 30):
        fd = os.open(f"/dev/shm/{grid_name}", os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, self.PROC_OFF + self.NPROC * self.LINE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.rnd, self.share, self.tries = rnd, share, tries
        self.aimed = self.hits = 0

    def role(self, pid: int) -> int:
        """The claim role pid holds (0: none, 1 put, 2 get, 3 publish)."""
        for i in range(self.NPROC):
            owner, _, _, claim = struct.unpack_from("<4Q", self.mm, self.PROC_OFF + i * self.LINE)
            if owner and owner & ((1 << 22) - 1) == pid:
                return claim & 0xF
        return 0

    def kill(self, p) -> None:
        if self.rnd.random() < self.share:
            self.aimed += 1
            for _ in range(self.tries):
                freeze(p.pid)
                if self.role(p.pid):
                    self.hits += 1
                    break
                os.kill(p.pid, signal.SIGCONT)
                time.sleep(self.rnd.uniform(0.00005, 0.0003))
        os.kill(p.pid, signal.SIGKILL)


def kill_on_schedule(plan, t0: float, aim: ClaimPeek | None = None) -> None:
    """plan: [(process, delay)]: SIGKILL each at t0 + delay (aimed at a
    claim if aim says so), then reap it (a killed worker must not have
    exited on its own first)."""
    for p, delay in sorted(plan, key=lambda x: x[1]):
        pause = t0 + delay - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        assert p.exitcode is None, f"worker exited on its own with {p.exitcode} before its kill"
        if aim is None:
            os.kill(p.pid, signal.SIGKILL)
        else:
            aim.kill(p)
    for p, _ in plan:
        p.join(10)
        assert p.exitcode == -signal.SIGKILL, f"worker exited with {p.exitcode}, not by the kill"


def join_clean(p, what: str) -> None:
    p.join(5)
    assert p.exitcode == 0, f"{what} did not exit cleanly when told to stop (exit code {p.exitcode})"


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2]


def freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while proc_state(pid) not in "tT":
        assert time.monotonic() < deadline, "SIGSTOP did not stop the process"
        time.sleep(0.0001)


def in_thread(fn):
    """Run fn() in a thread; returns (thread, result dict with value/time/error)."""
    res = {}

    def run():
        try:
            res["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            res["error"] = e
        res["time"] = time.monotonic()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, res


# =====================================================================================
# Ring
# =====================================================================================

RING_SLOTS, RING_SLOT_SIZE = 32, MAX_MSG
NPROD, NCONS = 3, 3
BATCH = 16  # put_many / get_many workers use batches of 1..BATCH


def ring_producer(r, sh, slot, p, batch, seed):
    """put (batch 1) or put_many (batch > 1) p's messages 1, 2, ... until
    told to stop; ack[p] = the last one whose call returned."""
    try:
        rnd = random.Random(seed)
        seq = 0
        sh.ready[slot] = 1
        while not sh.flags[STOP_W]:
            if batch == 1:
                try:
                    r.put(msg(p, seq + 1), timeout=0.02)
                except shmgrid.Full:
                    continue
                seq += 1
            else:
                k = rnd.randint(1, batch)
                try:
                    seq += r.put_many([msg(p, seq + i) for i in range(1, k + 1)], timeout=0.02)
                except shmgrid.Full:
                    continue
            sh.ack[p] = seq
    except BaseException:
        sh.errs[slot] = E_OTHER
        raise


def ring_consumer(r, sh, slot, c, batch):
    """get (batch 1) or get_many (batch > 1) until told to stop and the
    ring is empty, logging every message before the next call."""
    try:
        n = 0
        sh.ready[slot] = 1
        while True:
            try:
                got = [r.get(timeout=0.02)] if batch == 1 else r.get_many(batch, timeout=0.02)
            except shmgrid.Empty:
                if sh.flags[STOP_R]:
                    return
                continue
            ents = array.array("q")
            for m in got:
                ps = unmsg(m)
                if ps is None:
                    sh.errs[slot] = E_TORN
                    sh.info[slot] = len(m)
                    continue
                ents.append(entry(*ps))
            if n + len(ents) > LOGCAP:
                sh.errs[slot] = E_LOGFULL
                return
            n = sh.append(c, n, ents)
    except BaseException:
        sh.errs[slot] = E_OTHER
        raise


def ring_round_trip(r) -> int:
    """The ring works and len() is sane: a full lap of put_many/get_many,
    then one put/get. Every cell is written again, so a cell a dead consumer
    still held is recovered (and counted as dropped) here. Returns the
    positions used."""
    assert len(r) == 0, r.stats()
    n = r.capacity
    lap = [b"lap-%d" % i for i in range(n)]
    assert r.put_many(lap, timeout=5) == n
    assert len(r) == n
    got = []
    while len(got) < n:
        got += r.get_many(n, timeout=5)
    assert got == lap
    assert len(r) == 0
    r.put(b"one", timeout=5)
    assert len(r) == 1
    assert r.get(timeout=5) == b"one"
    assert len(r) == 0
    with pytest.raises(shmgrid.Empty):
        r.get_nowait()
    st = r.stats()
    assert st["head"] == st["tail"] and st["depth"] == 0, st
    return n + 1


def check_ring_round(rd, logs, acks, pbatch, pkilled, ckilled_batches, st0, st1, lap):
    """The accounting of one round (see the module doc). Returns counts."""
    # FIFO per producer, seen by each consumer
    for c, ents in enumerate(logs):
        last = {}
        for e in ents:
            p, s = unentry(e)
            assert s > last.get(p, 0), f"round {rd}: consumer {c} got producer {p}'s message {s} after {last[p]}"
            last[p] = s
    allents = [e for ents in logs for e in ents]
    seen = set(allents)
    if len(seen) != len(allents):
        dups = [unentry(e) for e, k in Counter(allents).items() if k > 1]
        pytest.fail(f"round {rd}: {len(dups)} messages delivered twice, e.g. {dups[:5]}")
    beyond = 0
    for e in seen:
        p, s = unentry(e)
        assert p in acks, f"round {rd}: message from unknown producer {p} (seq {s})"
        limit = acks[p] + (pbatch[p] if p in pkilled else 0)
        assert 1 <= s <= limit, (
            f"round {rd}: producer {p} ({'killed' if p in pkilled else 'stopped'}, batch {pbatch[p]}) "
            f"acknowledged {acks[p]}, yet message {s} was delivered")
        beyond += s > acks[p]
    missing = [(p, s) for p, a in acks.items() for s in range(1, a + 1) if entry(p, s) not in seen]

    d_tail = st1["tail"] - st0["tail"] - lap
    d_skip = st1["skipped"] - st0["skipped"]
    d_drop = st1["dropped"] - st0["dropped"]
    kp = sum(pbatch[p] for p in pkilled)  # positions killed producers may have claimed unwritten
    kc = sum(ckilled_batches)  # messages killed consumers may have taken with them
    unlogged = d_tail - d_skip - d_drop - len(allents)
    where = (f"round {rd}: positions {d_tail}, received {len(allents)}, skipped {d_skip}, dropped {d_drop}, "
             f"killed producers' batches {kp}, killed consumers' batches {kc}")
    assert 0 <= d_skip <= kp, f"{where}: 'skipped' is out of bounds"
    assert 0 <= unlogged, f"{where}: more messages received than positions produced"
    assert d_drop + unlogged <= kc, f"{where}: {d_drop + unlogged} messages lost with killed consumers"
    assert len(missing) <= d_drop + unlogged, (
        f"{where}: {len(missing)} acknowledged messages never delivered, e.g. {missing[:5]}")
    return {"received": len(allents), "skipped": d_skip, "dropped": d_drop, "unlogged": unlogged,
            "missing": len(missing), "beyond": beyond}


@pytest.mark.timeout(120)
def test_ring_sigkill_producers_and_consumers(grid, grid_name):
    """3 producers (put or put_many) and 3 consumers (get or get_many) per
    round; each producer killed with p=0.8, each consumer with p=0.5, at
    1-50 ms (half of the kills aimed into a claim); until at least 120 kills."""
    rnd = random.Random(0x5EED)
    r = grid.ring("crash", slots=RING_SLOTS, slot_size=RING_SLOT_SIZE)
    aim = ClaimPeek(grid_name, random.Random(0xA1))
    sh = Shared(nlogs=NCONS)
    procs = Procs()
    kills = pkills = ckills = rounds = 0
    totals = Counter()
    max_drain = 0.0
    next_id = 1
    try:
        while kills < 120:
            rounds += 1
            assert rounds <= 100, "too few kills per round"
            sh.reset()
            st0 = r.stats()
            assert st0["head"] == st0["tail"] and len(r) == 0, st0
            pb = [rnd.choice((1, BATCH)) for _ in range(NPROD)]
            cb = [rnd.choice((1, BATCH)) for _ in range(NCONS)]
            ids = list(range(next_id, next_id + NPROD))
            next_id += NPROD
            cons = {NPROD + c: procs.start(ring_consumer, r, sh, NPROD + c, c, cb[c]) for c in range(NCONS)}
            prods = {i: procs.start(ring_producer, r, sh, i, ids[i], pb[i], rnd.random()) for i in range(NPROD)}
            t0 = wait_ready(sh, {**cons, **prods})
            pk = [i for i in range(NPROD) if rnd.random() < 0.8]
            ck = [c for c in range(NCONS) if rnd.random() < 0.5]
            plan = [(prods[i], rnd.uniform(KILL_MIN, KILL_MAX)) for i in pk]
            plan += [(cons[NPROD + c], rnd.uniform(KILL_MIN, KILL_MAX)) for c in ck]
            kill_on_schedule(plan, t0, aim)
            kills += len(plan)
            pkills += len(pk)
            ckills += len(ck)
            time.sleep(max(0.0, t0 + KILL_MAX - time.monotonic()))
            sh.flags[STOP_W] = 1
            for i, p in prods.items():
                if i not in pk:
                    join_clean(p, f"producer {i}")
            acks = {ids[i]: sh.ack[ids[i]] for i in range(NPROD)}

            # every producer is done or dead: what is left drains, promptly
            t_done = time.monotonic()
            live = [c for c in range(NCONS) if c not in ck]
            parent_log = []
            while True:
                st = r.stats()
                if st["head"] == st["tail"]:
                    break
                waited = time.monotonic() - t_done
                assert waited < DRAIN_LIMIT, (
                    f"round {rounds}: consumers stalled: {st['tail'] - st['head']} positions left "
                    f"{waited:.1f} s after every producer was done or dead; {st}")
                if live:
                    time.sleep(0.0005)
                    continue
                try:  # every consumer was killed: the parent drains
                    got = r.get_many(BATCH, timeout=0.01)
                except shmgrid.Empty:
                    continue
                for m in got:
                    ps = unmsg(m)
                    assert ps is not None, f"round {rounds}: torn message {m!r}"
                    parent_log.append(entry(*ps))
            max_drain = max(max_drain, time.monotonic() - t_done)
            sh.flags[STOP_R] = 1
            for c in live:
                join_clean(cons[NPROD + c], f"consumer {c}")
            assert list(sh.errs) == [0] * len(sh.errs), f"round {rounds}: worker errors {list(sh.errs)} ({list(sh.info)})"

            lap = ring_round_trip(r)
            st1 = r.stats()
            logs = [sh.logged(c) for c in range(NCONS)] + [parent_log]
            got = check_ring_round(rounds, logs, acks, dict(zip(ids, pb)), {ids[i] for i in pk},
                                   [cb[c] for c in ck], st0, st1, lap)
            totals.update(got)
            totals["acked"] += sum(acks.values())
    finally:
        procs.kill_all()
    print(f"\nring: {rounds} rounds, {kills} kills ({pkills} producers, {ckills} consumers; {aim.aimed} aimed, "
          f"{aim.hits} inside a claim), "
          f"{totals['acked']} acknowledged, {totals['received']} received, skipped {totals['skipped']}, "
          f"dropped {totals['dropped']}, taken-but-unlogged {totals['unlogged']}, acknowledged-but-lost "
          f"{totals['missing']}, unacknowledged-but-delivered {totals['beyond']}; slowest drain {max_drain * 1e3:.1f} ms")
    assert totals["acked"] > 0 and totals["received"] > 0, "the workers never got to work"
    assert kills >= 100
    ring_round_trip(r)


# ---- a reader stuck behind a dead producer's claimed cell -------------------------------

BIG = 32 * 1024  # bytes per message: a long copy inside the claim, easy to freeze in


def big(tag: bytes, seq: int) -> bytes:
    head = tag + b"%010d" % seq
    return head + b"." * (BIG - len(head))


def frozen_producer(r, sh, batch):
    try:
        seq = 0
        sh.ready[0] = 1
        while True:
            if batch == 1:
                r.put(big(b"P", seq))
                seq += 1
            else:
                seq += r.put_many([big(b"P", seq + i) for i in range(batch)])
    except BaseException:
        sh.errs[0] = E_OTHER
        raise


def catch_mid_claim(proc, drain, stuck, rnd, tries=400):
    """SIGSTOP proc at random moments until it is frozen between claiming a
    position and publishing it (drain() empties what can be read, then
    stuck() > 0 says a claimed position blocks the reader). Returns stuck()
    then, with proc left frozen, or 0 (proc running) if it never happened."""
    for _ in range(tries):
        time.sleep(rnd.uniform(0.0001, 0.002))
        freeze(proc.pid)
        drain()
        n = stuck()
        if n:
            return n
        os.kill(proc.pid, signal.SIGCONT)
    return 0


def frozen_consumer(r, sh, batch):
    """get (batch 1) or get_many; info[0] = the last sequence number taken."""
    try:
        sh.ready[0] = 1
        while True:
            got = [r.get()] if batch == 1 else r.get_many(batch)
            for m in got:
                seq = int(m[1:11])
                if m[:1] != b"P" or len(m) != BIG or seq <= sh.info[0]:
                    sh.errs[0] = E_TORN
                sh.info[0] = seq
    except BaseException:
        sh.errs[0] = E_OTHER
        raise


@pytest.mark.timeout(60)
def test_ring_writer_frees_dead_consumers_cell_promptly(grid):
    """Freeze the only consumer (get, then get_many) while it holds claimed
    cells it has not freed: the ring then takes fewer messages than its free
    room. A producer blocked in put() behind such a cell gets it within
    STUCK_SKIP_LIMIT of the consumer's SIGKILL; 'dropped' counts exactly the
    held messages, and none of them is ever delivered."""
    rnd = random.Random(0xD209)
    slots = 64
    r = grid.ring("held", slots=slots, slot_size=BIG)
    sh = Shared()
    procs = Procs()
    latencies, caught = [], Counter()
    seq = [0]

    def put_nowait_all(n):
        k = 0
        while k < n:
            try:
                r.put_nowait(big(b"P", seq[0] + 1))
            except shmgrid.Full:
                break
            seq[0] += 1
            k += 1
        return k

    try:
        deadline = time.monotonic() + 20
        for batch in (1,) * 4 + (slots,) * 4:
            held = 0
            while time.monotonic() < deadline:
                sh.reset()
                assert len(r) == 0
                sh.info[0] = seq[0]  # everything up to here was taken or lost before
                p = procs.start(frozen_consumer, r, sh, batch)
                wait_ready(sh, {0: p})
                for _ in range(300):
                    st = r.stats()
                    put_nowait_all(slots - (st["tail"] - st["head"]))
                    time.sleep(rnd.uniform(0, 0.0003))
                    freeze(p.pid)
                    st = r.stats()
                    room = slots - (st["tail"] - st["head"])
                    held = room - put_nowait_all(room)
                    if held:
                        break
                    os.kill(p.pid, signal.SIGCONT)
                if held:
                    break
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
                while True:
                    try:
                        r.get_nowait()
                    except shmgrid.Empty:
                        break
            else:
                break
            assert 0 < held <= batch, (held, batch)
            assert sh.errs[0] == 0
            last_taken = sh.info[0]
            s0 = r.stats()
            th, res = in_thread(lambda: r.put(big(b"P", seq[0] + 1), timeout=10))
            time.sleep(0.02)  # the producer is now asleep behind the held cell
            assert th.is_alive(), f"put() returned while the cell's consumer was alive: {res}"
            t_kill = time.monotonic()
            os.kill(p.pid, signal.SIGKILL)
            th.join(15)
            assert not th.is_alive() and "error" not in res, res
            seq[0] += 1
            latency = res["time"] - t_kill
            latencies.append(latency)
            caught[batch] += 1
            p.join(5)
            # what is left: the messages after the held ones, in order, none of the held ones
            left = []
            while True:
                try:
                    left.append(int(r.get_nowait()[1:11]))
                except shmgrid.Empty:
                    break
            assert left == sorted(left) and left[-1] == seq[0], (left[:3], left[-3:], seq[0])
            lost = left[0] - last_taken - 1
            assert held <= lost <= batch, f"{lost} messages lost with a consumer of batches of {batch}, {held} held"
            ring_round_trip(r)  # recovers the other held cells
            s1 = r.stats()
            assert s1["dropped"] - s0["dropped"] == held, (held, s0, s1)
            assert s1["skipped"] == s0["skipped"]
            assert latency < STUCK_SKIP_LIMIT, f"the producer took {latency * 1e3:.0f} ms to free a dead consumer's cell"
    finally:
        procs.kill_all()
    print(f"\nring held-cell recoveries: get {caught[1]}, get_many {caught[slots]}; latency after the kill "
          f"max {max(latencies, default=0) * 1e3:.1f} ms")
    assert caught[1] + caught[slots] >= 3, f"could not freeze a consumer mid-claim often enough: {dict(caught)}"


@pytest.mark.timeout(60)
def test_ring_reader_skips_dead_producers_cell_promptly(grid):
    """Freeze a producer (put, then put_many) between its claim and its
    publish; a consumer blocked in get() behind the claimed cell gets the
    next message within STUCK_SKIP_LIMIT of the producer's SIGKILL, and
    'skipped' counts exactly the claimed, unwritten positions."""
    rnd = random.Random(0x57C4)
    r = grid.ring("stuck", slots=128, slot_size=BIG)
    sh = Shared()
    procs = Procs()
    latencies, caught = [], Counter()
    last = {}

    def drain():
        while True:
            try:
                m = r.get_nowait()
            except shmgrid.Empty:
                return
            assert m[:1] == b"P" and len(m) == BIG, m[:20]
            seq = int(m[1:11])
            assert seq > last.get("seq", -1), (seq, last)
            last["seq"] = seq

    def stuck():
        st = r.stats()
        return st["tail"] - st["head"]

    try:
        deadline = time.monotonic() + 20
        for batch in (1,) * 4 + (16,) * 4:
            while time.monotonic() < deadline:
                sh.reset()
                last.clear()
                p = procs.start(frozen_producer, r, sh, batch)
                wait_ready(sh, {0: p})
                n = catch_mid_claim(p, drain, stuck, rnd)
                if n:
                    break
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
                drain()
            else:
                break
            assert n <= batch, f"{n} positions blocked behind a producer of batches of {batch}"
            s0 = r.stats()
            r.put(b"marker", timeout=1)  # the position after the claimed ones
            th, res = in_thread(lambda: r.get(timeout=10))
            time.sleep(0.02)  # the reader is now asleep behind the claimed cell
            assert th.is_alive(), f"get() returned while the claimant was alive: {res}"
            t_kill = time.monotonic()
            os.kill(p.pid, signal.SIGKILL)
            th.join(15)
            assert not th.is_alive() and "error" not in res, res
            assert res["value"] == b"marker", res["value"][:20]
            latency = res["time"] - t_kill
            latencies.append(latency)
            caught[batch] += 1
            p.join(5)
            s1 = r.stats()
            assert s1["skipped"] - s0["skipped"] == n, (n, s0, s1)
            assert s1["dropped"] == s0["dropped"]
            assert latency < STUCK_SKIP_LIMIT, f"the reader took {latency * 1e3:.0f} ms to skip a dead producer's cell"
            ring_round_trip(r)
    finally:
        procs.kill_all()
    print(f"\nring stuck-cell skips: put {caught[1]}, put_many {caught[16]}; latency after the kill "
          f"max {max(latencies, default=0) * 1e3:.1f} ms")
    assert caught[1] + caught[16] >= 3, f"could not freeze a producer mid-claim often enough: {dict(caught)}"
    ring_round_trip(r)


# =====================================================================================
# Topic
# =====================================================================================

TOPIC_CAP = 16
NPUB = 3


def topic_publisher(t, sh, slot, p):
    """Publish p's messages 1, 2, ... until told to stop; ack[p] = the last
    one whose publish returned."""
    try:
        seq = 0
        sh.ready[slot] = 1
        while not sh.flags[STOP_W]:
            try:
                t.publish(msg(p, seq + 1), timeout=0.02)
            except shmgrid.Full:
                continue
            seq += 1
            sh.ack[p] = seq
    except BaseException:
        sh.errs[slot] = E_OTHER
        raise


def topic_witness(t, sh, slot, c):
    """Subscribe, log every message until told to stop (and nothing is
    left), then leave the topic."""
    try:
        sub = t.subscribe()
        n = 0
        sh.ready[slot] = 1
        while True:
            try:
                m = sub.get(timeout=0.02)
            except shmgrid.Empty:
                if sh.flags[STOP_R]:
                    break
                continue
            ps = unmsg(m)
            if ps is None:
                sh.errs[slot] = E_TORN
                continue
            n = sh.append(c, n, array.array("q", [entry(*ps)]))
        sub.close()
    except BaseException:
        sh.errs[slot] = E_OTHER
        raise


def topic_victim(t, sh, slot, mode, seed):
    """A subscriber that holds publishers back until it is killed: it never
    reads (idle), reads slowly (slow), or reads a little then stops (stops)."""
    try:
        rnd = random.Random(seed)
        sub = t.subscribe()
        sh.ready[slot] = 1
        if mode == "slow":
            while True:
                sub.get()
                time.sleep(rnd.uniform(0, 0.003))
        if mode == "stops":
            for _ in range(rnd.randint(0, 3 * TOPIC_CAP)):
                sub.get()
        while True:
            time.sleep(1)
    except BaseException:
        sh.errs[slot] = E_OTHER
        raise


def wait_caught_up(t, since: float, what: str) -> None:
    """Every live subscriber reaches the tail within DRAIN_LIMIT of `since`."""
    while True:
        st = t.stats()
        if st["lag"] == 0:
            return
        waited = time.monotonic() - since
        assert waited < DRAIN_LIMIT, f"{what}: subscribers stalled {st['lag']} messages behind for {waited:.1f} s; {st}"
        time.sleep(0.0005)


def topic_probe(t) -> None:
    """The topic still works: a new subscriber gets what is published next."""
    with t.subscribe() as sub:
        t.publish(b"probe", timeout=5)
        assert sub.get(timeout=5) == b"probe"
        with pytest.raises(shmgrid.Empty):
            sub.get_nowait()


@pytest.mark.timeout(60)
def test_topic_sigkill_publishers(grid, grid_name):
    """Lossless topic, 3 publishers killed (p=0.8) at 1-50 ms, 2 subscribers
    that see it all: both see the same sequence, every acknowledged message,
    each publisher's messages 1..n without a gap (n = ack, or ack + 1 for a
    killed one), and 'skipped' is exactly the positions with no message."""
    rnd = random.Random(0x70B1C)
    t = grid.topic("pubkill", capacity=TOPIC_CAP, max_message=MAX_MSG, lossless=True)
    aim = ClaimPeek(grid_name, random.Random(0xA2))
    sh = Shared(nlogs=2)
    procs = Procs()
    kills = rounds = 0
    totals = Counter()
    next_id = 1
    try:
        for rounds in range(1, 16):
            sh.reset()
            s0 = t.stats()
            wit = {NPUB + c: procs.start(topic_witness, t, sh, NPUB + c, c) for c in range(2)}
            wait_ready(sh, wit)  # subscribed before anything is published
            ids = list(range(next_id, next_id + NPUB))
            next_id += NPUB
            pubs = {i: procs.start(topic_publisher, t, sh, i, ids[i]) for i in range(NPUB)}
            t0 = wait_ready(sh, pubs)
            pk = [i for i in range(NPUB) if rnd.random() < 0.8]
            kill_on_schedule([(pubs[i], rnd.uniform(KILL_MIN, KILL_MAX)) for i in pk], t0, aim)
            kills += len(pk)
            time.sleep(max(0.0, t0 + KILL_MAX - time.monotonic()))
            sh.flags[STOP_W] = 1
            for i, p in pubs.items():
                if i not in pk:
                    join_clean(p, f"publisher {i}")
            wait_caught_up(t, time.monotonic(), f"round {rounds}")
            sh.flags[STOP_R] = 1
            for c, p in wit.items():
                join_clean(p, f"subscriber {c}")
            assert list(sh.errs) == [0] * len(sh.errs), f"round {rounds}: worker errors {list(sh.errs)}"

            s1 = t.stats()
            logs = [sh.logged(0), sh.logged(1)]
            assert logs[0] == logs[1], f"round {rounds}: the two subscribers saw different sequences"
            per = {p: [] for p in ids}
            for e in logs[0]:
                p, s = unentry(e)
                assert p in per, f"round {rounds}: message from unknown publisher {p}"
                per[p].append(s)
            for i, p in enumerate(ids):
                a = sh.ack[p]
                n = len(per[p])
                assert per[p] == list(range(1, n + 1)), f"round {rounds}: publisher {p}'s messages: gap or disorder"
                ok = (a, a + 1) if i in pk else (a,)
                assert n in ok, f"round {rounds}: publisher {p} ({'killed' if i in pk else 'stopped'}) acked {a}, seen {n}"
                totals["beyond"] += n - a
            d_tail = s1["published"] - s0["published"]
            d_skip = s1["skipped"] - s0["skipped"]
            assert d_skip == d_tail - len(logs[0]), (
                f"round {rounds}: {d_tail} positions, {len(logs[0])} messages seen, but skipped counts {d_skip}")
            assert d_skip <= len(pk)
            assert s1["removed"] == s0["removed"], "a subscriber that left cleanly was counted as removed"
            assert s1["subscribers"] == 0, s1
            totals["skipped"] += d_skip
            totals["seen"] += len(logs[0])
            topic_probe(t)
    finally:
        procs.kill_all()
    print(f"\ntopic/publishers: {rounds} rounds, {kills} kills ({aim.aimed} aimed, {aim.hits} inside a claim), "
          f"{totals['seen']} messages seen by both "
          f"subscribers, skipped {totals['skipped']}, unacknowledged-but-published {totals['beyond']}")
    assert totals["seen"] > 0


@pytest.mark.timeout(60)
def test_topic_sigkill_subscriber_unblocks_publisher(grid):
    """Lossless topic: a subscriber that holds the publisher back (never
    reads, reads slowly, or stops reading) is killed 1-50 ms in; the
    publisher publishes two capacities more within UNBLOCK_LIMIT, 'removed'
    counts the dead subscriber, and a live subscriber still sees every
    message in order."""
    rnd = random.Random(0x5B5C)
    t = grid.topic("subkill", capacity=TOPIC_CAP, max_message=MAX_MSG, lossless=True)
    sh = Shared(nlogs=1)
    procs = Procs()
    latencies = []
    blocked = 0
    try:
        for rd in range(1, 9):
            sh.reset()
            s0 = t.stats()
            mode = ("idle", "slow", "stops")[rd % 3]
            wit = procs.start(topic_witness, t, sh, 1, 0)
            vic = procs.start(topic_victim, t, sh, 2, mode, rnd.random())
            wait_ready(sh, {1: wit, 2: vic})
            pub = procs.start(topic_publisher, t, sh, 0, rd)
            t0 = wait_ready(sh, {0: pub})
            time.sleep(rnd.uniform(KILL_MIN, KILL_MAX))
            a_before = sh.ack[rd]
            time.sleep(0.002)
            a_kill = sh.ack[rd]
            blocked += a_kill == a_before
            os.kill(vic.pid, signal.SIGKILL)
            t_kill = time.monotonic()
            vic.join(5)
            goal = a_kill + 2 * TOPIC_CAP
            while sh.ack[rd] < goal:
                waited = time.monotonic() - t_kill
                assert waited < UNBLOCK_LIMIT, (
                    f"round {rd} ({mode} subscriber killed {t_kill - t0:.3f} s in): the publisher is still "
                    f"held back {waited:.1f} s after the subscriber died: acknowledged {a_kill} -> {sh.ack[rd]} "
                    f"(needs {goal}); stats {t.stats()}")
                time.sleep(0.0005)
            latencies.append(time.monotonic() - t_kill)
            sh.flags[STOP_W] = 1
            join_clean(pub, "publisher")
            wait_caught_up(t, time.monotonic(), f"round {rd}")
            sh.flags[STOP_R] = 1
            join_clean(wit, "live subscriber")
            assert list(sh.errs) == [0] * len(sh.errs), f"round {rd}: worker errors {list(sh.errs)}"
            a = sh.ack[rd]
            assert sh.logged(0) == [entry(rd, s) for s in range(1, a + 1)], f"round {rd}: the live subscriber missed messages"
            s1 = t.stats()
            assert s1["removed"] - s0["removed"] == 1, f"round {rd}: the dead subscriber was not counted as removed: {s0} -> {s1}"
            assert s1["skipped"] == s0["skipped"]
            assert s1["subscribers"] == 0, s1
            topic_probe(t)
    finally:
        procs.kill_all()
    print(f"\ntopic/subscribers: {len(latencies)} kills ({blocked} while the publisher was blocked); "
          f"publisher going again {max(latencies, default=0) * 1e3:.1f} ms after the kill at most")


def frozen_publisher(t, sh):
    try:
        seq = 0
        sh.ready[0] = 1
        while True:
            t.publish(big(b"P", seq))
            seq += 1
    except BaseException:
        sh.errs[0] = E_OTHER
        raise


@pytest.mark.timeout(60)
def test_topic_subscriber_skips_dead_publishers_position_promptly(grid):
    """Freeze a publisher between its claim and its publish; a subscriber
    blocked in get() behind that position gets the next message within
    STUCK_SKIP_LIMIT of the publisher's SIGKILL, and 'skipped' counts it."""
    rnd = random.Random(0xF00D)
    t = grid.topic("stuck", capacity=128, max_message=BIG, lossless=True)
    sub = t.subscribe()
    sh = Shared()
    procs = Procs()
    latencies = []
    last = {}

    def drain():
        while True:
            try:
                m = sub.get_nowait()
            except shmgrid.Empty:
                return
            assert m[:1] == b"P" and len(m) == BIG, m[:20]
            seq = int(m[1:11])
            assert seq == last.get("seq", -1) + 1, (seq, last)
            last["seq"] = seq

    try:
        deadline = time.monotonic() + 20
        while len(latencies) < 6 and time.monotonic() < deadline:
            sh.reset()
            last.clear()
            p = procs.start(frozen_publisher, t, sh)
            wait_ready(sh, {0: p})
            n = catch_mid_claim(p, drain, sub.pending, rnd)
            if not n:
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
                drain()
                continue
            assert n == 1, n
            s0 = t.stats()
            t.publish(b"marker", timeout=1)
            th, res = in_thread(lambda: sub.get(timeout=10))
            time.sleep(0.02)
            assert th.is_alive(), f"get() returned while the claimant was alive: {res}"
            t_kill = time.monotonic()
            os.kill(p.pid, signal.SIGKILL)
            th.join(15)
            assert not th.is_alive() and "error" not in res, res
            assert res["value"] == b"marker", res["value"][:20]
            latency = res["time"] - t_kill
            latencies.append(latency)
            p.join(5)
            s1 = t.stats()
            assert s1["skipped"] - s0["skipped"] == 1, (s0, s1)
            assert latency < STUCK_SKIP_LIMIT, f"the subscriber took {latency * 1e3:.0f} ms to skip a dead publisher's position"
            assert sub.pending() == 0
            topic_probe(t)
            assert sub.get(timeout=1) == b"probe"  # our own subscription sees the probe too
            assert sub.pending() == 0
    finally:
        procs.kill_all()
        sub.close()
    print(f"\ntopic stuck-position skips: {len(latencies)}; latency after the kill max "
          f"{max(latencies, default=0) * 1e3:.1f} ms")
    assert len(latencies) >= 2, "could not freeze a publisher mid-claim often enough"


# =====================================================================================
# Lock
# =====================================================================================

NLOCKERS = 5
P_OUT, P_ACQUIRING, P_HOLDING, P_RELEASING = 0, 1, 2, 3
RECCAP = 256


class LockShared(Shared):
    def __init__(self):
        super().__init__(nslots=NLOCKERS)
        self.phase, self.done, self.died_seen = (shared_i64(NLOCKERS) for _ in range(3))
        self.inside = shared_i64(1)  # id of the worker in the critical section, 0 = none
        self.rec_n = shared_i64(NLOCKERS)
        self.rec = shared_i64(NLOCKERS * RECCAP)  # `inside` as found by an owner_died acquire

    def reset(self):
        super().reset()
        for a in (self.phase, self.done, self.died_seen, self.rec_n):
            for i in range(NLOCKERS):
                a[i] = 0


def lock_worker(lk, m, sh, slot, wid):
    """acquire / read-modify-write the map's counter / release, forever."""
    try:
        phase, inside = sh.phase, sh.inside
        sh.ready[slot] = 1
        while True:
            phase[slot] = P_ACQUIRING
            if not lk.acquire(timeout=5):
                sh.errs[slot] = E_STALL
                return
            phase[slot] = P_HOLDING
            prev = inside[0]
            if lk.owner_died:
                sh.died_seen[slot] += 1
                k = sh.rec_n[slot]
                if k < RECCAP:
                    sh.rec[slot * RECCAP + k] = prev
                    sh.rec_n[slot] = k + 1
            elif prev != 0:
                sh.errs[slot], sh.info[slot] = E_MUTEX, prev
            inside[0] = wid
            v = un64(m.get(b"x"))
            m.put(b"x", i64(v + 1))  # not atomic: only the lock keeps increments apart
            if inside[0] != wid:
                sh.errs[slot], sh.info[slot] = E_MUTEX, inside[0]
            sh.done[slot] += 1
            inside[0] = 0
            phase[slot] = P_RELEASING
            lk.release()
            phase[slot] = P_OUT
    except BaseException:
        sh.errs[slot] = E_OTHER
        raise


@pytest.mark.timeout(60)
def test_lock_sigkill_holders(grid):
    """5 workers loop acquire/modify/release and are all killed at 1-50 ms,
    20 rounds. Mutual exclusion: the counter equals the completed critical
    sections plus at most one per worker killed holding the lock; whoever
    acquires after a holder's death is told (owner_died), and the parent
    always gets the lock within a second."""
    rnd = random.Random(0x10C)
    lk = grid.lock("crash")
    m = grid.map("lockdata", capacity=16, max_key=8, max_value=16)
    sh = LockShared()
    procs = Procs()
    base = kills = certain_total = seen_total = parent_died = 0
    max_take = 0.0
    try:
        for rd in range(1, 21):
            sh.reset()
            k0 = lk.stats()
            wids = [rd * 100 + w for w in range(NLOCKERS)]
            ws = {w: procs.start(lock_worker, lk, m, sh, w, wids[w]) for w in range(NLOCKERS)}
            t0 = wait_ready(sh, ws)
            kill_on_schedule([(p, rnd.uniform(KILL_MIN, KILL_MAX)) for p in ws.values()], t0)
            kills += NLOCKERS
            assert list(sh.errs) == [0] * NLOCKERS, f"round {rd}: worker errors {list(sh.errs)} (info {list(sh.info)})"

            phases = list(sh.phase)
            holding = {wids[w] for w in range(NLOCKERS) if phases[w] == P_HOLDING}
            maybe = sum(ph in (P_ACQUIRING, P_RELEASING) for ph in phases)
            pre = lk.stats()
            t = time.monotonic()
            assert lk.acquire(timeout=3), f"round {rd}: the parent could not take the lock: {pre} -> {lk.stats()}"
            take = time.monotonic() - t
            max_take = max(max_take, take)
            died = lk.owner_died
            parent_died += died
            if pre["owner_tid"]:
                assert not pre["owner_alive"] and died, f"round {rd}: lock held by a dead worker, yet owner_died is {died}: {pre}"
            else:
                assert not died, f"round {rd}: lock was free, yet owner_died: {pre}"
            assert take < 1.0, f"round {rd}: {take:.2f} s to take a lock whose holders are all dead"
            where = f"round {rd}: phases at death {phases}"
            recovered = [sh.rec[w * RECCAP + i] for w in range(NLOCKERS) for i in range(sh.rec_n[w])]
            if died:
                recovered.append(sh.inside[0])
            else:
                assert sh.inside[0] == 0, f"{where}: worker {sh.inside[0]} inside with the lock free"
            assert set(recovered) <= {0} | holding, (
                f"{where}: an owner_died acquire found worker(s) {set(recovered) - {0} - holding} inside, "
                f"which did not die holding the lock")

            v = un64(m.get(b"x"))
            done = sum(sh.done)
            assert 0 <= v - base - done <= len(holding), (
                f"{where}: counter moved by {v - base}, {done} critical sections completed, "
                f"{len(holding)} workers killed inside one: mutual exclusion broken")
            k1 = lk.stats()
            d_deaths = k1["owner_deaths"] - k0["owner_deaths"]
            assert len(holding) <= d_deaths <= len(holding) + maybe, (
                f"{where}: {d_deaths} owner deaths counted for {len(holding)} killed holders (+{maybe} maybe)")
            seen = sum(sh.died_seen) + died
            assert seen <= d_deaths
            assert k1["acquisitions"] - k0["acquisitions"] >= done + 1
            certain_total += len(holding)
            seen_total += seen
            base = v
            sh.inside[0] = 0
            lk.release()
            assert not lk.locked()
    finally:
        procs.kill_all()
    # the lock still works for a new process and for this one
    assert lk.acquire(timeout=1) and not lk.owner_died
    lk.release()
    print(f"\nlock: {kills} kills, {certain_total} while holding the lock, {seen_total} owner_died acquires "
          f"({parent_died} by the parent), {base} critical sections; parent's take at most {max_take * 1e3:.1f} ms")
    assert certain_total >= 5, "too few kills landed inside the critical section to test recovery"
