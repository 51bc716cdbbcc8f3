"""Shared fixtures: a unique grid name per test, and a 64 MiB grid on it.

Every segment a test makes is named ``sgt-<pid>-<hex>`` so that leftovers are
easy to spot (and to blame) in /dev/shm; the session check at the end fails
the run if any of this process's segments survived their test.

The global per-test timeout comes from ``[tool.pytest.ini_options] timeout``
in pyproject.toml; long tests carry their own ``@pytest.mark.timeout``.
"""
from __future__ import annotations

import os
import uuid

import pytest

import shmgrid

SHM_DIR = "/dev/shm"


def unique_grid_name(tag: str = "") -> str:
    """A grid name no other test (or other pytest process) uses."""
    return f"sgt-{os.getpid()}-{tag}{uuid.uuid4().hex[:8]}"


def unlink_quietly(name: str) -> None:
    try:
        shmgrid.Grid.unlink(name)
    except shmgrid.SegmentNotFound:
        pass


@pytest.fixture
def grid_name():
    """A unique grid name; its segment is unlinked at teardown if it exists."""
    name = unique_grid_name()
    yield name
    unlink_quietly(name)


@pytest.fixture
def grid(grid_name):
    """A fresh 64 MiB grid (sparse: tmpfs only allocates touched pages),
    closed at teardown (and then unlinked by ``grid_name``)."""
    g = shmgrid.Grid.create(grid_name, size="64MiB")
    try:
        yield g
    finally:
        g.close()


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_segments():
    """Fail the session if a segment made by this pytest process is left."""
    yield
    prefix = f"sgt-{os.getpid()}-"
    try:
        left = sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except OSError:
        return
    for n in left:
        unlink_quietly(n)
    assert not left, f"tests left segments in {SHM_DIR}: {left}"
