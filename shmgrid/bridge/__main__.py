"""``shmgrid-bridge run --config FILE`` (or ``python -m shmgrid.bridge``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.request
from typing import Optional, Sequence

from .config import ConfigError, load


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="shmgrid-bridge", description="Mirror shmgrid map partitions between hosts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run this host's bridge until SIGTERM/SIGINT")
    r.add_argument("--config", required=True)
    r.add_argument("--log-level", default="INFO")
    s = sub.add_parser("status", help="per partition: owner, connected, lag (needs `metrics` in the config)")
    s.add_argument("--config", required=True)
    c = sub.add_parser("check", help="check a configuration and print what it means")
    c.add_argument("--config", required=True)
    args = p.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"shmgrid-bridge: {e}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        print(f"host {cfg.name} listens on {cfg.listen[0]}:{cfg.listen[1]}, grid {cfg.grid}")
        for n, mc in cfg.maps.items():
            print(f"map {n}: {mc.partitions} partitions; here: {mc.owned_by(cfg.name)}")
        return 0
    if args.cmd == "status":
        if not cfg.metrics:
            print("shmgrid-bridge: status needs `metrics = \"host:port\"` in the configuration", file=sys.stderr)
            return 2
        try:
            with urllib.request.urlopen(f"http://{cfg.metrics[0]}:{cfg.metrics[1]}/status", timeout=5) as resp:
                st = json.load(resp)
        except OSError as e:
            print(f"shmgrid-bridge: bridge {cfg.name} is not answering on {cfg.metrics}: {e}", file=sys.stderr)
            return 1
        peers = st["peers"]
        counters = st["counters"]

        def figure(name: str, peer: str, m: str) -> str:
            v = counters.get(f'{name}{{map="{m}",peer="{peer}"}}')
            return "-" if v is None else f"{v:g}"

        print(f"bridge {st['host']}")
        for m, spec in sorted(st["maps"].items()):
            print(f"map {m}: {spec['partitions']} partitions")
            for p_, owner in enumerate(spec["owners"]):
                if owner == st["host"]:
                    state = "owned here"
                else:
                    ps = peers.get(owner, {})
                    state = (f"mirror of {owner}, {'connected' if ps.get('connected') else 'DISCONNECTED'}, "
                             f"lag {figure('replication_lag_seconds', owner, m)} s, "
                             f"records applied {figure('records_applied_total', owner, m)}")
                print(f"  partition {p_:3d}: {state}")
        print("counters:")
        for k, v in sorted(counters.items()):
            print(f"  {k} {v:g}")
        return 0
    logging.basicConfig(level=args.log_level.upper(),
                        format='{"ts": "%(asctime)s", "level": "%(levelname)s", "msg": "%(message)s"}')
    from .daemon import run

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
