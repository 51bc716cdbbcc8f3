"""What the benchmarks share: how busy the rest of the machine was during a
run, and a description of the machine and the build for the report."""
from __future__ import annotations

import ctypes
import os
import platform
import resource
import signal
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional

import shmgrid


class OtherCpu:
    """CPU time the rest of the machine used while this run went on: busy
    time in /proc/stat less this process's and its children's (and
    ``own_extra()`` seconds more, e.g. servers the benchmark started), in
    CPUs (1.0 = one CPU kept busy by others throughout). On a 2-CPU box,
    one busy neighbour moves the figures."""

    def __init__(self, own_extra: Optional[Callable[[], float]] = None) -> None:
        self.own_extra = own_extra
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is in user already)
        return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")

    def _own(self) -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        extra = self.own_extra() if self.own_extra else 0.0
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + extra

    def cpus(self) -> float:
        wall = time.monotonic() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other / wall) if wall > 0 else 0.0


def dist_version(name: str, missing: str = "?") -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001 - a version is only for the report
        return missing


def host() -> Dict[str, Any]:
    """CPU model and count, whether virtualized, kernel, Python, shmgrid
    version and the git commit the benchmark ran from."""
    cpu, hyper = "", False
    try:
        with open("/proc/cpuinfo") as fh:
            for ln in fh:
                if ln.startswith("model name") and not cpu:
                    cpu = ln.split(":", 1)[1].strip()
                if ln.startswith("flags"):
                    hyper = hyper or " hypervisor" in ln
    except OSError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cpus": os.cpu_count(), "virtualized": hyper, "kernel": platform.release(),
            "python": platform.python_version(), "shmgrid": shmgrid.__version__, "commit": commit}


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux prctl), so that an
    interrupted run leaves no process behind. ``parent``: the parent's pid,
    taken in the parent before the fork (read in the child, a parent that
    died before the prctl would already read as 1 and go unnoticed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def pct(sorted_vals: Any, p: float) -> float:
    """The p-th percentile of already sorted values (nearest rank)."""
    return float(sorted_vals[min(len(sorted_vals) - 1, int(len(sorted_vals) * p / 100))])


def cycled(items: List[Any], n: int) -> List[Any]:
    """n items, going round ``items`` as often as it takes."""
    return (items * (n // len(items) + 1))[:n]
