"""Run a function in a freshly spawned process (nothing inherited) and get
its result back, failing rather than hanging if it dies or gets stuck."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from typing import Any, Callable

SPAWN = mp.get_context("spawn")


def run_spawned(target: Callable[..., None], *args: Any, timeout: float = 60.0) -> Any:
    """Start ``target(*args, q)`` in a spawned process; return what it puts on q."""
    q = SPAWN.Queue()
    p = SPAWN.Process(target=target, args=(*args, q), daemon=True)
    p.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = q.get(timeout=0.5)
                break
            except queue.Empty:
                assert p.exitcode is None, f"the spawned process died with exit code {p.exitcode} (traceback above)"
                assert time.monotonic() < deadline, "the spawned process is stuck"
        p.join(30)
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(5)
        q.close()
        q.join_thread()
    assert p.exitcode == 0, f"the spawned process exited with {p.exitcode}"
    return result
