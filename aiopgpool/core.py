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
  trip. Each is written once (:meth:`PoolCore._lend_ready`,
  :meth:`PoolCore.give_back`) and shared with the thread port.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Hashable
from time import monotonic
from typing import Any, Generic, TypeVar

import anyio

from .connector import Connector
from .errors import PoolClosed, PoolError, PoolTimeout, TooManyRequests
from .lifecycle import Lifecycle
from .maintenance import Maintenance, close_dropped
from .options import PoolOptions, check_key, check_sizes, check_timeout
from .slot import Slot, mark_tested
from .stats import Counters, HistogramRecorder, PoolStats
from .waiting import HandoffQueue, WaitTimeout

__all__ = ["PoolCore"]

logger = logging.getLogger("aiopgpool")

ConnT = TypeVar("ConnT")

NEW, OPEN, CLOSING, CLOSED = "new", "open", "closing", "closed"

# With timeout=0 a request fails at once only when every slot is borrowed (or
# being set up for a borrower); a slot merely in transit (refilled, returned)
# is waited for, this long at most.
IN_TRANSIT_WAIT = 10.0
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
        "__weakref__",
        "_all_returned",
        "_borrowed",
        "_excess",
        "_fast",
        "_generation",
        "_idle",
        "_key_of",
        "_keyed",
        "_lifecycle",
        "_line",
        "_loop",
        "_max_size",
        "_min_size",
        "_owner",
        "_owner_type",
        "_preparing",
        "_queue",
        "_size",
        "_state",
        "_state_of",
        "_stats",
        "_target",
        "connect_hist",
        "connector",
        "leak_timeout",
        "maintenance",
        "max_idle",
        "max_lifetime",
        "max_waiting",
        "name",
        "null",
        "options",
        "ping_after_idle",
        "reconnect_timeout",
        "timeout",
        "use_hist",
        "wait_hist",
    )

    def __init__(
        self, lifecycle: Lifecycle[ConnT], options: PoolOptions, target: str, owner: Any = None
    ) -> None:
        self.options = options
        self.name: str = options.name  # type: ignore[assignment]  # set by PoolOptions
        self.null = options.null
        self._target = target
        self._lifecycle = lifecycle
        self._state_of = lifecycle.state_of  # read on every return: one lookup saved
        self._min_size = options.min_size
        self._max_size = options.max_size
        self.timeout = options.timeout
        self.max_waiting = options.max_waiting
        self.max_idle = options.max_idle
        self.max_lifetime = options.max_lifetime
        self.reconnect_timeout = options.reconnect_timeout
        self.leak_timeout = options.leak_timeout
        self.ping_after_idle = options.ping_after_idle
        # The object users hold: referenced weakly, so that a pool nobody
        # references can be collected (see close_dropped).
        self._owner = weakref.ref(self if owner is None else owner)
        self._owner_type = type(self if owner is None else owner).__name__

        self._state = NEW
        self._queue: HandoffQueue[Slot[ConnT]] = HandoffQueue(Slot, self._capacity(self._max_size))
        # The queue's own deques, for the two hottest paths (see HandoffQueue.items).
        self._idle = self._queue.items
        self._line = self._queue.line
        self._excess = 0  # slots to drop as they come back, after a shrinking resize
        self._size = 0  # open connections: idle, borrowed, or being checked
        # Borrowed connections and their slots (its size: how many are in use).
        self._borrowed: dict[ConnT, Slot[ConnT]] = {}
        self._keyed: dict[Hashable, ConnT] = {}
        self._key_of: dict[ConnT, Hashable] = {}
        self._generation = 0
        self._preparing = 0  # slots being checked or connected for a borrower
        self._all_returned: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = Counters()
        self.wait_hist = HistogramRecorder()
        self.use_hist = HistogramRecorder()
        self.connect_hist = HistogramRecorder()
        self._fast = False
        self.connector: Connector[ConnT] = Connector(self, lifecycle)
        self.maintenance: Maintenance[ConnT] = Maintenance(self)
        weakref.finalize(self, close_dropped, self.name, self._queue, lifecycle).atexit = False

    def _capacity(self, max_size: int) -> int:
        return UNBOUNDED if self.null and max_size == 0 else max_size

    # -- attributes --------------------------------------------------------------

    @property
    def min_size(self) -> int:
        """The number of connections the pool keeps open, idle or not."""
        return self._min_size

    @property
    def max_size(self) -> int:
        """The most connections the pool opens at once (0: no bound, null pools only)."""
        return self._max_size

    @property
    def state(self) -> str:
        """``new``, ``open``, ``closing`` or ``closed``."""
        return self._state

    @property
    def closed(self) -> bool:
        """True unless the pool is open: before ``open()``, and once closing."""
        return self._state != OPEN

    @property
    def size(self) -> int:
        """Connections open now: idle, borrowed, or being checked."""
        return self._size

    @property
    def owner(self) -> Any:
        """The public pool object this core serves (None once collected)."""
        return self._owner()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the pool was opened on."""
        return self._loop

    @property
    def lifecycle(self) -> Lifecycle[ConnT]:
        """What the core does to connections."""
        return self._lifecycle

    @property
    def stats_counters(self) -> Counters:
        """The live counters (for the collaborators)."""
        return self._stats

    def __repr__(self) -> str:
        return (
            f"<{self._owner_type} {self.name!r} {self._state} "
            f"size={self._size}/{self._max_size} in_use={len(self._borrowed)} "
            f"waiting={self._queue.waiting} {self._target}>"
        )

    # -- opening -----------------------------------------------------------------

    async def open(
        self, wait: bool = False, timeout: float = 30.0, *, fail_fast: bool = False
    ) -> None:
        """Start the pool: fill ``min_size`` connections in the background.

        With ``wait=True``, return once they exist or raise :class:`PoolTimeout`
        (the last connection error chained) after ``timeout`` seconds; with
        ``fail_fast=True`` too, the first connection error is raised at once.
        """
        check_timeout("timeout", timeout, allow_none=False)
        self.open_nowait()
        if wait:
            await self.connector.wait(timeout, fail_fast=fail_fast)

    def open_nowait(self) -> None:
        """Start the pool on the running loop, without waiting for connections."""
        if self._state == OPEN:
            self.check_loop()
            return
        if self._state != NEW:
            raise PoolClosed(f"pool {self.name!r} is closed and cannot be reopened")
        self._loop = asyncio.get_running_loop()
        self._queue.bind(self._loop)
        self._state = OPEN
        self.update_fast()
        logger.info(
            "pool %r opening (min_size=%d max_size=%d) %s",
            self.name,
            self._min_size,
            self._max_size,
            self._target,
        )
        self.connector.fill()
        self.maintenance.schedule()

    def check_open(self) -> None:
        """Raise :class:`PoolClosed` unless the pool is open."""
        if self._state != OPEN:
            raise self.closed_error()

    def check_loop(self) -> None:
        """Raise :class:`PoolError` when called from another loop than the pool's own.

        Called wherever the pool suspends or schedules, never on the idle hot path.
        """
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not self._loop and self._loop is not None:
            raise PoolError(
                f"pool {self.name!r} was opened on event loop {self._loop!r} and is used from "
                f"{loop!r}: a pool serves the loop it was opened on; create one per loop"
            )

    def closed_error(self) -> PoolClosed:
        """The error for a request the pool cannot take now."""
        if self._state == NEW:
            return PoolClosed(
                f"pool {self.name!r} is not open yet: call open() or use it as a context manager"
            )
        return PoolClosed(f"pool {self.name!r} is closed")

    # -- checkout ----------------------------------------------------------------

    async def getconn(self, timeout: float | None = None, *, key: Hashable | None = None) -> ConnT:
        """A connection, waiting up to ``timeout`` (default: the pool's) for one.

        The same ``key`` while its connection is held returns that connection
        again, without taking another slot.
        """
        # Under load every request waits, and each coroutine frame more in the
        # chain would cost again at every suspension and resumption: the wait
        # is written here rather than in a helper.
        if timeout is None and key is None and self._fast:  # _fast implies open
            self._stats.requests += 1
            idle = self._idle
            if idle:
                slot = idle.pop()
                conn = self._lend_ready(slot)
                if conn is not None:
                    return conn
                self._preparing += 1
                return self._lend(await self._prepare(slot, None, None), None)
            kept = self._queue.take_free_one()
        else:
            conn = self._request(timeout, key)
            if conn is not None:
                return conn  # the key's connection again: not a new request
            kept = self._queue.get_nowait()
        if kept is not None:
            self._preparing += 1
            return self._lend(await self._prepare(kept, None, timeout), key)
        # Nothing kept: wait in line.
        self.check_loop()
        stats = self._stats
        start = monotonic()
        wait: float | None
        if timeout is None and self.timeout and not self.max_waiting:
            wait = self.timeout  # the usual case of _wait_timeout(), inlined
        else:
            wait = self._wait_timeout(timeout)
        stats.requests_waited += 1
        fut = self._queue.join(wait, start)
        try:
            slot = await fut
        except BaseException as exc:
            self._waited(monotonic() - start)
            if not isinstance(exc, WaitTimeout):
                self._queue.withdraw(fut, _has_conn)
                raise
            stats.timeouts += 1
            raise self._timeout_error(timeout) from self.connector.failure_cause()
        self._waited(monotonic() - start)
        if key is None and self._fast and slot.conn is not None:
            conn = self._lend_ready(slot)
            if conn is not None:
                return conn
        self._preparing += 1
        return self._lend(await self._prepare(slot, start, timeout), key)

    def _request(self, timeout: float | None, key: Hashable | None) -> ConnT | None:
        """Validate a request off the hot path; the key's connection if it is held already."""
        if timeout is not None:
            check_timeout("timeout", timeout)
        if key is not None:
            check_key(key)
        if self._state != OPEN:
            raise self.closed_error()
        if key is not None and self._keyed:
            conn = self._keyed.get(key)
            if conn is not None:
                return conn
        self._stats.requests += 1
        return None

    def _waited(self, seconds: float) -> None:
        self._stats.wait_time_total += seconds
        self.wait_hist.record(seconds)

    def _lend_ready(self, slot: Slot[ConnT]) -> ConnT | None:
        """Lend ``slot``'s connection if it is ready as it is; None: it needs preparing.

        The one copy of the idle hot path's test: tested recently, or not
        expired and its socket quiet (a non-blocking system call). Only for
        requests with no key while the fast path is on (no check, no leak watch).
        """
        now = monotonic()
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
        lifecycle = self._lifecycle
        self._fast = (
            self._state == OPEN
            and not self.null
            and not self._excess
            and not lifecycle.has_check
            and not lifecycle.has_reset
            and self.leak_timeout is None
            and self.ping_after_idle is None
        )

    def _lend(self, slot: Slot[ConnT], key: Hashable | None, stack: str | None = None) -> ConnT:
        """Check out a prepared slot's connection (to ``key``, if given)."""
        conn = slot.conn
        assert conn is not None
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

    def _wait_timeout(self, timeout: float | None) -> float | None:
        """How long to wait in line; raises instead when ``timeout`` is 0 or the line is full."""
        timeout = self.effective_timeout(timeout)
        if timeout == 0:
            # Slots neither borrowed nor being set up for a borrower are in
            # transit (refilling, being returned) and will come back; those
            # already promised to the waiters ahead of us do not count.
            in_transit = (
                self._capacity(self._max_size)
                - len(self._borrowed)
                - self._preparing
                - self._excess
            )
            if in_transit <= self._queue.waiting:
                self._stats.timeouts += 1
                raise PoolTimeout("connection pool exhausted")
            timeout = IN_TRANSIT_WAIT
        if self.max_waiting and self._queue.waiting >= self.max_waiting:
            self._stats.timeouts += 1
            raise TooManyRequests(
                f"pool {self.name!r}: {self._queue.waiting} requests already waiting "
                f"(max_waiting={self.max_waiting})"
            )
        return timeout

    def _timeout_error(self, timeout: float | None) -> PoolTimeout:
        timeout = self.effective_timeout(timeout)
        return PoolTimeout(f"pool {self.name!r}: no connection available after {timeout:g} s")

    async def _prepare(
        self, slot: Slot[ConnT], start: float | None, timeout: float | None
    ) -> Slot[ConnT]:
        """Make a slot's connection usable: check it, or replace it, or open one.

        ``start``: when the request began (None: now). The caller counted the
        slot in ``_preparing``; this counts it out.
        """
        try:
            self.check_loop()
            if start is None:
                start = monotonic()
            timeout = self.effective_timeout(timeout)
            # A slot had at once (timeout=0) still gets connected within the
            # pool's own timeout; when that is 0 too (psycopg2's "fail at
            # once"), one attempt is made and its error raised, as
            # psycopg2.pool does.
            budget = timeout or self.timeout
            deadline = None if budget is None else start + budget
            retry = budget != 0
            while True:
                if slot.conn is not None:
                    if await self._usable(slot):
                        if self._state == CLOSED:  # closed while we checked it
                            raise self.closed_error()
                        return slot
                    swapped = self._queue.swap_top(slot)
                    if swapped is not None:
                        slot = swapped
                    continue
                await self.connector.connect(slot, None if not retry else deadline, retry=retry)
                self.connector.notify_size()
                if await self._checked(slot):
                    return slot
        except PoolTimeout:
            self._stats.timeouts += 1
            self.release_slot(slot)
            raise
        except BaseException:
            self.release_slot(slot)
            raise
        finally:
            self._preparing -= 1

    async def _usable(self, slot: Slot[ConnT]) -> bool:
        """Whether a connected slot can be handed out; discards it if not."""
        conn = slot.conn
        assert conn is not None
        now = monotonic()
        if slot.expires_at <= now:
            self.discard(slot, "max_lifetime reached")
            return False
        ping = self.ping_after_idle
        if not slot.quiet() or (ping is not None and now - slot.returned_at > ping):
            try:
                await self._lifecycle.probe(conn)
            except Exception as exc:
                self.discard(slot, f"dead while idle ({exc.__class__.__name__})", lost=True)
                return False
        if not await self._checked(slot):
            return False
        if slot.generation != self._generation:  # drained while we checked it
            self.discard(slot, "drained")
            return False
        mark_tested(slot, monotonic())
        return True

    async def _checked(self, slot: Slot[ConnT]) -> bool:
        """Run the user's ``check`` (if any) on a slot's connection; discards it if it fails."""
        if not self._lifecycle.has_check:
            return True
        conn = slot.conn
        assert conn is not None
        try:
            await self._lifecycle.check(conn)
        except Exception as exc:
            self.discard(slot, f"check failed ({exc.__class__.__name__}: {exc})", lost=True)
            return False
        return True

    def release_slot(self, slot: Slot[ConnT]) -> None:
        """Give a slot back to the queue (or drop it, after a shrinking resize)."""
        if self._state == CLOSED:
            if slot.conn is not None:
                self.discard(slot, "pool closed")
            return
        if self._excess:
            self._excess -= 1
            self.update_fast()
            if slot.conn is not None:
                self.discard(slot, "pool resized")
            return
        self._queue.put(slot, slot.conn is not None)

    def discard(self, slot: Slot[ConnT], reason: str, *, lost: bool = False) -> None:
        """Close a slot's connection; the slot becomes free."""
        conn = slot.conn
        if conn is None:
            return
        slot.clear()
        self._size -= 1
        if lost:
            self._stats.connections_lost += 1
        else:
            self._stats.connections_closed += 1
        logger.debug("pool %r: closing a connection: %s", self.name, reason)
        self._lifecycle.close(conn)

    def connected(self, slot: Slot[ConnT]) -> None:
        """Count a connection the connector opened on ``slot``."""
        slot.generation = self._generation
        self._size += 1

    # -- return --------------------------------------------------------------------

    async def putconn(self, conn: ConnT, key: Hashable | None = None, close: bool = False) -> None:
        """Give a connection back; ``close=True`` discards it.

        A connection left in a transaction or in error is rolled back, one left
        mid-query or broken is discarded, and changed attributes (autocommit,
        isolation level, read only, deferrable) are restored.
        """
        slot = self.give_back(conn, key, close)
        if slot is not None:
            await self.return_slow(slot, close)

    def give_back(self, conn: ConnT, key: Hashable | None, close: bool) -> Slot[ConnT] | None:
        """Take a borrowed connection back: None when that was all (the hot path).

        Else its slot, for :meth:`return_slow`. Either way ``conn`` is no
        longer borrowed (its key is free). Raises :class:`PoolError` for a
        connection not borrowed here, or returned under another key. It never
        suspends nor schedules; it may complete a waiter's future.
        """
        try:
            slot = self._borrowed.pop(conn)
        except (KeyError, TypeError):  # TypeError: unhashable, so certainly not ours
            raise self._not_borrowed(conn, None) from None
        if slot.conn is not conn:
            raise self._not_borrowed(conn, slot)
        if self._key_of or key is not None:
            self._unkey(conn, slot, key)
        if slot.leak_timer is not None:
            slot.leak_timer.cancel()
            slot.leak_timer = None
        now = monotonic()
        used = int((now - slot.borrowed_at) * 1e6)  # HistogramRecorder.record(), inlined
        use = self.use_hist
        use.counts[used.bit_length()] += 1
        use.total_us += used
        if (
            not close
            and self._fast
            and self._state_of(conn) == slot.baseline
            and slot.expires_at > now
        ):
            slot.returned_at = now
            if self._line:
                self._queue.put(slot, True)
            else:
                self._idle.append(slot)  # self._queue.put(slot, True)
            return None
        return slot

    def _unkey(self, conn: ConnT, slot: Slot[ConnT], key: Hashable | None) -> None:
        held = self._key_of.get(conn)
        if key is not None and held != key:
            self._borrowed[conn] = slot
            raise PoolError(
                f"pool {self.name!r}: this connection was taken "
                + ("without a key" if held is None else f"under key {held!r}")
                + f", not {key!r}"
            )
        if held is not None:
            del self._key_of[conn]
            del self._keyed[held]

    async def return_slow(self, slot: Slot[ConnT], close: bool) -> None:
        """The rest of a return that needs work: clean, reset, expire or discard."""
        conn = slot.conn
        assert conn is not None
        lifecycle = self._lifecycle
        try:
            if close:
                self.discard(slot, "closed by its borrower")
            elif self._state != OPEN or self.null or self._excess:
                self.discard(slot, "not kept")
            elif slot.generation != self._generation:
                self.discard(slot, "drained")
            else:
                self.check_loop()
                if lifecycle.is_bad_return(conn):
                    self.note_bad_return(lifecycle.describe_state(conn))
                if not lifecycle.is_clean(conn, slot.baseline) and not await lifecycle.clean(
                    conn, slot.baseline
                ):
                    self.discard(slot, "could not be cleaned after return")
                elif lifecycle.has_reset and not await lifecycle.reset(conn):
                    logger.warning("pool %r: reset left a connection unusable", self.name)
                    self.discard(slot, "reset left it unusable")
                elif slot.expires_at <= monotonic():
                    self.discard(slot, "max_lifetime reached")
        except BaseException as exc:
            # Cleaning failed or was interrupted (the borrower cancelled again):
            # the connection is in an unknown state, so it goes; the slot stays.
            self.discard(slot, f"cleaning failed ({exc.__class__.__name__})")
            if not isinstance(exc, Exception):
                raise
            logger.warning("pool %r: discarded a returned connection: %s", self.name, exc)
        finally:
            slot.returned_at = monotonic()
            self._after_return(slot)

    def note_bad_return(self, description: str) -> None:
        """Count (and log at WARNING) a connection returned in a bad state."""
        self._stats.returns_bad += 1
        logger.warning("pool %r: a connection was returned %s", self.name, description)

    def _after_return(self, slot: Slot[ConnT]) -> None:
        self.release_slot(slot)
        if self._state == CLOSING and not self._borrowed and self._all_returned is not None:
            if not self._all_returned.done():
                self._all_returned.set_result(None)
        elif self._state == OPEN and slot.conn is None:
            self.connector.fill()

    def _not_borrowed(self, conn: ConnT, slot: Slot[ConnT] | None) -> PoolError:
        if slot is not None and slot.conn is not None:
            # another connection that compares equal to it: put that one back
            self._borrowed[slot.conn] = slot
        if self._state == CLOSED:
            return PoolClosed(f"pool {self.name!r} is closed")
        return PoolError(
            f"pool {self.name!r}: this connection is not borrowed from this pool "
            "(a foreign connection, or returned twice)"
        )

    def held_by_key(self, key: Hashable) -> ConnT | None:
        """The connection checked out under ``key``, if any."""
        return self._keyed.get(key)

    def borrowed_slot(self, conn: ConnT) -> Slot[ConnT]:
        """The slot of a borrowed connection; PoolError if it is not borrowed here."""
        try:
            slot = self._borrowed.get(conn)
        except TypeError:
            slot = None
        if slot is None or slot.conn is not conn:
            raise self._not_borrowed(conn, None)
        return slot

    # -- the queue, for the collaborators --------------------------------------------

    @property
    def queue(self) -> HandoffQueue[Slot[ConnT]]:
        """The hand-off queue of slots."""
        return self._queue

    @property
    def generation(self) -> int:
        """Incremented by :meth:`~aiopgpool.maintenance.Maintenance.drain`."""
        return self._generation

    def new_generation(self) -> None:
        """Mark every connection open now as to be replaced (drain)."""
        self._generation += 1
        for slot in self._borrowed.values():
            # Expired, so that a return takes the slow path, which discards it.
            slot.expires_at = 0.0

    # -- resize ----------------------------------------------------------------------

    async def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's sizes (``max_size=None``: ``min_size``, as psycopg_pool).

        Connections beyond a smaller max go as they come back.
        """
        self.check_open()
        if max_size is None:
            max_size = min_size
        check_sizes(min_size, max_size, null=self.null)
        grow = self._capacity(max_size) - self._capacity(self._max_size)
        self._min_size = min_size
        self._max_size = max_size
        if grow > 0:
            cancel = min(grow, self._excess)
            self._excess -= cancel
            self._queue.add_free(grow - cancel)
        elif grow < 0:
            # Free slots go first, then the least recently used idle connections;
            # whatever is left is dropped as borrowed connections come back.
            shrink = -grow - self._queue.take_free(-grow)
            if shrink:
                idle = self._queue.take(_has_conn)  # least recently used first
                for slot in idle[:shrink]:
                    self.discard(slot, "pool resized")
                for slot in idle[shrink:]:
                    self._queue.put(slot, True)
                shrink -= min(shrink, len(idle))
            self._excess += shrink
        self.update_fast()
        self.connector.fill()

    # -- closing -------------------------------------------------------------------

    async def closeall(self) -> None:
        """Close every connection now, borrowed ones included; the pool is closed."""
        if self._state == CLOSED:
            raise PoolClosed(f"pool {self.name!r} is already closed")
        self.close_now()

    async def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, wait up to ``timeout`` for borrowed connections, close.

        When it returns the pool is closed, even when another ``close()`` is
        still waiting for returns (this one waits with it, up to its own
        ``timeout``).
        """
        check_timeout("timeout", timeout, allow_none=False)
        if self._state == CLOSED:
            return
        if self._state == NEW:
            self.close_now()
            return
        if self._state == OPEN:
            self._state = CLOSING
            self._fast = False
            self._queue.fail_waiters(self.closed_error)
            if self._borrowed:
                self._all_returned = asyncio.get_running_loop().create_future()
        if self._all_returned is not None and not self._all_returned.done():
            with anyio.move_on_after(timeout) as scope:
                await asyncio.shield(self._all_returned)
            if scope.cancelled_caught and self._state != CLOSED:
                logger.warning(
                    "pool %r: %d connections still borrowed after %g s: closing them",
                    self.name,
                    len(self._borrowed),
                    timeout,
                )
        if self._state != CLOSED:
            self.close_now()

    def close_dropped(self) -> None:
        """Close now, leaving borrowed connections open: for a pool object nobody references.

        Nobody can give those connections back any more, and closing them
        would break whoever still uses one; each closes with its own object.
        """
        if self._state == CLOSED:
            return
        if self._borrowed:
            logger.warning(
                "pool %r was dropped without close(): %d borrowed connections are left "
                "to their borrowers",
                self.name,
                len(self._borrowed),
            )
        self.close_now(keep_borrowed=True)

    def close_now(self, *, keep_borrowed: bool = False) -> None:
        """Close at once: fail waiters, stop background work, close connections."""
        self._state = CLOSED
        self._fast = False
        if self._all_returned is not None and not self._all_returned.done():
            self._all_returned.set_result(None)  # a close() waiting for returns: stop waiting
        self.maintenance.stop()
        self._queue.fail_waiters(self.closed_error)
        self.connector.stop(self.closed_error)
        for slot in self._queue.take(_has_conn):
            self.discard(slot, "pool closed")
        for slot in self._borrowed.values():
            if slot.leak_timer is not None:
                slot.leak_timer.cancel()
            if not keep_borrowed:
                self.discard(slot, "pool closed while borrowed")
        self._borrowed.clear()
        self._keyed.clear()
        self._key_of.clear()
        logger.info("pool %r closed", self.name)

    # -- stats -----------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A snapshot of the pool's state and counters."""
        c = self._stats
        return PoolStats(
            name=self.name,
            size=self._size,
            idle=len(self._queue),
            in_use=len(self._borrowed),
            waiting=self._queue.waiting,
            min_size=self._min_size,
            max_size=self._max_size,
            requests=c.requests,
            requests_waited=c.requests_waited,
            wait_time_total=c.wait_time_total,
            timeouts=c.timeouts,
            connections_created=c.connections_created,
            connections_failed=c.connections_failed,
            connections_lost=c.connections_lost,
            returns_bad=c.returns_bad,
            leaks=c.leaks,
            connections_closed=c.connections_closed,
            # Requests served at once are not recorded one by one: they waited 0.
            wait_time_histogram=self.wait_hist.snapshot(c.requests - c.requests_waited),
            use_time_histogram=self.use_hist.snapshot(),
            connect_time_histogram=self.connect_hist.snapshot(),
        )

    def reset_stats(self) -> None:
        """Zero the counters and histograms (``pop_stats()``)."""
        self._stats = Counters()
        self.wait_hist.clear()
        self.use_hist.clear()
        self.connect_hist.clear()
