"""Elastic map (issue 6): online growth, reclamation of deleted keys,
migrations under concurrent load and under SIGKILL, max_capacity and
compact().

API contract these tests rely on (beyond the core map):

- ``grid.map(name, capacity=..., max_key=..., max_value=..., max_capacity=None)``:
  ``capacity`` is the initial size; the table grows online when too full,
  or is rebuilt at the same size when too full of deleted keys' slots.
  Past ``max_capacity``, inserting a new key raises CapacityError naming
  "max_capacity"; an exhausted heap raises CapacityError naming "heap".
- ``m.compact()`` runs a cleaning migration and returns once it is done.
- ``m.validate()`` reports live, tombstones, bound, nslots, live_counter and
  generation (1 for the first table, +1 per migration); ``grid.validate()``
  reports carved/free/leaked/reachable bytes and ``retired_bytes``.
- Every change makes a key's version larger; a key stored again after a
  delete gets a version above its tombstone's (not necessarily +1).

Multi-process tests fork their workers (one spawns a process that attaches
by name); every wait has a timeout, and a stuck process is killed and fails
the test instead of hanging it. Workers that are SIGKILLed never use locks
or queues: they report through lock-free shared int64 arrays only.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import random
import signal
import struct
import time
import traceback
import zlib

import pytest
from spawned import run_spawned
from linearizability import CAS, DELETE, GET, INITIAL, PUT, Op, check, step

import shmgrid

FORK = mp.get_context("fork")
MiB = 1024 * 1024


def i64(n: int) -> bytes:
    return struct.pack("<q", n)


def un64(b: bytes) -> int:
    return struct.unpack("<q", b)[0]


# ---- running workers ---------------------------------------------------------------


def _entry(target, q, idx, args):
    try:
        res = target(*args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((idx, False, traceback.format_exc()))
        raise SystemExit(1)
    q.put((idx, True, res))


class Workers:
    """Processes that each report one result (or their traceback) through a
    queue. ``wait`` never hangs: it fails on an error, a process that died
    without reporting, or the deadline. Leaving the ``with`` block SIGKILLs
    whatever is still running."""

    def __init__(self, ctx=FORK):
        self.ctx = ctx
        self.q = ctx.Queue()
        self.procs = []
        self.results = {}

    def start(self, target, *args) -> int:
        idx = len(self.procs)
        p = self.ctx.Process(target=_entry, args=(target, self.q, idx, args), daemon=True)
        self.procs.append(p)
        p.start()
        return idx

    def wait(self, idxs, deadline):
        idxs = list(idxs)
        while not all(i in self.results for i in idxs):
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = [i for i in idxs if i not in self.results]
                pytest.fail(f"workers {stuck} still running at the deadline")
            try:
                idx, ok, res = self.q.get(timeout=min(left, 0.5))
            except queue.Empty:
                dead = [i for i, p in enumerate(self.procs) if i not in self.results and p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(0.3)  # a last message may still be in the pipe
                    if self.q.empty():
                        pytest.fail(f"workers {dead} died without reporting "
                                    f"(exit codes {[self.procs[i].exitcode for i in dead]})")
                continue
            if not ok:
                pytest.fail(f"worker {idx} failed:\n{res}")
            self.results[idx] = res
        for i in idxs:
            self.procs[i].join(max(1.0, deadline - time.monotonic()))
            assert not self.procs[i].is_alive(), f"worker {i} reported but does not exit"
            assert self.procs[i].exitcode == 0
        return [self.results[i] for i in idxs]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        self.q.close()
        self.q.join_thread()


def big_grid(name, size):
    return shmgrid.Grid.create(name, size=size)


# ---- 1. churn: deleted keys give their room back --------------------------------------


@pytest.mark.timeout(240)
def test_churn_5m_distinct_keys_in_capacity_4096(grid_name):
    """5M distinct keys in and out, at most 1,000 live at a time, in a map
    created for 4,096 keys: no CapacityError, and the heap stops growing
    (slots, key blocks and old tables of deleted keys are reclaimed)."""
    total, window, sample_at = 5_000_000, 1000, 500_000
    g = big_grid(grid_name, "512MiB")
    try:
        m = g.map("churn", capacity=4096, max_key=8, max_value=8)
        leaked0 = g.validate()["leaked_bytes"]
        put, delete = m.put, m.delete
        t0 = time.monotonic()
        for i in range(window):
            k = i.to_bytes(8, "little")
            put(k, k)
        for i in range(window, total):
            if i == sample_at:
                h_sample = g.validate()
                r_sample = m.validate()
            k = i.to_bytes(8, "little")
            put(k, k)
            if not delete((i - window).to_bytes(8, "little")):
                pytest.fail(f"key {i - window} vanished before its delete")
        r_full = m.validate()
        assert r_full["live"] == r_full["live_counter"] == len(m) == window
        for i in range(total - window, total):
            k = i.to_bytes(8, "little")
            assert m.get(k) == k
            assert delete(k)
        elapsed = time.monotonic() - t0
        r = m.validate()
        h = g.validate()
        print(f"\nchurn: {total} keys in {elapsed:.1f} s; generation {r['generation']}, nslots "
              f"{r_sample['nslots']} -> {r['nslots']}; carved {h_sample['carved_bytes']} -> {h['carved_bytes']}, "
              f"retired {h['retired_bytes']}")
        assert r["live"] == r["live_counter"] == len(m) == 0
        assert list(m) == []
        assert r["generation"] > 1, "5M distinct keys went through 4,096 slots without a single migration?"
        assert h["carved_bytes"] <= 2 * h_sample["carved_bytes"], (
            f"heap use keeps growing under churn: {h_sample['carved_bytes']} bytes carved after "
            f"{sample_at} keys, {h['carved_bytes']} after {total}")
        assert r["nslots"] <= 2 * r_sample["nslots"], "the table grew with no more than 1,000 live keys"
        assert h["leaked_bytes"] == leaked0, "blocks lost without any process dying"
        # the map still works normally afterwards
        assert put(b"after", b"x") >= 1 and m.get(b"after") == b"x"
    finally:
        g.close()


# ---- 2. growth under load -------------------------------------------------------------

G_NKEYS, G_WRITERS, G_READERS = 1_000_000, 4, 2


def g_key(k: int) -> bytes:
    return k.to_bytes(8, "little")


def g_writes(k: int) -> int:
    """How many times key k is written (seq 0 .. g_writes(k) - 1): 1 for
    most keys, 1-4 for every fifth."""
    return 1 + (k // 5) % 4 if k % 5 == 0 else 1


def g_value(kb: bytes, seq: int) -> bytes:
    return kb + seq.to_bytes(8, "little")


def _growth_writer(m, w, progress):
    """Write keys w, w + 4, w + 8, ...; progress[w] = j + 1 once key j's
    first put has returned. Overwrites of key j (seq s) come 500 * s keys
    later, so they land all through the growth."""
    put = m.put
    n = G_NKEYS // G_WRITERS
    lag = 500
    writes = 0
    for j in range(n + 3 * lag + 1):
        for s in range(4):
            jj = j - lag * s
            if 0 <= jj < n:
                k = w + G_WRITERS * jj
                if s < g_writes(k):
                    kb = g_key(k)
                    put(kb, g_value(kb, s))
                    writes += 1
        if j < n:
            progress[w] = j + 1
    return writes


def _growth_reader(m, seed, progress, stop):
    """Read random keys until told to stop. A key whose first put returned
    before we read progress[] must be present (a migration never hides a
    key); every value must be one written for that key, and per key the
    seq and the version never go backwards."""
    rnd = random.Random(seed)
    get = m.get_versioned
    last = {}
    reads = hits = 0
    errors = []
    while not stop[0] and len(errors) < 20:
        w = rnd.randrange(G_WRITERS)
        if rnd.random() < 0.2:  # any key, written or not yet
            k = rnd.randrange(G_NKEYS)
            must = False
        else:
            p = progress[w]
            if p == 0:
                continue
            k = w + G_WRITERS * rnd.randrange(p)
            must = True
        kb = g_key(k)
        got = get(kb)
        reads += 1
        if got is None:
            if must:
                errors.append(f"key {k} missing although its put returned")
            continue
        hits += 1
        v, ver = got
        if len(v) != 16 or v[:8] != kb:
            errors.append(f"key {k}: value {v!r} was never written for it")
            continue
        seq = int.from_bytes(v[8:], "little")
        if not 0 <= seq < g_writes(k):
            errors.append(f"key {k}: seq {seq} was never written")
            continue
        prev = last.get(k)
        if prev is not None:
            pseq, pver = prev
            if seq < pseq or (seq == pseq and ver != pver) or (seq > pseq and ver <= pver):
                errors.append(f"key {k}: went from (seq {pseq}, version {pver}) to (seq {seq}, version {ver})")
        last[k] = (seq, ver)
    return reads, hits, errors


@pytest.mark.timeout(180)
def test_growth_under_load(grid_name):
    """4 processes insert 1M keys into a map created for 1,024 while 2
    processes read and check every value they see; at the end every key
    holds its last value."""
    g = big_grid(grid_name, "1GiB")
    try:
        m = g.map("grow", capacity=1024, max_key=8, max_value=16)
        leaked0 = g.validate()["leaked_bytes"]
        progress = FORK.Array("q", G_WRITERS, lock=False)
        stop = FORK.Array("q", 1, lock=False)
        t0 = time.monotonic()
        with Workers() as ws:
            readers = [ws.start(_growth_reader, m, 100 + r, progress, stop) for r in range(G_READERS)]
            writers = [ws.start(_growth_writer, m, w, progress) for w in range(G_WRITERS)]
            deadline = time.monotonic() + 90
            writes = ws.wait(writers, deadline)
            t_write = time.monotonic() - t0
            stop[0] = 1
            rres = ws.wait(readers, deadline + 10)
        errors = [e for _, _, errs in rres for e in errs]
        assert not errors, "readers saw:\n" + "\n".join(errors[:20])
        expected_writes = sum(g_writes(k) for k in range(G_NKEYS))
        assert sum(writes) == expected_writes
        for reads, hits, _ in rres:
            assert reads > 10_000 and hits > 5_000, "a reader barely ran while the writers did"

        r = m.validate()
        h = g.validate()
        print(f"\ngrowth: writers done in {t_write:.1f} s, generation {r['generation']}, nslots {r['nslots']}, "
              f"reads {[x[0] for x in rres]}, carved {h['carved_bytes']}, retired {h['retired_bytes']}")
        assert r["generation"] > 1, "1M keys in a map created for 1,024 without a migration?"
        assert r["live"] == r["live_counter"] == r["bound"] == len(m) == G_NKEYS, r
        assert r["tombstones"] == 0
        get = m.get
        bad = []
        for k in range(G_NKEYS):
            kb = g_key(k)
            if get(kb) != g_value(kb, g_writes(k) - 1):
                bad.append(k)
        assert not bad, f"{len(bad)} keys do not hold their last value, e.g. {bad[:10]}"
        items = m.items()
        assert len(items) == G_NKEYS
        assert all(v == g_value(kb, g_writes(int.from_bytes(kb, "little")) - 1) for kb, v in items)
        assert g.validate()["leaked_bytes"] == leaked0, "blocks lost without any process dying"
    finally:
        g.close()


# ---- 3. SIGKILL during migrations ------------------------------------------------------------

K_WORKERS = 4
K_WINDOW = 16  # fresh keys a worker keeps live
K_NSHARED = 12
K_NINT = 6
K_MAXVAL = 120
K_KILL_WINDOW = 0.020
E_TORN, E_NOTINT, E_DELETE, E_OTHER = 1, 2, 3, 4


def k_mkval(rnd: random.Random) -> bytes:
    body = rnd.randbytes(rnd.choice((0, 1, 7, 20, 50, K_MAXVAL - 8)))
    return struct.pack("<II", zlib.crc32(body), len(body)) + body


def k_val_ok(v: bytes) -> bool:
    if len(v) < 8:
        return False
    crc, n = struct.unpack_from("<II", v)
    return n == len(v) - 8 and zlib.crc32(v[8:]) == crc


def k_fresh(w: int, n: int) -> bytes:
    return b"f%d-%d" % (w, n)


K_SKEYS = [b"s%d" % i for i in range(K_NSHARED)]
K_IKEYS = [b"i%d" % i for i in range(K_NINT)]


class KShared:
    """int64 arrays the workers write and the parent reads (fork-inherited)."""

    def __init__(self):
        arr = lambda: FORK.Array("q", K_WORKERS, lock=False)
        self.ack_c, self.nfresh, self.ready, self.errs, self.ops = arr(), arr(), arr(), arr(), arr()


def _kill_worker(m, w, seed, sh):
    """Loop until killed over: acknowledged incr of my counter; churn (put
    fresh key n, acknowledge nfresh = n + 1, delete fresh key n - K_WINDOW:
    so keys n - K_WINDOW + 1 .. n are live); shared checksummed values;
    shared int64s; and now and then a forced migration."""
    try:
        rnd = random.Random(seed)
        ck = b"c%d" % w
        n = sh.nfresh[w]
        sh.ready[w] = 1
        while True:
            op = rnd.random()
            if op < 0.20:
                sh.ack_c[w] = m.incr(ck)
            elif op < 0.60:
                m.put(k_fresh(w, n), k_mkval(rnd))
                sh.nfresh[w] = n + 1
                if n >= K_WINDOW and not m.delete(k_fresh(w, n - K_WINDOW)):
                    sh.errs[w] = E_DELETE
                n += 1
            elif op < 0.70:
                m.put(rnd.choice(K_SKEYS), k_mkval(rnd))
            elif op < 0.74:
                m.delete(rnd.choice(K_SKEYS))
            elif op < 0.82:
                v = m.get(rnd.choice(K_SKEYS))
                if v is not None and not k_val_ok(v):
                    sh.errs[w] = E_TORN
            elif op < 0.92:
                m.incr(rnd.choice(K_IKEYS), rnd.randint(-3, 3))
            elif op < 0.95:
                m.delete(rnd.choice(K_IKEYS))
            elif op < 0.995:
                v = m.get(rnd.choice(K_IKEYS))
                if v is not None and len(v) != 8:
                    sh.errs[w] = E_NOTINT
            else:
                m.compact()
            sh.ops[w] += 1
    except BaseException:
        sh.errs[w] = E_OTHER
        raise


def _kill_round(m, rd, sh, rnd):
    """Start K_WORKERS workers and SIGKILL each at a random moment: mostly
    0-20 ms into its loop, sometimes 0-20 ms after fork."""
    procs = []
    for w in range(K_WORKERS):
        sh.ready[w] = 0
    plan = []
    for w in range(K_WORKERS):
        p = FORK.Process(target=_kill_worker, args=(m, w, rd * 100 + w, sh), daemon=True)
        procs.append(p)
        p.start()
        early = rnd.random() < 0.15
        plan.append([p, time.monotonic() if early else None, rnd.uniform(0, K_KILL_WINDOW)])
    guard = time.monotonic() + 20
    pending = list(range(K_WORKERS))
    try:
        while pending:
            now = time.monotonic()
            assert now < guard, "a worker never got going"
            for w in list(pending):
                p, t0, delay = plan[w]
                if t0 is None and sh.ready[w]:
                    plan[w][1] = t0 = now
                if t0 is not None and now >= t0 + delay:
                    os.kill(p.pid, signal.SIGKILL)
                    pending.remove(w)
            time.sleep(0.0005)
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
    for p in procs:
        assert not p.is_alive()
        assert p.exitcode == -signal.SIGKILL, f"worker exited on its own with {p.exitcode}"
    return K_WORKERS


def max_block(m) -> int:
    """Bytes of the largest block a map write can hold (a power-of-two
    bound on its size class)."""
    need = 16 + max(m.max_value, m.max_key)
    return 1 << need.bit_length()


def _child(fn, args):
    fn(*args)


def in_child(fn, *args, timeout=20.0):
    """Run fn(*args) in a forked child: if it blocks (a migration nobody
    can finish) it is killed and the test fails instead of hanging."""
    p = FORK.Process(target=_child, args=(fn, args), daemon=True)
    p.start()
    p.join(timeout)
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
        pytest.fail(f"{fn.__name__} blocked for over {timeout} s")
    assert p.exitcode == 0, f"{fn.__name__} failed in the child (exit code {p.exitcode}; traceback above)"


def _probe_after_kills(m):
    """Fresh operations finish (completing any migration the dead left
    half-done), and every shared key reads back sane and stays writable."""
    probe = b"probe-%d" % os.getpid()
    assert m.put_if_absent(probe, b"x")
    assert m.get(probe) == b"x"
    assert m.delete(probe)
    for w in range(K_WORKERS):
        ck = b"c%d" % w
        v = m.get(ck)
        assert m.incr(ck, 0) == (un64(v) if v is not None else 0)
    for k in K_SKEYS:
        v = m.get(k)
        assert v is None or k_val_ok(v), f"torn value under {k!r}"
    for k in K_IKEYS:
        v = m.get(k)
        assert v is None or len(v) == 8
    m.validate()


def _attach_and_use(name, acks, q):
    with shmgrid.Grid.attach(name) as g:
        m = g.map("mig")
        seen = [un64(m.get(b"c%d" % w, i64(0))) for w in range(len(acks))]
        n = m.incr(b"c0")
        m.put(b"from-spawn", b"hello")
        ok = m.get(b"from-spawn") == b"hello" and m.delete(b"from-spawn")
        gen = m.validate()["generation"]
        m.compact()
        ok = ok and m.validate()["generation"] == gen + 1
        q.put((seen, n, ok))


@pytest.mark.timeout(300)
def test_sigkill_during_migrations(grid_name):
    """Workers churn a map created for 64 keys (a migration every few dozen
    operations, and forced ones) and are SIGKILLed at random moments, 4 per
    round. After each round: a fresh operation finishes, validate passes,
    every acknowledged incr and churn step is there and no deleted key came
    back. At the end a spawned process attaches and works."""
    rounds = 80
    rnd = random.Random(0x5EED)
    g = big_grid(grid_name, "256MiB")
    try:
        m = g.map("mig", capacity=64, max_key=16, max_value=K_MAXVAL)
        sh = KShared()
        gen = [m.validate()["generation"]]
        kills = total_ops = 0
        max_table = m.validate()["table_bytes"]
        leaked_prev = g.validate()["leaked_bytes"]
        carved_sample = None
        for rd in range(rounds):
            for w in range(K_WORKERS):
                sh.ops[w] = 0
            kills += _kill_round(m, rd, sh, rnd)
            total_ops += sum(sh.ops)
            assert list(sh.errs) == [0] * K_WORKERS, f"round {rd}: worker errors {list(sh.errs)}"

            in_child(_probe_after_kills, m)
            r = m.validate()
            gen.append(r["generation"])
            max_table = max(max_table, r["table_bytes"])
            assert abs(r["live_counter"] - r["live"]) <= kills, r

            expected_live = 0
            for w in range(K_WORKERS):
                # incr: the acknowledged value, or one more (the one in flight)
                v = m.get(b"c%d" % w)
                c = un64(v) if v is not None else 0
                assert sh.ack_c[w] <= c <= sh.ack_c[w] + 1, (rd, w, c, sh.ack_c[w])
                sh.ack_c[w] = c
                expected_live += v is not None
                # churn: A = nfresh; keys A-K_WINDOW .. A-1 present, A-K_WINDOW-1
                # and A either way (in flight), older ones deleted for good
                a = sh.nfresh[w]
                for j in range(max(0, a - K_WINDOW), a):
                    assert m.get(k_fresh(w, j)) is not None, f"round {rd}: acknowledged key {k_fresh(w, j)!r} lost"
                for j in range(max(0, a - K_WINDOW - 40), max(0, a - K_WINDOW - 1)):
                    assert m.get(k_fresh(w, j)) is None, f"round {rd}: deleted key {k_fresh(w, j)!r} came back"
                # normalize the in-flight ones for the next round and the count
                if a - K_WINDOW - 1 >= 0:
                    m.delete(k_fresh(w, a - K_WINDOW - 1))
                m.delete(k_fresh(w, a))
                expected_live += min(a, K_WINDOW)
            expected_live += sum(m.get(k) is not None for k in K_SKEYS + K_IKEYS)
            r = m.validate()
            assert r["live"] == expected_live, (rd, r, expected_live)
            h = g.validate()
            # A killed process leaks at worst the block it was writing and a
            # table it had allocated but not yet published (at most twice the
            # largest table so far): never a list of retired tables.
            grown = h["leaked_bytes"] - leaked_prev
            leaked_prev = h["leaked_bytes"]
            allowance = K_WORKERS * (2 * max_table + 2 * max_block(m))
            assert grown <= allowance, (
                f"round {rd}: {K_WORKERS} kills leaked {grown} bytes, over one table ({max_table} bytes) x 2 "
                f"+ one block each ({allowance} in all): dead processes hold memory for good")
            if rd == 9:
                carved_sample = h["carved_bytes"]

        grew = sum(b > a for a, b in zip(gen, gen[1:]))
        h = g.validate()
        print(f"\n{kills} kills, {total_ops} operations; generation {gen[0]} -> {gen[-1]}, grew in {grew}/{rounds} "
              f"rounds; nslots {m.validate()['nslots']}; carved {carved_sample} -> {h['carved_bytes']}, "
              f"leaked {h['leaked_bytes']}, retired {h['retired_bytes']}")
        assert kills >= 50
        assert total_ops > 0 and sum(sh.ack_c) > 0, "the workers never got to work before being killed"
        assert grew >= 0.8 * rounds, f"migrations happened in only {grew} of {rounds} rounds: {gen}"
        assert gen[-1] - gen[0] >= kills, f"fewer migrations ({gen[-1] - gen[0]}) than kills ({kills})"
        # dead processes do not hold retired memory forever, and the heap is
        # bounded: what is in use stays near the early sample; carving may go
        # further, as freed blocks of one size class do not serve another
        # (tables of many sizes come and go here), but stays under a ceiling
        in_use = h["carved_bytes"] - h["free_bytes"] - h["gap_bytes"] - h["leaked_bytes"]
        assert in_use <= 2 * carved_sample, (carved_sample, h)
        assert h["carved_bytes"] <= 4 * carved_sample + (1 << 20), (carved_sample, h)

        # only the parent is left: after a few forced migrations, what was
        # retired while the workers lived has been reclaimed
        for _ in range(3):
            m.compact()
            m.put(b"quiet", b"x")
            m.delete(b"quiet")
        h = g.validate()
        assert h["retired_bytes"] <= max(1 * MiB, 8 * m.validate()["table_bytes"]), h

        # a process that never saw any of this attaches by name and works
        seen, n, ok = run_spawned(_attach_and_use, grid_name, list(sh.ack_c))
        assert seen == list(sh.ack_c) and n == sh.ack_c[0] + 1 and ok
        m.validate()
        g.validate()
    finally:
        g.close()


# ---- 4. linearizability --------------------------------------------------------------------------


def H(proc, kind, arg, result, inv, ret):
    return Op(proc, kind, arg, result, inv, ret)


class TestChecker:
    """The checker itself, on hand-written histories."""

    def test_empty_and_sequential(self):
        assert check([])
        h = [
            H(0, GET, None, None, 0, 1),
            H(0, PUT, b"a", 1, 2, 3),
            H(0, GET, None, (b"a", 1), 4, 5),
            H(0, CAS, (1, b"b"), 2, 6, 7),
            H(0, CAS, (1, b"c"), None, 8, 9),
            H(0, GET, None, (b"b", 2), 10, 11),
            H(0, DELETE, None, True, 12, 13),
            H(0, DELETE, None, False, 14, 15),
            H(0, GET, None, None, 16, 17),
            H(0, CAS, (0, b"d"), 4, 18, 19),
            H(0, CAS, (0, b"e"), None, 20, 21),
        ]
        res = check(h)
        assert res, res.explain()
        assert check(h, exact=True)

    def test_rejects_stale_read_after_completed_write(self):
        h = [
            H(0, PUT, b"a", 1, 0, 10),
            H(0, PUT, b"b", 2, 20, 30),
            H(1, GET, None, (b"a", 1), 40, 50),
        ]
        res = check(h)
        assert not res
        assert "NOT linearizable" in res.explain()

    def test_rejects_read_of_absent_after_completed_put(self):
        assert not check([H(0, PUT, b"a", 1, 0, 10), H(1, GET, None, None, 11, 12)])

    def test_accepts_overlap_in_either_order(self):
        put = H(0, PUT, b"a", 1, 0, 100)
        assert check([put, H(1, GET, None, None, 10, 20)])  # read before the put
        assert check([put, H(1, GET, None, (b"a", 1), 10, 20)])  # read after it
        # two overlapping puts: the one with the larger version is last
        p1, p2 = H(0, PUT, b"a", 2, 0, 100), H(1, PUT, b"b", 1, 10, 50)
        assert check([p1, p2, H(2, GET, None, (b"a", 2), 200, 210)])
        p1, p2 = H(0, PUT, b"a", 1, 0, 100), H(1, PUT, b"b", 2, 10, 50)
        assert check([p1, p2, H(2, GET, None, (b"b", 2), 200, 210)])
        assert not check([p1, p2, H(2, GET, None, (b"a", 1), 200, 210)])

    def test_rejects_new_old_inversion(self):
        # p1 saw the put by t=20, so p2's later read cannot miss it
        h = [
            H(0, PUT, b"a", 1, 0, 100),
            H(1, GET, None, (b"a", 1), 10, 20),
            H(2, GET, None, None, 30, 40),
        ]
        assert not check(h)
        # ... but overlapping reads may disagree
        h[2] = H(2, GET, None, None, 15, 40)
        assert check(h)

    def test_versions(self):
        # equal to what the op returned, strictly increasing
        assert not check([H(0, PUT, b"a", 1, 0, 1), H(0, GET, None, (b"a", 2), 2, 3)])
        assert not check([H(0, PUT, b"a", 3, 0, 1), H(0, PUT, b"b", 3, 2, 3)])
        assert not check([H(0, PUT, b"a", 3, 0, 1), H(0, PUT, b"b", 2, 2, 3)])
        assert check([H(0, PUT, b"a", 3, 0, 1), H(0, PUT, b"b", 9, 2, 3)])
        assert not check([H(0, PUT, b"a", 3, 0, 1), H(0, PUT, b"b", 9, 2, 3)], exact=True)
        # stored again after a delete: above the (unseen) tombstone version
        base = [H(0, PUT, b"a", 1, 0, 1), H(0, DELETE, None, True, 2, 3)]
        assert not check(base + [H(0, PUT, b"b", 2, 4, 5)])
        assert check(base + [H(0, PUT, b"b", 3, 4, 5)])
        assert check(base + [H(0, PUT, b"b", 70, 4, 5)])
        assert check(base + [H(0, PUT, b"b", 3, 4, 5)], exact=True)
        assert not check(base + [H(0, PUT, b"b", 70, 4, 5)], exact=True)

    def test_cas_and_delete_semantics(self):
        present = [H(0, PUT, b"a", 1, 0, 1)]
        assert not check(present + [H(0, CAS, (0, b"b"), 2, 2, 3)])  # "if absent" on a present key
        assert not check(present + [H(0, CAS, (1, b"b"), None, 2, 3)])  # matching version must win
        assert not check(present + [H(0, CAS, (2, b"b"), 2, 2, 3)])  # wrong version must lose
        assert check(present + [H(0, CAS, (2, b"b"), None, 2, 3)])
        assert not check(present + [H(0, DELETE, None, False, 2, 3)])
        assert not check([H(0, DELETE, None, True, 0, 1)])
        assert not check([H(0, CAS, (0, b"a"), None, 0, 1)])  # absent: "if absent" must win
        # two concurrent cas on the same version: only one may win
        h = [H(0, PUT, b"a", 1, 0, 1), H(1, CAS, (1, b"b"), 2, 5, 20), H(2, CAS, (1, b"c"), 2, 6, 21)]
        assert not check(h)
        h[2] = H(2, CAS, (1, b"c"), None, 6, 21)
        assert check(h)
        # concurrent deletes: one True, one False
        h = [H(0, PUT, b"a", 1, 0, 1), H(1, DELETE, None, True, 5, 20), H(2, DELETE, None, True, 6, 21)]
        assert not check(h)
        h[2] = H(2, DELETE, None, False, 6, 21)
        assert check(h)

    def test_rejects_malformed(self):
        with pytest.raises(ValueError):
            check([H(0, PUT, b"a", 1, 5, 4)])
        with pytest.raises(ValueError):
            check([H(0, PUT, b"a", 1, 0, 10), H(0, PUT, b"b", 2, 5, 15)])

    @pytest.mark.parametrize("jumps", [False, True])
    def test_random_linearizable_histories_accepted(self, jumps):
        """Histories generated from a real register with a linearization
        point inside each interval are all accepted; corrupting one result
        is caught at least sometimes (the checker does not accept all)."""
        rnd = random.Random(42 + jumps)
        rejected = 0
        for trial in range(300):
            ops = sim_history(rnd, nproc=3, nops=8, jumps=jumps)
            res = check(ops)
            assert res, res.explain()
            if not jumps:
                assert check(ops, exact=True)
            bad = corrupt(rnd, ops)
            if bad is not None and not check(bad):
                rejected += 1
        assert rejected > 50

    @pytest.mark.parametrize("nproc,nops", [(3, 2), (2, 3)])
    def test_agrees_with_brute_force(self, nproc, nops):
        """On small histories (correct ones and corrupted ones), the verdict
        equals that of trying every permutation."""
        rnd = random.Random(nproc * 10 + nops)
        verdicts = set()
        for _ in range(300):
            ops = sim_history(rnd, nproc=nproc, nops=nops, jumps=True, spread=6)
            if rnd.random() < 0.6:
                ops = corrupt(rnd, ops) or ops
            for exact in (False, True):
                want = brute_force(ops, exact)
                assert bool(check(ops, exact=exact)) == want, "\n".join(map(str, ops))
                verdicts.add(want)
        assert verdicts == {True, False}

    def test_long_concurrent_history_is_fast(self):
        rnd = random.Random(7)
        t = time.monotonic()
        for _ in range(20):
            assert check(sim_history(rnd, nproc=4, nops=15, jumps=True, spread=40))
        assert time.monotonic() - t < 20


def brute_force(ops, exact):
    """Linearizable? by trying every order that respects real time."""
    for perm in itertools.permutations(ops):
        if any(perm[j].ret < perm[i].inv for i in range(len(perm)) for j in range(i + 1, len(perm))):
            continue
        st = INITIAL
        for o in perm:
            st = step(st, o, exact)
            if st is None:
                break
        else:
            return True
    return False


def sim_history(rnd, nproc, nops, jumps, spread=20):
    """A history of a correct register: each op takes effect at a random
    instant inside its interval. With ``jumps``, versions sometimes jump
    (as after a migration dropped a tombstone)."""
    calls = []
    for p in range(nproc):
        t = rnd.randrange(5)
        for n in range(nops):
            inv = t + rnd.randrange(3)
            ret = inv + 1 + rnd.randrange(spread)
            lin = rnd.uniform(inv, ret)
            calls.append((lin, p, n, inv, ret))
            t = ret + 1
    calls.sort()
    value, version, tomb = None, 0, 0
    ops = []
    for _, p, n, inv, ret in calls:
        kind = rnd.choice((PUT, PUT, GET, GET, CAS, DELETE))
        nxt = max(version, tomb) + 1 + (rnd.randrange(3) if jumps and rnd.random() < 0.3 else 0)
        if kind == PUT:
            arg, value, version = b"%d:%d" % (p, n), b"%d:%d" % (p, n), nxt
            res = version
        elif kind == GET:
            arg, res = None, (value, version) if value is not None else None
        elif kind == CAS:
            exp = rnd.choice((0, version, version, max(0, version - 1)))
            arg = (exp, b"%d:%d" % (p, n))
            if (exp == 0 and value is None) or (exp != 0 and value is not None and version == exp):
                value, version, res = arg[1], nxt, nxt
            else:
                res = None
        else:
            arg, res = None, value is not None
            if value is not None:
                value, tomb = None, nxt
        ops.append(Op(p, kind, arg, res, inv, ret))
    return ops


def corrupt(rnd, ops):
    """Change one result to a plausible wrong one (or None if none found)."""
    idx = list(range(len(ops)))
    rnd.shuffle(idx)
    seen = [(o.arg, o.result) for o in ops if o.kind == PUT]
    for i in idx:
        o = ops[i]
        if o.kind == GET and seen:
            v, ver = rnd.choice(seen)
            new = (v, ver) if o.result != (v, ver) else None
        elif o.kind == DELETE:
            new = not o.result
        elif o.kind == PUT:
            new = max(1, o.result - rnd.randrange(1, 3))
        else:
            continue
        bad = list(ops)
        bad[i] = Op(o.proc, o.kind, o.arg, new, o.inv, o.ret)
        return bad
    return None


L_PROCS, L_KEYS, L_GROUP, L_ROUNDS = 3, 200, 1, 8


def _spin_barrier(sync, name, parties, timeout=30.0):
    """Everyone leaves within microseconds of the last arrival (a blocking
    barrier's wake-ups are spread over tens of microseconds, longer than a
    whole group of operations). The counter is a key of another map."""
    sync.incr(name)
    deadline = time.monotonic() + timeout
    while un64(sync.get(name)) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"spin barrier {name!r}: the others never came")


def _lin_worker(m, sync, w, seed, start):
    """Per group of L_GROUP keys: wait for the others, then L_ROUNDS passes
    over the group (in my own order), one random op per key per pass."""
    rnd = random.Random(seed)
    now = time.monotonic_ns
    hist = []
    n = 0
    start.wait(30)
    for g0 in range(0, L_KEYS, L_GROUP):
        keys = list(range(g0, g0 + L_GROUP))
        last = {}
        _spin_barrier(sync, b"group-%d" % g0, L_PROCS)
        for _ in range(L_ROUNDS):
            rnd.shuffle(keys)
            for k in keys:
                kb = b"lin-%d" % k
                n += 1
                x = rnd.random()
                if x < 0.30:
                    v = b"%d:%d" % (w, n)
                    t0 = now()
                    res = m.put(kb, v)
                    t1 = now()
                    hist.append((k, PUT, v, res, t0, t1))
                    last[k] = res
                elif x < 0.65:
                    t0 = now()
                    res = m.get_versioned(kb)
                    t1 = now()
                    hist.append((k, GET, None, res, t0, t1))
                    if res is not None:
                        last[k] = res[1]
                elif x < 0.85:
                    exp = last.get(k, 0) if rnd.random() < 0.8 else 0
                    v = b"%d:%d" % (w, n)
                    t0 = now()
                    res = m.compare_and_set(kb, exp, v)
                    t1 = now()
                    hist.append((k, CAS, (exp, v), res, t0, t1))
                    if res is not None:
                        last[k] = res
                else:
                    t0 = now()
                    res = m.delete(kb)
                    t1 = now()
                    hist.append((k, DELETE, None, res, t0, t1))
    return hist


def _lin_churner(m, stop, start):
    """From the moment the workers start until told to stop: churn other
    keys, and force a migration every 500 inserts, so that the register keys
    keep moving between tables. Returns the (start, end) times of the
    forced migrations and the insert count."""
    i = 0
    put, delete = m.put, m.delete
    now = time.monotonic_ns
    compacts = []
    start.wait(30)
    while not stop[0]:
        put(b"churn-%d" % i, b"x")
        if i >= 32:
            delete(b"churn-%d" % (i - 32))
        i += 1
        if i % 500 == 0:
            t0 = now()
            m.compact()
            compacts.append((t0, now()))
            time.sleep(0.0005)  # leave the workers some CPU on a 2-core box
    return compacts, i


@pytest.mark.timeout(180)
def test_linearizable_during_migrations(grid_name):
    """3 processes run put/get/compare_and_set/delete on 200 keys (8 ops
    each per key, all three starting on a key together) while a 4th churns
    other keys and forces migrations, so that the keys keep moving between
    tables; each key's history must be linearizable.

    How many operations truly overlap depends on how many of the processes
    the box runs at once (printed; on a busy 2-core machine, few): the
    check still holds every read to the writes that completed before it,
    in any process and across migrations."""
    g = big_grid(grid_name, "256MiB")
    try:
        m = g.map("lin", capacity=64, max_key=16, max_value=16)
        gen0 = m.validate()["generation"]
        stop = FORK.Array("q", 1, lock=False)
        sync = g.map("sync", capacity=2 * L_KEYS, max_key=16, max_value=8)
        start = FORK.Barrier(L_PROCS + 1)
        with Workers() as ws:
            churner = ws.start(_lin_churner, m, stop, start)
            workers = [ws.start(_lin_worker, m, sync, w, 1000 + w, start) for w in range(L_PROCS)]
            deadline = time.monotonic() + 120
            hists = ws.wait(workers, deadline)
            stop[0] = 1
            ((compacts, churned),) = ws.wait([churner], deadline + 10)
        gen1 = m.validate()["generation"]
        per_key = {}
        for w, hist in enumerate(hists):
            for k, kind, arg, res, t0, t1 in hist:
                per_key.setdefault(k, []).append(Op(w, kind, arg, res, t0, t1))
        assert sorted(per_key) == list(range(L_KEYS))
        failures = []
        overlapping = 0
        for k, ops in sorted(per_key.items()):
            assert len(ops) == L_PROCS * L_ROUNDS
            res = check(ops)
            if not res:
                failures.append(f"key lin-{k}:\n{res.explain()}")
            srt = sorted(ops, key=lambda o: o.inv)
            overlapping += sum(b.inv < a.ret for a, b in zip(srt, srt[1:]))
        t_first = min(o.inv for ops in per_key.values() for o in ops)
        t_last = max(o.ret for ops in per_key.values() for o in ops)
        during = sum(t_first < a and b < t_last for a, b in compacts)
        print(f"\nlinearizability: {L_KEYS} keys x {L_PROCS * L_ROUNDS} ops in {(t_last - t_first) / 1e6:.0f} ms, "
              f"{overlapping} overlapping pairs; generation {gen0} -> {gen1}, {during} forced migrations "
              f"inside the histories; churner did {churned} inserts")
        assert not failures, f"{len(failures)} of {L_KEYS} keys not linearizable; first:\n{failures[0]}"
        assert during >= 5, "too few migrations happened while the histories were recorded"
        assert gen1 - gen0 >= 10, "too few migrations"
        # the final state of each key agrees with the map
        for k, ops in per_key.items():
            got = m.get_versioned(b"lin-%d" % k)
            assert got is None or got[1] >= max((o.result for o in ops if o.kind in (PUT, CAS) and o.result), default=0)
        r = m.validate()
        assert r["live"] == r["live_counter"]
        g.validate()
    finally:
        g.close()


# ---- 5. max_capacity and compact() ----------------------------------------------------------------


def test_max_capacity_and_compact(grid_name):
    g = big_grid(grid_name, "64MiB")
    try:
        m = g.map("capped", capacity=64, max_key=16, max_value=8, max_capacity=256)
        stored = 0
        with pytest.raises(shmgrid.CapacityError, match="max_capacity") as ei:
            while stored < 100_000:
                m.put(b"k%d" % stored, i64(stored))
                stored += 1
        print(f"\nmax_capacity 256: {stored} keys stored before {ei.value}")
        assert 256 <= stored <= 4 * 256, f"{stored} keys stored under max_capacity=256"
        r = m.validate()
        assert r["live"] == r["live_counter"] == len(m) == stored
        # the refused key was not stored; existing keys still work
        assert m.get(b"k%d" % stored) is None
        assert m.put(b"k0", i64(-1)) > 1 and m.get(b"k0") == i64(-1)
        assert m.incr(b"k1") == 2
        assert all(m.get(b"k%d" % i) is not None for i in range(stored))

        # delete all but 10: compact makes inserts possible again
        for i in range(10, stored):
            assert m.delete(b"k%d" % i)
        before = m.validate()
        m.compact()
        r = m.validate()
        assert r["tombstones"] == 0, r
        assert r["generation"] == before["generation"] + 1
        assert r["nslots"] == before["nslots"], "compact never shrinks a table (README)"
        assert r["live"] == r["live_counter"] == len(m) == 10
        assert sorted(m.keys()) == sorted(b"k%d" % i for i in range(10))
        for i in range(200):
            m.put(b"new%d" % i, i64(i))
        assert len(m) == 210
        # compact with nothing to clean still migrates, once per call (the
        # inserts above may have grown the table by themselves meanwhile)
        for _ in range(2):
            gen = m.validate()["generation"]
            m.compact()
            r = m.validate()
            assert r["generation"] == gen + 1 and r["tombstones"] == 0 and r["live"] == 210, r
        assert all(m.get(b"new%d" % i) == i64(i) for i in range(200))
        assert m.get(b"k0") == i64(-1) and m.get(b"k1") == i64(2)
        g.validate()
    finally:
        g.close()


def test_version_after_delete_and_compact_exceeds_tombstone(grid):
    m = grid.map("vers", capacity=64, max_key=16, max_value=8)
    v1 = m.put(b"k", b"a")
    v2 = m.put(b"k", b"b")
    assert v2 > v1
    assert m.delete(b"k")  # tombstone version > v2
    m.compact()  # the tombstone may be dropped here
    assert m.validate()["tombstones"] == 0
    v3 = m.put(b"k", b"c")
    assert v3 > v2 + 1, f"stored again after delete: version {v3} not above the tombstone's (> {v2})"
    assert m.get_versioned(b"k") == (b"c", v3)
    assert m.compare_and_set(b"k", v3, b"d") > v3
    # a never-seen key after many migrations still starts at a positive version
    assert m.put(b"other", b"x") >= 1


def test_heap_exhaustion_names_the_heap(grid_name):
    """No max_capacity: growth stops at the grid's size, with an error that
    says the heap ran out; the map stays readable and valid."""
    g = big_grid(grid_name, "4MiB")
    try:
        m = g.map("big", capacity=64, max_key=16, max_value=1024)
        val = b"v" * 1000
        n = 0
        with pytest.raises(shmgrid.CapacityError, match="heap"):
            while n < 1_000_000:
                m.put(b"k%d" % n, val)
                n += 1
        assert n > 64, "refused before any growth"
        assert all(m.get(b"k%d" % i) == val for i in range(n))
        r = m.validate()
        assert r["live"] == n
        g.validate()
    finally:
        g.close()
