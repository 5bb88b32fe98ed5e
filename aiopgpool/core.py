"""The asyncio pool core: slots, checkout and return, growth, maintenance, closing.

:class:`PoolCore` is generic over the kind of connection; a
:class:`~aiopgpool.lifecycle.Lifecycle` does everything that touches one. It
runs on one event loop and knows nothing of threads.

Design, in short:

* ``max_size`` :class:`~aiopgpool.lifecycle.Holder` objects live in a
  :class:`~aiopgpool.waiting.HandoffQueue`; a holder is a slot, with or
  without a connection. Taking a holder is taking a slot, so the queue is the
  semaphore and "never more than ``max_size``" holds by construction.
* A borrower that gets an empty holder connects on it itself (many borrowers
  connect concurrently, bounded by a semaphore), within its own deadline.
* The hot path (an idle connection is ready, nobody waits): ``getconn`` pops
  the top holder, makes a non-blocking socket test and returns; ``putconn``
  sees the connection idle with its attributes unchanged and pushes it back.
  No lock, no task, no server round trip.
"""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
import weakref
from collections.abc import Callable, Hashable
from time import monotonic
from typing import Any, Generic, TypeVar

import anyio

from .backoff import Backoff
from .errors import PoolClosed, PoolError, PoolTimeout, TooManyRequests
from .lifecycle import Baseline, Holder, Lifecycle
from .options import check_sizes, check_timeout
from .stats import Counters, PoolStats
from .waiting import HandoffQueue, Waiter, WaitTimeout

__all__ = ["PoolCore"]

logger = logging.getLogger("aiopgpool")

ConnT = TypeVar("ConnT")

_NEW, _OPEN, _CLOSING, _CLOSED = "new", "open", "closing", "closed"

# Connections opened at the same time by one pool.
MAX_CONCURRENT_CONNECTS = 16
# A connection's max_lifetime is shortened by up to this fraction, so that
# connections made together do not all expire together.
LIFETIME_JITTER = 0.05
# An idle connection's socket is tested at checkout unless it was tested this
# recently: a test that old is nearly as good as one made now, since the server
# can close a connection just after any test. Under load this makes the test
# rare, and it matters: it is a system call, which costs several microseconds
# more than it seems on a busy machine (the SELECT 1 benchmark at 100 tasks
# loses about 5 % with 1 ms here). A connection idle for longer is always tested.
SOCKET_TEST_INTERVAL = 0.01
# With timeout=0 a request fails at once only when every slot is borrowed (or
# being set up for a borrower); a slot merely in transit (refilled, returned)
# is waited for, this long at most.
IN_TRANSIT_WAIT = 10.0


def _tested(holder: Holder[Any], now: float) -> None:
    """Record that ``holder``'s connection was found alive at ``now``."""
    holder.fresh_until = min(holder.expires_at, now + SOCKET_TEST_INTERVAL)


def _is_connected(holder: Holder[Any]) -> bool:
    return holder.conn is not None


def _maintain(ref: weakref.ref[PoolCore[Any]]) -> None:
    core = ref()
    if core is not None:
        core._maintain()


def _close_dropped(name: str, queue: HandoffQueue[Holder[Any]], lifecycle: Lifecycle[Any]) -> None:
    """The finalizer of a pool dropped while open: close its idle connections.

    Borrowed connections are left to their borrowers: nobody can return them.
    """
    idle = [holder.conn for holder in queue.take(_is_connected)]
    if idle:
        logger.warning(
            "pool %r was dropped without close(): closing its %d idle connections",
            name,
            len(idle),
        )
    for conn in idle:
        lifecycle.close(conn)


class PoolCore(Generic[ConnT]):
    """The pool machinery shared by every pool class; see the module docstring."""

    # Slots, not a __dict__: with more than 30 attributes an instance dict
    # no longer shares its keys, and every self.x on the hot paths becomes a
    # dict lookup (slots cut about 1,000 instructions per waited checkout).
    __slots__ = (
        "__weakref__",
        "_all_returned",
        "_borrowed",
        "_connect_slots",
        "_excess",
        "_fail_fast_watchers",
        "_failing_since",
        "_failure_reported",
        "_filling",
        "_generation",
        "_idle",
        "_keep_idle",
        "_key_of",
        "_keyed",
        "_last_error",
        "_lifecycle",
        "_line",
        "_loop",
        "_maintenance",
        "_max_size",
        "_min_size",
        "_owner",
        "_owner_type",
        "_plain",
        "_preparing",
        "_queue",
        "_reconnect_failed",
        "_size",
        "_size_watchers",
        "_state",
        "_state_of",
        "_stats",
        "_target",
        "_tasks",
        "leak_timeout",
        "max_idle",
        "max_lifetime",
        "max_waiting",
        "name",
        "reconnect_timeout",
        "timeout",
    )

    def __init__(
        self,
        lifecycle: Lifecycle[ConnT],
        *,
        name: str,
        target: str,
        min_size: int,
        max_size: int,
        timeout: float | None,
        max_waiting: int,
        max_idle: float | None,
        max_lifetime: float | None,
        reconnect_timeout: float | None,
        reconnect_failed: Callable[[Any], None] | None,
        leak_timeout: float | None,
        keep_idle: bool = True,
        owner: Any = None,
    ) -> None:
        check_sizes(min_size, max_size)
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting must be an integer >= 0, got {max_waiting!r}")
        if reconnect_failed is not None and not callable(reconnect_failed):
            raise ValueError("reconnect_failed must be callable")
        self.name = name
        self._target = target
        self._lifecycle = lifecycle
        self._state_of = lifecycle.state_of  # read on every return: one lookup saved
        self._min_size = min_size
        self._max_size = max_size
        self.timeout = check_timeout("timeout", timeout)
        self.max_waiting = max_waiting
        self.max_idle = check_timeout("max_idle", max_idle)
        self.max_lifetime = check_timeout("max_lifetime", max_lifetime)
        self.reconnect_timeout = check_timeout("reconnect_timeout", reconnect_timeout)
        self.leak_timeout = check_timeout("leak_timeout", leak_timeout)
        self._reconnect_failed = reconnect_failed
        self._keep_idle = keep_idle
        # The object users hold (a sync facade holds its core): referenced
        # weakly, so that a facade nobody references can be collected.
        self._owner = weakref.ref(self if owner is None else owner)
        self._owner_type = type(self if owner is None else owner).__name__

        self._state = _NEW
        self._queue: HandoffQueue[Holder[ConnT]] = HandoffQueue(_is_connected)
        for _ in range(max_size):
            self._queue.put(Holder())
        # The queue's own deques, for the two hottest paths (see HandoffQueue.items).
        self._idle = self._queue.items
        self._line = self._queue.line
        self._excess = 0  # holders to drop as they come back, after a shrinking resize
        self._size = 0  # open connections: idle, borrowed, or being checked
        # Borrowed connections and their holders (its size: how many are in use).
        self._borrowed: dict[ConnT, Holder[ConnT]] = {}
        self._keyed: dict[Hashable, ConnT] = {}
        self._key_of: dict[ConnT, Hashable] = {}
        self._generation = 0
        self._filling = 0
        self._preparing = 0  # slots being checked or connected for a borrower
        self._connect_slots = asyncio.Semaphore(min(max_size, MAX_CONCURRENT_CONNECTS) or 1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._size_watchers: list[asyncio.Future[None]] = []
        self._fail_fast_watchers: list[asyncio.Future[None]] = []  # a subset of those
        self._all_returned: asyncio.Future[None] | None = None
        self._maintenance: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_error: BaseException | None = None
        self._failing_since: float | None = None
        self._failure_reported = False
        self._stats = Counters()
        self._plain = False
        weakref.finalize(self, _close_dropped, name, self._queue, lifecycle).atexit = False

    # -- attributes --------------------------------------------------------------

    @property
    def min_size(self) -> int:
        """The number of connections the pool keeps open, idle or not."""
        return self._min_size

    @property
    def max_size(self) -> int:
        """The most connections the pool opens at once."""
        return self._max_size

    @property
    def closed(self) -> bool:
        """True once the pool is closed (or closing)."""
        return self._state in (_CLOSING, _CLOSED)

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
        ``fail_fast=True`` too, the first connection error is raised at once
        (see :meth:`wait`).
        """
        if self._state == _OPEN:
            if wait:
                await self.wait(timeout, fail_fast=fail_fast)
            return
        if self._state != _NEW:
            raise PoolClosed(f"pool {self.name!r} is closed and cannot be reopened")
        self._loop = asyncio.get_running_loop()
        self._state = _OPEN
        self._update_plain()
        logger.info(
            "pool %r opening (min_size=%d max_size=%d) %s",
            self.name,
            self._min_size,
            self._max_size,
            self._target,
        )
        self._fill()
        self._schedule_maintenance()
        if wait:
            await self.wait(timeout, fail_fast=fail_fast)

    async def wait(self, timeout: float = 30.0, *, fail_fast: bool = False) -> None:
        """Wait until ``min_size`` connections are open, or raise :class:`PoolTimeout`.

        ``fail_fast=True``: a connection attempt that fails meanwhile raises
        its own error at once, as psycopg2's pools do when they connect at
        construction (the drop-ins use it).
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._size_watchers.append(fut)
        if fail_fast:
            self._fail_fast_watchers.append(fut)
        self._notify_size()
        try:
            with anyio.fail_after(timeout):
                await fut
        except TimeoutError:
            raise PoolTimeout(
                f"pool {self.name!r}: {self._size} of min_size {self._min_size} "
                f"connections after {timeout:g} s"
            ) from self._last_error
        finally:
            for watchers in (self._size_watchers, self._fail_fast_watchers):
                if fut in watchers:
                    watchers.remove(fut)

    def _notify_size(self) -> None:
        if self._size >= self._min_size and self._size_watchers:
            for fut in self._size_watchers:
                if not fut.done():
                    fut.set_result(None)
            self._size_watchers.clear()
            self._fail_fast_watchers.clear()

    def _check_open(self) -> None:
        if self._state != _OPEN:
            raise self._closed_error()

    def _closed_error(self) -> PoolClosed:
        if self._state == _NEW:
            return PoolClosed(
                f"pool {self.name!r} is not open yet: call open() or use it as a context manager"
            )
        return PoolClosed(f"pool {self.name!r} is closed")

    # -- checkout ----------------------------------------------------------------

    async def getconn(self, key: Hashable | None = None, timeout: float | None = None) -> ConnT:
        """A connection, waiting up to ``timeout`` (default: the pool's) for one.

        The same ``key`` while its connection is held returns that connection
        again, without taking another slot.
        """
        # The helpers are inlined here: this is the hottest path, and under
        # load every request waits, so each coroutine frame more in the chain
        # would cost again at every suspension and resumption.
        if key is None and self._plain:  # _plain implies open
            self._stats.requests += 1
            idle = self._idle
            if idle:
                holder = idle.pop()  # self._queue.get_nowait()
                conn = holder.conn
                now = monotonic()
                if conn is not None and (  # _ready()
                    now < holder.fresh_until or self._still_ready(holder, now)
                ):
                    self._borrowed[conn] = holder  # _checkout(holder, None)
                    return conn
                self._preparing += 1
                return self._checkout(await self._prepare(holder, now, timeout), None)
        else:
            conn = self._keyed_or_closed(key)
            if conn is not None:
                return conn  # the key's connection again: not a new request
            self._stats.requests += 1
            kept = self._queue.get_nowait()
            if kept is not None:
                self._preparing += 1
                return self._checkout(await self._prepare(kept, None, timeout), key)
        # Nothing kept: wait in line.
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
            holder = await fut
        except BaseException as exc:
            stats.wait_time_total += monotonic() - start
            if not isinstance(exc, WaitTimeout):
                self._queue.withdraw(fut)
                raise
            stats.timeouts += 1
            raise self._timeout_error(timeout) from self._failure_cause()
        now = monotonic()
        stats.wait_time_total += now - start
        conn = holder.conn
        if (
            conn is not None
            and key is None
            and self._plain
            and (now < holder.fresh_until or self._still_ready(holder, now))
        ):
            self._borrowed[conn] = holder
            return conn
        self._preparing += 1
        return self._checkout(await self._prepare(holder, start, timeout), key)

    def _keyed_or_closed(self, key: Hashable | None) -> ConnT | None:
        """The connection already held under ``key``; raises if the pool is not open."""
        if self._state != _OPEN:
            raise self._closed_error()
        return self._keyed.get(key) if key is not None and self._keyed else None

    def _ready(self, holder: Holder[ConnT], conn: ConnT) -> bool:
        """An idle connection can be handed out as it is: not expired, socket quiet."""
        now = monotonic()
        return now < holder.fresh_until or self._still_ready(holder, now)

    @staticmethod
    def _still_ready(holder: Holder[ConnT], now: float) -> bool:
        """:meth:`_ready` once ``now`` is past ``fresh_until``: not expired, socket quiet."""
        if holder.expires_at > now and holder.quiet():
            _tested(holder, now)
            return True
        return False

    def _update_plain(self) -> None:
        # True when checkouts and returns need none of the rarer features, so
        # the hot paths test one flag instead of six conditions.
        lifecycle = self._lifecycle
        self._plain = (
            self._state == _OPEN
            and self._keep_idle
            and not self._excess
            and not lifecycle.has_check
            and not lifecycle.has_reset
            and self.leak_timeout is None
        )

    def _checkout(
        self, holder: Holder[ConnT], key: Hashable | None, stack: str | None = None
    ) -> ConnT:
        conn = holder.conn
        assert conn is not None
        self._borrowed[conn] = holder
        if self.leak_timeout is not None:
            self._watch_leak(holder, stack)
        if key is not None:
            self._keyed[key] = conn
            self._key_of[conn] = key
        return conn

    def try_getconn_nowait(self, key: Hashable | None = None, test: bool = True) -> ConnT | None:
        """The fast path of :meth:`getconn` as a plain call: a ready idle connection, or None.

        It never suspends, never schedules a callback and never completes a
        future, so it is safe to call whenever no other code of this pool's
        event loop is running at the same time. None means "call getconn()".
        ``test=False``: None also when the connection's socket is due for a
        test (a system call), for a caller that would rather make it outside
        its lock (see :meth:`test_slot`).
        """
        if key is not None or not self._plain:
            conn = self._keyed_or_closed(key)
            if conn is not None or not self._plain:
                return conn
        # The sync facade's hot path: helpers inlined as in getconn().
        idle = self._idle
        if not idle:
            return None
        holder = idle.pop()  # self._queue.get_nowait()
        conn = holder.conn
        now = monotonic()
        if conn is not None and (
            now < holder.fresh_until or (test and self._still_ready(holder, now))
        ):
            self._stats.requests += 1
            if key is None:
                self._borrowed[conn] = holder  # _checkout(holder, None)
                return conn
            return self._checkout(holder, key)
        # Items were kept, so nobody waits: put() just puts it back where it was.
        self._queue.put(holder)
        return None

    def _effective_timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else check_timeout("timeout", timeout)

    def _wait_timeout(self, timeout: float | None) -> float | None:
        """How long to wait in line; raises instead when ``timeout`` is 0 or the line is full.

        ``timeout`` as given to getconn (None: the pool's).
        """
        timeout = self._effective_timeout(timeout)
        if timeout == 0:
            # Slots neither borrowed nor being set up for a borrower are in
            # transit (refilling, being returned) and will come back; those
            # already promised to the waiters ahead of us do not count.
            in_transit = self._max_size - len(self._borrowed) - self._preparing - self._excess
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
        timeout = self._effective_timeout(timeout)
        return PoolTimeout(f"pool {self.name!r}: no connection available after {timeout:g} s")

    def _failure_cause(self) -> BaseException | None:
        return self._last_error if self._failing_since is not None else None

    async def _prepare(
        self, holder: Holder[ConnT], start: float | None, timeout: float | None
    ) -> Holder[ConnT]:
        """Make a slot's connection usable: check it, or replace it, or open one.

        ``start``: when the request began (None: now). The caller counted the
        slot in ``_preparing``; this counts it out.
        """
        try:
            if start is None:
                start = monotonic()
            timeout = self._effective_timeout(timeout)
            # A slot had at once (timeout=0) still gets connected within the
            # pool's own timeout; when that is 0 too (psycopg2's "fail at
            # once"), one attempt is made and its error raised, as
            # psycopg2.pool does.
            budget = timeout or self.timeout
            deadline = None if budget is None else start + budget
            retry = budget != 0
            while True:
                if holder.conn is not None:
                    if await self._usable(holder):
                        if self._state == _CLOSED:  # closed while we checked it
                            raise self._closed_error()
                        return holder
                    swapped = self._queue.swap_top(holder)
                    if swapped is not None:
                        holder = swapped
                    continue
                await self._connect(holder, None if not retry else deadline, retry=retry)
                self._notify_size()
                return holder
        except PoolTimeout:
            self._stats.timeouts += 1
            self._release_slot(holder)
            raise
        except BaseException:
            self._release_slot(holder)
            raise
        finally:
            self._preparing -= 1

    # -- checkout by an outside waiter (the sync facade's threads) ---------------------

    def request_nowait(
        self, key: Hashable | None, waiter: Waiter[Holder[ConnT]], timeout: float | None
    ) -> ConnT | Holder[ConnT] | None:
        """Start a checkout without suspending, for a caller that waits on its own.

        Returns a connection (a keyed one held already), a slot to finish
        with :meth:`checkout_slot_nowait` (then :meth:`checkout_slot`), or None when
        ``waiter`` (a future-like object whose ``set_result`` is safe to call
        from this pool's code) was put in line; it will be completed with a
        slot, or with an exception when the pool closes. A caller that stops
        waiting calls :meth:`abandon_wait`. Like the other ``*_nowait`` calls,
        this never schedules anything on the event loop.
        """
        conn = self._keyed_or_closed(key)
        if conn is not None:
            return conn
        self._stats.requests += 1
        holder = self._queue.get_nowait()
        if holder is not None:
            return holder
        self._wait_timeout(timeout)
        self._stats.requests_waited += 1
        self._queue.add_waiter(waiter)
        return None

    def wait_timeout(self, timeout: float | None) -> float | None:
        """How long an outside waiter put in line by :meth:`request_nowait` waits."""
        timeout = self._effective_timeout(timeout)
        return IN_TRANSIT_WAIT if timeout == 0 else timeout

    def abandon_wait(
        self, waiter: Waiter[Holder[ConnT]], waited: float, timeout: float | None
    ) -> Holder[ConnT]:
        """Account for an outside wait that ended; return the slot it got, or raise.

        Raises :class:`PoolTimeout` when the waiter got nothing (it is taken
        out of the line), or the exception the pool completed it with.
        """
        self._stats.wait_time_total += waited
        holder = self._queue.abandon(waiter)
        if holder is None:
            self._stats.timeouts += 1
            raise self._timeout_error(timeout) from self._failure_cause()
        return holder

    @staticmethod
    def test_slot(holder: Holder[ConnT]) -> None:
        """Test the socket of a slot's idle connection now, if due (see SOCKET_TEST_INTERVAL).

        It touches only ``holder``, so a caller that owns the slot (from
        :meth:`request_nowait`) may call it without the lock it holds around
        the other ``*_nowait`` calls: the test is a system call, which lets
        other threads run.
        """
        now = monotonic()
        if holder.conn is not None and now >= holder.fresh_until:
            PoolCore._still_ready(holder, now)

    def checkout_slot_nowait(self, holder: Holder[ConnT], key: Hashable | None) -> ConnT | None:
        """Hand out a slot's connection if it is ready as it is.

        None means it needs work: the caller must then finish with
        :meth:`checkout_slot` (the slot now counts as being set up).
        """
        conn = holder.conn
        if conn is None or not self._plain or not self._ready(holder, conn):
            self._preparing += 1
            return None
        return self._checkout(holder, key)

    async def checkout_slot(
        self,
        holder: Holder[ConnT],
        key: Hashable | None,
        timeout: float | None,
        start: float,
        stack: str | None = None,
    ) -> ConnT:
        """Finish a checkout on the event loop: check, replace or connect the slot's connection.

        ``start`` is the ``time.monotonic()`` at which the request began (the
        clock of asyncio's default loops); ``stack`` the borrower's stack, for
        leak reports when the borrower is in another thread.
        """
        holder = await self._prepare(holder, start, timeout)
        return self._checkout(holder, key, stack)

    def release_slot_nowait(self, holder: Holder[ConnT]) -> None:
        """Give back a slot obtained by :meth:`request_nowait` but not used."""
        self._release_slot(holder)

    async def _usable(self, holder: Holder[ConnT]) -> bool:
        """Whether a connected holder can be handed out; discards it if not."""
        conn = holder.conn
        assert conn is not None
        if holder.expires_at <= self._now():
            self._discard(holder, "max_lifetime reached")
            return False
        lifecycle = self._lifecycle
        if not holder.quiet():
            try:
                await lifecycle.probe(conn)
            except Exception as exc:
                self._discard(holder, f"dead while idle ({exc.__class__.__name__})", lost=True)
                return False
        if lifecycle.has_check:
            try:
                await lifecycle.check(conn)
            except Exception as exc:
                self._discard(holder, f"check failed ({exc.__class__.__name__}: {exc})", lost=True)
                return False
        if holder.generation != self._generation:  # drained while we checked it
            self._discard(holder, "drained")
            return False
        _tested(holder, monotonic())
        return True

    def _release_slot(self, holder: Holder[ConnT]) -> None:
        """Give a slot back to the queue (or drop it, after a shrinking resize)."""
        if self._state == _CLOSED:
            if holder.conn is not None:
                self._discard(holder, "pool closed")
            return
        if self._excess:
            self._excess -= 1
            self._update_plain()
            if holder.conn is not None:
                self._discard(holder, "pool resized")
            return
        self._queue.put(holder)

    # -- connecting ----------------------------------------------------------------

    async def _connect(
        self, holder: Holder[ConnT], deadline: float | None, *, retry: bool = True
    ) -> None:
        """Open a connection on an empty holder, retrying with backoff until ``deadline``."""
        backoff = Backoff()
        # One attempt never outlasts the pool's timeout: a connect stuck that
        # long (a startup packet lost in a partition, no connect_timeout) is
        # of no use to any waiter, and would hold its slot for good.
        attempt_limit = self.timeout or None
        while True:
            if self._state == _CLOSED:
                raise self._closed_error()
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                raise PoolTimeout(
                    f"pool {self.name!r}: could not connect before the deadline"
                ) from self._last_error
            limit = remaining
            if attempt_limit is not None and (limit is None or attempt_limit < limit):
                limit = attempt_limit
            try:
                # A cancel scope acts in this task: unlike asyncio.wait_for on
                # Python < 3.12, it never swallows a cancellation of the caller
                # that lands just as the connect completes.
                with anyio.move_on_after(limit) as scope:
                    await self._connect_once(holder)
                if not scope.cancelled_caught:
                    return
                if limit is remaining:
                    continue  # the deadline: raised above
                self._connect_failed(
                    PoolTimeout(f"connection attempt took longer than {limit:g} s")
                )
            except PoolClosed:
                raise
            except Exception as exc:
                self._connect_failed(exc)
                if not retry:
                    raise
            delay = backoff.next()
            if deadline is not None:
                delay = min(delay, max(deadline - monotonic(), 0))
            await asyncio.sleep(delay)

    async def _connect_once(self, holder: Holder[ConnT]) -> None:
        async with self._connect_slots:
            conn, baseline = await self._lifecycle.connect()
        if self._state == _CLOSED:
            self._lifecycle.close(conn)
            raise self._closed_error()
        now = self._now()
        holder.conn = conn
        holder.baseline = baseline
        holder.quiet = self._lifecycle.quiet_test(conn)
        holder.created_at = holder.returned_at = now
        holder.generation = self._generation
        holder.expires_at = (
            float("inf")
            if self.max_lifetime is None
            else now + self.max_lifetime * (1 - LIFETIME_JITTER * random.random())
        )
        _tested(holder, now)
        self._size += 1
        self._stats.connections_created += 1
        if self._failing_since is not None:
            logger.info("pool %r: connected again after failures", self.name)
            self._failing_since = None
            self._failure_reported = False

    def _connect_failed(self, exc: BaseException) -> None:
        self._stats.connections_failed += 1
        self._last_error = exc
        for fut in self._fail_fast_watchers:
            if not fut.done():
                fut.set_exception(exc)
        self._fail_fast_watchers.clear()
        now = self._now()
        if self._failing_since is None:
            self._failing_since = now
        logger.warning("pool %r: connection attempt failed: %s", self.name, exc)
        if (
            self.reconnect_timeout is not None
            and now - self._failing_since >= self.reconnect_timeout
        ):
            self._reconnect_gave_up()

    def _reconnect_gave_up(self) -> None:
        """Report, once per streak of failures, that reconnect_timeout ran out."""
        if self._failure_reported or self._failing_since is None:
            return
        self._failure_reported = True
        logger.error(
            "pool %r: could not connect for %g s (reconnect_timeout)",
            self.name,
            self.reconnect_timeout,
        )
        owner = self._owner()
        if self._reconnect_failed is not None and owner is not None:
            try:
                self._reconnect_failed(owner)
            except Exception:
                logger.exception("pool %r: reconnect_failed callback raised", self.name)

    def _fill(self) -> None:
        """Start background connects until ``min_size`` connections exist or are coming."""
        while self._state == _OPEN and self._size + self._filling < self._min_size:
            holder = self._queue.take_bottom()
            if holder is None:
                return
            self._filling += 1
            self._spawn(self._fill_one(holder))

    async def _fill_one(self, holder: Holder[ConnT]) -> None:
        deadline = None
        if self.reconnect_timeout is not None:
            deadline = monotonic() + self.reconnect_timeout
        try:
            await self._connect(holder, deadline)
        except PoolTimeout:
            self._reconnect_gave_up()
        except PoolClosed:
            pass
        finally:
            self._filling -= 1
            self._release_slot(holder)
            self._notify_size()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _discard(self, holder: Holder[ConnT], reason: str, *, lost: bool = False) -> None:
        """Close a holder's connection; the holder becomes an empty slot."""
        conn = holder.conn
        if conn is None:
            return
        holder.clear()
        self._size -= 1
        if lost:
            self._stats.connections_lost += 1
        else:
            self._stats.connections_closed += 1
        logger.debug("pool %r: closing a connection: %s", self.name, reason)
        self._lifecycle.close(conn)

    # -- return --------------------------------------------------------------------

    async def putconn(self, conn: ConnT, key: Hashable | None = None, close: bool = False) -> None:
        """Give a connection back; ``close=True`` discards it.

        A connection left in a transaction or in error is rolled back, one left
        mid-query or broken is discarded, and changed attributes (autocommit,
        isolation level, read only, deferrable) are restored.
        """
        # try_putconn_nowait(conn, handoff=True), inlined: this is the hottest path.
        try:
            holder = self._borrowed.pop(conn)
        except (KeyError, TypeError):
            raise self._not_borrowed(conn, None) from None
        if holder.conn is not conn:
            raise self._not_borrowed(conn, holder)
        if not (
            close or not self._plain or self._key_of or self._state_of(conn) != holder.baseline
        ):
            now = monotonic()
            if holder.expires_at > now:
                holder.returned_at = now
                if self._line:
                    self._queue.put(holder, True)
                else:
                    self._idle.append(holder)  # self._queue.put(holder, True)
                return
        self._unborrow(conn, holder)
        await self._return_slow(holder, close)

    def _unborrow(self, conn: ConnT, holder: Holder[ConnT]) -> None:
        """Bookkeeping of a return, other than the hot path's."""
        if self._key_of:
            held_key = self._key_of.pop(conn, None)
            if held_key is not None:
                del self._keyed[held_key]
        if holder.leak_timer is not None:
            holder.leak_timer.cancel()
            holder.leak_timer = None

    def _take_borrowed(self, conn: ConnT) -> Holder[ConnT]:
        """Take ``conn`` out of the borrowed; PoolError if it was not borrowed here."""
        try:
            holder = self._borrowed.pop(conn)
        except (KeyError, TypeError):  # TypeError: unhashable, so certainly not ours
            raise self._not_borrowed(conn, None) from None
        if holder.conn is not conn:
            raise self._not_borrowed(conn, holder)
        return holder

    def _not_borrowed(self, conn: ConnT, holder: Holder[ConnT] | None) -> PoolError:
        if holder is not None and holder.conn is not None:
            # another connection that compares equal to it: put that one back
            self._borrowed[holder.conn] = holder
        if self._state == _CLOSED:
            return PoolClosed(f"pool {self.name!r} is closed")
        return PoolError(
            f"pool {self.name!r}: this connection is not borrowed from this pool "
            "(a foreign connection, or returned twice)"
        )

    def held_by_key(self, key: Hashable) -> ConnT | None:
        """The connection checked out under ``key``, if any."""
        return self._keyed.get(key)

    def borrowed_baseline(self, conn: ConnT) -> Baseline:
        """The attributes a borrowed connection had when configured (to restore them)."""
        try:
            holder = self._borrowed.get(conn)
        except TypeError:
            holder = None
        if holder is None or holder.conn is not conn:
            raise self._not_borrowed(conn, None)
        return holder.baseline

    def try_putconn_nowait(self, conn: ConnT, handoff: bool = False, bad: bool = False) -> bool:
        """The fast path of :meth:`putconn` as a plain call; False means "call putconn()".

        It succeeds only when the return needs no work (the connection is
        idle and unchanged, not keyed, nothing to reset or expire) and nobody
        waits, so that, like :meth:`try_getconn_nowait`, it never suspends,
        schedules a callback or completes a future. With ``handoff=True`` it
        may complete a waiter's future: only for callers whose waiters are all
        outside waiters (see :meth:`request_nowait`). A foreign connection or
        a second return raises :class:`PoolError` here too. ``bad=True``: the
        caller already cleaned a connection returned in a bad state (counted).
        """
        holder = self._take_borrowed(conn)
        if (
            self._plain
            and not self._key_of
            and self._state_of(conn) == holder.baseline
            and (handoff or not self._queue.waiting)
        ):
            now = monotonic()
            if holder.expires_at > now:
                holder.returned_at = now
                if self._line:
                    self._queue.put(holder, True)
                else:
                    self._idle.append(holder)  # self._queue.put(holder, True)
                if bad:
                    self._stats.returns_bad += 1
                return True
        self._borrowed[conn] = holder
        return False

    def take_return_nowait(self, conn: ConnT, bad: bool = False) -> Holder[ConnT]:
        """The bookkeeping of a return, done now; finish it with :meth:`finish_return`.

        For a caller in another thread: once this returns, the connection is
        no longer borrowed (a second return raises :class:`PoolError`, its
        key is free), while the work left may run later on the loop.
        """
        holder = self._take_borrowed(conn)
        self._unborrow(conn, holder)
        if bad:
            self._stats.returns_bad += 1
        return holder

    async def finish_return(self, holder: Holder[ConnT], close: bool = False) -> None:
        """The rest of a return begun with :meth:`take_return_nowait`."""
        await self._return_slow(holder, close)

    async def _return_slow(self, holder: Holder[ConnT], close: bool) -> None:
        conn = holder.conn
        assert conn is not None
        lifecycle = self._lifecycle
        try:
            if close:
                self._discard(holder, "closed by its borrower")
            elif self._state != _OPEN or not self._keep_idle or self._excess:
                self._discard(holder, "not kept")
            elif holder.generation != self._generation:
                self._discard(holder, "drained")
            else:
                if lifecycle.is_bad_return(conn):
                    self._stats.returns_bad += 1
                if not lifecycle.is_clean(conn, holder.baseline) and not await lifecycle.clean(
                    conn, holder.baseline
                ):
                    self._discard(holder, "could not be cleaned after return")
                elif lifecycle.has_reset and not await lifecycle.reset(conn):
                    self._discard(holder, "reset left it unusable")
                elif holder.expires_at <= self._now():
                    self._discard(holder, "max_lifetime reached")
        except BaseException as exc:
            # Cleaning failed or was interrupted (the borrower cancelled again):
            # the connection is in an unknown state, so it goes; the slot stays.
            self._discard(holder, f"cleaning failed ({exc.__class__.__name__})")
            if not isinstance(exc, Exception):
                raise
            logger.warning("pool %r: discarded a returned connection: %s", self.name, exc)
        finally:
            holder.returned_at = self._now()
            self._after_return(holder)

    def _after_return(self, holder: Holder[ConnT]) -> None:
        self._release_slot(holder)
        if self._state == _CLOSING and not self._borrowed and self._all_returned is not None:
            if not self._all_returned.done():
                self._all_returned.set_result(None)
        elif self._state == _OPEN and holder.conn is None:
            self._fill()

    # -- leaks -------------------------------------------------------------------

    def _watch_leak(self, holder: Holder[ConnT], stack: str | None) -> None:
        assert self._loop is not None and self.leak_timeout is not None
        if stack is None:
            stack = "".join(traceback.format_stack()[:-2])
        holder.leak_timer = self._loop.call_later(
            self.leak_timeout, self._report_leak, holder, stack
        )

    def _report_leak(self, holder: Holder[ConnT], stack: str) -> None:
        holder.leak_timer = None
        self._stats.leaks += 1
        logger.warning(
            "pool %r: a connection has been held for more than %g s (leak_timeout); "
            "borrowed at:\n%s",
            self.name,
            self.leak_timeout,
            stack,
        )

    # -- maintenance ---------------------------------------------------------------

    def _schedule_maintenance(self) -> None:
        periods = [p for p in (self.max_idle, self.max_lifetime) if p]
        if not periods or self._loop is None:
            return
        interval = min(max(min(periods) / 2, 0.05), 10.0)
        # Through a weak reference: the timer must not keep alive a pool its
        # users dropped without closing it (see _close_dropped).
        self._maintenance = self._loop.call_later(interval, _maintain, weakref.ref(self))

    def _maintain(self) -> None:
        if self._state != _OPEN:
            return
        try:
            self._expire_idle(self.max_idle, keep_min=True)
        finally:
            self._schedule_maintenance()

    def _expire_idle(self, max_idle: float | None, *, keep_min: bool) -> int:
        """Close idle connections past their lifetime or idle longer than ``max_idle``."""
        now = self._now()
        spare = self._size - self._min_size if keep_min else self._size

        def expired(holder: Holder[ConnT]) -> bool:
            nonlocal spare
            if holder.conn is None:
                return False
            if holder.expires_at <= now:
                return True
            if max_idle is not None and spare > 0 and now - holder.returned_at >= max_idle:
                spare -= 1
                return True
            return False

        taken = self._queue.take(expired)
        for holder in taken:
            self._discard(holder, "expired")
            self._release_slot(holder)
        self._fill()
        return len(taken)

    async def purge_expired(self) -> int:
        """Close idle connections idle longer than ``max_idle`` (or past max_lifetime) now.

        Unlike the background shrinking, ``min_size`` does not protect them;
        the pool then refills ``min_size`` with fresh connections. Returns how
        many were closed.
        """
        self._check_open()
        return self._expire_idle(self.max_idle, keep_min=False)

    async def check(self) -> None:
        """Make a round trip on every idle connection; replace those that fail."""
        self._check_open()
        taken = self._queue.take(_is_connected)
        try:
            while taken:
                holder = taken.pop()
                conn = holder.conn
                assert conn is not None
                try:
                    await self._lifecycle.probe(conn)
                except Exception as exc:
                    self._discard(holder, f"check() failed ({exc.__class__.__name__})", lost=True)
                finally:
                    self._release_slot(holder)
        finally:
            for holder in taken:
                self._release_slot(holder)
        self._fill()

    async def drain(self) -> None:
        """Replace every connection: idle ones now, borrowed ones when returned."""
        self._check_open()
        self._generation += 1
        for holder in self._borrowed.values():
            # Expired, so that a return takes the slow path, which discards it.
            holder.expires_at = 0.0
        for holder in self._queue.take(_is_connected):
            self._discard(holder, "drained")
            self._release_slot(holder)
        self._fill()

    async def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's sizes; connections beyond a smaller max go as they come back."""
        self._check_open()
        if max_size is None:
            max_size = max(min_size, self._max_size)
        check_sizes(min_size, max_size)
        grow = max_size - self._max_size
        self._min_size = min_size
        self._max_size = max_size
        if grow > 0:
            cancel = min(grow, self._excess)
            self._excess -= cancel
            for _ in range(grow - cancel):
                self._queue.put(Holder())
        elif grow < 0:
            shrink = -grow
            # Free slots go first, then the least recently used idle connections;
            # whatever is left is dropped as borrowed connections come back.
            for predicate in (lambda h: h.conn is None, _is_connected):
                taken = self._queue.take(predicate)
                for holder in taken[:shrink]:
                    self._discard(holder, "pool resized")
                for holder in taken[shrink:]:
                    self._queue.put(holder)
                shrink -= min(shrink, len(taken))
            self._excess += shrink
        self._update_plain()
        self._fill()

    # -- closing -------------------------------------------------------------------

    async def closeall(self) -> None:
        """Close every connection now, borrowed ones included; the pool is closed."""
        if self._state == _CLOSED:
            raise PoolClosed(f"pool {self.name!r} is already closed")
        self._close_now()

    async def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, wait up to ``timeout`` for borrowed connections, close.

        When it returns the pool is closed, even when another ``close()`` is
        still waiting for returns (this one waits with it, up to its own
        ``timeout``).
        """
        if self._state == _CLOSED:
            return
        if self._state == _NEW:
            self._close_now()
            return
        if self._state == _OPEN:
            self._state = _CLOSING
            self._plain = False
            self._queue.fail_waiters(self._closed_error)
            if self._borrowed:
                self._all_returned = asyncio.get_running_loop().create_future()
        if self._all_returned is not None and not self._all_returned.done():
            with anyio.move_on_after(timeout) as scope:
                await asyncio.shield(self._all_returned)
            if scope.cancelled_caught and self._state != _CLOSED:
                logger.warning(
                    "pool %r: %d connections still borrowed after %g s: closing them",
                    self.name,
                    len(self._borrowed),
                    timeout,
                )
        if self._state != _CLOSED:
            self._close_now()

    def abandon(self) -> None:
        """Close now, leaving borrowed connections open: for a pool object nobody references.

        Nobody can give those connections back any more, and closing them
        would break whoever still uses one; each closes with its own object.
        """
        if self._state == _CLOSED:
            return
        if self._borrowed:
            logger.warning(
                "pool %r was dropped without close(): %d borrowed connections are left "
                "to their borrowers",
                self.name,
                len(self._borrowed),
            )
        self._close_now(keep_borrowed=True)

    def _close_now(self, *, keep_borrowed: bool = False) -> None:
        self._state = _CLOSED
        self._plain = False
        if self._all_returned is not None and not self._all_returned.done():
            self._all_returned.set_result(None)  # a close() waiting for returns: stop waiting
        if self._maintenance is not None:
            self._maintenance.cancel()
        self._queue.fail_waiters(self._closed_error)
        for fut in self._size_watchers:
            if not fut.done():
                fut.set_exception(self._closed_error())
        self._size_watchers.clear()
        self._fail_fast_watchers.clear()
        for task in list(self._tasks):
            task.cancel()
        for holder in self._queue.take(lambda h: True):
            self._discard(holder, "pool closed")
        for holder in self._borrowed.values():
            if holder.leak_timer is not None:
                holder.leak_timer.cancel()
            if not keep_borrowed:
                self._discard(holder, "pool closed while borrowed")
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
            idle=sum(1 for h in self._queue if h.conn is not None),
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
        )

    def _now(self) -> float:
        # asyncio's default loops keep time with time.monotonic() too.
        return monotonic()
