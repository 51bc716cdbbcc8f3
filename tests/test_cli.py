"""The shmgrid command: ls, stat, validate, rm, demo."""
import json
import os
import subprocess
import sys

import pytest

from shmgrid import Grid

CLI = [sys.executable, "-m", "shmgrid.cli"]


def run(*args, timeout=60):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_ls_stat_validate_rm(grid):
    m = grid.map("users", capacity=100, max_key=32, max_value=64)
    for i in range(10):
        m[f"u{i}"] = b"x" * i
    del m["u0"]

    r = run("ls")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(grid.name))
    assert "64.0 MiB" in line and "1 live" in line  # this test process; ls leaves itself out

    r = run("stat", grid.name)
    assert r.returncode == 0, r.stderr
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("users")).split()
    assert row[:4] == ["users", "map", "9", "1"] and row[4].startswith("10/") and row[5:7] == ["1", "100"]
    assert "leaked" in r.stdout and "reclaimable" in r.stdout and str(os.getpid()) in r.stdout
    m.compact()
    row = next(ln for ln in run("stat", grid.name).stdout.splitlines() if ln.startswith("users")).split()
    assert row[2:4] == ["9", "0"] and row[5] == "2"  # tombstone dropped, second table generation

    st = json.loads(run("stat", grid.name, "--json").stdout)
    rep = st["objects"][0]["report"]
    assert (rep["live"], rep["tombstones"], rep["capacity"], rep["generation"]) == (9, 0, 100, 2)
    assert st["heap"]["leaked_bytes"] == 0

    r = run("validate", grid.name)
    assert r.returncode == 0 and "OK" in r.stdout and "9 keys, 0 tombstones" in r.stdout

    r = run("rm", grid.name)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(f"/dev/shm/{grid.name}")
    r = run("rm", grid.name)
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_errors_are_one_line(grid_name):
    r = run("stat", grid_name)
    assert r.returncode == 1
    assert r.stderr.strip() == f"shmgrid stat: grid '{grid_name}' does not exist (shm_open)"
    r = run("stat", "bad/name")
    assert r.returncode == 1 and "invalid grid name" in r.stderr


def test_ls_reports_unusable_segments(grid_name):
    with Grid.create(grid_name, size="1MiB"):
        pass
    with open(f"/dev/shm/{grid_name}", "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xff\xff\xff")  # format version from the future
    r = run("ls")
    assert r.returncode == 0
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(grid_name))
    assert "unusable" in line and "format version" in line


@pytest.mark.timeout(90)
def test_demo_runs_checks_and_cleans_up():
    r = run("demo", "--duration", "2", "--workers", "3", timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ops/s" in r.stdout and "exact" in r.stdout and r.stdout.rstrip().endswith("PASS")
    grid = r.stdout.split("grid '")[1].split("'")[0]
    assert grid.startswith("shmgrid-demo-") and not os.path.exists(f"/dev/shm/{grid}")
