"""``shmgrid demo --two-hosts``: two grids and two bridges on loopback,
standing in for two machines. Host a owns the map's partitions; a writer
on a stamps each value with the time it wrote it; a watcher on b measures
how long each change took to appear there. Then a process on b writes
through to a (remote writes), and the demo checks both grids hold the same
data and removes everything it made."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List

from .grid import Grid

_STAMP = struct.Struct("<qq")  # (sequence, time.time_ns() at the write)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(d: str, name: str, grids: Dict[str, str], ports: Dict[str, int], metrics: int) -> str:
    path = os.path.join(d, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'''name = "{name}"
grid = "{grids[name]}"
grid_size = "64MiB"
secret_file = "cluster.key"
metrics = "127.0.0.1:{metrics}"
timeout = 2.0

[hosts]
a = "127.0.0.1:{ports['a']}"
b = "127.0.0.1:{ports['b']}"

[maps.prices]
partitions = 8
owners = ["a", "a", "a", "a", "a", "a", "b", "b"]
capacity = 8192
max_key = 32
max_value = 64
''')
    return path


def run_two_hosts(seconds: float = 3.0, rate: int = 20_000) -> int:
    d = tempfile.mkdtemp(prefix="shmgrid-demo-hosts-")
    tag = os.getpid()
    grids = {"a": f"shmgrid-demo-a-{tag}", "b": f"shmgrid-demo-b-{tag}"}
    ports = {"a": _port(), "b": _port()}
    mports = {"a": _port(), "b": _port()}
    with open(os.path.join(d, "cluster.key"), "wb") as f:
        f.write(os.urandom(32).hex().encode())
    procs: List[subprocess.Popen] = []
    try:
        for h in "ab":
            cfg = _config(d, h, grids, ports, mports[h])
            log = open(os.path.join(d, f"{h}.log"), "w")
            procs.append(subprocess.Popen([sys.executable, "-m", "shmgrid.bridge", "run", "--config", cfg],
                                          stdout=log, stderr=log))
        for h in "ab":
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{mports[h]}/status", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        print(f"bridge {h} did not start; its log:\n" + open(os.path.join(d, f"{h}.log")).read())
                        return 1
                    time.sleep(0.05)
        print(f"two hosts on loopback: grid {grids['a']} + bridge a :{ports['a']}, "
              f"grid {grids['b']} + bridge b :{ports['b']}; map 'prices', 8 partitions, a owns 6, b owns 2")
        ga, gb = Grid.attach(grids["a"]), Grid.attach(grids["b"])
        try:
            A, B = ga.map("prices"), gb.map("prices")
            watch = B.watch(prefix="px:")
            lags: List[float] = []
            n = 0
            t0 = time.monotonic()
            keys = [b"px:%d" % i for i in range(500)]
            owned = [k for k in keys if _owner(k) == "a"]  # written on their owner
            print(f"writing {rate:,} changes/s on a for {seconds:g} s; measuring on b when each appears there")
            while time.monotonic() - t0 < seconds:
                target = int((time.monotonic() - t0) * rate)
                while n < target:
                    A.put(owned[n % len(owned)], _STAMP.pack(n, time.time_ns()))
                    n += 1
                while True:
                    try:
                        ev = watch.get_nowait()
                    except Exception:
                        break
                    if ev.kind == "put":
                        v = B.get(ev.key)
                        if v is not None and len(v) == _STAMP.size:
                            lags.append((time.time_ns() - _STAMP.unpack(v)[1]) / 1e6)
                time.sleep(0.0005)
            deadline = time.monotonic() + 10
            while {k: A.get_versioned(k) for k in owned} != {k: B.get_versioned(k) for k in owned}:
                if time.monotonic() > deadline:
                    print("b did not catch up with a within 10 s")
                    return 1
                time.sleep(0.01)
            lags.sort()
            if lags:
                print(f"  {n:,} changes written; lag on b: p50 {statistics.median(lags):.2f} ms, "
                      f"p99 {lags[int(len(lags) * 0.99) - 1]:.2f} ms over {len(lags):,} observed")
            remote = [k for k in keys if _owner(k) == "a"][:50]
            t1 = time.monotonic()
            for k in remote:
                B.put(k, b"written-on-b")
            rtt = (time.monotonic() - t1) / len(remote) * 1e3
            ok = all(A.get(k) == b"written-on-b" and B.get(k) == b"written-on-b" for k in remote)
            print(f"  remote writes from b to a's partitions: {rtt:.2f} ms each (returns once b's mirror has it); "
                  f"{'visible on both hosts' if ok else 'MISSING'}")
            same = {k: A.get_versioned(k) for k in A.keys()} == {k: B.get_versioned(k) for k in B.keys()}
            print(f"check: both hosts hold the same keys, values and versions: {'yes' if same else 'NO'}")
            print("PASS" if ok and same and lags else "FAIL")
            return 0 if ok and same and lags else 1
        finally:
            ga.close()
            gb.close()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for g in grids.values():
            try:
                Grid.unlink(g)
            except Exception:
                pass
        shutil.rmtree(d, ignore_errors=True)


def _owner(key: bytes) -> str:
    from .mirror import partition_of

    return "a" if partition_of(key, 8) < 6 else "b"
