"""The asyncio pool core: state, checkout and return, resize, closing, stats.

:class:`PoolCore` is generic over the kind of connection; a
:class:`~aiopgpool.lifecycle.Lifecycle` does everything that touches one. It
runs on one event loop and knows nothing of threads. Three collaborators are
called only from slow branches: the :class:`~aiopgpool.connector.Connector`
(connecting, retrying, filling to ``min_size``, ``wait()``), the
:class:`~aiopgpool.maintenance.Maintenance` (timers, expiry, ``check``,
``drain``, leak reports) and, for the sync facade, the
:class:`~aiopgpool.threadport.ThreadPort`.

Design, in short:

* The pool's :class:`~aiopgpool.slot.Slot` objects live in a
  :class:`~aiopgpool.waiting.HandoffQueue`; taking a slot is taking the right
  to one connection, so the queue is the semaphore and "never more than
  ``max_size``" holds by construction. Free slots are only counted until
  taken.
* A borrower that gets a free slot connects on it itself (many borrowers
  connect concurrently, bounded), within its own deadline.
* The hot path (an idle connection is ready, nobody waits): ``getconn`` pops
  the top slot, makes a non-blocking socket test unless one was made in the
  last 10 ms, and returns; ``putconn`` sees the connection idle with its
  attributes unchanged and pushes it back. No lock, no task, no server round
  trip. Each is written once (:meth:`PoolCore.lend_idle`,
  :meth:`PoolCore.give_back`) and shared with the sync facade.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from math import floor
from typing import Any, Final, Generic, TypeVar

from .admission import timeout_error, wait_timeout
from .closing import Closing
from .connector import Connector
from .errors import PoolClosed, PoolError
from .lifecycle import Lifecycle
from .maintenance import Maintenance, on_drop
from .options import PoolOptions, check_key, check_timeout
from .slot import Slot
from .stats import USE_FLOOR_BITS, Counters, HistogramRecorder, PoolStats, snapshot
from .validation import Validation
from .waiting import HandoffQueue, WaitTimeout

__all__ = ["PoolCore"]

logger = logging.getLogger("aiopgpool")

ConnT = TypeVar("ConnT")

NEW: Final = "new"
OPEN: Final = "open"
CLOSING: Final = "closing"
CLOSED: Final = "closed"

# Final, not imported: compiled (aiopgpool.native), a Final name is read from a C
# static, an imported one is a module dict lookup at every call.
monotonic: Final = time.monotonic
get_ident: Final = threading.get_ident

# The capacity of a null pool created with max_size=0 ("no bound").
UNBOUNDED = 1 << 62


def _has_conn(slot: Slot[Any]) -> bool:
    return slot.conn is not None


class PoolCore(Generic[ConnT]):
    """The pool machinery shared by every pool class; see the module docstring."""

    # Slots, not a __dict__: with this many attributes an instance dict no
    # longer shares its keys, and every self.x on the hot paths becomes a
    # dict lookup (slots cut about 1,000 instructions per waited checkout).
    __slots__ = (
        "_borrowed",
        "_dropped",
        "_fast",
        "_idle",
        "_key_of",
        "_keyed",
        "_owner_type",
        "_preparing",
        "_state_of",
        "_target",
        "_waiters",
        "checking",
        "closing",
        "connect_hist",
        "connecting_borrowers",
        "connector",
        "counters",
        "excess",
        "generation",
        "leak_timeout",
        "lifecycle",
        "loop",
        "loop_thread",
        "maintenance",
        "max_idle",
        "max_lifetime",
        "max_size",
        "max_waiting",
        "min_size",
        "name",
        "null",
        "options",
        "owner_ref",
        "ping_after_idle",
        "queue",
        "reconnect_timeout",
        "returning",
        "size",
        "state",
        "threaded",
        "timeout",
        "use_hist",
        "validation",
        "wait_hist",
    )

    def __init__(
        self, lifecycle: Lifecycle[ConnT], options: PoolOptions, target: str, owner: Any = None
    ) -> None:
        self.options = options
        self.name: str = options.name  # type: ignore[assignment]  # set by PoolOptions
        self.null = options.null
        self._target = target
        self.lifecycle = lifecycle
        self._state_of = lifecycle.state_of  # read on every return: one lookup saved
        self.min_size = options.min_size
        self.max_size = options.max_size
        self.timeout = options.timeout
        self.max_waiting = options.max_waiting
        self.max_idle = options.max_idle
        self.max_lifetime = options.max_lifetime
        self.reconnect_timeout = options.reconnect_timeout
        self.leak_timeout = options.leak_timeout
        self.ping_after_idle = options.ping_after_idle
        # The object users hold: referenced weakly, so that a pool nobody
        # references can be collected (see close_dropped). A bare core (the
        # unit tests') is its own owner.
        self.owner_ref: Callable[[], object] = self._itself if owner is None else weakref.ref(owner)
        self._owner_type = type(self if owner is None else owner).__name__

        self.state = NEW
        self.queue: HandoffQueue[Slot[ConnT]] = HandoffQueue(Slot, self.capacity(self.max_size))
        # The queue's own list and deque, for the two hottest paths (see HandoffQueue.items).
        self._idle = self.queue.items
        self._waiters = self.queue.waiters
        self.excess = 0  # slots to drop as they come back, after a shrinking resize
        self.size = 0  # open connections: idle, borrowed, or being checked
        # Borrowed connections and their slots (its size: how many are in use).
        self._borrowed: dict[ConnT, Slot[ConnT]] = {}
        self._keyed: dict[Hashable, ConnT] = {}
        self._key_of: dict[ConnT, Hashable] = {}
        self.generation = 0
        self._preparing = 0  # slots being checked or connected for a borrower
        # Checkouts opening their own connection: pending requests too (stats().waiting).
        self.connecting_borrowers = 0
        # The slots of returns under way off the hot path (rolling back, resetting): a
        # graceful close() waits for them as for borrowed connections, and closing
        # at once shuts their connections down under the work in progress.
        self.returning: set[Slot[ConnT]] = set()
        # Slots whose connection a checkout or check() is testing (a ping, `check`):
        # closing at once shuts those down too.
        self.checking: set[Slot[ConnT]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        # The thread last seen running ``loop``: a return compares thread
        # identities (see give_back), not loops, which costs a getpid() system
        # call on Python 3.10 and 3.11.
        self.loop_thread = 0
        self.counters = Counters()
        self.wait_hist = HistogramRecorder()
        # Use times below about 1 ms share the first bucket: counting them costs
        # a third of bucketing them (about 550 instructions a return, not 1,700).
        self.use_hist = HistogramRecorder(floor_bits=USE_FLOOR_BITS)
        self.connect_hist = HistogramRecorder()
        self._fast = False
        # Driven by a ThreadPort: callers come from threads, some running loops of their own.
        self.threaded = False
        self.connector: Connector[ConnT] = Connector(self, lifecycle)
        self.maintenance: Maintenance[ConnT] = Maintenance(self)
        self.validation: Validation[ConnT] = Validation(self)
        self.closing: Closing[ConnT] = Closing(self)
        self._dropped = on_drop(self.name, self.queue, lifecycle)

    def _itself(self) -> PoolCore[ConnT]:
        return self

    def capacity(self, max_size: int) -> int:
        """Slots for ``max_size`` (a null pool's 0: no bound)."""
        return UNBOUNDED if self.null and max_size == 0 else max_size

    @property
    def closed(self) -> bool:
        """True unless the pool is open: before ``open()``, and once closing."""
        return self.state != OPEN

    def __repr__(self) -> str:
        return (
            f"<{self._owner_type} {self.name!r} {self.state} "
            f"size={self.size}/{self.max_size} in_use={len(self._borrowed)} "
            f"waiting={self.queue.waiting} {self._target}>"
        )

    # -- opening -----------------------------------------------------------------

    async def open(
        self, wait: bool = False, timeout: object = 30.0, *, fail_fast: bool = False
    ) -> None:
        """Start the pool: fill ``min_size`` connections in the background.

        With ``wait=True``, return once they exist or raise :class:`PoolTimeout`
        (the last connection error chained) after ``timeout`` seconds; with
        ``fail_fast=True`` too, the first connection error is raised at once.
        """
        seconds = check_timeout("timeout", timeout, allow_none=False)
        self.open_nowait()
        if wait:
            assert seconds is not None
            await self.connector.wait(seconds, fail_fast=fail_fast)

    def open_nowait(self) -> None:
        """Start the pool on the running loop, without waiting for connections."""
        if self.state == OPEN:
            self.check_loop()
            return
        if self.state != NEW:
            raise PoolClosed(f"pool {self.name!r} is closed and cannot be reopened")
        self.loop = asyncio.get_running_loop()
        self.loop_thread = get_ident()
        self.queue.bind(self.loop)
        self.state = OPEN
        self.update_fast()
        logger.info(
            "pool %r opening (min_size=%d max_size=%d) %s",
            self.name,
            self.min_size,
            self.max_size,
            self._target,
        )
        self.connector.fill()
        self.maintenance.schedule()

    def check_open(self) -> None:
        """Raise :class:`PoolClosed` unless the pool is open."""
        if self.state != OPEN:
            raise self.closed_error()

    def check_loop(self) -> None:
        """Raise :class:`PoolError` when called from another loop than the pool's own.

        Called wherever the pool suspends or schedules, never on the idle hot
        path. Without a running loop (the sync facade's threads) it passes.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if loop is self.loop:
            self.loop_thread = get_ident()  # the loop may have moved to another thread
        elif self.loop is not None:
            raise PoolError(
                f"pool {self.name!r} was opened on event loop {self.loop!r} and is used from "
                f"{loop!r}: a pool serves the loop it was opened on; create one per loop"
            )

    def closed_error(self) -> PoolClosed:
        """The error for a request the pool cannot take now."""
        if self.state == NEW:
            return PoolClosed(
                f"pool {self.name!r} is not open yet: call open() or use it as a context manager"
            )
        return PoolClosed(f"pool {self.name!r} is closed")

    # -- checkout ----------------------------------------------------------------

    async def getconn(self, timeout: object = None, *, key: Hashable | None = None) -> ConnT:
        """A connection, waiting up to ``timeout`` (default: the pool's) for one.

        The same ``key`` while its connection is held returns that connection
        again, without taking another slot. ``timeout`` is typed ``object``
        here and in the other entry points the facades call with the user's
        value: it is validated by ``check_timeout``, which names it, while
        compiled (``aiopgpool.native``) a ``float`` parameter would be
        checked before, with a ``TypeError`` of its own.
        """
        # Under load every request waits, and each coroutine frame more in the
        # chain would cost again at every suspension and resumption: the wait
        # is written here rather than in a helper.
        if self._idle and (conn := self.lend_idle(timeout, key)) is not None:
            return conn
        seconds = None if timeout is None else check_timeout("timeout", timeout)
        if key is None and self._fast and not self._idle:  # the usual waited request
            self.counters.requests += 1
            kept = self.queue.take_free_one() if self.queue.free else None
        else:
            conn = self._request(key)
            if conn is not None:
                return conn  # the key's connection again: not a new request
            kept = self.queue.get_nowait()
        if kept is not None:
            self._preparing += 1
            return self._lend(await self.validation.prepare(kept, None, seconds, False), key)
        # Nothing kept: wait in line, on the pool's own loop only. Compared by
        # thread, as give_back does: get_running_loop() is a getpid() system
        # call on Python 3.10 and 3.11. Another loop of this thread is caught
        # where it fails: the pool's loop closed (the deadline cannot be
        # armed), or its task refuses the pool loop's future (below).
        if get_ident() != self.loop_thread:
            self.check_loop()
        start = monotonic()
        wait: float | None
        if seconds is None and self.timeout and not self.max_waiting:
            wait = self.timeout  # the usual case of wait_timeout(), inlined
        else:
            wait = wait_timeout(self, seconds)
        try:
            fut = self.queue.join(wait, start)
        except RuntimeError:
            self.check_loop()  # "Event loop is closed": PoolError, naming both loops
            raise
        self.counters.requests_waited += 1
        try:
            slot = await fut
        except BaseException as exc:
            self._waited(monotonic() - start)
            if not isinstance(exc, WaitTimeout):
                handed = self.queue.withdraw(fut)
                if handed is not None:
                    self.release_slot(handed)  # to the next waiter, or closed with the pool
                if isinstance(exc, RuntimeError):
                    # "got Future attached to a different loop": awaited on
                    # another loop of the pool's thread. PoolError, naming both.
                    self.check_loop()
                raise
            self.counters.timeouts += 1  # not stats: replaced if pop_stats() ran meanwhile
            # timeout_error chains the last connection error itself (mypyc drops `from`).
            raise timeout_error(self, seconds)  # noqa: B904
        now = monotonic()
        waited = now - start  # self._waited(), inlined: every waited request
        # self.counters again: a pop_stats() during the wait replaced them.
        self.counters.wait_time_total += waited
        self.wait_hist.counts[floor(waited * 1e6).bit_length()] += 1
        if (
            key is None
            and self._fast
            and slot.conn is not None
            and slot.generation == self.generation
        ):
            conn = self._lend_ready(slot, now)
            if conn is not None:
                return conn
        self._preparing += 1
        return self._lend(await self.validation.prepare(slot, start, seconds, True), key)

    def _request(self, key: Hashable | None) -> ConnT | None:
        """Validate a request off the hot path (its timeout checked already); the key's
        connection if it is held already."""
        if key is not None:
            check_key(key)
        if self.state != OPEN:
            raise self.closed_error()
        if key is not None and self._keyed:
            conn = self._keyed.get(key)
            if conn is not None:
                return conn
        self.counters.requests += 1
        return None

    def _waited(self, seconds: float) -> None:
        self.counters.wait_time_total += seconds  # the wait histogram's sum
        self.wait_hist.count(seconds)

    def lend_idle(self, timeout: object, key: Hashable | None) -> ConnT | None:
        """The checkout hot path: lend the top idle connection if it is ready as it is.

        None: the request takes the slow path (nothing idle, a key, a feature
        that needs the slow path, or the top connection needs a test or a
        replacement, which the slow path makes). The one copy, shared by
        ``getconn`` and the sync facade (under its lock). Ready: tested in
        the last ``SOCKET_TEST_INTERVAL``, or not expired and its socket
        quiet (a non-blocking system call).
        """
        idle = self._idle
        if idle and key is None and self._fast:  # _fast implies open
            if timeout is not None:
                check_timeout("timeout", timeout)  # validated on every path
            slot = idle.pop()
            conn = self._lend_ready(slot, monotonic())
            if conn is not None:
                self.counters.requests += 1
                return conn
            idle.append(slot)  # to test or replace: the slow path takes it again
        return None

    def _lend_ready(self, slot: Slot[ConnT], now: float) -> ConnT | None:
        """Lend ``slot`` if it is ready as it is; None: it needs preparing.

        The one copy of the readiness test and the lend, for the idle hot path
        (:meth:`lend_idle`) and a slot handed to a waiter (async or thread).
        ``slot`` holds a connection of the current generation. Only for
        requests with no key while the fast path is on (no check, no leak
        watch); ``now`` is ``time.monotonic()``, read by the caller.
        """
        if now < slot.fresh_until or slot.still_ready(now):
            conn = slot.conn
            assert conn is not None
            slot.borrowed_at = now
            self._borrowed[conn] = slot
            return conn
        return None

    def update_fast(self) -> None:
        """Recompute the fast-path flag.

        True when checkouts and returns need none of the rarer features, so
        the hot paths test one flag instead of six conditions.
        """
        lifecycle = self.lifecycle
        self._fast = (
            self.state == OPEN
            and not self.null
            and not self.excess
            and not lifecycle.has_check
            and not lifecycle.has_reset
            and self.leak_timeout is None
            and self.ping_after_idle is None
        )

    def _lend(self, slot: Slot[ConnT], key: Hashable | None, stack: str | None = None) -> ConnT:
        """Check out a prepared slot's connection (to ``key``, if given)."""
        conn = slot.conn
        assert conn is not None
        if key is not None:
            held = self._keyed.get(key)
            if held is not None:
                # A concurrent request under the same key got there first: share
                # its connection, and this one goes back to the pool.
                self.release_slot(slot)
                return held
        slot.borrowed_at = monotonic()
        self._borrowed[conn] = slot
        if self.leak_timeout is not None:
            self.maintenance.watch_leak(slot, stack)
        if key is not None:
            self._keyed[key] = conn
            self._key_of[conn] = key
        return conn

    def effective_timeout(self, timeout: float | None) -> float | None:
        """``timeout`` as given to getconn (validated), or the pool's."""
        return self.timeout if timeout is None else check_timeout("timeout", timeout)

    def release_slot(self, slot: Slot[ConnT]) -> None:
        """Give a slot back to the queue (or drop it, after a shrinking resize).

        Once closing began its connection is closed: nobody may borrow it any more.
        """
        if self.state == CLOSED:
            if slot.conn is not None:
                self.discard(slot, "pool closed")
            return
        if self.state == CLOSING and slot.conn is not None:
            self.discard(slot, "pool closing")
        if slot.generation != self.generation and slot.conn is not None:
            # Out of the queue when drain() ran (checked, being returned): replaced too.
            self.discard(slot, "drained")
        if self.excess:
            self.excess -= 1
            self.update_fast()
            if slot.conn is not None:
                self.discard(slot, "pool resized")
            return
        self.queue.put(slot, slot.conn is not None)

    def close_idle(self, reason: str, which: Callable[[Slot[ConnT]], bool] = _has_conn) -> int:
        """Close the idle connections ``which`` selects (all by default); their slots go
        back free (to waiters first; dropped once closed). How many were closed."""
        taken = self.queue.take(which)
        for slot in taken:
            self.discard(slot, reason)
            self.release_slot(slot)
        return len(taken)

    def discard(self, slot: Slot[ConnT], reason: str, *, lost: bool = False) -> None:
        """Close a slot's connection; the slot becomes free."""
        conn = slot.conn
        if conn is None:
            return
        slot.clear()
        self.size -= 1
        if lost:
            self.counters.connections_lost += 1
        else:
            self.counters.connections_closed += 1
        logger.debug("pool %r: closing a connection: %s", self.name, reason)
        self.lifecycle.close(conn)

    def connected(self, slot: Slot[ConnT]) -> None:
        """Count a connection the connector opened on ``slot``."""
        slot.generation = self.generation
        self.size += 1

    # -- return --------------------------------------------------------------------

    async def putconn(
        self, conn: ConnT, key: Hashable | None = None, close: object = False
    ) -> None:
        """Give a connection back; a true ``close`` discards it (any true value, as in
        psycopg2's pools: typed ``object`` for the reason :meth:`getconn` gives).

        A connection left in a transaction or in error is rolled back, one left
        mid-query or broken is discarded, and changed attributes (autocommit,
        isolation level, read only, deferrable) are restored.
        """
        slot = self.give_back(conn, key, close)
        if slot is not None:
            await self.validation.restore(slot, bool(close))

    def give_back(self, conn: ConnT, key: Hashable | None, close: object) -> Slot[ConnT] | None:
        """Take a borrowed connection back: None when that was all (the hot path).

        Else its slot, for ``validation.restore()``. Either way ``conn`` is no
        longer borrowed (its key is free). Raises :class:`PoolError` for a
        connection not borrowed here, or returned under another key. It never
        suspends nor schedules; it may complete a waiter's future.
        """
        if self._waiters and not self.threaded and get_ident() != self.loop_thread:
            # A waiter's future may be completed: from the pool's loop's thread only.
            # (In that thread, another loop can run only while the pool's does
            # not, and a waiter woken then resumes when the pool's loop runs.)
            self.check_loop()
        try:
            slot = self._borrowed.pop(conn)
        except (KeyError, TypeError):  # TypeError: unhashable, so certainly not ours
            raise self.validation.not_borrowed(conn, None) from None
        if slot.conn is not conn:
            raise self.validation.not_borrowed(conn, slot)
        if self._key_of or key is not None:
            self.validation.unkey(conn, slot, key)
        now = monotonic()
        used = now - slot.borrowed_at  # HistogramRecorder.record(), inlined, in two speeds
        use = self.use_hist
        if used < use.short_below:
            use.short += 1
            use.short_sum += used
        else:
            us = floor(used * 1e6)
            use.counts[us.bit_length()] += 1
            use.total_us += us
        if (
            not close
            and self._fast
            and self._state_of(conn) == slot.baseline
            and slot.expires_at > now
        ):
            slot.returned_at = now
            if self._waiters:
                self.queue.put(slot, True)
            else:
                self._idle.append(slot)  # self.queue.put(slot, True)
            return None
        if slot.leak_timer is not None:  # never on the fast path: leak_timeout turns it off
            slot.leak_timer.cancel()
            slot.leak_timer = None
        self.returning.add(slot)  # until after_return()
        return slot

    def after_return(self, slot: Slot[ConnT]) -> None:
        """A return is over: the slot goes back; closing or refilling follow."""
        if self.end_return(slot):
            self.closing.all_returned()
        elif self.state == OPEN and slot.conn is None:
            self.connector.fill()

    def end_return(self, slot: Slot[ConnT]) -> bool:
        """The slot of a return begun with :meth:`give_back` goes back (its connection
        closed if the pool is closing); True when that was the last connection a
        closing pool waited for. Never suspends nor schedules (callable from a thread
        of the sync facade under its lock)."""
        self.returning.discard(slot)
        self.release_slot(slot)
        return self.state == CLOSING and not self._borrowed and not self.returning

    def loan_of(self, conn: ConnT) -> float | None:
        """What identifies ``conn``'s current loan (when it began); None: not borrowed."""
        slot = self._borrowed.get(conn)
        return None if slot is None else slot.borrowed_at

    def loan_ended(self, conn: ConnT, loan: float | None) -> bool:
        """True if the loan ``loan`` (:meth:`loan_of` at checkout) of ``conn`` is over
        while the pool is not closed: given back (``putconn``, or ``close()`` with
        ``close_returns``), and maybe lent to another borrower since."""
        return self.state != CLOSED and self.loan_of(conn) != loan

    def held_by_key(self, key: Hashable) -> ConnT | None:
        """The connection checked out under ``key``, if any."""
        return self._keyed.get(key)

    @property
    def borrowed(self) -> dict[ConnT, Slot[ConnT]]:
        """Borrowed connections and their slots."""
        return self._borrowed

    def forget_borrowed(self) -> None:
        """Forget every borrowed connection and key (the pool closed)."""
        self._borrowed.clear()
        self._keyed.clear()
        self._key_of.clear()

    def new_generation(self) -> None:
        """Mark every connection open now as to be replaced (drain)."""
        self.generation += 1
        for slot in self._borrowed.values():
            # Expired, so that a return takes the slow path, which discards it.
            slot.expires_at = 0.0

    # -- stats -----------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A snapshot of the pool's state, counters and histograms."""
        return snapshot(
            self.name,
            self.size,
            len(self.queue),
            len(self._borrowed),
            self.queue.waiting + self.connecting_borrowers,
            self.min_size,
            self.max_size,
            self.counters,
            (self.wait_hist, self.use_hist, self.connect_hist),
        )

    def reset_stats(self) -> None:
        """Zero the counters and histograms (``pop_stats()``)."""
        self.counters = Counters()
        self.wait_hist.clear()
        self.use_hist.clear()
        self.connect_hist.clear()
