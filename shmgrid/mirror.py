"""Moving a map's state between hosts in buffers of records (the bridge's
data path): snapshot a set of partitions, stream their changes, apply them
on a mirror. Records are built and applied in C, a buffer at a time; Python
only moves the buffers. The wire format is in csrc/shmgrid.h ("mirroring").

A key's partition is ``sg_hash64(key) % partitions``. Applying keeps only
what is newer than the mirror's version of a key, so replays, overlaps
between a snapshot and the change stream, and reconnects are harmless.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Iterator, Optional, Tuple

from ._core import ffi, lib
from ._wait import start, until
from .errors import raise_for

__all__ = ["partition_of", "PartitionMask", "snapshot", "ChangeStream", "apply_records", "reset_partitions",
           "SeenKeys", "prune", "BUFFER_BYTES"]

BUFFER_BYTES = 1 << 20  # records per buffer: up to 1 MiB (at least one record of the largest size)


class _Quiet(Exception):
    """No change within the timeout (ChangeStream.next returns empty)."""


def partition_of(key: bytes, partitions: int) -> int:
    return lib.sg_hash64(key, len(key)) % partitions  # type: ignore[no-any-return]


class PartitionMask:
    """A set of partitions of a map split into ``partitions``, as the C bitmap."""

    def __init__(self, partitions: int, members: Iterable[int]) -> None:
        if not 1 <= partitions <= lib.SG_MAX_PARTITIONS:
            raise ValueError(f"partitions must be 1..{lib.SG_MAX_PARTITIONS}, not {partitions}")
        self.partitions = partitions
        self.members = frozenset(members)
        bits = bytearray((partitions + 7) // 8)
        for p in self.members:
            if not 0 <= p < partitions:
                raise ValueError(f"partition {p} is not in 0..{partitions - 1}")
            bits[p // 8] |= 1 << (p % 8)
        self.c = ffi.new("uint8_t[]", bytes(bits))

    def __contains__(self, p: object) -> bool:
        return p in self.members


def _buffer_size(m: Any) -> int:
    return max(BUFFER_BYTES, lib.SG_RECORD_HDR + m.max_key + m.max_value)


def snapshot(m: Any, mask: PartitionMask) -> Iterator[bytes]:
    """The current state of every key of the mask's partitions, tombstones
    included, as buffers of records (weakly consistent, like iteration: a
    change made meanwhile may or may not be in it; the change stream opened
    before the snapshot covers it either way)."""
    cap = _buffer_size(m)
    buf = ffi.new("char[]", cap)
    view = ffi.buffer(buf)
    it = ffi.new("sg_iter **")
    rc = lib.sg_iter_open(m._h, it)
    if rc:
        raise_for(rc)
    it = ffi.gc(it[0], lib.sg_iter_free)
    try:
        while True:
            n = lib.sg_iter_records(it, buf, cap, mask.partitions, mask.c)
            if n < 0:
                raise_for(n)
            if n == 0:
                return
            yield view[0:n]
    finally:
        ffi.release(it)


class ChangeStream:
    """The changes to a map's partitions from the moment it is made, as
    buffers of records carrying each changed key's current state. Open it
    before taking a snapshot, so that nothing falls between the two."""

    def __init__(self, m: Any, mask: PartitionMask) -> None:
        self._map = m
        self.mask = mask
        self._cap = _buffer_size(m)
        self._buf = ffi.new("char[]", self._cap)
        self._view = ffi.buffer(self._buf)
        self._lost = ffi.new("uint64_t *")
        out = ffi.new("sg_watch **")
        rc = lib.sg_watch_open(m._h, ffi.NULL, 0, out)
        if rc:
            raise_for(rc)
        self._h = ffi.gc(out[0], lib.sg_watch_free)

    def cursor(self) -> int:
        """The feed position this stream reads next: what a mirror has
        seen once it applied everything sent so far."""
        return lib.sg_watch_cursor(self._h)  # type: ignore[no-any-return]

    def seek(self, position: int) -> bool:
        """Resume from ``position`` (a cursor an earlier stream reached);
        False if it is not a position of this feed (past its tail). If the
        feed has overwritten changes since, next() reports them lost."""
        return lib.sg_watch_seek(self._h, position) == 0

    def next(self, timeout: Optional[float] = None) -> Tuple[bytes, int]:
        """(records, lost): what changed, waiting up to ``timeout`` seconds
        (None: no limit) for the first change. ``lost`` > 0 means changes
        were missed: the caller must resync from a snapshot. Returns
        (b"", 0) on timeout. Blocks in C with the GIL released: call it
        from a thread, not from an event loop."""
        h, buf, cap, mask, lost = self._h, self._buf, self._cap, self.mask, self._lost
        try:
            n = until(lambda ns: lib.sg_watch_records(h, buf, cap, mask.partitions, mask.c, lost, ns),
                      start(timeout)[0], _Quiet)
        except _Quiet:
            return b"", 0
        return self._view[0:n], lost[0]

    def next_batch(self, timeout: Optional[float] = None, linger: float = 0.0005, small: int = 64 << 10,
                   urgent: Optional[threading.Event] = None) -> Tuple[bytes, int]:
        """next(), and if what came is a small buffer, wait ``linger``
        seconds (or until ``urgent`` is set: someone waits for these
        records) and take what arrived meanwhile too: under a steady
        trickle of changes, fewer and larger buffers cost the bridge far
        less per change, for at most ``linger`` of added delay."""
        recs, lost = self.next(timeout)
        if recs and len(recs) < small and linger > 0:
            if urgent is None:
                time.sleep(linger)
            elif urgent.wait(linger):
                urgent.clear()
            more, lost2 = self.next(0)
            recs, lost = recs + more, lost + lost2
        return recs, lost


def apply_records(m: Any, records: bytes, mask: Optional[PartitionMask] = None,
                  seen: Optional["SeenKeys"] = None) -> Tuple[int, int]:
    """Apply a buffer of records to mirror map ``m``: (records, applied).
    Every key must be in ``mask`` (the partitions the sender owns); a
    malformed buffer or a foreign key raises InvalidArgument naming the
    record (those before it are applied, which is harmless). ``seen``
    (during a snapshot) gathers the hashes of the keys, in the same pass."""
    applied = ffi.new("uint64_t *")
    nparts = mask.partitions if mask is not None else 0
    cmask = mask.c if mask is not None else ffi.NULL
    out = seen.room(len(records)) if seen is not None else ffi.NULL
    n = lib.sg_map_apply_records(m._h, records, len(records), nparts, cmask, applied, out)
    if n < 0:
        raise_for(n)
    if seen is not None:
        seen.n += n
    return n, applied[0]


def reset_partitions(m: Any, mask: PartitionMask) -> int:
    """Forget every key of ``mask``'s partitions in map ``m``, tombstones
    included (each becomes a version-0 tombstone, so any version applied
    later wins): the number of keys reset. For a mirror about to follow a
    grid whose versions are unrelated to the ones it holds; run it while
    nothing else writes those partitions."""
    n = lib.sg_map_reset_partitions(m._h, mask.partitions, mask.c)
    if n < 0:
        raise_for(n)
    return n  # type: ignore[no-any-return]


class SeenKeys:
    """The hashes of the keys a snapshot carried, written by
    :func:`apply_records` as it applies them, for :func:`prune`."""

    def __init__(self) -> None:
        self.buf = ffi.new("uint64_t[]", 4096)
        self.n = 0

    def room(self, nbytes: int) -> Any:
        """Where the hashes of a buffer of ``nbytes`` of records go."""
        need = self.n + nbytes // lib.SG_RECORD_HDR  # records are at least a header each
        if need > len(self.buf):
            new = ffi.new("uint64_t[]", max(2 * len(self.buf), need))
            ffi.memmove(new, self.buf, self.n * 8)
            self.buf = new
        return self.buf + self.n


def prune(m: Any, mask: PartitionMask, seen: SeenKeys, floor: int) -> int:
    """After a snapshot of ``mask``'s partitions: delete the keys ``m``
    holds there that the snapshot did not carry and whose version is below
    the owner's version floor (the owner forgot their deletion: a migration
    dropped the tombstone). Each gets a tombstone just above the version
    held, so anything the owner sends later still wins. The number deleted.
    (A key whose 64-bit hash equals a carried key's is kept.)"""
    n = lib.sg_map_prune(m._h, mask.partitions, mask.c, floor, seen.buf, seen.n)
    if n < 0:
        raise_for(n)
    return n  # type: ignore[no-any-return]
