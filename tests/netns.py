"""Hosts for the bridge tests: each a network namespace with its own
address on a shared Linux bridge (veth links), and its own /dev/shm (a
private mount namespace held open by a sleeper process). Processes are run
inside both namespaces with nsenter. Everything is torn down, even when a
test fails, by Hosts.close()."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from typing import Dict, List, Optional

ENV_OK = os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "iptables", "nsenter", "unshare"))


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


class Host:
    def __init__(self, net: "Hosts", name: str, index: int) -> None:
        self.net, self.name = net, name
        self.ns = f"sg{net.tag}{name}"
        self.ip = f"10.{net.octet}.0.{index + 1}"
        self.veth = f"v{net.tag}{name}"  # root-namespace end, on the bridge
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        sh("ip", "link", "set", self.veth, "master", net.bridge, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        sh("ip", "-n", self.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        # the private /dev/shm lives as long as this sleeper
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
             "mount -t tmpfs -o size=512m tmpfs /dev/shm && exec sleep 100000"])
        self.procs: List[subprocess.Popen] = []

    def _enter(self) -> List[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.ns}", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--"]

    def popen(self, argv: List[str], log: Optional[str] = None) -> subprocess.Popen:
        out = open(log, "a") if log else subprocess.DEVNULL
        p = subprocess.Popen(self._enter() + argv, stdout=out, stderr=subprocess.STDOUT if log else None)
        self.procs.append(p)
        return p

    def run(self, argv: List[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self._enter() + argv, capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, timeout: float = 60) -> str:
        r = self.run([sys.executable, "-c", code], timeout)
        assert r.returncode == 0, f"on {self.name}: {r.stdout}{r.stderr}"
        return r.stdout

    def link(self, up: bool) -> None:
        sh("ip", "-n", self.ns, "link", "set", "eth0", "up" if up else "down")

    def drop_from(self, other: "Host", on: bool) -> None:
        sh("ip", "netns", "exec", self.ns, "iptables", "-A" if on else "-D", "INPUT", "-s", other.ip, "-j", "DROP")

    def close(self) -> None:
        for p in self.procs + [self.holder]:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.veth, check=False)


class Hosts:
    def __init__(self, names: List[str]) -> None:
        self.tag = uuid.uuid4().hex[:4]
        self.octet = 100 + int(self.tag, 16) % 100
        self.bridge = f"br{self.tag}"
        self.hosts: Dict[str, Host] = {}
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        try:
            for i, n in enumerate(names):
                self.hosts[n] = Host(self, n, i)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        for h in self.hosts.values():
            h.close()
        sh("ip", "link", "del", self.bridge, check=False)
