"""A small Wing & Gong linearizability checker for one map key seen as a
versioned register.

A history is a list of :class:`Op`, each with the process that ran it, its
kind and argument, what it returned, and its invoke/return timestamps
(``time.monotonic_ns()``, one clock for every process on the host). The
checker looks for a total order of the operations that

- respects real time: if ``a.ret < b.inv``, a comes before b (operations
  that overlap may go either way; equal timestamps count as overlapping);
- is legal for the sequential register below.

Sequential semantics (the map's, for one key):

- ``put(v) -> version``: stores v; the version returned is the key's new one.
- ``get() -> (v, version) | None``: the current value and version, or None
  when the key is absent.
- ``compare_and_set(expected, v) -> version | None``: stores v if the key is
  present with version ``expected`` (``expected == 0``: if the key is
  absent); returns the new version, or None and changes nothing.
- ``delete() -> bool``: True if the key was present (it becomes absent and
  its version grows: the tombstone's version, which no operation returns);
  False, changing nothing, if it was absent.

Versions: by default the model only demands that every change returns a
version strictly larger than the previous one (a delete's unseen tombstone
version included: a put after a delete returns at least the last seen
version + 2), and that reads return exactly the current version. That is
what the map promises once migrations may drop tombstones and restart a
key above a floor. ``exact=True`` demands the old rule instead: each change
adds exactly one.

Search: depth-first over the "minimal" operations (those no remaining
operation precedes in real time), memoizing (set of operations placed,
register state) pairs already shown to lead nowhere (Lowe's refinement of
Wing & Gong). Every operation must have returned: histories with pending
operations are not supported.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["CAS", "DELETE", "GET", "INITIAL", "PUT", "Op", "Result", "State", "check", "step"]

PUT, GET, CAS, DELETE = "put", "get", "cas", "delete"
_KINDS = (PUT, GET, CAS, DELETE)


@dataclass(frozen=True)
class Op:
    """One completed operation.

    ``arg``: put: the value; cas: ``(expected_version, value)``; get and
    delete: None. ``result``: what the call returned (see the module doc).
    """

    proc: int
    kind: str
    arg: Any
    result: Any
    inv: int
    ret: int

    def __str__(self) -> str:
        a = "" if self.arg is None else repr(self.arg)
        return f"p{self.proc} {self.kind}({a}) -> {self.result!r} [{self.inv}, {self.ret}]"


class State(NamedTuple):
    """The register: ``value`` (None when absent), ``version`` (exact, or
    None after a delete, whose tombstone version nobody sees) and ``floor``:
    the next change must return a version > floor (``== floor + 1`` in exact
    mode)."""

    value: bytes | None
    version: int | None
    floor: int


INITIAL = State(None, None, 0)


def _next_ok(r: Any, floor: int, exact: bool) -> bool:
    if not isinstance(r, int) or isinstance(r, bool):
        return False
    return r == floor + 1 if exact else r > floor


def step(state: State, op: Op, exact: bool = False) -> State | None:
    """The state after ``op`` if ``op`` (with its result) is legal in
    ``state``, else None."""
    value, version, floor = state
    kind, res = op.kind, op.result
    if kind == GET:
        if res is None:
            return state if value is None else None
        v, r = res
        return state if value is not None and value == v and version == r else None
    if kind == DELETE:
        if res:
            return State(None, None, floor + 1) if value is not None else None
        return state if value is None else None
    if kind == PUT:
        return State(op.arg, res, res) if _next_ok(res, floor, exact) else None
    if kind == CAS:
        expected, v = op.arg
        matches = value is None if expected == 0 else (value is not None and version == expected)
        if res is None:
            return None if matches else state
        return State(v, res, res) if matches and _next_ok(res, floor, exact) else None
    raise ValueError(f"unknown operation kind {kind!r}")


@dataclass
class Result:
    ok: bool
    order: list[Op] = field(default_factory=list)  # a linearization if ok, else the longest legal prefix found
    stuck: list[Op] = field(default_factory=list)  # if not ok: the candidates that could not extend that prefix
    explored: int = 0

    def __bool__(self) -> bool:
        return self.ok

    def explain(self) -> str:
        if self.ok:
            return "linearizable: " + "; ".join(map(str, self.order))
        lines = [f"NOT linearizable ({self.explored} states explored). Longest legal prefix:"]
        lines += [f"  {o}" for o in self.order]
        lines.append("none of these can come next:")
        lines += [f"  {o}" for o in self.stuck]
        return "\n".join(lines)


def _validate(ops: Sequence[Op]) -> None:
    by_proc: dict[int, list[Op]] = {}
    for o in ops:
        if o.kind not in _KINDS:
            raise ValueError(f"unknown operation kind in {o}")
        if o.ret < o.inv:
            raise ValueError(f"operation returns before it is invoked: {o}")
        by_proc.setdefault(o.proc, []).append(o)
    for p, lst in by_proc.items():
        lst.sort(key=lambda o: o.inv)
        for a, b in zip(lst, lst[1:]):
            if b.inv < a.ret:
                raise ValueError(f"process {p} has overlapping operations: {a} / {b}")


def check(ops: Sequence[Op], initial: State = INITIAL, exact: bool = False) -> Result:
    """Is the history linearizable? Returns a :class:`Result` (truthy if so)."""
    _validate(ops)
    ops = sorted(ops, key=lambda o: (o.inv, o.ret))
    n = len(ops)
    full = (1 << n) - 1
    invs = [o.inv for o in ops]
    rets = [o.ret for o in ops]
    failed: set[tuple[int, State]] = set()
    best: tuple[int, list[int], list[int]] = (-1, [], [])
    explored = 0

    def candidates(mask: int) -> list[int]:
        rest = [i for i in range(n) if not mask >> i & 1]
        min_ret = min(rets[i] for i in rest)
        # ops are sorted by inv: the minimal ones are a prefix of ``rest``
        out = []
        for i in rest:
            if invs[i] > min_ret:
                break
            out.append(i)
        return out

    # iterative DFS; each frame: (mask, state, candidates, next candidate index)
    if n == 0:
        return Result(True, [], [], 0)
    path: list[int] = []
    stack: list[list[Any]] = [[0, initial, candidates(0), 0]]
    while stack:
        frame = stack[-1]
        mask, state, cands, k = frame
        if mask == full:
            return Result(True, [ops[i] for i in path], [], explored)
        advanced = False
        while k < len(cands):
            i = cands[k]
            k += 1
            nxt = step(state, ops[i], exact)
            if nxt is None:
                continue
            nmask = mask | (1 << i)
            if (nmask, nxt) in failed:
                continue
            explored += 1
            frame[3] = k
            path.append(i)
            stack.append([nmask, nxt, candidates(nmask) if nmask != full else [], 0])
            advanced = True
            break
        if advanced:
            continue
        # dead end: remember it, and backtrack
        if len(path) > best[0]:
            best = (len(path), list(path), list(cands))
        failed.add((mask, state))
        stack.pop()
        if path:
            path.pop()
    _depth, prefix, stuck = best
    return Result(False, [ops[i] for i in prefix], [ops[i] for i in stuck], explored)
