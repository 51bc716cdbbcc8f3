"""Watching a map's changes: every change seen once, in per-key version
order, from any process; exact lost counts when a watcher is slow."""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
from workers import FORK, Workers

import shmgrid
from shmgrid import Busy, ChangeEvent, Closed, Empty
from shmgrid.watch import FEED_SLOTS


def drain(w):
    out = []
    while True:
        try:
            out.append(w.get_nowait())
        except Empty:
            return out


def test_events_kinds_versions_and_prefix(grid):
    m = grid.map("w", capacity=64)
    m["before"] = b"x"  # made before the watch: not seen
    w = m.watch()
    users = m.watch(prefix="user:")
    m["a"] = b"1"
    m["user:1"] = b"2"
    m.incr("n")
    del m["a"]
    assert not m.put_if_absent("user:1", b"z")  # refused: no change, no event
    assert m.replace("user:1", b"2", b"3")
    assert m.compare_and_set("n", 1, b"\0" * 8) == 2
    m.pop("missing", None)  # nothing deleted: no event
    assert drain(w) == [
        ChangeEvent("put", b"a", 1), ChangeEvent("put", b"user:1", 1), ChangeEvent("put", b"n", 1),
        ChangeEvent("delete", b"a", 2), ChangeEvent("put", b"user:1", 2), ChangeEvent("put", b"n", 2),
    ]
    assert drain(users) == [ChangeEvent("put", b"user:1", 1), ChangeEvent("put", b"user:1", 2)]


def test_slow_watcher_is_told_exactly_how_many_it_lost(grid):
    m = grid.map("slow", capacity=256)
    w = m.watch()
    total = 3 * FEED_SLOTS + 123
    for i in range(total):
        m[b"k%d" % (i % 200)] = b"v"
    events = drain(w)
    lost = sum(e.lost for e in events if e.kind == "lost")
    seen = [e for e in events if e.kind != "lost"]
    assert events[0].kind == "lost" and lost == total - FEED_SLOTS and len(seen) == FEED_SLOTS
    # what it saw is the tail of the history, in order
    assert [e.key for e in seen] == [b"k%d" % (i % 200) for i in range(total - FEED_SLOTS, total)]


def _writer(name, wid, n):
    changes = 0
    with shmgrid.Grid.attach(name) as g:
        m = g.map("shared")
        for i in range(n):
            k = b"own:%d:%d" % (wid, i % 50) if i % 3 else b"common:%d" % (i % 7)
            if i % 11 == 10:
                changes += m.delete(k)  # a delete of an absent key changes nothing
            else:
                m.put(k, b"w%d-%d" % (wid, i))
                changes += 1
    return changes


END = b"end-of-test"


def _watcher(name, ready):
    with shmgrid.Grid.attach(name) as g:
        w = g.map("shared").watch()
        ready.set()
        got, lost = [], 0
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline, f"watcher saw {len(got)} + lost {lost}, no end marker"
            try:
                e = w.get(timeout=1.0)
            except Empty:
                continue
            if e.kind == "lost":
                lost += e.lost
                continue
            got.append((e.key, e.version, e.kind))
            if e.key == END:
                return got, lost


@pytest.mark.timeout(150)
@pytest.mark.parametrize("per_writer,exact", [(FEED_SLOTS // 3 - 10, True), (40_000, False)])
def test_three_writers_two_watchers(grid, per_writer, exact):
    """Fewer changes than the feed holds: every change is seen exactly once
    by each watcher. Many more: each watcher's events plus its lost count
    add up to every change exactly, and no change is seen twice."""
    m = grid.map("shared", capacity=1024)
    with Workers() as ws:
        ready = [FORK.Event(), FORK.Event()]
        for i in range(2):
            ws.start(("watch", i), _watcher, grid.name, ready[i])
        for e in ready:
            assert e.wait(30)
        for wid in range(3):
            ws.start(("write", wid), _writer, grid.name, wid, per_writer)
        total = sum(ws.wait([("write", w) for w in range(3)], timeout=120)) + 1
        m[END] = b"."  # the watchers stop when they see it
        results = ws.wait([("watch", 0), ("watch", 1)], timeout=120)
    final = {k: m.get_versioned(k)[1] for k in list(m.keys())}
    for got, lost in results:
        assert len(got) + lost == total, (len(got), lost, total)
        if exact:
            assert lost == 0
        per_key = defaultdict(list)
        for key, version, _ in got:
            per_key[key].append(version)
        inversions = 0
        for key, versions in per_key.items():
            assert len(set(versions)) == len(versions), f"{key!r}: a change seen twice"
            # Feed order is append order: two writes of one key racing each
            # other may append in the opposite order of their versions (the
            # CAS and the append are two steps). Only neighbours can swap.
            inversions += sum(a > b for a, b in zip(versions, versions[1:]))
        assert inversions <= total // 100, f"{inversions} inversions"
        if exact:
            # every change once: each key's versions without a gap, up to
            # the version the key has now
            for key, versions in per_key.items():
                vs = sorted(versions)
                assert vs == list(range(vs[0], vs[0] + len(vs)))
            for key, version in final.items():
                assert max(per_key[key]) == version


def test_watch_errors_and_threads(grid):
    m = grid.map("e", capacity=16, max_key=8)
    with pytest.raises(shmgrid.ValueTooLarge):
        m.watch(prefix=b"x" * 9)
    w = m.watch()
    with pytest.raises(Empty):
        w.get(timeout=0.05)
    caught = []

    def reader():
        try:
            w.get()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            caught.append(type(e))

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.1)
    with pytest.raises(Busy):
        w.get_nowait()
    w.close()
    th.join(5)
    assert caught == [Closed]
    with pytest.raises(Closed):
        w.get_nowait()
