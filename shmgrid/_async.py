"""asyncio support: awaiting rings, topics, watches and locks without a
thread per waiter.

One waiter thread per process (started on the first wait, gone after two
idle seconds, started afresh in a forked child) sleeps in ``futex_waitv``
on every event word some coroutine of the process awaits, plus one private
word that a new registration bumps to make it look again. Many awaiters of
one word (200 ``get_async`` on one ring) share one slot of the futex_waitv
array, so the 128-word limit is on *distinct* objects awaited at once;
words past the first 127 are polled every 5 ms instead (and so is every
word on a kernel without futex_waitv, Linux < 5.16).

The protocol of one await (``wait_until``), in the loop's thread:

1. try the non-blocking C call; done if it proceeds;
2. arm the object's event word (``sg_event_arm``: the seq_cst RMW that sets
   the waiter bit W and the seq_cst fence, the sleeper's half of
   SYNC POINT: event, exactly as a blocking C caller arms it), which
   returns the armed value v;
3. try the non-blocking call again: a waker that stored its change before
   our fence and did not see W is caught here;
4. register (word, v) and await a future. The waiter thread resolves it
   once the word is no longer v. A waker that saw W bumped the word (v ->
   v + 1, then FUTEX_WAKE), so either futex_waitv finds the word changed
   when it enters, or the wake finds it asleep: no lost wake-up. A waker
   killed between its bump and its FUTEX_WAKE is covered by the thread
   comparing every word with its awaiters' v on each pass, and passes
   happen at least every 100 ms;
5. go back to 2. A wake-up means "re-try", never "it is yours": the
   message, the lock, the change is taken only by the non-blocking call in
   the loop thread, so a coroutine cancelled at its ``await`` has taken
   nothing.

Like a blocking sleeper, an await re-checks its object at least every
100 ms (10 ms for locks) even without a wake-up, to notice a dead producer
or lock holder: each word's group of awaiters sends its oldest one to
re-try (a "probe"); a probe that then succeeds passes the turn to the next
one, so the awaiters behind a recovered cell do not wait a slice each.

A cancelled or timed-out await leaves no registration and no future behind.
It may leave W set on the word, as a killed blocking sleeper does: the
next waker then makes one futex-wake call for nobody, and W is clear again.
"""
from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional

from . import _wait, grid as _grid
from ._core import ffi, lib
from .errors import Closed, raise_for

AGAIN: Any = object()  # what an attempt returns when it could not proceed
_EAGAIN = lib.SG_EAGAIN


def nonblocking(call: Callable[[], int], done: Callable[[int], Any] = lambda rc: rc) -> Callable[[], Any]:
    """An attempt for wait_until out of a non-blocking C call: ``done(rc)``
    once the call proceeds (rc >= 0), AGAIN if it could not (SG_EAGAIN),
    the call's error otherwise."""
    def attempt() -> Any:
        rc = call()
        if rc >= 0:
            return done(rc)
        if rc == _EAGAIN:
            return AGAIN
        raise_for(rc)

    return attempt

SLICE = 0.1
LOCK_SLICE = 0.01
POLL = 0.005  # words beyond futex_waitv's reach, or no futex_waitv at all
IDLE_EXIT = 2.0
WAITV_MAX = lib.SG_EVENT_WAITV_MAX
_load = lib.sg_event_load
_monotonic = time.monotonic


def _addr(p: Any) -> int:
    return int(ffi.cast("uintptr_t", p))


class _Entry:
    """One awaiting coroutine: its loop and future, the value it armed, the
    object whose close() must wake it, and whether a probe woke it."""

    __slots__ = ("loop", "fut", "v", "owner", "group", "probed")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: "asyncio.Future[None]", v: int, owner: Any) -> None:
        self.loop, self.fut, self.v, self.owner = loop, fut, v, owner
        self.group: Optional[_Group] = None
        self.probed = False


class _Group:
    """The awaiters of one event word, oldest first."""

    __slots__ = ("ptr", "grid", "slice", "next_probe", "entries")

    def __init__(self, ptr: Any, grid: int, slice_s: float, now: float) -> None:
        self.ptr, self.grid, self.slice = ptr, grid, slice_s
        self.next_probe = now + slice_s
        self.entries: Dict[_Entry, None] = {}  # insertion-ordered set


def _resolve(entries: List[_Entry]) -> None:
    for e in entries:
        if not e.fut.done():
            e.fut.set_result(None)


def _dispatch(fired: List[_Entry]) -> None:
    """Resolve the futures of fired entries, one call per loop."""
    by_loop: Dict[asyncio.AbstractEventLoop, List[_Entry]] = {}
    for e in fired:
        by_loop.setdefault(e.loop, []).append(e)
    for loop, entries in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, entries)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits these futures any more


class Waiter:
    """The registry of awaited words and the thread that sleeps on them.
    ``mutex`` guards everything; the thread reads a word only under it and
    only while a registration names it, and Grid.close drops a grid's
    registrations under it before unmapping, so no word is read after its
    grid is gone."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.groups: Dict[int, _Group] = {}
        self.wake = ffi.new("uint32_t *")  # process-private: bumped to make the thread look again
        self.thread: Optional[threading.Thread] = None
        self.waitv = True  # False once the kernel said ENOSYS

    # ---- the loop side -------------------------------------------------------

    def register(self, e: _Entry, ptr: Any, grid_h: Callable[[], Any], slice_s: float) -> None:
        """Add e, awaiting word ptr of the grid whose handle ``grid_h()``
        gives (it raises Closed once the grid is closed). It is called
        under the mutex: Grid.close marks the grid closed before its hook
        (forget_grid) takes the mutex, so either the hook finds e and fires
        it, or this call sees the grid closed. No word is registered after
        its grid's hook ran, i.e. none is read after the unmap."""
        addr = _addr(ptr)
        with self.mutex:
            grid = _addr(grid_h())
            g = self.groups.get(addr)
            new = g is None
            if g is None:
                g = self.groups[addr] = _Group(ptr, grid, slice_s, _monotonic())
            g.entries[e] = None
            e.group = g
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="shmgrid-async-waiter", daemon=True)
                self.thread.start()
        if new:
            # An entry on a word the thread already sleeps on needs no poke:
            # its v equals the value the thread sleeps on, or the word moved
            # since the thread read it, which ends the sleep by itself.
            lib.sg_event_poke(self.wake)

    def unregister(self, e: _Entry) -> None:
        """Drop e if the thread has not fired it (cancel, timeout, close)."""
        g = e.group
        if g is None:
            return
        with self.mutex:
            if e.group is None:
                return
            e.group = None
            del g.entries[e]
            drop = not g.entries and self.groups.get(_addr(g.ptr)) is g
            if drop:
                del self.groups[_addr(g.ptr)]
        if drop:
            lib.sg_event_poke(self.wake)  # let the thread stop sleeping on the word

    def pass_on(self, ptr: Any) -> None:
        """A probed awaiter got through (a dead claimant or lock holder was
        recovered, no wake-up came): send the next awaiter of the word to
        re-try as well."""
        with self.mutex:
            g = self.groups.get(_addr(ptr))
            fired = self._fire_oldest(g, probed=True) if g is not None else []
        _dispatch(fired)

    def _fire_oldest(self, g: _Group, probed: bool) -> List[_Entry]:
        for e in g.entries:
            del g.entries[e]
            e.group, e.probed = None, probed
            if not g.entries:
                del self.groups[_addr(g.ptr)]
            return [e]
        return []

    def _fire_where(self, match: Callable[[_Group, _Entry], bool]) -> None:
        fired: List[_Entry] = []
        with self.mutex:
            for addr, g in list(self.groups.items()):
                for e in [e for e in g.entries if match(g, e)]:
                    del g.entries[e]
                    e.group = None
                    fired.append(e)
                if not g.entries:
                    del self.groups[addr]
        if fired:
            lib.sg_event_poke(self.wake)
            _dispatch(fired)

    def forget_grid(self, grid: int) -> None:
        """Before the grid is unmapped: wake every awaiter of a word in it
        (its re-try then fails with Closed) and stop watching those words."""
        self._fire_where(lambda g, e: g.grid == grid)

    def wake_owner(self, owner: Any) -> None:
        """A subscription or watch is being closed: wake its awaiters."""
        self._fire_where(lambda g, e: e.owner is owner)

    def registrations(self) -> int:
        with self.mutex:
            return sum(len(g.entries) for g in self.groups.values())

    # ---- the thread ------------------------------------------------------------

    def _run(self) -> None:
        me = threading.current_thread()
        idle_since: Optional[float] = None
        words = ffi.new("uint32_t *[]", WAITV_MAX)
        vals = ffi.new("uint32_t[]", WAITV_MAX)
        while True:
            fired: List[_Entry] = []
            with self.mutex:
                if self.thread is not me:
                    return
                now = _monotonic()
                # Read the wake word before the groups: a registration made
                # after this read pokes it, so the sleep below ends.
                words[0], vals[0] = self.wake, _load(self.wake)
                n, wake_at = 1, now + SLICE
                for addr, g in list(self.groups.items()):
                    cur = _load(g.ptr)
                    for e in [e for e in g.entries if e.v != cur]:  # the word moved since e armed
                        del g.entries[e]
                        e.group = None
                        fired.append(e)
                    if g.entries and now >= g.next_probe:
                        fired += self._fire_oldest(g, probed=True)
                        g.next_probe = now + g.slice
                    if not g.entries:
                        self.groups.pop(addr, None)
                        continue
                    wake_at = min(wake_at, g.next_probe)
                    if self.waitv and n < WAITV_MAX:
                        words[n], vals[n] = g.ptr, cur  # every entry left has v == cur
                        n += 1
                    else:
                        wake_at = min(wake_at, now + POLL)
                if self.groups or fired:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since >= IDLE_EXIT:
                    self.thread = None  # the next register starts a new one
                    return
                if idle_since is not None:
                    wake_at = min(wake_at, idle_since + IDLE_EXIT)
            if fired:
                _dispatch(fired)
            timeout_ns = max(0, int((wake_at - _monotonic()) * 1e9))
            if self.waitv:
                if lib.sg_event_waitv(words, vals, n, timeout_ns):
                    self.waitv = False  # no futex_waitv here (ENOSYS): poll from now on
            else:
                time.sleep(min(POLL, timeout_ns / 1e9))


_waiter = Waiter()


def waiter() -> Waiter:
    return _waiter


def _after_fork_in_child() -> None:
    # The parent's thread does not exist here, its futures belong to the
    # parent's loops, and its mutex may have been held at the fork.
    global _waiter
    _waiter = Waiter()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_grid._close_hooks.append(lambda h: _waiter.forget_grid(_addr(h)))
_wait._close_hooks.append(lambda owner: _waiter.wake_owner(owner))


def deadline_of(loop: asyncio.AbstractEventLoop, timeout: Optional[float]) -> Optional[float]:
    """The loop-time deadline of ``timeout`` seconds (checked as the
    blocking calls check it; None or inf: no limit)."""
    if _wait.start(timeout)[0] is None:
        return None
    return loop.time() + timeout  # type: ignore[operator]


async def wait_until(attempt: Callable[[], Any], event: Any, grid_h: Callable[[], Any], timeout: Optional[float],
                     on_timeout: Callable[[], BaseException], owner: Any = None,
                     slice_s: Optional[float] = None) -> Any:
    """Run ``attempt()`` (a non-blocking call) in this loop's thread until it
    returns something other than AGAIN, sleeping on ``event`` (a word from
    an sg_*_event call) in between; ``on_timeout()`` is raised when
    ``timeout`` seconds have passed. ``grid_h()`` gives the grid handle
    (raising Closed if the grid is closed). ``slice_s``: how often the
    awaiters of the word probe without a wake-up (default SLICE)."""
    loop = asyncio.get_running_loop()
    deadline = deadline_of(loop, timeout)
    r = attempt()
    if r is not AGAIN:
        return r
    v = ffi.new("uint32_t *")
    probed = False
    if slice_s is None:
        slice_s = SLICE
    while True:
        rc = lib.sg_event_arm(grid_h(), event, v)
        if rc:
            raise_for(rc)
        r = attempt()
        if r is not AGAIN:
            if probed:
                _waiter.pass_on(event)
            return r
        if deadline is not None and loop.time() >= deadline:
            raise on_timeout()
        probed = await _sleep(loop, event, v[0], grid_h, owner, deadline, slice_s)


async def _sleep(loop: asyncio.AbstractEventLoop, event: Any, v: int, grid_h: Callable[[], Any], owner: Any,
                 deadline: Optional[float], slice_s: float) -> bool:
    """Await the waiter thread's word that (event, v) moved, or the
    deadline. Returns whether a probe (not a wake-up) ended it."""
    w = _waiter
    fut: "asyncio.Future[None]" = loop.create_future()
    e = _Entry(loop, fut, v, owner)
    w.register(e, event, grid_h, slice_s)
    timer = loop.call_at(deadline, _resolve, [e]) if deadline is not None else None
    try:
        await fut
    except BaseException:
        if e.probed:
            w.pass_on(event)  # this awaiter's turn to re-try goes to the next one
        raise
    finally:
        if timer is not None:
            timer.cancel()
        w.unregister(e)
    return e.probed


class Gate:
    """A FIFO mutex among the tasks of one loop, handed over directly on
    release. Lock ownership is per thread, so the tasks of one loop queue
    here before one of them takes the shared lock (for the shared lock they
    are all one thread: a second acquire would be a deadlock)."""

    __slots__ = ("held", "waiters")

    def __init__(self) -> None:
        self.held = False
        self.waiters: Deque["asyncio.Future[bool]"] = collections.deque()

    async def acquire(self, loop: asyncio.AbstractEventLoop, deadline: Optional[float]) -> bool:
        if not self.held and not self.waiters:
            self.held = True
            return True
        fut: "asyncio.Future[bool]" = loop.create_future()
        self.waiters.append(fut)
        timer = loop.call_at(deadline, _set_false, fut) if deadline is not None else None
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()  # handed to us as we were cancelled: hand it on
            raise
        finally:
            if timer is not None:
                timer.cancel()
            try:
                self.waiters.remove(fut)
            except ValueError:
                pass

    def release(self) -> None:
        while self.waiters:
            f = self.waiters.popleft()
            if not f.done():
                f.set_result(True)  # held stays True: it is f's now
                return
        self.held = False


def _set_false(fut: "asyncio.Future[bool]") -> None:
    if not fut.done():
        fut.set_result(False)


_gates: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Dict[int, Gate]]" = weakref.WeakKeyDictionary()


def gate(loop: asyncio.AbstractEventLoop, key: int) -> Gate:
    d = _gates.get(loop)
    if d is None:
        d = _gates[loop] = {}
    g = d.get(key)
    if g is None:
        g = d[key] = Gate()
    return g


def check_open(ptr: Any, what: str) -> Any:
    if ptr == ffi.NULL:
        raise Closed(f"{what}: grid is closed")
    return ptr
