"""The bridge daemon: one per host, attached to the host's grid.

For every mirrored map, the owner of a partition ships the state of each
key that changes in it, and a full snapshot when a mirror (re)connects or
when its change feed overflowed; mirrors apply only what is newer
(shmgrid.mirror). Mirrors dial owners: a mirror host keeps one
authenticated connection to each host that owns partitions it mirrors, and
reconnects with backoff. Records travel in buffers built and applied in C.

Writes to partitions owned elsewhere come from local processes over a
Unix socket (shmgrid.remote), go to the owner on the same connection the
mirror follows it on, are applied there with the ordinary map operation,
and are answered once the local mirror holds the resulting version.

Optional mutual TLS between bridges ([tls] in the config); the HMAC
handshake runs inside it either way.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from .. import mirror
from .._core import ffi, lib
from ..errors import InvalidArgument, RemoteUnavailable, ShmgridError
from ..remote import RETRY_SECONDS, b64, grid_path, peer_cred, socket_address, unb64
from ..grid import Grid
from .config import Config
from .protocol import (MAX_FRAME, T, Link, ProtocolError, client_handshake, encode, records_payload,
                       server_handshake, split_records)

__all__ = ["Bridge", "run"]

log = logging.getLogger("shmgrid.bridge")
MAX_UNAUTHENTICATED = 64  # connections in the handshake at once
STATE_MAP = "_shmgrid.bridge"  # per partition: the owner's grid whose data this host holds
DEDUP_BYTES = 64 << 20  # the most an owner keeps of remote-write results, for retries


class Metrics:
    """Counters, exposed in Prometheus text format (and as JSON by /status)."""

    def __init__(self) -> None:
        self.c: Dict[str, float] = {}
        self.peers: Dict[str, Dict[str, Any]] = {}

    @staticmethod
    def _key(name: str, labels: Dict[str, str]) -> str:
        return name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")

    def add(self, name: str, n: float = 1, **labels: str) -> None:
        key = self._key(name, labels)
        self.c[key] = self.c.get(key, 0) + n

    def set(self, name: str, v: float, **labels: str) -> None:
        self.c[self._key(name, labels)] = v

    def prometheus(self, extra: Optional[Dict[str, float]] = None) -> str:
        lines = []
        for key, v in sorted({**self.c, **(extra or {})}.items()):
            lines.append(f"shmgrid_bridge_{key} {v:g}")
        return "\n".join(lines) + "\n"


class _Throttle:
    """At most ``burst`` log lines per ``period`` seconds per kind: a flood
    of bad connections must not fill the disk. The next line after a quiet
    spell says how many were left out."""

    def __init__(self, burst: int = 10, period: float = 10.0) -> None:
        self.burst, self.period = burst, period
        self.state: Dict[str, List[float]] = {}  # kind -> [window start, lines in it, suppressed]

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        st = self.state.setdefault(kind, [now, 0, 0])
        if now - st[0] >= self.period:
            if st[2]:
                log.warning("%d more %s messages were not logged in the last %.0f s", st[2], kind, now - st[0])
            st[:] = [now, 0, 0]
        if st[1] < self.burst:
            st[1] += 1
            log.warning(msg, *args)
        else:
            st[2] += 1


class _Pending:
    """A remote write awaiting its owner's answer."""

    __slots__ = ("owner", "frame", "reply", "sent", "waiters")

    def __init__(self, owner: str, frame: bytes, reply: "asyncio.Future[Dict[str, Any]]") -> None:
        self.owner, self.frame, self.reply = owner, frame, reply  # frame: the WRITE payload, id included
        self.sent = False  # went out on a link at least once: the owner may have applied it
        self.waiters = 0  # local callers awaiting it (a caller's retry joins the first attempt)


class Bridge:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.maps: Dict[str, Any] = {}
        self.grid: Optional[Grid] = None
        self._stop = asyncio.Event()
        # a shipping stream parks a thread in its feed wait (up to 0.2 s):
        # one per (mirror, map) at most, plus room for snapshots and prunes
        streams = len(cfg.peers) * len(cfg.maps)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16 + 2 * streams,
                                                           thread_name_prefix="bridge-feed")
        self._owner_links: Dict[str, Link] = {}  # owners we follow, while connected
        self._sessions: Dict[str, Link] = {}  # mirrors we serve: the latest session of each
        self._throttle = _Throttle()
        self._heard: Dict[str, float] = {}  # owner -> when we last had a frame from it
        self._applied: Dict[str, asyncio.Event] = {}  # per map: set when a buffer of records was applied (run())
        self._unauthenticated = 0  # connections still in the handshake
        # per map: set after a remote write is applied here, so that its
        # record ships without the batching delay (the writer waits for it)
        self._urgent = {n: threading.Event() for n in cfg.maps}
        # remote writes awaiting their owner, by request id: (owner, request,
        # its reply); sent again on every reconnect until answered
        self._pending: Dict[str, Any] = {}
        # owner side: the results of recent remote writes by request id, so
        # that a request sent again (after a reconnect) is not applied twice
        self._done: "OrderedDict[str, Tuple[float, Dict[str, Any], int]]" = OrderedDict()
        self._done_bytes = 0
        # how long a request id can come back: the caller's wait on the
        # first attempt, its client's resends (shmgrid.remote) each waited
        # for as long again, and a margin for reconnects
        self._dedup_seconds = max(120.0, 3 * cfg.timeout + RETRY_SECONDS + 60.0)
        # where we are in each owner's change feed, per map: {"feed": its
        # identity, "cursor": position}; a reconnect resumes there
        self._resume: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self._feed_id = ""
        self._masks: Dict[str, Dict[str, mirror.PartitionMask]] = {}  # owner -> map -> its partitions
        for h in cfg.hosts:
            self._masks[h] = {n: mirror.PartitionMask(mc.partitions, mc.owned_by(h)) for n, mc in cfg.maps.items()}

    def stop(self) -> None:
        self._stop.set()

    def _tls(self, server: bool) -> Optional[ssl.SSLContext]:
        """Mutual TLS between bridges, if configured: both sides present a
        certificate signed by the cluster's CA (host names are not checked:
        the HMAC handshake inside the channel names the peer)."""
        if not self.cfg.tls:
            return None
        cert, key, ca = self.cfg.tls
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.load_cert_chain(cert, key)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    # ---- lifecycle ----------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        self.grid = Grid.open(cfg.grid, size=cfg.grid_size)
        # feed positions are meaningful only for this very grid: a grid
        # created again starts its feeds from 0
        self._feed_id = f"{cfg.name}:{self.grid.info()['created_ns']}"
        for n, mc in cfg.maps.items():
            # raw: the bridge moves bytes, whatever dtypes a typed map has
            self.maps[n] = self.grid.map(n, capacity=mc.capacity, max_key=mc.max_key, max_value=mc.max_value).raw()
        self._applied = {n: asyncio.Event() for n in cfg.maps}  # here: in the loop (Python 3.9 binds one)
        self._state = self.grid.map(STATE_MAP, capacity=1024, max_key=256, max_value=256)
        for n in cfg.maps:  # partitions owned here hold this grid's own data (see _adopt)
            for p in self._masks[cfg.name][n].members:
                self._state.put(n.encode() + b"/%d" % p, self._feed_id.encode())
        for n, mc in cfg.maps.items():  # writes to other hosts' partitions now come through us
            rc = lib.sg_map_set_mirror(self.maps[n]._h, mc.partitions, self._masks[cfg.name][n].c)
            if rc:
                from ..errors import raise_for
                raise_for(rc)
        host, port = cfg.listen
        tls = self._tls(True)
        server = await asyncio.start_server(self._serve, host, port, ssl=tls,
                                            ssl_handshake_timeout=cfg.timeout if tls else None)
        local = await asyncio.start_unix_server(self._serve_local, path=socket_address(cfg.grid))
        log.info("bridge %s listening on %s:%d, grid %s, maps %s", cfg.name, host, port, cfg.grid,
                 ", ".join(cfg.maps))
        tasks = [asyncio.ensure_future(self._mirror_from(p)) for p in cfg.peers
                 if any(self._masks[p][n].members for n in cfg.maps)]
        if cfg.metrics:
            mserver = await asyncio.start_server(self._serve_metrics, *cfg.metrics)
            if not ipaddress.ip_address(socket.gethostbyname(cfg.metrics[0])).is_loopback:
                log.warning("metrics on %s:%d: /metrics and /status answer anyone who can reach them "
                            "(no authentication); bind them to 127.0.0.1 unless a firewall guards them",
                            *cfg.metrics)
        else:
            mserver = None
        try:
            await self._stop.wait()
        finally:
            log.info("bridge %s stopping", cfg.name)
            for t in tasks:
                t.cancel()
            server.close()
            local.close()
            for pw in self._pending.values():
                if not pw.reply.done():
                    pw.reply.set_exception(RemoteUnavailable("the bridge is stopping; the write may or may not have "
                                                      "been applied"))
            if mserver:
                mserver.close()
            # bounded: on Python <= 3.11 a wait_for may swallow a cancel
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.grid.close()

    # ---- owner side: serve a mirror -------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.cfg
        addr = writer.get_extra_info("peername")
        peer = None
        link: Optional[Link] = None
        tasks: List[asyncio.Future] = []
        if self._unauthenticated >= MAX_UNAUTHENTICATED:
            # a flood of connections that never authenticate must not use up
            # our file descriptors: the real peers retry with backoff
            self.metrics.add("rejected_connections_total")
            writer.close()
            return
        self._unauthenticated += 1
        try:
            try:
                peer, link = await server_handshake(reader, writer, cfg.secret, cfg.name, cfg.timeout)
            finally:
                self._unauthenticated -= 1
            if peer not in cfg.hosts or peer == cfg.name:
                raise ProtocolError(f"authenticated peer calls itself {peer!r}, which is not another host of the "
                                    "configuration")
            kind, payload = await asyncio.wait_for(link.recv(), cfg.timeout)
            if kind != T.SUBSCRIBE:
                raise ProtocolError(f"expected SUBSCRIBE, got frame type {kind}")
            wanted = json.loads(payload)["maps"]
            for name, spec in wanted.items():
                mc = cfg.maps.get(name)
                mine = self._masks[cfg.name].get(name)
                if mc is None or mine is None or spec.get("partitions") != mc.partitions or \
                        sorted(spec.get("owned", [])) != sorted(mine.members) or \
                        (spec.get("max_key"), spec.get("max_value")) != (mc.max_key, mc.max_value):
                    msg = (f"map {name!r}: the mirror's configuration disagrees with ours (partitions, owners, "
                           "max_key or max_value)")
                    link.send(T.ERROR, msg.encode())
                    raise ProtocolError(msg)
            log.info("mirror %s connected from %s for %s", peer, addr, ", ".join(wanted))
            self.metrics.add("mirror_connections_total", peer=peer)
            old = self._sessions.get(peer)
            if old is not None:  # its older session is over: no stale write of it may land later
                old.close()
            self._sessions[peer] = link
            for name, spec in wanted.items():
                tasks.append(asyncio.ensure_future(self._ship(peer, name, link, spec.get("resume"))))
            tasks.append(asyncio.ensure_future(self._heartbeat(link)))

            def died(t: "asyncio.Future[Any]") -> None:  # a shipping task must not die unnoticed
                if not t.cancelled() and t.exception() is not None:
                    log.error("shipping to %s failed: %r; dropping the connection", peer, t.exception())
                    writer.close()

            for t in tasks:
                t.add_done_callback(died)
            while True:  # then remote writes and heartbeats, until it goes away or falls silent
                kind, payload = await asyncio.wait_for(link.recv(), cfg.timeout * 3)
                if kind == T.HEARTBEAT:
                    continue
                if kind != T.WRITE:
                    raise ProtocolError(f"unexpected frame type {kind} from mirror {peer}")
                req = json.loads(payload)
                if not isinstance(req, dict) or not isinstance(req.get("id"), str):
                    raise ProtocolError(f"a WRITE from mirror {peer} without a request id")
                result = {**self._apply_owned(peer, req), "id": req["id"]}
                link.send_json(T.WRITE_RESULT, result)
                await link.drain()
        except (ProtocolError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.metrics.add("rejected_connections_total")
            self._throttle.warning("rejected-connection", "connection from %s (%s) rejected: %s", addr,
                                   peer or "unauthenticated", e)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as e:
            if peer is not None and isinstance(e, asyncio.IncompleteReadError) and not e.partial:
                log.info("mirror %s disconnected", peer)
            elif peer is None:  # gone or silent before proving it holds the secret
                self.metrics.add("rejected_connections_total")
                self._throttle.warning("rejected-connection", "connection from %s rejected: %s during the handshake",
                                       addr, type(e).__name__)
            else:
                log.info("connection from %s (%s) closed: %s", addr, peer, type(e).__name__)
        finally:
            if peer is not None and link is not None and self._sessions.get(peer) is link:
                del self._sessions[peer]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()

    async def _heartbeat(self, link: Link) -> None:
        while True:
            await asyncio.sleep(self.cfg.timeout / 3)
            link.send(T.HEARTBEAT)
            await link.drain()

    async def _send(self, link: Link, kind: int, payload: bytes, peer: str, name: str) -> None:
        n = link.send(kind, payload)
        if kind == T.RECORDS:
            self.metrics.add("bytes_shipped_total", n, peer=peer, map=name)
        await link.drain()

    async def _snapshot(self, peer: str, name: str, mask: mirror.PartitionMask, link: Link,
                        stream: mirror.ChangeStream) -> None:
        loop = asyncio.get_running_loop()
        m = self.maps[name]
        cursor = stream.cursor()  # the stream re-sends everything from here on
        # the feed identity names this grid's incarnation: a mirror that
        # holds another's data of these partitions forgets it first
        await self._send(link, T.SNAP_BEGIN, encode({"map": name, "feed": self._feed_id}), peer, name)
        gen = mirror.snapshot(m, mask)
        while True:
            chunk = await loop.run_in_executor(self._pool, next, gen, None)
            if chunk is None:
                break
            await self._send(link, T.RECORDS, records_payload(name, chunk, time.time(), cursor), peer, name)
        floor = lib.sg_map_version_floor(m._h)
        end = {"map": name, "floor": floor, "feed": self._feed_id, "cursor": cursor}
        await self._send(link, T.SNAP_END, encode(end), peer, name)
        self.metrics.add("snapshots_sent_total", peer=peer, map=name)

    async def _ship(self, peer: str, name: str, link: Link, resume: Optional[Dict[str, Any]]) -> None:
        """Ship map ``name``'s partitions owned here to ``peer``: resume the
        change stream where the mirror left it if our feed still holds that
        position, else a snapshot, then the stream (opened first, so
        nothing falls between)."""
        loop = asyncio.get_running_loop()
        mask = self._masks[self.cfg.name][name]
        stream = mirror.ChangeStream(self.maps[name], mask)
        if resume and resume.get("feed") == self._feed_id and stream.seek(int(resume.get("cursor", -1)) % 2**64):
            # if the feed overwrote changes since, next() reports them lost
            # and a snapshot follows
            self.metrics.add("resumes_total", peer=peer, map=name)
            log.info("map %s: %s resumes at feed position %s", name, peer, resume.get("cursor"))
        else:
            await self._snapshot(peer, name, mask, link, stream)
        urgent = self._urgent[name]
        while True:
            before = stream.cursor()
            recs, lost = await loop.run_in_executor(self._pool, stream.next_batch, 0.2, 0.0005, 64 << 10, urgent)
            if recs:
                # with a loss, the resume point stays where it was: a mirror
                # reconnecting before the snapshot below must not skip it
                cursor = before if lost else stream.cursor()
                await self._send(link, T.RECORDS, records_payload(name, recs, time.time(), cursor), peer, name)
                self.metrics.set("send_queue_bytes", link.buffered(), peer=peer)
            if lost:
                log.info("map %s: %d changes gone from the feed before %s had them: sending a snapshot", name,
                         lost, peer)
                self.metrics.add("resyncs_total", peer=peer, map=name)
                await self._snapshot(peer, name, mask, link, stream)

    # ---- mirror side: follow an owner -------------------------------------------------

    async def _mirror_from(self, owner: str) -> None:
        cfg = self.cfg
        host, port = cfg.hosts[owner]
        backoff = 0.05
        masks = {n: mk for n, mk in self._masks[owner].items() if mk.members}
        while True:
            writer = None
            link: Optional[Link] = None
            since = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=self._tls(False)),
                                                        cfg.timeout)
                _, link = await client_handshake(reader, writer, cfg.secret, cfg.name, cfg.timeout, expect=owner)
                where = self._resume.setdefault(owner, {})
                sub = {n: {"partitions": mk.partitions, "owned": sorted(mk.members), "resume": where.get(n),
                           "max_key": cfg.maps[n].max_key, "max_value": cfg.maps[n].max_value}
                       for n, mk in masks.items()}
                link.send_json(T.SUBSCRIBE, {"maps": sub})
                # from here on new remote writes go out on this link; the
                # ones unanswered on a broken link go again, with their ids,
                # which the owner answers only once (no await in between)
                self._owner_links[owner] = link
                for rid, pw in self._pending.items():
                    if pw.owner == owner:
                        link.send(T.WRITE, pw.frame)
                        if pw.sent:
                            self.metrics.add("remote_writes_resent_total", peer=owner)
                        pw.sent = True
                await link.drain()
                self.metrics.peers[owner] = {"connected": True, "since": time.time()}
                log.info("following %s at %s:%d for %s", owner, host, port, ", ".join(masks))
                beat = asyncio.ensure_future(self._heartbeat(link))  # so the owner can tell we are alive
                try:
                    await self._follow(owner, link, masks)
                finally:
                    beat.cancel()
            except asyncio.CancelledError:
                raise
            except (ProtocolError, InvalidArgument) as e:
                self.metrics.add("rejected_connections_total")  # as the accepting side counts them
                self._throttle.warning(f"owner-{owner}", "owner %s: %s", owner, e)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                log.info("owner %s unreachable or gone: %s", owner, type(e).__name__)
            except Exception:  # a bug: say so, and keep following
                log.exception("following owner %s failed", owner)
            finally:
                if link is not None and self._owner_links.get(owner) is link:
                    del self._owner_links[owner]
                if writer is not None:
                    writer.close()
            self.metrics.peers[owner] = {"connected": False, "since": time.time()}
            self.metrics.add("reconnects_total", peer=owner)
            # back off from a link that fails again and again, even after
            # a handshake: only a connection that lasted resets the delay
            if time.monotonic() - since >= cfg.timeout:
                backoff = 0.05
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _follow(self, owner: str, link: Link, masks: Dict[str, mirror.PartitionMask]) -> None:
        snap: Dict[str, mirror.SeenKeys] = {}  # maps in a snapshot: the keys it has carried so far
        while True:
            kind, payload = await asyncio.wait_for(link.recv(), self.cfg.timeout * 2)
            self._heard[owner] = time.time()
            if kind == T.HEARTBEAT:
                continue
            if kind == T.RECORDS:
                name, sent, cursor, recs = split_records(payload)
                if name not in masks:
                    raise ProtocolError(f"records for map {name!r}, which {owner} does not ship to us")
                n, applied = mirror.apply_records(self.maps[name], recs, masks[name], snap.get(name))
                self._applied[name].set()  # remote writes waiting to see their version here
                where = self._resume.get(owner, {}).get(name)
                if where is not None and name not in snap:
                    where["cursor"] = cursor  # all applied: a reconnect may resume here
                lag = max(0.0, time.time() - sent)  # the owner's clock against ours: exact on one machine
                self.metrics.add("records_received_total", n, peer=owner, map=name)
                self.metrics.add("records_applied_total", applied, peer=owner, map=name)
                self.metrics.add("bytes_received_total", len(payload), peer=owner, map=name)
                self.metrics.set("replication_lag_seconds", lag, peer=owner, map=name)
                self.metrics.add("replication_lag_seconds_sum", lag, peer=owner, map=name)
                self.metrics.add("replication_lag_seconds_count", 1, peer=owner, map=name)
            elif kind == T.SNAP_BEGIN:
                begin = json.loads(payload)
                name = begin["map"]
                if name not in masks:
                    raise ProtocolError(f"a snapshot of map {name!r}, which {owner} does not ship to us")
                self._resume.get(owner, {}).pop(name, None)  # a broken snapshot cannot be resumed
                await self._adopt(owner, name, masks[name], str(begin["feed"]))
                snap[name] = mirror.SeenKeys()
            elif kind == T.SNAP_END:
                end = json.loads(payload)
                name = end["map"]
                if name not in snap:
                    raise ProtocolError(f"the end of a snapshot of map {name!r} that did not begin")
                await self._prune(name, masks[name], snap.pop(name), int(end["floor"]))
                self._resume.setdefault(owner, {})[name] = {"feed": end["feed"], "cursor": int(end["cursor"])}
            elif kind == T.WRITE_RESULT:
                res = json.loads(payload)
                pw = self._pending.get(str(res.pop("id")))
                if pw is not None and not pw.reply.done():
                    pw.reply.set_result(res)
            elif kind == T.ERROR:
                raise ProtocolError(f"{owner} refused us: {payload.decode('utf-8', 'replace')}")
            else:
                raise ProtocolError(f"unexpected frame type {kind} from {owner}")

    async def _adopt(self, owner: str, name: str, mask: mirror.PartitionMask, feed: str) -> None:
        """Before the first snapshot from a grid whose data we do not hold
        for some of these partitions (the first sync, a grid created again
        on the owner host, a partition that moved to another owner):
        forget all we hold of them, tombstones included. The new grid's
        versions may be lower than ours, and applying keeps only what is
        newer, so without this the mirror would never converge. Which grid
        each partition follows is kept in our grid (STATE_MAP), so a
        restarted bridge knows it."""
        ident = feed.encode()
        prefix = name.encode() + b"/"
        stale = [p for p in sorted(mask.members) if self._state.get(prefix + b"%d" % p) != ident]
        if not stale:
            return
        m = self.maps[name]
        gone = await asyncio.get_running_loop().run_in_executor(
            self._pool, mirror.reset_partitions, m, mirror.PartitionMask(mask.partitions, stale))
        for p in stale:  # after the reset: a crash before this only repeats it
            self._state.put(prefix + b"%d" % p, ident)
        self.metrics.add("partition_resets_total", len(stale), peer=owner, map=name)
        if gone:
            log.warning("map %s: %s serves %d partitions from grid %s, which we did not follow before: "
                        "forgot the %d keys we held of them", name, owner, len(stale), feed, gone)

    async def _prune(self, name: str, mask: mirror.PartitionMask, seen: mirror.SeenKeys, floor: int) -> None:
        """After a snapshot: keys we hold in its partitions that it did not
        carry had their tombstones dropped by a migration on the owner
        (mirror.prune; in C, off the event loop)."""
        gone = await asyncio.get_running_loop().run_in_executor(
            self._pool, mirror.prune, self.maps[name], mask, seen, floor)
        if gone:
            log.info("map %s: %d keys deleted on the owner while we were away", name, gone)

    # ---- remote writes ----------------------------------------------------------------

    def _may_write(self, writer: asyncio.StreamWriter) -> bool:
        """Whether the connected local process could write the grid itself:
        the socket is in the abstract namespace, which has no permissions,
        so the peer's credentials are checked against the grid's mode."""
        sock = writer.get_extra_info("socket")
        try:
            _, uid, gid = peer_cred(sock)
            st = os.stat(grid_path(self.cfg.grid))
        except OSError:
            return False
        return (uid == 0 or uid == st.st_uid and st.st_mode & 0o200 or gid == st.st_gid and st.st_mode & 0o020
                or st.st_mode & 0o002) != 0

    async def _serve_local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A local process's requests (shmgrid.remote), one at a time."""
        if not self._may_write(writer):
            self.metrics.add("rejected_local_clients_total")
            log.warning("local client refused: it may not write grid %s", self.cfg.grid)
            writer.close()
            return
        try:
            while True:
                (n,) = struct.unpack("<I", await reader.readexactly(4))
                if n > 64 << 20:
                    raise ProtocolError(f"local request of {n} bytes")
                req = json.loads(await reader.readexactly(n))
                t0 = time.monotonic()
                try:
                    reply = await self._remote_write(req)
                except RemoteUnavailable as e:
                    reply = {"error": "RemoteUnavailable", "message": str(e)}
                self.metrics.add("remote_writes_total", op=str(req.get("op")))
                self.metrics.add("remote_write_seconds_total", time.monotonic() - t0)
                body = json.dumps(reply).encode()
                writer.write(struct.pack("<I", len(body)) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except (ProtocolError, ValueError, KeyError) as e:
            log.warning("local client sent a bad request: %s", e)
        finally:
            writer.close()

    _OPS = {"put": ("value",), "put_if_absent": ("value",), "replace": ("expected", "value"),
            "compare_and_set": ("expected_version", "value"), "delete": (), "pop": (), "incr": ("delta",),
            "get": ()}

    async def _remote_write(self, req: Dict[str, Any]) -> Dict[str, Any]:
        cfg = self.cfg
        if not isinstance(req, dict) or req.get("op") not in self._OPS or not isinstance(req.get("key"), str) or \
                any(req.get(f) is None for f in self._OPS[req["op"]]):
            return {"error": "InvalidArgument", "message": "malformed request"}
        name = req["map"]
        mc = cfg.maps.get(name)
        if mc is None:
            return {"error": "InvalidArgument", "message": f"map {name!r} is not mirrored by this bridge"}
        key = unb64(req["key"]) or b""
        owner = mc.owners[mirror.partition_of(key, mc.partitions)]
        # the caller's request id, kept across its retries (shmgrid.remote)
        rid = req.pop("rid", None)
        retried = bool(req.pop("retried", False))  # an earlier attempt may have reached the owner
        if not isinstance(rid, str) or not 16 <= len(rid) <= 64:
            rid = os.urandom(16).hex()
        if owner == cfg.name:
            return self._apply_owned(cfg.name, {**req, "id": rid})
        deadline = time.monotonic() + cfg.timeout
        pw = self._pending.get(rid)
        if pw is None:  # (else: the caller's retry of a request still under way)
            frame = encode({**req, "id": rid})
            # a frame the owner would refuse as oversized would cost the
            # link on every resend
            if len(frame) > MAX_FRAME - 4096:
                return {"error": "InvalidArgument", "message": "the request is too large for a bridge frame "
                        f"({MAX_FRAME >> 20} MiB, base64 included)"}
            pw = self._pending[rid] = _Pending(owner, frame, asyncio.get_running_loop().create_future())
            pw.sent = retried
            link = self._owner_links.get(owner)
            if link is not None:  # else it goes out when the link is up again
                link.send(T.WRITE, frame)
                pw.sent = True
        pw.waiters += 1
        try:
            res = await asyncio.wait_for(asyncio.shield(pw.reply), cfg.timeout)
        except asyncio.TimeoutError:
            if pw.sent:
                raise RemoteUnavailable(f"owner {owner} did not answer within {cfg.timeout:g} s; the write may or "
                                        "may not have been applied there") from None
            raise RemoteUnavailable(f"owner {owner} of the key's partition is unreachable (no connection for "
                                    f"{cfg.timeout:g} s); nothing was applied") from None
        finally:
            pw.waiters -= 1
            if pw.waiters == 0 and self._pending.get(rid) is pw:
                # in the same step as the caller's answer: a request never
                # sent is never sent later, so "nothing was applied" holds
                del self._pending[rid]
        want = res.get("version", 0)
        if want and "error" not in res:  # read-your-writes: wait for our mirror to hold it
            m = self.maps[name]
            ver = ffi.new("uint64_t *")
            applied = self._applied[name]
            while True:
                lib.sg_map_get(m._h, key, len(key), ffi.NULL, 0, ver)
                left = deadline + cfg.timeout - time.monotonic()
                if ver[0] >= want or left <= 0:
                    break
                # woken by the next buffer applied to this map (a sleep would
                # cost a whole millisecond: the event loop's timer grain)
                applied.clear()
                try:
                    await asyncio.wait_for(applied.wait(), left)
                except asyncio.TimeoutError:
                    pass
        return res

    def _apply_owned(self, peer: str, req: Dict[str, Any]) -> Dict[str, Any]:
        """Apply a remote write on a key whose partition is owned here, at
        most once per request id: a request sent again (the mirror's link
        broke before the answer came back) gets the first answer. A
        malformed request gets an error reply; it never costs the link."""
        rid = req.get("id") if isinstance(req, dict) else None
        if isinstance(rid, str):
            hit = self._done.get(rid)
            if hit is not None:
                self.metrics.add("remote_writes_deduplicated_total", peer=peer)
                return dict(hit[1])
        try:
            res = self._apply_owned_checked(peer, req)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            res = {"error": "InvalidArgument", "message": f"malformed request: {type(e).__name__}: {e}"}
        finally:  # ship the change without the batching delay: the writer waits for it
            ev = self._urgent.get(str(req.get("map")) if isinstance(req, dict) else "")
            if ev is not None:
                ev.set()
        if isinstance(rid, str) and req.get("op") != "get":
            self._remember(rid, res)
        return res

    def _remember(self, rid: str, res: Dict[str, Any]) -> None:
        now = time.monotonic()
        done = self._done
        size = 200 + len(rid) + len(str(res.get("value") or ""))
        done[rid] = (now, dict(res), size)
        self._done_bytes += size
        while done:
            t, _, n = next(iter(done.values()))
            young = now - t <= self._dedup_seconds
            if young and self._done_bytes <= DEDUP_BYTES:
                break
            if young:
                self.metrics.add("remote_write_ids_forgotten_early_total")
                self._throttle.warning("dedup", "remote-write results past %d MiB: forgetting some younger "
                                       "than %.0f s; a retry of those could apply twice", DEDUP_BYTES >> 20,
                                       self._dedup_seconds)
            done.popitem(last=False)
            self._done_bytes -= n

    def _apply_owned_checked(self, peer: str, req: Dict[str, Any]) -> Dict[str, Any]:
        if not isinstance(req, dict):
            raise TypeError("a request is a JSON object")
        name, op = req.get("map"), req.get("op")
        mc = self.cfg.maps.get(str(name))
        key = unb64(req.get("key")) or b""
        if mc is None or mc.owners[mirror.partition_of(key, mc.partitions)] != self.cfg.name:
            return {"error": "RemoteUnavailable", "message": f"{self.cfg.name} does not own that key of {name!r}"}
        m = self.maps[str(name)]
        if lib.sg_map_is_remote(m._h, key, len(key)):
            # our descriptor says elsewhere (damaged): set it again rather
            # than let the Map call below go through the bridge, i.e. us
            lib.sg_map_set_mirror(m._h, mc.partitions, self._masks[self.cfg.name][str(name)].c)
            if lib.sg_map_is_remote(m._h, key, len(key)):
                return {"error": "CorruptSegment", "message": f"map {name!r}: cannot repair its mirror descriptor"}
            log.warning("map %s: its mirror descriptor was damaged; set it again", name)
        value, expected = unb64(req.get("value")), unb64(req.get("expected"))
        try:
            if op == "put":
                return {"ok": True, "version": m.put(key, value)}
            if op == "put_if_absent":
                r: Dict[str, Any] = {"ok": m.put_if_absent(key, value)}
            elif op == "replace":
                r = {"ok": m.replace(key, expected, value)}
            elif op == "compare_and_set":
                v = m.compare_and_set(key, int(req["expected_version"]), value)
                if v is not None:  # the CAS's own version, not a later writer's
                    return {"ok": True, "version": v}
                r = {"ok": False}
            elif op == "delete":
                r = {"ok": m.delete(key)}
            elif op == "pop":
                old = m.pop(key, None)
                r = {"ok": old is not None, "value": b64(old)}
            elif op == "incr":
                r = {"ok": True, "result": m.incr(key, int(req["delta"]))}
            elif op == "get":
                got = m.get_versioned(key)
                return {"ok": got is not None, "value": b64(got[0]) if got else None, "version": 0}
            else:
                return {"error": "InvalidArgument", "message": f"unknown operation {op!r}"}
        except ShmgridError as e:
            return {"error": type(e).__name__, "message": str(e)}
        ver = ffi.new("uint64_t *")
        lib.sg_map_get(m._h, key, len(key), ffi.NULL, 0, ver)
        r["version"] = ver[0]
        return r

    # ---- metrics -------------------------------------------------------------------

    def _gauges(self) -> Dict[str, float]:
        """Figures computed when read: how long since each owner we follow
        was last heard from (the lag figure is stamped when records arrive,
        so it stands still while an owner is away; this one grows)."""
        now = time.time()
        return {Metrics._key("owner_silence_seconds", {"peer": o}): max(0.0, now - t)
                for o, t in self._heard.items()}

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            path = line.split()[1].decode() if len(line.split()) > 1 else "/"
            if path.startswith("/status"):
                maps = {n: {"partitions": mc.partitions, "owners": list(mc.owners)} for n, mc in self.cfg.maps.items()}
                body = json.dumps({"host": self.cfg.name, "peers": self.metrics.peers, "maps": maps,
                                   "counters": {**self.metrics.c, **self._gauges()}}).encode()
                ctype = b"application/json"
            else:
                body = self.metrics.prometheus(self._gauges()).encode()
                ctype = b"text/plain; version=0.0.4"
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: " +
                         str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (OSError, asyncio.TimeoutError, IndexError):
            pass
        finally:
            writer.close()


def run(cfg: Config) -> int:
    """Run a bridge until SIGTERM or SIGINT."""
    async def main() -> None:
        b = Bridge(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, b.stop)
        await b.run()

    try:
        asyncio.run(main())
    except ShmgridError as e:
        log.error("bridge %s: %s", cfg.name, e)
        return 1
    return 0
