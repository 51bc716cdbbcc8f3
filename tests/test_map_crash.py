"""Crash tests: SIGKILL map writers at random moments, then check that the
map validates, that nothing acknowledged is lost, and that nothing blocks.

Acknowledgement without a second operation: each worker owns some keys that
only it writes, and after every write that RETURNED it stores what it knows
(the value incr returned, the sequence number it put) into a
multiprocessing.Array of int64 (lock=False: one aligned 8-byte store, which
SIGKILL cannot tear). After the kill the key must hold the acknowledged
state or the one after it (the single operation that was in flight).

Shared keys get checksummed values, so any torn or mixed-up value is seen.
Workers never use locks or queues (a kill would leave them held); they report
through shared arrays only.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import struct
import time
import zlib

import pytest
from spawned import run_spawned

import shmgrid

FORK = mp.get_context("fork")
NWORKERS = 4
NSHARED = 24  # s-keys: checksummed values of varied sizes, put/delete/pop by everyone
NINT = 8  # i-keys: int64, incr/delete by everyone
MAX_VALUE = 300
KILL_WINDOW = 0.020  # kill 0..20 ms after the worker starts its loop

# error codes a worker writes to errs[w]
E_TORN, E_NOTINT, E_DELETE, E_OTHER = 1, 2, 3, 4


def i64(n: int) -> bytes:
    return struct.pack("<q", n)


def un64(b: bytes) -> int:
    return struct.unpack("<q", b)[0]


def mkval(rnd: random.Random) -> bytes:
    body = rnd.randbytes(rnd.choice((0, 1, 4, 12, 20, 40, 60, 100, 200, MAX_VALUE - 8)))
    return struct.pack("<I", zlib.crc32(body)) + struct.pack("<I", len(body)) + body


def val_ok(v: bytes) -> bool:
    if len(v) < 8:
        return False
    crc, n = struct.unpack_from("<II", v)
    return n == len(v) - 8 and zlib.crc32(v[8:]) == crc


def pval(seq: int, rnd: random.Random) -> bytes:
    """Value of a worker's p-key: its sequence number, padded to a random size."""
    return i64(seq) + mkval(rnd)[: rnd.randrange(0, 64)]


def skeys():
    return [f"s{i}".encode() for i in range(NSHARED)]


def ikeys():
    return [f"i{i}".encode() for i in range(NINT)]


class Shared:
    """The int64 arrays workers write and the parent reads (fork-inherited)."""

    def __init__(self):
        arr = lambda: FORK.Array("q", NWORKERS, lock=False)  # noqa: E731
        self.ack_c, self.ack_p, self.ack_d = arr(), arr(), arr()
        self.ready, self.errs, self.ops = arr(), arr(), arr()


# ---- the worker ---------------------------------------------------------------


def mixed_worker(m, fresh, w, seed, sh):
    """Loop forever over a mix of put/delete/pop/incr/get until killed."""
    try:
        rnd = random.Random(seed)
        ck, pk, dk = f"c{w}".encode(), f"p{w}".encode(), f"d{w}".encode()
        seq_p, seq_d = sh.ack_p[w], sh.ack_d[w]
        sk, ik = skeys(), ikeys()
        nfresh = 0
        sh.ready[w] = 1
        while True:
            op = rnd.random()
            if op < 0.22:  # acknowledged incr of my counter
                sh.ack_c[w] = m.incr(ck)
            elif op < 0.30:  # acknowledged put of my sequence key
                seq_p += 1
                m.put(pk, pval(seq_p, rnd))
                sh.ack_p[w] = seq_p
            elif op < 0.38:  # acknowledged put/delete toggle: odd = present
                seq_d += 1
                if seq_d % 2:
                    m.put(dk, i64(seq_d))
                elif not m.delete(dk):
                    sh.errs[w] = E_DELETE
                sh.ack_d[w] = seq_d
            elif op < 0.55:
                m.put(rnd.choice(sk), mkval(rnd))
            elif op < 0.60:
                m.delete(rnd.choice(sk))
            elif op < 0.64:
                v = m.pop(rnd.choice(sk), None)
                if v is not None and not val_ok(v):
                    sh.errs[w] = E_TORN
            elif op < 0.74:
                v = m.get(rnd.choice(sk))
                if v is not None and not val_ok(v):
                    sh.errs[w] = E_TORN
            elif op < 0.86:
                m.incr(rnd.choice(ik), rnd.randint(-5, 5))
            elif op < 0.89:
                m.delete(rnd.choice(ik))
            elif op < 0.92:
                v = m.get(rnd.choice(ik))
                if v is not None and len(v) != 8:
                    sh.errs[w] = E_NOTINT
            elif op < 0.98:  # brand-new keys: kills during slot binding
                nfresh += 1
                try:
                    fresh.put_if_absent(f"f{w}-{seed}-{nfresh}", mkval(rnd)[:20])
                except shmgrid.CapacityError:
                    pass
            else:
                k = f"f{w}-{seed}-{rnd.randint(1, max(1, nfresh))}"
                fresh.delete(k)
            sh.ops[w] += 1
    except BaseException:
        sh.errs[w] = E_OTHER
        raise


def hot_worker(m, w, seed, sh):
    """Everyone hammers the same few keys; ack_c[w] counts this worker's
    returned increments of the shared counter."""
    try:
        rnd = random.Random(seed)
        done = sh.ack_c[w]
        hot = [b"h0", b"h1"]
        sh.ready[w] = 1
        while True:
            op = rnd.random()
            if op < 0.5:
                m.incr(b"total")
                done += 1
                sh.ack_c[w] = done
            elif op < 0.7:
                m.put(rnd.choice(hot), mkval(rnd))
            elif op < 0.8:
                m.delete(rnd.choice(hot))
            else:
                v = m.get(rnd.choice(hot))
                if v is not None and not val_ok(v):
                    sh.errs[w] = E_TORN
            sh.ops[w] += 1
    except BaseException:
        sh.errs[w] = E_OTHER
        raise


# ---- killing -----------------------------------------------------------------------


def run_and_kill(make_proc, sh, rnd):
    """Start NWORKERS workers and SIGKILL each at a random moment: mostly
    0-20 ms after it entered its loop, sometimes 0-20 ms after fork (while
    it is still taking its process-table slot). Returns the kill count."""
    procs = [make_proc(w) for w in range(NWORKERS)]
    for w in range(NWORKERS):
        sh.ready[w] = 0
    plan = []
    for p in procs:
        p.start()
        early = rnd.random() < 0.15
        plan.append([p, early, time.monotonic() if early else None, rnd.uniform(0, KILL_WINDOW)])
    guard = time.monotonic() + 20
    pending = list(range(NWORKERS))
    while pending:
        now = time.monotonic()
        assert now < guard, "a worker never got going"
        for w in list(pending):
            p, early, t0, delay = plan[w]
            if t0 is None and sh.ready[w]:
                plan[w][2] = t0 = now
            if t0 is not None and now >= t0 + delay:
                os.kill(p.pid, signal.SIGKILL)
                pending.remove(w)
        time.sleep(0.0005)
    for p in procs:
        p.join(10)
        assert not p.is_alive()
        assert p.exitcode == -signal.SIGKILL, f"worker exited on its own with {p.exitcode}"
    return NWORKERS


def in_child(fn, *args, timeout=20.0):
    """Run fn(*args) in a forked child: if it blocks it is killed and the
    test fails instead of hanging."""
    p = FORK.Process(target=_child, args=(fn, args), daemon=True)
    p.start()
    p.join(timeout)
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
        pytest.fail(f"{fn.__name__} blocked for over {timeout} s")
    assert p.exitcode == 0, f"{fn.__name__} failed in the child (exit code {p.exitcode}; traceback above)"


def _child(fn, args):
    fn(*args)


def touch_every_key(m, fresh, nworkers):
    """Write every key a worker may have been writing when it died (a key
    left blocked or broken shows here), keeping the accounted keys' state."""
    rnd = random.Random(os.getpid())
    for w in range(nworkers):
        ck, pk, dk = f"c{w}".encode(), f"p{w}".encode(), f"d{w}".encode()
        got = m.get_versioned(ck)
        before = un64(got[0]) if got else 0
        assert m.incr(ck, 0) == before
        v = m.get(pk)
        if v is not None:
            m.put(pk, v)
        v = m.get(dk)
        if v is not None:
            m.put(dk, v)
        else:
            assert m.put_if_absent(dk, b"probe")
            assert m.delete(dk)
    for k in skeys():
        v = m.get(k)
        assert v is None or val_ok(v)
        nv = mkval(rnd)
        m.put(k, nv)
        assert m.get(k) == nv
        assert m.delete(k)
        assert k not in m
        if rnd.random() < 0.5:
            assert m.put_if_absent(k, mkval(rnd))
    for k in ikeys():
        v = m.get(k)
        n = un64(v) if v is not None else 0
        assert m.incr(k, 3) == n + 3
        assert m.incr(k, -3) == n
        assert m.delete(k)
        assert m.get(k) is None
        assert m.incr(k, n) == n
    probe = f"probe-{os.getpid()}"
    try:
        assert fresh.put_if_absent(probe, b"x")
        assert fresh.get(probe) == b"x"
        assert fresh.delete(probe)
    except shmgrid.CapacityError:
        pass
    for k in list(fresh)[:50]:
        fresh.get(k)


def check_drift(r, kills):
    """Counters a killed writer may leave off by one each, never more."""
    assert 0 <= r["used"] - r["bound"] <= kills, r
    assert abs(r["live_counter"] - r["live"]) <= kills, r


def max_block(m) -> int:
    """Bytes of the largest block a map write can hold (a power-of-two
    bound on its size class)."""
    need = 16 + max(m.max_value, m.max_key)
    return 1 << need.bit_length()


# ---- the tests -------------------------------------------------------------------------


def _attach_and_use(name, counts, q):
    with shmgrid.Grid.attach(name) as g:
        m = g.map("crash")
        seen = [un64(m.get(f"c{w}")) if m.get(f"c{w}") is not None else 0 for w in range(len(counts))]
        n = m.incr(b"c0")
        m.put(b"from-spawn", b"hello")
        ok = m.get(b"from-spawn") == b"hello" and m.delete(b"from-spawn")
        q.put((seen, n, ok))


@pytest.mark.timeout(240)
def test_sigkill_mixed_writers(grid, grid_name):
    rounds = 120
    rnd = random.Random(0xC0FFEE)
    m = grid.map("crash", capacity=256, max_key=32, max_value=MAX_VALUE)
    fresh = grid.map("fresh", capacity=60_000, max_key=32, max_value=32)
    leaked0 = grid.validate()["leaked_bytes"]
    sh = Shared()
    off_c = [0] * NWORKERS  # versions added to c{w} by touch_every_key (incr by 0)
    off_p = [0] * NWORKERS
    kills = total_ops = landed = 0
    for rd in range(rounds):
        for w in range(NWORKERS):
            sh.ops[w] = 0
        kills += run_and_kill(
            lambda w: FORK.Process(target=mixed_worker, args=(m, fresh, w, rd * 100 + w, sh), daemon=True), sh, rnd
        )
        total_ops += sum(sh.ops)
        assert list(sh.errs) == [0] * NWORKERS, f"round {rd}: worker errors {list(sh.errs)}"

        r, rf = m.validate(), fresh.validate()
        check_drift(r, kills)
        check_drift(rf, kills)
        leaked = grid.validate()["leaked_bytes"] - leaked0
        assert 0 <= leaked <= kills * max_block(m), leaked

        for w in range(NWORKERS):
            # incr: the acknowledged value, or one more (the incr in flight)
            got = m.get_versioned(f"c{w}")
            c, ver = (un64(got[0]), got[1]) if got else (0, 0)
            assert sh.ack_c[w] <= c <= sh.ack_c[w] + 1, (rd, w, c, sh.ack_c[w])
            assert ver == c + off_c[w], "a version bump without its value change, or the reverse"
            landed += c - sh.ack_c[w]
            sh.ack_c[w] = c
            # put: the acknowledged sequence number, or the next
            got = m.get_versioned(f"p{w}")
            seq, ver = (un64(got[0][:8]), got[1]) if got else (0, 0)
            assert sh.ack_p[w] <= seq <= sh.ack_p[w] + 1, (rd, w, seq, sh.ack_p[w])
            assert ver == seq + off_p[w]
            sh.ack_p[w] = seq
            # put/delete toggle: odd sequence numbers leave the key present
            v = m.get(f"d{w}")
            a = sh.ack_d[w]
            if v is None:
                sh.ack_d[w] = a if a % 2 == 0 else a + 1
            else:
                assert un64(v) in (a, a + 1) and un64(v) % 2 == 1, (rd, w, un64(v), a)
                sh.ack_d[w] = un64(v)
        for k in skeys():
            v = m.get(k)
            assert v is None or val_ok(v), f"torn value under {k!r}"
        for k in ikeys():
            v = m.get(k)
            assert v is None or len(v) == 8

        in_child(touch_every_key, m, fresh, NWORKERS)
        for w in range(NWORKERS):
            off_c[w] += 1
            if m.get(f"p{w}") is not None:
                off_p[w] += 1
        m.validate()

    r = m.validate()
    print(
        f"\n{kills} kills, {total_ops} operations, {landed} unacknowledged incr landed; "
        f"drift: used-bound {r['used'] - r['bound']}, live_counter-live {r['live_counter'] - r['live']}, "
        f"leaked {grid.validate()['leaked_bytes'] - leaked0} bytes"
    )
    assert kills >= 200
    assert total_ops > 0 and sum(sh.ack_c) > 0, "the workers never got to work before being killed"

    # a process that never saw any of this attaches by name and works
    seen, n, ok = run_spawned(_attach_and_use, grid_name, list(sh.ack_c))
    assert seen == list(sh.ack_c) and n == sh.ack_c[0] + 1 and ok

    # drift stays within the kills; repair makes the counters exact
    for mm in (m, fresh):
        r = mm.validate()
        check_drift(r, kills)
        rep = mm.validate(repair=True)
        after = mm.validate()
        assert after["live"] == after["live_counter"] == len(mm) == len(list(mm)) == rep["live"]
        assert after["used"] == after["bound"] == r["bound"]
    grid.validate()


def _hot_check(m, nworkers):
    """Every hot key is readable, writable and deletable."""
    for k in (b"h0", b"h1"):
        v = m.get(k)
        assert v is None or val_ok(v)
        m.put(k, b"x" * 8 + b"y")
        assert m.delete(k)
    got = m.get_versioned(b"total")
    n = un64(got[0]) if got else 0
    assert m.incr(b"total", 0) == n


@pytest.mark.timeout(120)
def test_sigkill_on_contended_keys(grid):
    """All workers hit the same keys (CAS retries, recycled blocks). The shared
    counter holds every acknowledged increment, plus at most one in flight
    per killed worker."""
    rounds = 40
    rnd = random.Random(0xBEEF)
    m = grid.map("hot", capacity=16, max_key=8, max_value=MAX_VALUE)
    sh = Shared()
    kills = versions_added = 0
    for rd in range(rounds):
        kills += run_and_kill(
            lambda w: FORK.Process(target=hot_worker, args=(m, w, 7000 + rd * 10 + w, sh), daemon=True), sh, rnd
        )
        assert list(sh.errs) == [0] * NWORKERS
        m.validate()
        got = m.get_versioned(b"total")
        total, ver = (un64(got[0]), got[1]) if got else (0, 0)
        acked = sum(sh.ack_c)
        assert acked <= total <= acked + NWORKERS, (rd, total, acked)  # at most one in flight each
        assert ver == total + versions_added
        # the in-flight increments that landed now count as acknowledged for
        # the next round: credit them to worker 0
        sh.ack_c[0] += total - acked
        in_child(_hot_check, m, NWORKERS)
        versions_added += 1
    r = m.validate()
    check_drift(r, kills)
    assert sum(sh.ack_c) > 0
