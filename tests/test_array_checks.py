"""Shared arrays: argument checks done before anything is created, and the
grid's mapping and process-table slot around close(), forks and the
collector (from a review of the array code)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

import shmgrid
from shmgrid import InvalidArgument


@pytest.mark.parametrize("shape, dtype", [((0, 2**70), "f8"), ((3,), "S0"), ((3,), np.dtype([]))])
def test_a_shape_or_dtype_numpy_refuses_creates_nothing(grid, shape, dtype):
    """Checked before the object exists: a name created with a shape numpy
    refuses could never be opened again (objects cannot be deleted)."""
    with pytest.raises(InvalidArgument):
        grid.array("x", shape, dtype)
    with pytest.raises(InvalidArgument, match="does not exist"):
        grid.array("x")
    assert grid.array("x", (2,), "f8").shape == (2,)  # the name is still free


def test_publish_narrows_integers_only_when_exact(grid):
    a = grid.array("i", (3,), "i1")
    with pytest.raises(InvalidArgument, match="not exactly"):
        a.publish(np.array([1, 300, 2], dtype="i8"))  # numpy's cast would store 44
    assert a.version == 0
    assert a.publish(np.array([1, 2, 3], dtype="i8")) == 1 and a.tolist() == [1, 2, 3]
    f = grid.array("f", (2,), "f4")
    assert f.publish(np.float64(1.5)) == 1  # a numpy scalar is data, cast within its kind
    assert f.tolist() == [1.5, 1.5]


def test_a_cached_out_made_read_only_is_refused(grid):
    a = grid.array("a", (4,), "f8")
    out = np.empty(4)
    a.snapshot(out=out)
    out.flags.writeable = False
    with pytest.raises(InvalidArgument, match="writable"):
        a.snapshot(out=out)


def test_a_forked_child_dropping_a_pinned_view_leaves_the_parents_slot(grid_name):
    """The grid is closed but a view pins it (and its process-table slot);
    a forked child dropping its copy of the view must not free the slot of
    its live parent."""
    g = shmgrid.Grid.create(grid_name, size="16MiB")
    a = g.array("a", (4,), np.float64)
    v = a[1:]
    del a
    g.close()
    with shmgrid.Grid.attach(grid_name) as probe:
        before = {p["slot"] for p in probe.processes() if p["pid"] == os.getpid()}
        pid = os.fork()
        if pid == 0:
            del v
            gc.collect()
            os._exit(0)
        os.waitpid(pid, 0)
        after = {p["slot"] for p in probe.processes() if p["pid"] == os.getpid()}
    assert before <= after, (before, after)
    assert v.tolist() == [0.0, 0.0, 0.0]
    del v


GC_IN_CLOSE = r"""
import faulthandler, gc, sys
import numpy as np, shmgrid
import shmgrid._async  # registers the close hook, as any asyncio user does
g = shmgrid.Grid.create(sys.argv[1], size="16MiB")
try:
    a = g.array("a", (4,), np.float64)
    gc.disable(); gc.collect(1)
    class Holder: pass
    h = Holder(); h.me = h; h.view = a[1:]     # the last view, in a cycle
    gc.collect(0)
    del a, h
    gc.set_threshold(1, int(sys.argv[2]), 1000000); gc.enable()
    faulthandler.dump_traceback_later(5, exit=True)
    g.close()                                  # a collection inside it frees the view
    faulthandler.cancel_dump_traceback_later()
    assert g._pins == 0
finally:
    shmgrid.Grid.unlink(sys.argv[1])
"""


@pytest.mark.timeout(60)
def test_a_collection_inside_close_that_frees_the_last_view_does_not_deadlock(grid_name):
    for young in (1, 2, 3, 4):  # where the collection lands among close()'s allocations
        r = subprocess.run([sys.executable, "-c", GC_IN_CLOSE, f"{grid_name}{young}", str(young)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr[-2000:]
