"""The ``shmgrid`` command: inspect, validate, remove grids; run the demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .errors import ShmgridError
from .grid import SHM_DIR, Grid, list_segments


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _others(procs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The process table without this command's own attach."""
    me = os.getpid()
    return [p for p in procs if p["pid"] != me]


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def cmd_ls(args: argparse.Namespace) -> int:
    rows: List[Sequence[Any]] = []
    for name in list_segments():
        try:
            with Grid.attach(name) as g:
                info = g.info()
                procs = _others(g.processes())
                live = sum(p["alive"] for p in procs)
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created_ns"] / 1e9))
                rows.append((name, _human(info["size"]), _human(info["heap_brk"]), info["objects"],
                             f"{live} live" + (f", {len(procs) - live} dead" if len(procs) > live else ""),
                             created))
        except ShmgridError as e:
            rows.append((name, "-", "-", "-", "-", f"unusable: {e}"))
    if not rows:
        print(f"no shmgrid segments in {SHM_DIR}")
        return 0
    print(_table(rows, ("NAME", "SIZE", "USED", "OBJECTS", "PROCESSES", "CREATED")))
    return 0


def _stat(g: Grid) -> Dict[str, Any]:
    report = g.validate()
    return {
        "grid": g.name,
        "info": g.info(),
        "heap": {k: v for k, v in report.items() if k != "maps"},
        "objects": [
            dict(o, report=report["maps"].get(o["name"])) for o in g.objects()
        ],
        "processes": _others(g.processes()),
    }


def cmd_stat(args: argparse.Namespace) -> int:
    with Grid.attach(args.name) as g:
        st = _stat(g)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    info, heap = st["info"], st["heap"]
    print(f"grid {st['grid']}: {_human(info['size'])}, format {info['format']}, layout 0x{info['layout_sig']:08x}")
    print(f"heap: {_human(heap['carved_bytes'])} carved of {_human(heap['heap_bytes'])}: "
          f"{_human(heap['reachable_bytes'])} in use, {_human(heap['free_bytes'])} free for reuse, "
          f"{_human(heap['retired_bytes'])} reclaimable (old tables waiting for readers), "
          f"{_human(heap['leaked_bytes'])} leaked (held by processes killed mid-write; exact only when idle)")
    rows = []
    for o in st["objects"]:
        r = o["report"]
        if r is None:
            rows.append((o["name"], o["kind"], "-", "-", "-", "-", "-", "-"))
            continue
        rows.append((o["name"], o["kind"], r["live"], r["tombstones"], f"{r['bound']}/{r['nslots']}",
                     r["generation"], r["capacity"], _human(r["block_bytes"] + r["table_bytes"])))
    if rows:
        print(_table(rows, ("OBJECT", "KIND", "ENTRIES", "TOMBSTONES", "SLOTS", "TABLE GEN", "CAPACITY", "HEAP")))
    else:
        print("no objects")
    procs = st["processes"]
    if procs:
        print(_table([(p["slot"], p["pid"], "alive" if p["alive"] else "dead") for p in procs],
                     ("SLOT", "PID", "STATE")))
    else:
        print("no other attached processes")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    with Grid.attach(args.name) as g:
        others = [p["pid"] for p in _others(g.processes()) if p["alive"]]
        if args.repair and others:
            print(f"shmgrid validate: not repairing while other processes are attached (pids {others}); "
                  "counters are only recounted on an idle grid", file=sys.stderr)
            return 1
        if args.repair:
            for o in g.objects():
                if o["kind"] == "map":
                    g.map(o["name"]).validate(repair=True)
        report = g.validate()
    maps = report.pop("maps")
    print(f"grid {args.name}: OK ({len(maps)} maps; leaked {_human(report['leaked_bytes'])})")
    for name, r in maps.items():
        drift = r["live_counter"] - r["live"]
        note = f"; len() counter off by {drift} (validate --repair fixes it when idle)" if drift else ""
        print(f"  map {name}: {r['live']} keys, {r['tombstones']} tombstones{note}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    rc = 0
    for name in args.names:
        try:
            Grid.unlink(name)
        except ShmgridError as e:
            print(f"shmgrid rm: {e}", file=sys.stderr)
            rc = 1
    return rc


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(workers=args.workers, duration=args.duration, keys=args.keys)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="shmgrid", description="Inspect and manage shmgrid shared-memory grids.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ls", help="list grids with size, objects and attached processes").set_defaults(fn=cmd_ls)
    s = sub.add_parser("stat", help="per-object figures of one grid")
    s.add_argument("name")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_stat)
    s = sub.add_parser("validate", help="walk every structure of a grid and check its invariants")
    s.add_argument("name")
    s.add_argument("--repair", action="store_true",
                   help="also reset counters left off by killed processes (only while nothing writes)")
    s.set_defaults(fn=cmd_validate)
    s = sub.add_parser("rm", help="unlink grids (attached processes keep their mapping)")
    s.add_argument("names", nargs="+")
    s.set_defaults(fn=cmd_rm)
    s = sub.add_parser("demo", help="several processes sharing one map, with live throughput and a final check")
    s.add_argument("--workers", type=int, default=4)
    s.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    s.add_argument("--keys", type=int, default=2000)
    s.set_defaults(fn=cmd_demo)
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except ShmgridError as e:
        print(f"shmgrid {args.cmd}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
