"""The waiting logic: a hand-off queue of slots, FIFO for waiters, LIFO for ready items.

The pool puts its slots in this queue, so the queue *is* the semaphore
(asyncpg's design): taking an item is taking a slot. Unlike
:class:`asyncio.Queue`, whose wake-up-then-retry protocol lets a newcomer take
an item from under a woken waiter, ``put`` hands the item straight to the
longest waiter, so waiters are served strictly first come, first served, and a
waiter that is cancelled just as it is handed an item passes the item on to
the next one. A getter takes an item with ``get_nowait``, or joins the line
(``join``) and awaits the future it gets.

Ready items nobody waits for (slots with a connection) are kept in a list, a
stack with the most recently returned on top (a list, not a deque: compiled,
its ``pop``, ``append`` and truth test are inline primitives, a deque's are
method calls). Free items (slots without a connection) are
only counted: an object is made when one is taken, so a pool's ``max_size``
costs nothing until it is used (``max_size=10**9`` is as cheap as 10).

Deadlines do not cost a timer per waiter: one timer, armed for the earliest
deadline, sweeps the line when it fires and re-arms itself for the next one
(at most every ``SWEEP_INTERVAL``). With the usual equal timeouts a new
waiter's deadline is never the earliest, so waiting costs a comparison.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final, Generic, Protocol, TypeVar

__all__ = ["HandoffQueue", "WaitTimeout", "Waiter"]

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Waiter(Protocol[T_contra]):
    """What the queue needs of a waiter: an asyncio Future, or a thread's waiter."""

    def done(self) -> bool: ...

    def set_result(self, result: T_contra, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...

    def cancel(self) -> bool: ...


class WaitTimeout(Exception):
    """The exception a waiter's future gets when its deadline passes."""


# The sweeping timer re-arms itself no sooner than this after it fired: a
# waiter may time out this much late, at most.
SWEEP_INTERVAL: Final = 0.005
TIMER_SLACK: Final = 0.001
_NEVER: Final = float("inf")
monotonic: Final = time.monotonic  # a C static when compiled (see core.py)
# Compiled, a method call on an object of a class mypyc does not compile is a
# lookup by name at each call; these C functions are called directly instead.
_deque_append: Final = deque.append
_deque_popleft: Final = deque.popleft
_Future: Final = asyncio.Future
_base_create_future: Final = asyncio.BaseEventLoop.create_future


class HandoffQueue(Generic[T]):
    """FIFO waiters, LIFO ready items, direct hand-off; single event loop, no locks.

    ``make_free()`` makes a free item; ``free`` items exist at first.
    """

    __slots__ = (
        "_items",
        "_loop",
        "_make_free",
        "_plain_futures",
        "_seated",
        "_sweep_at",
        "_sweeper",
        "_waiters",
        "_waiting",
        "free",
    )

    def __init__(self, make_free: Callable[[], T], free: int) -> None:
        self._make_free = make_free
        #: How many free items are kept (counted, not made); read it, never set it.
        self.free = free
        self._items: list[T] = []
        # (future, deadline) of waiting getters, oldest first. Entries whose
        # future is already done (timed out, cancelled, failed) are skipped
        # lazily. Outside waiters (add_waiter) keep their own deadline.
        self._waiters: deque[tuple[Any, float]] = deque()
        # Futures in line not done yet: whoever completes one counts it out.
        self._waiting = 0
        # Of those, seats (add_seat): borrowers that hold a free slot already and
        # wait for a ready item only. Each counts itself out (seat_left).
        self._seated = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._plain_futures = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_at = _NEVER

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop whose futures the waiters await."""
        self._loop = loop
        # asyncio's own loops make a plain Future: the queue makes it itself,
        # without the loop's Python method (a frame per waiter). Other loops
        # (uvloop, or one that overrides create_future) make their own.
        made_by = getattr(loop.create_future, "__func__", None)
        self._plain_futures = made_by is _base_create_future

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    @property
    def items(self) -> list[T]:
        """The kept ready items, top last (the same list for the queue's lifetime).

        For a caller's hot paths: ``pop()`` from it is :meth:`get_nowait`
        when it is not empty, and ``append()`` to it is :meth:`put` of a
        ready item while :attr:`waiters` is empty.
        """
        return self._items

    @property
    def waiters(self) -> deque[tuple[Any, float]]:
        """The waiters, in line (some may be done already): see :attr:`items`."""
        return self._waiters

    @property
    def waiting(self) -> int:
        """How many getters are waiting now (seats, which hold a slot already, aside)."""
        return self._waiting - self._seated

    def get_nowait(self) -> T | None:
        """The top ready item, else a free one, or None when there is none.

        Items only pile up while nobody waits (``put`` hands them over
        otherwise), so taking one here never jumps the queue.
        """
        items = self._items
        if items:
            return items.pop()
        if self.free:
            self.free -= 1
            return self._make_free()
        return None

    def put(self, item: T, ready: bool) -> None:
        """Hand ``item`` to the longest waiter, or keep it (``ready``: on top; else counted).

        A free item is never handed to a seat (:meth:`add_seat`).
        """
        waiters = self._waiters
        if not ready and self._seated:
            self._put_free(item)
            return
        while waiters:
            fut, _ = _deque_popleft(waiters)
            if not fut.done():
                fut.set_result(item)
                self._waiting -= 1
                return
        if ready:
            self._items.append(item)
        else:
            self.free += 1

    def _put_free(self, item: T) -> None:
        """:meth:`put` of a free item while seats are in line: to the longest waiter that
        is not a seat (the seats keep their places), or counted."""
        waiters = self._waiters
        for i, (fut, _) in enumerate(waiters):
            if not fut.done() and not getattr(fut, "ready_only", False):
                del waiters[i]
                fut.set_result(item)
                self._waiting -= 1
                return
        self.free += 1

    def add_free(self, count: int) -> None:
        """``count`` more free items: handed to waiters first."""
        while count and self.waiting:
            self.put(self._make_free(), False)
            count -= 1
        self.free += count

    def take_free(self, count: int) -> int:
        """Remove up to ``count`` free items; how many were removed."""
        taken = min(count, self.free)
        self.free -= taken
        return taken

    def take_free_one(self) -> T | None:
        """A free item, or None when none is kept."""
        if self.free:
            self.free -= 1
            return self._make_free()
        return None

    def swap_top(self, item: T) -> T | None:
        """Exchange ``item`` (no longer ready) for the top ready item, if any."""
        items = self._items
        if items:
            top = items.pop()
            self.free += 1
            return top
        return None

    def take(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return the kept ready items matching ``predicate`` (bottom first)."""
        taken = [item for item in self._items if predicate(item)]
        if taken:
            ids = {id(item) for item in taken}
            kept = [item for item in self._items if id(item) not in ids]
            self._items.clear()  # in place: see items
            self._items.extend(kept)
        return taken

    def join(self, timeout: float | None, now: float) -> asyncio.Future[T]:
        """Join the line: a future completed with an item, or with :class:`WaitTimeout`.

        ``now`` is the caller's ``time.monotonic()`` (the clock of asyncio's
        default loops), taken just before. The caller awaits the future and,
        if that raises anything else, calls :meth:`withdraw`. (A future and
        not a coroutine: under load every request waits, and a coroutine
        frame more in the chain costs at each suspension and resumption.)
        """
        loop = self._loop
        assert loop is not None, "bind() the queue to its loop first"
        fut: asyncio.Future[T]
        fut = _Future(loop=loop) if self._plain_futures else loop.create_future()
        if timeout is None:
            deadline = _NEVER
        else:
            deadline = now + timeout
            if deadline < self._sweep_at:
                self._arm(loop, deadline)
        _deque_append(self._waiters, (fut, deadline))
        self._waiting += 1
        return fut

    def withdraw(self, fut: asyncio.Future[T]) -> T | None:
        """A waiter stops awaiting ``fut`` (cancelled): leave the line.

        Returns the item it was handed in the same tick as the cancellation,
        if any: the caller passes it on (it may belong to a pool that closed
        meanwhile, so the queue does not take it back itself).
        """
        if fut.cancelled():
            self._waiting -= 1
        elif not fut.done():
            fut.cancel()
            self._waiting -= 1
        elif fut.exception() is None:
            return fut.result()
        return None

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        # The new timer first: if the loop refuses it (closed), nothing changed.
        sweeper = loop.call_at(when, self._sweep, loop)
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweep_at = when
        self._sweeper = sweeper

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time out every waiter whose deadline passed; re-arm for the next deadline."""
        self._sweeper = None
        self._sweep_at = _NEVER
        # A loop may fire the timer a little early (uvloop keeps milliseconds):
        # a deadline within TIMER_SLACK counts as passed, not as one more sweep.
        now = monotonic() + TIMER_SLACK
        earliest = _NEVER
        for fut, deadline in self._waiters:
            if fut.done():
                continue
            if deadline <= now:
                fut.set_exception(WaitTimeout())
                self._waiting -= 1
            elif deadline < earliest:
                earliest = deadline
        if earliest != _NEVER:
            self._arm(loop, max(earliest, now + SWEEP_INTERVAL))

    def add_waiter(self, waiter: Waiter[T]) -> None:
        """Put an outside waiter in line; it waits on its own (see :meth:`leave`).

        Only while no item is kept: a caller takes one with :meth:`get_nowait` first.
        """
        _deque_append(self._waiters, (waiter, _NEVER))
        self._waiting += 1

    def add_seat(self, seat: Waiter[T]) -> None:
        """Put a seat in line: a borrower that holds a free item already (it is
        connecting it) and waits for a ready item only. It has a true ``ready_only``
        attribute, is handed no free item, is not counted in :attr:`waiting`, and calls
        :meth:`seat_left` once done (handed an item, failed or cancelled).

        Only while no ready item is kept.
        """
        self.add_waiter(seat)
        self._seated += 1

    def seat_left(self) -> None:
        """A seat is done: handed an item, failed, or cancelled."""
        self._seated -= 1

    def leave(self, waiter: Waiter[T]) -> bool:
        """An outside waiter stops waiting: True if it left with nothing.

        False: it was completed already (with an item or an exception).
        """
        if waiter.cancel():
            self._waiting -= 1
            return True
        return False

    def fail_waiters(self, make_exc: Callable[[], BaseException]) -> None:
        """Wake every waiter with an exception (used when the pool closes)."""
        while self._waiters:
            fut, _ = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(make_exc())
                self._waiting -= 1
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
            self._sweep_at = _NEVER
