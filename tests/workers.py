"""Forked worker processes for the messaging tests: each runs a function
and reports its (small) result, and the parent fails, never hangs, if one
errs, dies without reporting or is stuck."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

FORK = mp.get_context("fork")


def _entry(q, key, target, args):
    try:
        res = target(*args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((key, False, traceback.format_exc()))
        raise SystemExit(1)
    q.put((key, True, res))


class Workers:
    """Forked processes, each running ``target(*args)`` and reporting its
    (small) result on a queue. ``wait`` fails, never hangs, if a worker
    errs, dies without reporting or is stuck; leaving the ``with`` block
    kills whatever still runs."""

    def __init__(self):
        self.q = FORK.Queue()
        self.procs = {}
        self.results = {}

    def start(self, key, target, *args):
        p = FORK.Process(target=_entry, args=(self.q, key, target, args), daemon=True)
        p.start()
        self.procs[key] = p
        return p

    def wait(self, keys, timeout=60.0):
        keys = list(keys)
        deadline = time.monotonic() + timeout
        dead_since = None
        while any(k not in self.results for k in keys):
            left = deadline - time.monotonic()
            missing = [k for k in keys if k not in self.results]
            assert left > 0, f"worker(s) {missing} still running after {timeout} s"
            try:
                key, ok, res = self.q.get(timeout=min(left, 0.5))
            except queue.Empty:
                dead = [(k, self.procs[k].exitcode) for k in missing if self.procs[k].exitcode is not None]
                if dead:
                    dead_since = dead_since or time.monotonic()
                    # let a last message come through the pipe, then give up
                    assert time.monotonic() - dead_since < 2.0, f"worker(s) died without reporting: {dead}"
                continue
            assert ok, f"worker {key} failed:\n{res}"
            self.results[key] = res
        for k in keys:
            self.procs[k].join(max(1.0, deadline - time.monotonic()))
            assert self.procs[k].exitcode == 0, f"worker {k} exited with {self.procs[k].exitcode}"
        return [self.results[k] for k in keys]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        self.q.close()
        self.q.join_thread()


def run_all(target, args_list, timeout=60.0):
    """target(start_barrier, *args) in one process per args, started
    together; their results in order."""
    start = FORK.Barrier(len(args_list))
    with Workers() as w:
        for i, args in enumerate(args_list):
            w.start(i, target, start, *args)
        return w.wait(range(len(args_list)), timeout=timeout)


def wait_for(cond, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def stats_include(stats, expected):
    """``stats`` has these fields with these values (and maybe more fields)."""
    missing = object()
    got = {k: stats.get(k, missing) for k in expected}
    assert got == expected, f"stats {stats} differ from the expected {expected}"
