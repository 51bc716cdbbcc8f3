"""The bridge's configuration: one TOML file, the same on every host but
for ``name`` (README, "Across hosts: the bridge"). Every field is checked before anything starts,
and an error names the field."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .._core import lib
from ..errors import ShmgridError
from ..grid import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10
    import tomli as tomllib

__all__ = ["ConfigError", "MapConfig", "Config", "load", "parse"]

MAX_PARTITIONS = lib.SG_MAX_PARTITIONS


class ConfigError(ShmgridError, ValueError):
    """A bridge configuration that cannot be used; the message names the field."""


@dataclass(frozen=True)
class MapConfig:
    name: str
    partitions: int
    owners: Tuple[str, ...]  # owner host of each partition
    capacity: Optional[int] = None
    max_key: Optional[int] = None
    max_value: Optional[int] = None

    def owned_by(self, host: str) -> List[int]:
        return [p for p, o in enumerate(self.owners) if o == host]


@dataclass(frozen=True)
class Config:
    path: str
    name: str
    grid: str
    grid_size: int
    secret: bytes
    hosts: Dict[str, Tuple[str, int]]
    maps: Dict[str, MapConfig]
    timeout: float = 2.0
    metrics: Optional[Tuple[str, int]] = None
    tls: Optional[Tuple[str, str, str]] = None  # (cert, key, ca) paths: mutual TLS between bridges

    @property
    def listen(self) -> Tuple[str, int]:
        return self.hosts[self.name]

    @property
    def peers(self) -> Tuple[str, ...]:
        """The other hosts, in name order."""
        return tuple(h for h in sorted(self.hosts) if h != self.name)


_TOP = {"name", "grid", "grid_size", "secret_file", "metrics", "timeout", "hosts", "maps", "tls"}
_TLS = {"cert", "key", "ca"}
_MAP = {"partitions", "capacity", "max_key", "max_value", "owners"}


def _address(where: str, v: Any) -> Tuple[str, int]:
    if not isinstance(v, str) or ":" not in v:
        raise ConfigError(f"{where}: expected \"host:port\", got {v!r}")
    host, _, port = v.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected \"host:port\" with a port 1-65535, got {v!r}")
    return host.strip("[]"), int(port)


def _int(where: str, v: Any, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{where}: expected an integer from {lo} to {hi}, got {v!r}")
    return v


def parse(data: Dict[str, Any], path: str = "<config>") -> Config:
    """A Config from the parsed TOML ``data`` of the file at ``path``."""
    def where(f: str) -> str:
        return f"{path}: {f}"

    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise ConfigError(where(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(_TOP))})"))
    for req in ("name", "grid", "secret_file", "hosts", "maps"):
        if req not in data:
            raise ConfigError(where(f"{req}: missing"))
    hosts_raw = data["hosts"]
    if not isinstance(hosts_raw, dict) or not hosts_raw:
        raise ConfigError(where("hosts: expected a table of host = \"address:port\""))
    hosts = {str(h): _address(where(f"hosts.{h}"), a) for h, a in hosts_raw.items()}
    name = data["name"]
    if not isinstance(name, str) or name not in hosts:
        raise ConfigError(where(f"name: {name!r} is not a host in [hosts] ({', '.join(sorted(hosts))})"))
    grid = data["grid"]
    if not isinstance(grid, str) or not grid:
        raise ConfigError(where(f"grid: expected a grid name, got {grid!r}"))
    try:
        grid_size = parse_size(data.get("grid_size", "256MiB"))
    except (ValueError, TypeError) as e:
        raise ConfigError(where(f"grid_size: {e}")) from None
    secret_file = data["secret_file"]
    if not isinstance(secret_file, str):
        raise ConfigError(where(f"secret_file: expected a path, got {secret_file!r}"))
    secret_path = os.path.join(os.path.dirname(os.path.abspath(path)), secret_file)
    try:
        with open(secret_path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(where(f"secret_file: cannot read {secret_path}: {e.strerror}")) from None
    if len(secret) < 16:
        raise ConfigError(where(f"secret_file: {secret_path} holds {len(secret)} bytes; use at least 16"))
    timeout = data.get("timeout", 2.0)
    # at most 25 s: a remote write waits up to twice this (the owner's
    # answer, then the mirror catching up) inside the client's own 60 s
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 25:
        raise ConfigError(where(f"timeout: expected seconds > 0 (at most 25), got {timeout!r}"))
    metrics = _address(where("metrics"), data["metrics"]) if "metrics" in data else None
    maps_raw = data["maps"]
    if not isinstance(maps_raw, dict) or not maps_raw:
        raise ConfigError(where("maps: expected at least one [maps.NAME] table"))
    order = sorted(hosts)
    maps: Dict[str, MapConfig] = {}
    for mname, m in maps_raw.items():
        w = f"maps.{mname}"
        if mname.startswith("_shmgrid"):
            raise ConfigError(where(f"{w}: names starting with _shmgrid are the bridge's own"))
        if not isinstance(m, dict):
            raise ConfigError(where(f"{w}: expected a table"))
        unknown = sorted(set(m) - _MAP)
        if unknown:
            raise ConfigError(where(f"{w}.{unknown[0]}: unknown field (known: {', '.join(sorted(_MAP))})"))
        if "partitions" not in m:
            raise ConfigError(where(f"{w}.partitions: missing"))
        parts = _int(where(f"{w}.partitions"), m["partitions"], 1, MAX_PARTITIONS)
        if "owners" in m:
            owners = m["owners"]
            if not isinstance(owners, list) or len(owners) != parts:
                raise ConfigError(where(f"{w}.owners: expected a list of {parts} host names, one per partition"))
            for i, o in enumerate(owners):
                if o not in hosts:
                    raise ConfigError(where(f"{w}.owners[{i}]: {o!r} is not a host in [hosts] "
                                            f"({', '.join(order)})"))
            owner_t = tuple(owners)
        else:
            owner_t = tuple(order[p % len(order)] for p in range(parts))  # round-robin over [hosts]
        # keys travel with a 16-bit length, and a record must fit in a frame
        limits = {"capacity": 2**36, "max_key": 65535, "max_value": 8 << 20}
        kw = {k: _int(where(f"{w}.{k}"), m[k], 1, limits[k]) for k in limits if k in m}
        maps[str(mname)] = MapConfig(str(mname), parts, owner_t, **kw)
    tls = None
    if "tls" in data:
        t = data["tls"]
        if not isinstance(t, dict) or set(t) != _TLS:
            raise ConfigError(where("tls: expected a table with exactly cert, key and ca (paths)"))
        paths = []
        for item in ("cert", "key", "ca"):
            p = os.path.join(os.path.dirname(os.path.abspath(path)), str(t[item]))
            if not os.access(p, os.R_OK):
                raise ConfigError(where(f"tls.{item}: cannot read {p}"))
            paths.append(p)
        tls = (paths[0], paths[1], paths[2])
    return Config(path=path, name=name, grid=grid, grid_size=grid_size, secret=secret, hosts=hosts, maps=maps,
                  timeout=float(timeout), metrics=metrics, tls=tls)


def load(path: str) -> Config:
    """Read and check the TOML file at ``path``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, path)
