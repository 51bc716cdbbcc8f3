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
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("users"))
    assert row.split()[:2] == ["users", "map"]
    assert "9 keys, 1 tombstones, slots 10/" in row and "table gen 1, capacity 100," in row
    assert "leaked" in r.stdout and "reclaimable" in r.stdout and str(os.getpid()) in r.stdout
    m.compact()
    row = next(ln for ln in run("stat", grid.name).stdout.splitlines() if ln.startswith("users"))
    assert "9 keys, 0 tombstones" in row and "table gen 2," in row  # tombstone dropped, second table

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


def test_stat_and_ls_show_messaging_objects(grid):
    q = grid.ring("jobs", slots=8, slot_size=32)
    q.put_many([b"a", b"b", b"c"])
    q.get()
    t = grid.topic("news", capacity=16, lossless=False)
    sub = t.subscribe()
    t.publish(b"x")
    grid.counter("hits").add(42)
    lk = grid.lock("mutex")
    lk.acquire()

    line = next(ln for ln in run("ls").stdout.splitlines() if ln.startswith(grid.name))
    assert "4: 1 counter, 1 lock, 1 ring, 1 topic" in line
    out = run("stat", grid.name).stdout
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.split() and ln.split()[0] in
            ("jobs", "news", "hits", "mutex")}
    assert "depth 2/8, slot_size 32, waiters 0, put 3, got 1, skipped 0" in rows["jobs"]
    assert "lossy, published 1, capacity 16" in rows["news"] and "subscribers 1/64, slowest lag 1" in rows["news"]
    assert "value 42" in rows["hits"]
    assert f"held by tid {os.getpid()} (alive), waiters 0, acquisitions 1" in rows["mutex"]
    st = json.loads(run("stat", grid.name, "--json").stdout)
    assert st["heap"]["leaked_bytes"] == 0  # object blocks count as reachable
    lk.release()
    sub.close()
    r = run("validate", grid.name)
    assert r.returncode == 0 and "ring jobs: depth 2/8" in r.stdout and "lock mutex: free" in r.stdout


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
    r = run("demo", "--duration", "2", "--workers", "3", "--jobs", "100000", timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ops/s" in r.stdout and "exact" in r.stdout and r.stdout.rstrip().endswith("PASS")
    assert "map stage: PASS" in r.stdout and "pipeline stage: PASS" in r.stdout
    assert "100,000 of 100,000 jobs came back exactly once" in r.stdout
    assert "array stage: PASS" in r.stdout and "0 snapshots were not exactly the frame" in r.stdout
    grid = r.stdout.split("grid '")[1].split("'")[0]
    assert grid.startswith("shmgrid-demo-") and not os.path.exists(f"/dev/shm/{grid}")


@pytest.mark.timeout(90)
def test_two_host_demo_replicates_and_cleans_up():
    r = run("demo", "--two-hosts", timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lag on b: p50" in r.stdout and "visible on both hosts" in r.stdout and r.stdout.rstrip().endswith("PASS")
    tag = r.stdout.split("grid shmgrid-demo-a-")[1].split()[0]
    assert not os.path.exists(f"/dev/shm/shmgrid-demo-a-{tag}") and not os.path.exists(f"/dev/shm/shmgrid-demo-b-{tag}")
