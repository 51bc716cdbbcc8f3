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


def _kinds(objects: List[Dict[str, Any]]) -> str:
    """'5: 2 maps, 1 ring, 2 locks'."""
    counts: Dict[str, int] = {}
    for o in objects:
        counts[o["kind"]] = counts.get(o["kind"], 0) + 1
    parts = [f"{n} {k}{'s' if n > 1 else ''}" for k, n in sorted(counts.items())]
    return f"{len(objects)}" + (f": {', '.join(parts)}" if parts else "")


def _details(kind: str, r: Optional[Dict[str, Any]]) -> str:
    """One line of figures per object for `shmgrid stat`."""
    if r is None:
        return "-"
    if kind == "map":
        return (f"{r['live']} keys, {r['tombstones']} tombstones, slots {r['bound']}/{r['nslots']}, "
                f"table gen {r['generation']}, capacity {r['capacity']}, heap {_human(r['block_bytes'] + r['table_bytes'])}")
    if kind == "ring":
        return (f"depth {r['depth']}/{r['capacity']}, slot_size {r['slot_size']}, waiters {r['waiters']}, "
                f"put {r['tail']}, got {r['head']}, skipped {r['skipped']} (dead producers), "
                f"dropped {r['dropped']} (dead consumers)" + ("" if r.get("checked", True) else ", busy: cells not checked"))
    if kind == "topic":
        return (f"{'lossless' if r['lossless'] else 'lossy'}, published {r['published']}, capacity {r['capacity']}, "
                f"max_message {r['max_message']}, subscribers {r['subscribers']}/{r['max_subscribers']}"
                + (f" (+{r['dead_subscribers']} dead, not yet removed)" if r.get("dead_subscribers") else "") + ", "
                f"slowest lag {r['lag']}, waiters {r['waiters']}, skipped {r['skipped']}, removed {r['removed']}")
    if kind == "counter":
        return f"value {r['value']}"
    if kind == "lock":
        held = (f"held by tid {r['owner_tid']} ({'alive' if r['owner_alive'] else 'dead: the next acquirer takes it'})"
                if r["owner_tid"] else "free")
        return f"{held}, waiters {r['waiters']}, acquisitions {r['acquisitions']}, owner deaths {r['owner_deaths']}"
    if kind == "array" and "version" in r:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        writer = (f", writer tid {r['writer_tid']} ({'publishing' if r['writer_alive'] else 'dead: the next publisher repairs'})"
                  if r["writer_tid"] else "")
        return (f"{shape} {r['dtype']} ({_human(r['nbytes'])}), version {r['version']}, publishes {r['publishes']}, "
                f"repairs {r['repairs']} (dead publishers), locked reads {r['locked_reads']}, waiters {r['waiters']}"
                + writer + ("" if r.get("checked", True) else ", busy: not checked"))
    return "-"


def cmd_ls(args: argparse.Namespace) -> int:
    rows: List[Sequence[Any]] = []
    for name in list_segments():
        try:
            with Grid.attach(name) as g:
                info = g.info()
                procs = _others(g.processes())
                live = sum(p["alive"] for p in procs)
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created_ns"] / 1e9))
                rows.append((name, _human(info["size"]), _human(info["heap_brk"]), _kinds(g.objects()),
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
            dict(o, report=report["maps"].get(o["name"]) or report["objects"].get(o["name"])) for o in g.objects()
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
    rows = [(o["name"], o["kind"], _details(o["kind"], o["report"])) for o in st["objects"]]
    if rows:
        print(_table(rows, ("OBJECT", "KIND", "FIGURES")))
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
    others = report.pop("objects")
    print(f"grid {args.name}: OK ({len(maps)} maps, {len(others)} other objects; "
          f"leaked {_human(report['leaked_bytes'])})")
    for name, r in maps.items():
        drift = r["live_counter"] - r["live"]
        note = f"; len() counter off by {drift} (validate --repair fixes it when idle)" if drift else ""
        print(f"  map {name}: {r['live']} keys, {r['tombstones']} tombstones{note}")
    for name, r in others.items():
        print(f"  {r['kind']} {name}: {_details(r['kind'], r)}")
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
    if args.two_hosts:
        from .demo_hosts import run_two_hosts

        return run_two_hosts()
    from .demo import run_demo

    return run_demo(workers=args.workers, duration=args.duration, keys=args.keys, jobs=args.jobs)


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
    s = sub.add_parser("demo", help="processes sharing a map, then a ring/topic/counter pipeline, then a shared numpy array; "
                                           "live figures and exact checks")
    s.add_argument("--workers", type=int, default=4)
    s.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    s.add_argument("--keys", type=int, default=2000)
    s.add_argument("--jobs", type=int, default=2_000_000, help="jobs through the pipeline stage")
    s.add_argument("--two-hosts", action="store_true",
                   help="instead: two grids and two bridges on loopback, replication lag and remote writes")
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
