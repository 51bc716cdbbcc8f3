"""Two grids and two bridges on 127.0.0.1: mirrors converge to the owners'
data (values and versions), across a bridge killed and restarted; bad
peers and bad frames are refused and change nothing; bad configurations
are refused before anything starts."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import unique_grid_name, unlink_quietly
from workers import wait_for

import shmgrid
from shmgrid import mirror
from shmgrid.bridge import daemon, protocol

PARTS = 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path, name, grids, ports, metrics, extra=""):
    hosts = "\n".join(f'{h} = "127.0.0.1:{p}"' for h, p in ports.items())
    path.write_text(f'''name = "{name}"
grid = "{grids[name]}"
grid_size = "64MiB"
secret_file = "cluster.key"
metrics = "127.0.0.1:{metrics[name]}"
timeout = 1.0

[hosts]
{hosts}

[maps.users]
partitions = {PARTS}
capacity = 4096
max_key = 64
max_value = 256
{extra}''')


class Cluster:
    def __init__(self, tmp_path):
        self.dir = tmp_path
        (tmp_path / "cluster.key").write_bytes(os.urandom(32).hex().encode())
        self.grids = {h: unique_grid_name() for h in "ab"}
        self.ports = {h: free_port() for h in "ab"}
        self.mports = {h: free_port() for h in "ab"}
        self.procs = {}
        for h in "ab":
            write_config(tmp_path / f"{h}.toml", h, self.grids, self.ports, self.mports)

    def start(self, h):
        log = open(self.dir / f"{h}.log", "a")
        self.procs[h] = subprocess.Popen([sys.executable, "-m", "shmgrid.bridge", "run", "--config",
                                          str(self.dir / f"{h}.toml")], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while True:  # ready when its metrics answer
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.mports[h]}/status", timeout=1).read()
                return
            except OSError:
                assert self.procs[h].poll() is None, self.log(h)
                assert time.monotonic() < deadline, "bridge did not come up\n" + self.log(h)
                time.sleep(0.05)

    def log(self, h):
        return (self.dir / f"{h}.log").read_text()

    def status(self, h):
        import json
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.mports[h]}/status", timeout=2))

    def stop(self, h, sig=signal.SIGTERM):
        p = self.procs.pop(h)
        p.send_signal(sig)
        return p.wait(10)

    def close(self):
        for h in list(self.procs):
            self.stop(h, signal.SIGKILL)
        for g in self.grids.values():
            unlink_quietly(g)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def owned(host, key):
    return "ab"[mirror.partition_of(key, PARTS) % 2] == host  # round-robin over sorted [hosts]


def wait_converged(ga, gb, timeout=20.0):
    A, B = ga.map("users"), gb.map("users")
    deadline = time.monotonic() + timeout
    while True:
        sa = {k: A.get_versioned(k) for k in A.keys()}
        sb = {k: B.get_versioned(k) for k in B.keys()}
        if sa == sb:
            return sa
        assert time.monotonic() < deadline, f"not converged: {len(sa)} keys on a, {len(sb)} on b"
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_mirrors_converge_and_survive_a_killed_bridge(cluster):
    cluster.start("a")
    cluster.start("b")
    ga, gb = shmgrid.Grid.attach(cluster.grids["a"]), shmgrid.Grid.attach(cluster.grids["b"])
    try:
        A, B = ga.map("users"), gb.map("users")
        keys = [b"user:%d" % i for i in range(400)]
        for i, k in enumerate(keys):  # each host writes the keys it owns
            (A if owned("a", k) else B)[k] = b"v%d" % i
        state = wait_converged(ga, gb)
        assert len(state) == 400
        cluster.stop("b", signal.SIGKILL)
        for i, k in enumerate(keys):  # a keeps writing while b's bridge is dead
            if owned("a", k):
                if i % 5 == 0:
                    del A[k]
                else:
                    A[k] = b"w%d" % i
        cluster.start("b")
        state = wait_converged(ga, gb)
        assert all(state[k][0] == b"w%d" % i for i, k in enumerate(keys) if owned("a", k) and i % 5)
        assert not any(k in state for i, k in enumerate(keys) if owned("a", k) and i % 5 == 0)
        st = cluster.status("b")
        assert st["peers"]["a"]["connected"]
        assert any(k.startswith("records_applied_total") and v > 0 for k, v in st["counters"].items())
    finally:
        ga.close()
        gb.close()


@pytest.mark.timeout(60)
def test_a_long_absence_needs_a_snapshot_and_drops_deleted_keys(cluster):
    """Away past the change feed (more changes than it holds) and past a
    migration that dropped tombstones: the snapshot brings the mirror back,
    deleted keys included."""
    cluster.start("a")
    cluster.start("b")
    ga, gb = shmgrid.Grid.attach(cluster.grids["a"]), shmgrid.Grid.attach(cluster.grids["b"])
    try:
        A = ga.map("users")
        mine = [k for k in (b"k%d" % i for i in range(2000)) if owned("a", k)][:300]
        for k in mine:
            A[k] = b"1"
        wait_converged(ga, gb)
        cluster.stop("b", signal.SIGKILL)
        for _ in range(40):  # > FEED_SLOTS changes
            for k in mine[:250]:
                A[k] = b"2"
        for k in mine[250:]:
            del A[k]
        A.compact()  # drops the tombstones: the deletes exist only as absence now
        cluster.start("b")
        state = wait_converged(ga, gb)
        assert len(state) == 250 and all(v[0] == b"2" for v in state.values())
    finally:
        ga.close()
        gb.close()


async def _raw(port, data, read=True):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        if read:
            await protocol.read_frame(r, protocol.MAX_HANDSHAKE)  # HELLO
        w.write(data)
        await w.drain()
        return await asyncio.wait_for(r.read(), 5)  # the bridge closes on us
    finally:
        w.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what,data", [
    ("garbage", b"\x00GARBAGE\xff" * 10),
    ("oversized", struct.pack("<IB", 1 << 30, protocol.T.AUTH)),
    ("truncated", struct.pack("<IB", 100, protocol.T.AUTH) + b"x" * 10),
    ("wrong secret", protocol.frame(protocol.T.AUTH, b"\0" * 32 + os.urandom(32) + bytes([protocol.VERSION]) + b"b")),
])
def test_bad_peers_are_refused_and_change_nothing(cluster, what, data):
    cluster.start("a")
    ga = shmgrid.Grid.attach(cluster.grids["a"])
    try:
        before = ga.map("users").validate()["live"]
        out = asyncio.run(_raw(cluster.ports["a"], data))
        assert out == b""  # after its HELLO the bridge sent nothing: no AUTH_OK, it just closed
        deadline = time.monotonic() + 10
        while "rejected" not in cluster.log("a"):
            assert time.monotonic() < deadline, cluster.log("a")
            time.sleep(0.05)
        assert ga.map("users").validate()["live"] == before
        assert cluster.procs["a"].poll() is None  # still serving
    finally:
        ga.close()


@pytest.mark.parametrize("extra,field", [
    ('owners = ["a", "c", "a", "b", "a", "b", "a", "b"]', "maps.users.owners[1]: 'c' is not a host"),
    ('owners = ["a", "b"]', "maps.users.owners: expected a list of 8 host names"),
    ('colour = "blue"', "maps.users.colour: unknown field"),
])
def test_bad_configurations_are_refused_before_starting(tmp_path, extra, field):
    (tmp_path / "cluster.key").write_bytes(b"x" * 32)
    write_config(tmp_path / "a.toml", "a", {"a": "g1", "b": "g2"}, {"a": 1, "b": 2}, {"a": 3, "b": 4}, extra)
    r = subprocess.run([sys.executable, "-m", "shmgrid.bridge", "run", "--config", str(tmp_path / "a.toml")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and field in r.stderr, r.stderr
    assert not os.path.exists("/dev/shm/g1")


def test_config_errors_name_the_field(tmp_path):
    from shmgrid.bridge.config import ConfigError, parse

    (tmp_path / "k").write_bytes(b"s" * 20)
    base = {"name": "a", "grid": "g", "secret_file": "k", "hosts": {"a": "127.0.0.1:1"},
            "maps": {"m": {"partitions": 2}}}
    cfg = parse(base, str(tmp_path / "c.toml"))
    assert cfg.maps["m"].owners == ("a", "a") and cfg.timeout == 2.0
    for change, msg in [
        ({"name": "z"}, "name: 'z' is not a host"),
        ({"hosts": {"a": "nohost"}}, "hosts.a: expected \"host:port\""),
        ({"timeout": -1}, "timeout:"),
        ({"secret_file": "missing"}, "secret_file: cannot read"),
        ({"maps": {"m": {"partitions": 0}}}, "maps.m.partitions"),
        ({"metrics": "x:99999"}, "metrics:"),
        ({"grid_size": "lots"}, "grid_size:"),
        ({"extra": 1}, "unknown field 'extra'"),
    ]:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
            parse({**base, **change}, str(tmp_path / "c.toml"))


def _incr_worker(grid_name, keys, n, out):
    with shmgrid.Grid.attach(grid_name) as g:
        m = g.map("users")
        for i in range(n):
            m.incr(keys[i % len(keys)])
    out.put(n)


@pytest.mark.timeout(120)
def test_remote_writes_cas_semantics_and_read_your_writes(cluster):
    cluster.start("a")
    cluster.start("b")
    ga, gb = shmgrid.Grid.attach(cluster.grids["a"]), shmgrid.Grid.attach(cluster.grids["b"])
    try:
        A, B = ga.map("users"), gb.map("users")
        ka = next(k for k in (b"ka%d" % i for i in range(100)) if owned("a", k))
        kb = next(k for k in (b"kb%d" % i for i in range(100)) if owned("b", k))
        # b writes a key a owns: applied on a, visible on b when put returns
        v = B.put(ka, b"from-b")
        assert B.get_versioned(ka) == (b"from-b", v)
        assert A.get_versioned(ka) == (b"from-b", v)
        assert B.get(ka, consistent=True) == b"from-b"
        assert not B.put_if_absent(ka, b"no") and B.replace(ka, b"from-b", b"r")
        assert B.compare_and_set(ka, v, b"stale") is None
        v2 = B.compare_and_set(ka, v + 1, b"cas")
        assert v2 == v + 2 and A.get(ka) == b"cas" and B.get(ka) == b"cas"
        assert B.pop(ka) == b"cas" and ka not in B and ka not in A
        assert B.incr(ka, 5) == 5 and A.incr(ka) == 6
        wait_converged(ga, gb)
        B.put(kb, b"x")
        with pytest.raises(shmgrid.NotAnInteger):  # the owner's error, raised here
            A.incr(kb)
        B.delete(kb)
        # two hosts racing incr on the same keys (owned by a and by b): exact totals
        from workers import FORK
        keys = [ka, kb]
        q = FORK.Queue()
        procs = [FORK.Process(target=_incr_worker, args=(cluster.grids[h], keys, 300, q)) for h in "abab"]
        for p in procs:
            p.start()
        for p in procs:
            p.join(90)
            assert p.exitcode == 0
        state = wait_converged(ga, gb)
        assert struct.unpack("<q", state[ka][0])[0] == 6 + 600
        assert struct.unpack("<q", state[kb][0])[0] == 600
    finally:
        ga.close()
        gb.close()


@pytest.mark.timeout(60)
def test_remote_unavailable_when_the_owner_is_down(cluster):
    cluster.start("a")
    cluster.start("b")
    ga, gb = shmgrid.Grid.attach(cluster.grids["a"]), shmgrid.Grid.attach(cluster.grids["b"])
    try:
        B = gb.map("users")
        ka = next(k for k in (b"ka%d" % i for i in range(100)) if owned("a", k))
        cluster.stop("a", signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(shmgrid.RemoteUnavailable):
            B.put(ka, b"lost")
        assert time.monotonic() - t0 < 5
        assert B.get(ka) is None and ga.map("users").get(ka) is None  # applied nowhere
        # a consistent read goes to the owner: with the owner down it fails
        # where a plain read answers from the local mirror
        with pytest.raises(shmgrid.RemoteUnavailable):
            B.get(ka, consistent=True)
        kb = next(k for k in (b"kb%d" % i for i in range(100)) if owned("b", k))
        B.put(kb, b"mine")
        assert B.get(kb, consistent=True) == b"mine"  # owned here: read here, no owner needed
        cluster.stop("b")  # and with no bridge at all on this host
        with pytest.raises(shmgrid.RemoteUnavailable, match="no bridge is running") as e:
            B.put(ka, b"lost")
        assert "may or may not" not in str(e.value)
    finally:
        ga.close()
        gb.close()


WRITER = r"""
import sys, time, shmgrid
grid, host, ackfile, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
with shmgrid.Grid.attach(grid) as g:
    m = g.map("users")
    end, i = time.monotonic() + seconds, 0
    with open(ackfile, "a") as out:
        while time.monotonic() < end:
            k = b"k%d" % (i % 200)
            try:
                out.write("%s %d\n" % (k.decode(), m.put(k, b"%s-%d" % (host.encode(), i))))
                out.flush()
            except shmgrid.RemoteUnavailable:
                time.sleep(0.005)
            i += 1
"""


@pytest.mark.timeout(120)
def test_through_a_faulty_proxy_delays_and_cut_connections(cluster, tmp_path):
    """b reaches a only through a proxy that delays every chunk and cuts
    connections at random; writers on both hosts write every key. Once the
    proxy heals, both hold the same data and every acknowledged write."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(cluster.ports["a"], delay=0.003, drop=0.01)
    try:
        ports_for_b = dict(cluster.ports)
        ports_for_b["a"] = proxy.port
        write_config(tmp_path / "b.toml", "b", cluster.grids, ports_for_b, cluster.mports)
        cluster.start("a")
        cluster.start("b")
        # separate interpreters, not forks: the proxy's thread must not be forked
        ws = [subprocess.Popen([sys.executable, "-c", WRITER, cluster.grids[h], h, str(tmp_path / f"ack-{h}"), "4"])
              for h in "ab"]
        for w in ws:
            assert w.wait(60) == 0
        proxy.heal()
        ga, gb = shmgrid.Grid.attach(cluster.grids["a"]), shmgrid.Grid.attach(cluster.grids["b"])
        try:
            state = wait_converged(ga, gb, timeout=30)
        finally:
            ga.close()
            gb.close()
        acked = {}
        for h in "ab":
            for line in (tmp_path / f"ack-{h}").read_text().split("\n"):
                if line:
                    k, v = line.split()
                    acked[k.encode()] = max(acked.get(k.encode(), 0), int(v))
        assert acked and proxy.cuts > 0, (len(acked), proxy.cuts)
        assert all(state[k][1] >= v for k, v in acked.items())
    finally:
        proxy.close()


def _make_certs(d):
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=shmgrid-test-ca")
    run("req", *ec, "-keyout", "host.key", "-out", "host.csr", "-subj", "/CN=bridge")
    run("x509", "-req", "-in", "host.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "host.crt", "-days", "1")


@pytest.mark.timeout(60)
@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="needs openssl to make certificates")
def test_tls_between_bridges(cluster, tmp_path):
    _make_certs(tmp_path)
    tls = '\n[tls]\ncert = "host.crt"\nkey = "host.key"\nca = "ca.crt"\n'
    for h in "ab":
        write_config(tmp_path / f"{h}.toml", h, cluster.grids, cluster.ports, cluster.mports, tls)
    cluster.start("a")
    cluster.start("b")
    ga, gb = shmgrid.Grid.attach(cluster.grids["a"]), shmgrid.Grid.attach(cluster.grids["b"])
    try:
        A, B = ga.map("users"), gb.map("users")
        for i in range(100):
            k = b"t%d" % i
            (A if owned("a", k) else B)[k] = b"over tls"
        assert len(wait_converged(ga, gb)) == 100
        assert B.put(next(k for k in (b"t%d" % i for i in range(100)) if owned("a", k)), b"remote") > 1
    finally:
        ga.close()
        gb.close()

    async def plain():  # a client without TLS never even gets a HELLO
        r, w = await asyncio.open_connection("127.0.0.1", cluster.ports["a"])
        w.write(b"GET / HTTP/1.0\r\n\r\n")
        await w.drain()
        try:
            return await asyncio.wait_for(r.read(), 5)
        finally:
            w.close()

    out = asyncio.run(plain())
    assert len(out) < 5 or out[4] != protocol.T.HELLO, out  # no protocol frame outside TLS


@pytest.mark.timeout(60)
def test_status_and_metrics(cluster):
    cluster.start("a")
    cluster.start("b")
    with shmgrid.Grid.attach(cluster.grids["a"]) as ga, shmgrid.Grid.attach(cluster.grids["b"]) as gb:
        for i in range(50):
            k = b"s%d" % i
            if owned("a", k):
                ga.map("users")[k] = b"x"
        wait_converged(ga, gb)
    r = subprocess.run([sys.executable, "-m", "shmgrid.bridge", "status", "--config", str(cluster.dir / "b.toml")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "partition   0: mirror of a, connected, lag" in r.stdout and "partition   1: owned here" in r.stdout
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.mports['b']}/metrics", timeout=2).read().decode()
    assert 'shmgrid_bridge_records_applied_total{map="users",peer="a"}' in text
    assert 'shmgrid_bridge_replication_lag_seconds{map="users",peer="a"}' in text


LOCAL_CLIENT = r"""
import os, pwd, socket, struct, sys
os.setgid(pwd.getpwnam("nobody").pw_gid)
os.setuid(pwd.getpwnam("nobody").pw_uid)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\0shmgrid-bridge/" + sys.argv[1])
body = b'{"op": "put", "map": "users", "key": "YQ==", "value": "YQ=="}'
try:
    s.sendall(struct.pack("<I", len(body)) + body)
    s.settimeout(10)
    print("reply" if s.recv(4) else "closed")
except (ConnectionResetError, BrokenPipeError):
    print("closed")
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to user nobody needs root")
def test_local_socket_refuses_users_who_may_not_write_the_grid(cluster):
    cluster.start("b")
    r = subprocess.run([sys.executable, "-c", LOCAL_CLIENT, cluster.grids["b"]], capture_output=True, text=True,
                       timeout=30)
    assert r.stdout.strip() == "closed", r.stdout + r.stderr
    assert "local client refused" in cluster.log("b")


def _counter(cluster, host, prefix):
    st = cluster.status(host)
    return sum(v for k, v in st["counters"].items() if k.startswith(prefix))


@pytest.mark.timeout(60)
def test_a_short_break_resumes_from_the_feed_a_long_one_resyncs(cluster):
    cluster.start("a")
    cluster.start("b")
    ga, gb = shmgrid.Grid.attach(cluster.grids["a"]), shmgrid.Grid.attach(cluster.grids["b"])
    try:
        A = ga.map("users")
        mine = [k for k in (b"r%d" % i for i in range(400)) if owned("a", k)]
        for k in mine:
            A[k] = b"1"
        wait_converged(ga, gb)
        snapshots = _counter(cluster, "a", "snapshots_sent_total")
        # the owner stops past the timeout: b drops the connection and
        # reconnects; a few changes happened meanwhile
        cluster.procs["a"].send_signal(signal.SIGSTOP)
        for k in mine[:20]:
            A[k] = b"2"
        time.sleep(2.5)
        cluster.procs["a"].send_signal(signal.SIGCONT)
        wait_converged(ga, gb)
        deadline = time.monotonic() + 10
        while _counter(cluster, "a", "resumes_total") < 1:
            assert time.monotonic() < deadline, cluster.log("a") + cluster.log("b")
            time.sleep(0.05)
        assert _counter(cluster, "a", "snapshots_sent_total") == snapshots  # no snapshot needed
        # again, but more changes than the feed holds meanwhile: the resume
        # finds them gone and a snapshot follows
        resyncs = _counter(cluster, "a", "resyncs_total")
        cluster.procs["a"].send_signal(signal.SIGSTOP)
        for i in range(shmgrid.watch.FEED_SLOTS // len(mine) + 2):
            for k in mine:
                A[k] = b"3-%d" % i
        time.sleep(2.5)
        cluster.procs["a"].send_signal(signal.SIGCONT)
        state = wait_converged(ga, gb)
        assert all(state[k][0].startswith(b"3-") for k in mine)
        assert _counter(cluster, "a", "resyncs_total") > resyncs
    finally:
        ga.close()
        gb.close()


SQUATTER = r"""
import os, pwd, socket, sys, time
os.setgid(pwd.getpwnam("nobody").pw_gid)
os.setuid(pwd.getpwnam("nobody").pw_uid)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0shmgrid-bridge/" + sys.argv[1])
s.listen()
print("bound", flush=True)
c, _ = s.accept()
time.sleep(5)
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to user nobody needs root")
def test_client_refuses_a_squatter_on_the_bridge_socket(grid):
    from shmgrid import remote

    p = subprocess.Popen([sys.executable, "-c", SQUATTER, grid.name], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "bound"
        with pytest.raises(shmgrid.RemoteUnavailable, match="refusing to send it writes"):
            remote.call(grid.name, {"op": "put", "map": "m", "key": "YQ==", "value": "YQ=="})
    finally:
        p.kill()
        p.wait(5)


@pytest.mark.timeout(60)
def test_a_malformed_remote_request_gets_an_error_not_a_reset_link(cluster):
    from shmgrid import remote

    cluster.start("a")
    cluster.start("b")
    ka = next(k for k in (b"m%d" % i for i in range(100)) if owned("a", k))
    with shmgrid.Grid.attach(cluster.grids["b"]) as gb:
        gb.map("users").put(ka, b"\0" * 8)
        snapshots = _counter(cluster, "a", "snapshots_sent_total")
        for bad in ({"delta": "ten"}, {"delta": None}, {"value": None, "op": "put"}):
            req = {"op": "incr", "map": "users", "key": remote.b64(ka), **bad}
            with pytest.raises(shmgrid.InvalidArgument):
                remote.call(cluster.grids["b"], req)
        assert gb.map("users").incr(ka) == 1  # the link is still up
        assert _counter(cluster, "a", "snapshots_sent_total") == snapshots


@pytest.mark.timeout(60)
def test_a_flood_of_silent_connections_is_capped(cluster):
    cluster.start("a")
    socks = []
    try:
        for _ in range(100):  # never authenticate
            s = socket.create_connection(("127.0.0.1", cluster.ports["a"]), timeout=5)
            socks.append(s)
        # within the cap a connection gets HELLO; past it, it is closed at
        # once (well before the 1 s handshake timeout closes the others)
        greeted = closed = 0
        for s in socks:
            s.settimeout(0.5)
            try:
                got = s.recv(1)
            except socket.timeout:
                got = None
            greeted += bool(got)
            closed += got == b""
        cap = daemon.MAX_UNAUTHENTICATED
        assert (greeted, closed) == (cap, 100 - cap)
        cluster.start("b")  # a real peer still gets through once the silent ones time out
        with shmgrid.Grid.attach(cluster.grids["a"]) as ga, shmgrid.Grid.attach(cluster.grids["b"]) as gb:
            k = next(k for k in (b"f%d" % i for i in range(100)) if owned("a", k))
            ga.map("users")[k] = b"through"
            wait_converged(ga, gb)
    finally:
        for s in socks:
            s.close()


# ---- integrity, exactly-once remote writes, owner incarnations ---------------------------


class _Capture:
    """A stand-in for a StreamWriter that keeps what a Link sends."""

    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


def _links():
    """Both ends of one connection's links, with what each sends captured."""
    c2s, s2c = protocol._session_keys(b"s" * 32, b"n" * 32, b"m" * 32, b"a", b"b")
    loop = asyncio.new_event_loop()
    rs, rc = asyncio.StreamReader(loop=loop), asyncio.StreamReader(loop=loop)
    server = protocol.Link(rs, _Capture(), s2c, c2s)
    client = protocol.Link(rc, _Capture(), c2s, s2c)
    return loop, server, client


def test_every_frame_after_the_handshake_is_tamper_evident():
    loop, server, client = _links()
    try:
        recv = lambda link: loop.run_until_complete(link.recv())  # noqa: E731
        client.send(protocol.T.WRITE, b'{"op":"put"}')
        client.send(protocol.T.HEARTBEAT)
        first, client.writer.data = client.writer.data, b""
        server.reader.feed_data(first)
        assert recv(server) == (protocol.T.WRITE, b'{"op":"put"}')
        assert recv(server) == (protocol.T.HEARTBEAT, b"")
        for name, forged in [
            ("replayed", first),  # the same bytes again: the sequence number moved on
            ("untagged", protocol.frame(protocol.T.WRITE, b'{"op":"put"}' + b"\0" * protocol.TAG)),
            ("altered", None),
            ("reflected", None),  # the server's own frame sent back to it
        ]:
            if name == "altered":
                client.send(protocol.T.WRITE, b'{"op":"put"}')
                data, client.writer.data = bytearray(client.writer.data), b""
                data[8] ^= 1
                forged = bytes(data)
            elif name == "reflected":
                server.send(protocol.T.WRITE, b'{"op":"put"}')
                forged, server.writer.data = server.writer.data, b""
            loop2, server2, _ = _links()  # a fresh link that has received two frames
            server2.reader.feed_data(first)
            loop2.run_until_complete(server2.recv())
            loop2.run_until_complete(server2.recv())
            server2.reader.feed_data(forged)
            with pytest.raises(protocol.ProtocolError, match="integrity"):
                loop2.run_until_complete(server2.recv())
            loop2.close()
    finally:
        loop.close()


@pytest.mark.timeout(90)
def test_an_altered_frame_closes_the_link_and_nothing_of_it_lands(cluster, tmp_path):
    """b follows a through a proxy that flips bytes past the handshake:
    every altered frame is caught by its tag, the link is dropped and
    followed again, and b ends with exactly a's data. Each key is written
    once, so an altered record that got applied would stay."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(cluster.ports["a"], delay=0.0, drop=0.0, corrupt=0.05, intact=600)
    try:
        ports_for_b = dict(cluster.ports)
        ports_for_b["a"] = proxy.port
        write_config(tmp_path / "b.toml", "b", cluster.grids, ports_for_b, cluster.mports)
        cluster.start("a")
        cluster.start("b")
        with shmgrid.Grid.attach(cluster.grids["a"]) as ga, shmgrid.Grid.attach(cluster.grids["b"]) as gb:
            A = ga.map("users")
            mine = [k for k in (b"c%d" % i for i in range(3000)) if owned("a", k)]
            for i, k in enumerate(mine):
                A[k] = k * 8
                if i % 50 == 49:
                    time.sleep(0.01)  # many small frames, many chances
            deadline = time.monotonic() + 20
            while proxy.corrupted < 3:
                assert time.monotonic() < deadline, proxy.corrupted
                time.sleep(0.05)
            proxy.heal()
            state = wait_converged(ga, gb)
            assert all(state[k][0] == k * 8 for k in mine)
        assert "failed its integrity check" in cluster.log("a") + cluster.log("b")
    finally:
        proxy.close()


def _follow_as(cluster, peer, frames):
    """Connect to a's bridge as mirror ``peer``, send ``frames`` (type,
    JSON) after subscribing, and collect the WRITE_RESULTs for them."""

    async def go():
        r, w = await asyncio.open_connection("127.0.0.1", cluster.ports["a"])
        secret = (cluster.dir / "cluster.key").read_bytes().strip()
        _, link = await protocol.client_handshake(r, w, secret, peer, 5)
        link.send_json(protocol.T.SUBSCRIBE, {"maps": {"users": {
            "partitions": PARTS, "owned": list(range(0, PARTS, 2)), "max_key": 64, "max_value": 256}}})
        for kind, obj in frames:
            link.send_json(kind, obj)
        results = []
        while len(results) < len(frames):
            kind, payload = await asyncio.wait_for(link.recv(), 10)
            if kind == protocol.T.WRITE_RESULT:
                results.append(__import__("json").loads(payload))
        w.close()
        return results

    return asyncio.run(go())


@pytest.mark.timeout(60)
def test_a_remote_write_sent_again_is_applied_once(cluster):
    """The owner answers a request id it has seen with the first answer:
    a mirror resending after a broken link cannot apply a write twice."""
    from shmgrid import remote

    cluster.start("a")
    ka = next(k for k in (b"d%d" % i for i in range(100)) if owned("a", k))
    req = {"op": "incr", "map": "users", "key": remote.b64(ka), "delta": 7, "id": "0123456789abcdef0123"}
    first, again = _follow_as(cluster, "b", [(protocol.T.WRITE, req), (protocol.T.WRITE, req)])
    assert first == again and first["result"] == 7
    (third,) = _follow_as(cluster, "b", [(protocol.T.WRITE, req)])  # on a new connection too
    assert third == first
    (other,) = _follow_as(cluster, "b", [(protocol.T.WRITE, {**req, "id": "another-id-0123456789"})])
    assert other["result"] == 14
    with shmgrid.Grid.attach(cluster.grids["a"]) as ga:
        assert struct.unpack("<q", ga.map("users")[ka])[0] == 14
    assert _counter(cluster, "a", "remote_writes_deduplicated_total") == 2


INCR_COUNTING = r"""
import sys, time, shmgrid
grid, key, seconds, out = sys.argv[1], sys.argv[2].encode(), float(sys.argv[3]), sys.argv[4]
acked = unknown = 0
with shmgrid.Grid.attach(grid) as g:
    m = g.map("users")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            m.incr(key)
            acked += 1
        except shmgrid.RemoteUnavailable as e:
            assert "may or may not" in str(e) or "nothing was applied" in str(e), e
            unknown += "may or may not" in str(e)
open(out, "w").write("%d %d" % (acked, unknown))
"""


@pytest.mark.timeout(120)
def test_remote_incr_through_cut_connections_counts_exactly(cluster, tmp_path):
    """Processes on b incr a key a owns while a proxy cuts b's link to a
    at random: requests cut off are sent again on the next link, and the
    owner applies each once. The total is every acknowledged incr plus at
    most the ones reported as "may or may not"."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(cluster.ports["a"], delay=0.001, drop=0.03)
    try:
        ports_for_b = dict(cluster.ports)
        ports_for_b["a"] = proxy.port
        write_config(tmp_path / "b.toml", "b", cluster.grids, ports_for_b, cluster.mports)
        cluster.start("a")
        cluster.start("b")
        ka = next(k for k in (b"e%d" % i for i in range(100)) if owned("a", k))
        ws = [subprocess.Popen([sys.executable, "-c", INCR_COUNTING, cluster.grids["b"], ka.decode(), "6",
                                str(tmp_path / f"n{i}")]) for i in range(2)]
        for w in ws:
            assert w.wait(60) == 0
        proxy.heal()
        acked = unknown = 0
        for i in range(2):
            a, u = map(int, (tmp_path / f"n{i}").read_text().split())
            acked, unknown = acked + a, unknown + u
        with shmgrid.Grid.attach(cluster.grids["a"]) as ga:
            total = struct.unpack("<q", ga.map("users")[ka])[0]
        assert acked > 0 and proxy.cuts > 0
        assert acked <= total <= acked + unknown, (acked, unknown, total)
        assert _counter(cluster, "b", "remote_writes_resent_total") > 0, cluster.log("b")
    finally:
        proxy.close()


@pytest.mark.timeout(120)
def test_a_recreated_owner_grid_is_followed_not_ignored(cluster):
    """a's grid is removed and created again: its versions start over,
    below the ones b holds. b forgets a's partitions before the first
    snapshot of the new grid and converges to it exactly; a restarted b
    remembers which grid it follows and forgets nothing."""
    cluster.start("a")
    cluster.start("b")
    mine = [k for k in (b"g%d" % i for i in range(400)) if owned("a", k)]
    with shmgrid.Grid.attach(cluster.grids["a"]) as ga, shmgrid.Grid.attach(cluster.grids["b"]) as gb:
        A = ga.map("users")
        for r in range(5):
            for k in mine:
                A[k] = b"old-%d" % r
        for k in mine[:20]:
            del A[k]  # tombstones with high versions on b
        gb.map("users")[next(k for k in (b"h%d" % i for i in range(100)) if owned("b", k))] = b"b's own"
        wait_converged(ga, gb)
    cluster.stop("a")
    shmgrid.Grid.unlink(cluster.grids["a"])
    cluster.start("a")  # creates the grid again: versions from 1
    with shmgrid.Grid.attach(cluster.grids["a"]) as ga, shmgrid.Grid.attach(cluster.grids["b"]) as gb:
        A = ga.map("users")
        for k in mine[:10] + mine[30:40]:
            A[k] = b"new"
        state = wait_converged(ga, gb)
        assert {k for k in state if owned("a", k)} == set(mine[:10] + mine[30:40])
        assert all(state[k] == (b"new", 1) for k in mine[:10] + mine[30:40])
        assert any(not owned("a", k) for k in state)  # b's own partitions came back to a's new grid
        assert "forgot the" in cluster.log("b")
        resets = _counter(cluster, "b", "partition_resets_total")
        cluster.stop("b")
        cluster.start("b")
        for k in mine[:10]:
            A[k] = b"newer"
        state = wait_converged(ga, gb)
        assert all(state[k] == (b"newer", 2) for k in mine[:10])
        assert _counter(cluster, "b", "partition_resets_total") == 0, resets


@pytest.mark.timeout(60)
def test_an_owner_that_stops_answering_leaves_the_outcome_unknown(cluster):
    """The request reached a's socket, but a is frozen past the timeout:
    the caller is told the write may or may not have been applied, and
    indeed a applies it once it runs again."""
    cluster.start("a")
    cluster.start("b")
    with shmgrid.Grid.attach(cluster.grids["a"]) as ga, shmgrid.Grid.attach(cluster.grids["b"]) as gb:
        ka = next(k for k in (b"u%d" % i for i in range(100)) if owned("a", k))
        gb.map("users").put(ka, b"before")  # the link is up
        cluster.procs["a"].send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(shmgrid.RemoteUnavailable, match="may or may not have been applied"):
                gb.map("users").put(ka, b"during")
        finally:
            cluster.procs["a"].send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while ga.map("users").get(ka) != b"during":
            assert time.monotonic() < deadline, ga.map("users").get(ka)
            time.sleep(0.05)
        wait_converged(ga, gb)


@pytest.mark.timeout(90)
def test_a_retry_through_a_restarted_bridge_never_claims_nothing_was_applied(cluster):
    """b's bridge forwards a write to a, which is frozen; b's bridge is
    killed and started again, and the client sends the request again to
    it. The new bridge cannot reach a in time, but it must not say that
    nothing was applied: the first attempt is in a's socket, and a applies
    it once it runs."""
    import threading

    cluster.start("a")
    cluster.start("b")
    ka = next(k for k in (b"n%d" % i for i in range(100)) if owned("a", k))
    with shmgrid.Grid.attach(cluster.grids["a"]) as ga, shmgrid.Grid.attach(cluster.grids["b"]) as gb:
        gb.map("users").put(ka, b"before")  # the link is up
        cluster.procs["a"].send_signal(signal.SIGSTOP)
        out = {}

        def writer():
            try:
                out["ok"] = gb.map("users").put(ka, b"during")
            except shmgrid.RemoteUnavailable as e:
                out["err"] = str(e)

        t = threading.Thread(target=writer)
        try:
            t.start()
            time.sleep(0.4)  # the WRITE is in a's socket buffer
            cluster.stop("b", signal.SIGKILL)
            cluster.start("b")
            t.join(30)
        finally:
            cluster.procs["a"].send_signal(signal.SIGCONT)
        assert "may or may not" in out.get("err", ""), out
        wait_for(lambda: ga.map("users").get(ka) == b"during", 10, "a to apply it")


@pytest.mark.timeout(150)
def test_a_partition_that_moves_away_and_back_converges(cluster, tmp_path):
    """Every partition owned by b, then by a, then by b again, on the same
    grids. While a owned them, a local write on a was not shipped; once b
    owns them again, a must forget it (its record of which grid it follows
    was reset when it owned them itself) and take b's data."""
    def config(owner):
        for h in "ab":
            write_config(tmp_path / f"{h}.toml", h, cluster.grids, cluster.ports, cluster.mports,
                         extra="owners = [%s]" % ", ".join([f'"{owner}"'] * PARTS))

    k = b"flip"
    config("b")
    cluster.start("a")
    cluster.start("b")
    with shmgrid.Grid.attach(cluster.grids["a"]) as ga, shmgrid.Grid.attach(cluster.grids["b"]) as gb:
        A, B = ga.map("users"), gb.map("users")
        B[k] = b"v1-by-b"
        wait_for(lambda: A.get_versioned(k) == (b"v1-by-b", 1), 15, "phase 1")
        cluster.stop("a")
        cluster.stop("b")
        config("a")  # a owns everything
        cluster.start("a")
        cluster.start("b")
        cluster.stop("a")
        A[k] = b"v2-by-a-unshipped"  # a's bridge is down: b never gets it
        cluster.stop("b")
        config("b")  # b owns everything again
        cluster.start("a")
        cluster.start("b")
        wait_for(lambda: A.get_versioned(k) == (b"v1-by-b", 1), 15, "a to go back to b's data")
        B[k] = b"v2-by-b"
        wait_for(lambda: A.get_versioned(k) == (b"v2-by-b", 2), 15, "a to follow b")


@pytest.mark.timeout(60)
def test_the_owner_bridge_repairs_a_damaged_mirror_descriptor(tmp_path, monkeypatch):
    """a's descriptor is damaged (its partition count zeroed): every write
    to the map on a is refused in C and goes to a's bridge, which must set
    the descriptor again and apply, never call its own socket."""
    import mmap

    monkeypatch.setattr(sys.modules[__name__], "PARTS", 4099)  # a count easy to find in the segment
    c = Cluster(tmp_path)
    try:
        c.start("a")
        c.start("b")
        pattern = struct.pack("<II", 4099, 0) + b"\x55" * 64  # a's descriptor: a owns the even partitions
        with open(f"/dev/shm/{c.grids['a']}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            i = mm.find(pattern)
            assert i >= 0 and mm.find(pattern, i + 1) < 0
            mm[i:i + 4] = b"\0\0\0\0"
        ka = next(k for k in (b"d%d" % i for i in range(1000)) if owned("a", k))
        with shmgrid.Grid.attach(c.grids["a"]) as ga, shmgrid.Grid.attach(c.grids["b"]) as gb:
            t0 = time.monotonic()
            v = gb.map("users").put(ka, b"from-b")  # through a's bridge, which repairs and applies
            assert ga.map("users").get_versioned(ka) == (b"from-b", v)
            assert time.monotonic() - t0 < 5
            ga.map("users").put(ka, b"local")  # and the repaired descriptor lets a's own writes in again
        assert "descriptor was damaged" in c.log("a")
        assert c.status("a")["host"] == "a"  # its loop still answers
    finally:
        c.close()


def _bridge(tmp_path, **cfg):
    from shmgrid.bridge.config import parse

    (tmp_path / "k").write_bytes(b"s" * 20)
    base = {"name": "a", "grid": "g", "secret_file": "k", "hosts": {"a": "127.0.0.1:1", "b": "127.0.0.1:2"},
            "maps": {"m": {"partitions": 2}}, **cfg}
    return daemon.Bridge(parse(base, str(tmp_path / "c.toml")))


def test_remembered_answers_are_capped_by_bytes_and_kept_by_age(tmp_path, monkeypatch):
    """README: answers kept at least two minutes (longer with a larger
    timeout) and up to DEDUP_BYTES; past the cap the oldest go first, and
    the early forgetting is counted."""
    b = _bridge(tmp_path, timeout=20.0)
    assert b._dedup_seconds >= 120 and b._dedup_seconds >= 2 * 20 + 10
    monkeypatch.setattr(daemon, "DEDUP_BYTES", 10_000)
    for i in range(100):
        b._remember("id%03d" % i, {"ok": True, "version": i})
    assert "id099" in b._done and "id000" not in b._done
    assert b._done_bytes <= 10_000 and len(b._done) == b._done_bytes // (200 + 5)
    assert b.metrics.c["remote_write_ids_forgotten_early_total"] == 100 - len(b._done)
    assert b._apply_owned("b", {"id": "id099", "map": "m", "op": "put"}) == {"ok": True, "version": 99}
    b._pool.shutdown()


def test_warnings_are_throttled_per_kind(caplog):
    """README: at most 10 lines per 10 s per kind, then one line saying how
    many were left out."""
    t = daemon._Throttle(burst=10, period=10.0)
    with caplog.at_level("WARNING", logger="shmgrid.bridge"):
        for i in range(50):
            t.warning("flood", "bad peer %d", i)
        t.warning("other", "another kind")
        t.state["flood"][0] -= 11  # the window has passed
        t.warning("flood", "after")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:10] == ["bad peer %d" % i for i in range(10)]
    assert lines[10] == "another kind"
    assert "40 more flood messages were not logged" in lines[11] and lines[12] == "after"
