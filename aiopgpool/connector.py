"""Connecting: open a connection on a slot, retry with jittered backoff, fill to ``min_size``.

The :class:`Connector` owns the failure streak (when failures began, the
last error, whether ``reconnect_failed`` was called for it), the background
fill tasks and the futures of callers of ``wait()``. The core calls it only
from slow branches: a free slot, a refill, an explicit ``wait()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import Callable, Iterator
from time import monotonic
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from .backoff import Backoff
from .deadlines import move_on_after
from .errors import PoolClosed, PoolTimeout
from .lifecycle import Lifecycle
from .options import check_timeout
from .slot import Slot, mark_tested
from .waiting import WaitTimeout

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["FIRST_ATTEMPT_FLOOR", "LIFETIME_JITTER", "MAX_CONCURRENT_CONNECTS", "Connector", "Seat"]

logger = logging.getLogger("aiopgpool")

ConnT = TypeVar("ConnT")

# Connections opened at the same time by one pool.
MAX_CONCURRENT_CONNECTS = 16
# A connection's max_lifetime is shortened by up to this fraction, so that
# connections made together do not all expire together.
LIFETIME_JITTER = 0.05


#: Seconds the background fill's first attempt may take at least, with no pool timeout
#: to bound it, however short ``reconnect_timeout`` is (psycopg_pool's default timeout).
FIRST_ATTEMPT_FLOOR = 30.0


class Connector(Generic[ConnT]):
    """Opens the connections of one :class:`~aiopgpool.core.PoolCore`."""

    __slots__ = (
        "_connect_slots",
        "_core",
        "_fail_fast_watchers",
        "_failing_since",
        "_failure_reported",
        "_filling",
        "_last_error",
        "_lifecycle",
        "_size_watchers",
        "_tasks",
    )

    def __init__(self, core: PoolCore[ConnT], lifecycle: Lifecycle[ConnT]) -> None:
        self._core = core
        self._lifecycle = lifecycle
        self._connect_slots = asyncio.Semaphore(MAX_CONCURRENT_CONNECTS)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._size_watchers: list[asyncio.Future[None]] = []
        self._fail_fast_watchers: list[asyncio.Future[None]] = []  # a subset of those
        self._filling = 0
        self._last_error: BaseException | None = None
        self._failing_since: float | None = None
        self._failure_reported = False

    def stalled_fills(self) -> int:
        """Slots held by background fills while connecting fails (0 while it does not)."""
        return self._filling if self._failing_since is not None else 0

    def failure_cause(self) -> BaseException | None:
        """The last connection error while connecting fails, to chain to a PoolTimeout."""
        return self._last_error if self._failing_since is not None else None

    # -- one connection ----------------------------------------------------------------

    async def connect(
        self,
        slot: Slot[ConnT],
        deadline: float | None,
        *,
        retry: bool,
        borrower: bool = False,
        always_try: bool = False,
    ) -> Slot[ConnT]:
        """Open a connection on a free slot, retrying with backoff until ``deadline``.

        Returns ``slot``, connected. An attempt cut short, by the attempt limit or
        by the deadline, counts as a failed one (logged, counted, towards
        ``reconnect_failed``), except at a ``borrower``'s own deadline: it gave up.

        ``always_try``: the first attempt is made however near the deadline is
        (``reconnect_timeout`` bounds the retries of the background fill, not its
        first attempt, as in psycopg_pool), bounded by the pool's timeout alone
        (with ``timeout=None``, by the deadline but never less than
        :data:`FIRST_ATTEMPT_FLOOR`).

        A ``borrower`` (a checkout connecting its own slot) also takes its place in
        the waiters' line once an attempt failed: a connection given back meanwhile is
        handed to it, in line order, and it returns that slot instead (``slot`` goes
        back to the pool, free). Else a connection returned while the server refuses
        new ones (too many clients) would go to a later request, and the borrower to
        its timeout.
        """
        core = self._core
        backoff = Backoff()
        # One attempt never outlasts the pool's timeout: a connect stuck that
        # long (a startup packet lost in a partition, no connect_timeout) is
        # of no use to any waiter, and would hold its slot for good.
        attempt_limit = core.timeout or None
        seat: Seat[ConnT] | None = None
        try:
            while True:
                if core.state == "closed":
                    raise core.closed_error()
                remaining = None if deadline is None else deadline - monotonic()
                if always_try:  # the first attempt: bounded by the attempt limit alone
                    always_try = False
                    if remaining is not None and attempt_limit is None:
                        remaining = max(remaining, FIRST_ATTEMPT_FLOOR)
                    else:
                        remaining = None
                elif remaining is not None and remaining <= 0:
                    raise PoolTimeout(
                        f"pool {core.name!r}: could not connect before the deadline"
                    ) from self._last_error
                limit = remaining
                if attempt_limit is not None and (limit is None or attempt_limit < limit):
                    limit = attempt_limit
                try:
                    # A cancel scope acts in this task: unlike asyncio.wait_for on
                    # Python < 3.12, it never swallows a cancellation of the caller
                    # that lands just as the connect completes.
                    with move_on_after(limit) as scope, Seat.watching(seat, scope):
                        await self._connect_once(slot)
                    if seat is not None and seat.done():
                        return seat.take_instead(slot)
                    if not scope.cancelled_caught:
                        return slot
                    # Cut at the attempt limit, or at the deadline (then raised above): a
                    # failed attempt, but for a borrower's own deadline (it gave up).
                    if limit is not remaining or not borrower:
                        self._failed(
                            PoolTimeout(f"connection attempt took longer than {limit:g} s")
                        )
                    if limit is remaining:
                        continue
                except PoolClosed:
                    raise
                except Exception as exc:
                    self._failed(exc)
                    if not retry:
                        raise
                if borrower and seat is None and retry and not core.null:
                    if core.state != "open":  # closing: no connection will be handed out
                        raise core.closed_error()
                    ready = core.queue.swap_top(slot)  # a connection kept meanwhile
                    if ready is not None:
                        return ready
                    seat = Seat(core)
                delay = backoff.next()
                if deadline is not None:
                    delay = min(delay, max(deadline - monotonic(), 0))
                with anyio.CancelScope() as scope, Seat.watching(seat, scope):
                    await asyncio.sleep(delay)
                if seat is not None and seat.done():
                    return seat.take_instead(slot)
        finally:
            if seat is not None:
                seat.leave()

    async def _connect_once(self, slot: Slot[ConnT]) -> None:
        core = self._core
        async with self._connect_slots:
            started = monotonic()
            conn, baseline = await self._lifecycle.connect()
        if core.state == "closed":
            self._lifecycle.close(conn)
            raise core.closed_error()
        now = monotonic()
        core.connect_hist.record(now - started)
        slot.conn = conn
        slot.baseline = baseline
        slot.quiet = self._lifecycle.quiet_test(conn)
        slot.server = self._lifecycle.server_of(conn)
        slot.created_at = slot.returned_at = now
        max_lifetime = core.max_lifetime
        slot.expires_at = (
            float("inf")
            if max_lifetime is None
            else now + max_lifetime * (1 - LIFETIME_JITTER * random.random())
        )
        mark_tested(slot, now)
        core.connected(slot)
        core.counters.connections_created += 1
        if self._failing_since is not None:
            logger.info("pool %r: connected again after failures", core.name)
            self._failing_since = None
            self._failure_reported = False
            # The server is back: refill min_size now, not at the next maintenance.
            self.fill()

    def _failed(self, exc: BaseException) -> None:
        core = self._core
        core.counters.connections_failed += 1
        self._last_error = exc
        for fut in self._fail_fast_watchers:
            if not fut.done():
                fut.set_exception(exc)
        self._fail_fast_watchers.clear()
        now = monotonic()
        if self._failing_since is None:
            self._failing_since = now
        logger.warning("pool %r: connection attempt failed: %s", core.name, exc)
        timeout = core.reconnect_timeout
        if timeout is not None and now - self._failing_since >= timeout:
            self.gave_up()

    def gave_up(self) -> None:
        """Report, once per streak of failures, that ``reconnect_timeout`` ran out."""
        core = self._core
        if self._failure_reported or self._failing_since is None:
            return
        self._failure_reported = True
        logger.error(
            "pool %r: could not connect for %g s (reconnect_timeout)",
            core.name,
            core.reconnect_timeout,
        )
        callback = core.options.reconnect_failed
        owner = core.owner_ref()
        if callback is None or owner is None:
            return
        try:
            result = callback(owner)
            if inspect.isawaitable(result):
                self._spawn(self._await_callback(result))
        except Exception:
            logger.exception("pool %r: reconnect_failed callback raised", core.name)

    async def _await_callback(self, result: Any) -> None:
        try:
            await result
        except Exception:
            logger.exception("pool %r: reconnect_failed callback raised", self._core.name)

    # -- filling to min_size -------------------------------------------------------------

    def fill(self) -> None:
        """Start background connects until ``min_size`` connections exist or are coming.

        At most :data:`MAX_CONCURRENT_CONNECTS` at a time, each starting the next when it
        succeeds: a task per missing connection would freeze the loop for a huge
        ``min_size`` (nothing bounds it above).
        """
        core = self._core
        queue = core.queue
        while (
            core.state == "open"
            and core.size + self._filling < core.min_size
            and self._filling < MAX_CONCURRENT_CONNECTS
        ):
            slot = queue.take_free_one()
            if slot is None:
                return
            self._filling += 1
            self._spawn(self._fill_one(slot))

    async def _fill_one(self, slot: Slot[ConnT]) -> None:
        core = self._core
        deadline = None
        if core.reconnect_timeout is not None:
            deadline = monotonic() + core.reconnect_timeout
        connected = False
        try:
            await self.connect(slot, deadline, retry=True, always_try=True)
            connected = True
        except PoolTimeout:
            self.gave_up()
        except PoolClosed:
            pass
        finally:
            self._filling -= 1
            core.release_slot(slot)
            self.notify_size()
        if connected:
            self.fill()  # the next one, if min_size needs more than were started

    def _spawn(self, coro: Any) -> None:
        loop = self._core.loop
        assert loop is not None
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- wait() ------------------------------------------------------------------------------

    async def wait(self, timeout: float = 30.0, *, fail_fast: bool = False) -> None:
        """Wait until ``min_size`` connections are open, or raise :class:`PoolTimeout`.

        ``fail_fast=True``: a connection attempt that fails meanwhile raises
        its own error at once, as psycopg2's pools do when they connect at
        construction (the drop-ins use it). A null pool makes one real
        connection attempt (and closes the connection).
        """
        core = self._core
        check_timeout("timeout", timeout, allow_none=False)
        core.check_open()
        core.check_loop()
        if core.null:
            await self._try_one(timeout, fail_fast)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._size_watchers.append(fut)
        if fail_fast:
            self._fail_fast_watchers.append(fut)
        self.notify_size()
        # Background connects that gave up (reconnect_timeout) start again now, not at
        # the next maintenance run (up to 10 s away).
        self.fill()
        try:
            with move_on_after(timeout) as scope:
                await fut
            if scope.cancelled_caught:
                raise PoolTimeout(
                    f"pool {core.name!r}: {core.size} of min_size {core.min_size} "
                    f"connections after {timeout:g} s"
                ) from self._last_error
        finally:
            for watchers in (self._size_watchers, self._fail_fast_watchers):
                if fut in watchers:
                    watchers.remove(fut)

    async def _try_one(self, timeout: float, fail_fast: bool) -> None:
        """A null pool's wait(): open one connection within ``timeout``, then close it.

        On a slot of the pool's, waited for in line when every one is lent: its
        ``max_size`` bounds the connections to the server, this one's included.
        """
        core = self._core
        queue = core.queue
        start = monotonic()
        slot = queue.take_free_one()
        if slot is None:
            fut = queue.join(timeout, start)
            try:
                slot = await fut
            except WaitTimeout:
                raise PoolTimeout(
                    f"pool {core.name!r}: no free slot to connect within {timeout:g} s "
                    f"(max_size={core.max_size}, all lent)"
                ) from None
            except BaseException:
                handed = queue.withdraw(fut)
                if handed is not None:
                    core.release_slot(handed)
                raise
        try:
            await self.connect(slot, start + timeout, retry=not fail_fast)
        except PoolTimeout as exc:
            raise PoolTimeout(
                f"pool {core.name!r}: could not connect within {timeout:g} s"
            ) from exc.__cause__
        finally:
            core.discard(slot, "wait() attempt")
            core.release_slot(slot)

    def notify_size(self) -> None:
        """Wake the callers of :meth:`wait` once ``min_size`` connections exist."""
        core = self._core
        if core.size >= core.min_size and self._size_watchers:
            for fut in self._size_watchers:
                if not fut.done():
                    fut.set_result(None)
            self._size_watchers.clear()
            self._fail_fast_watchers.clear()

    def stop(self, make_error: Callable[[], BaseException]) -> None:
        """The pool closes: cancel background connects, fail the callers of ``wait()``."""
        for fut in self._size_watchers:
            if not fut.done():
                fut.set_exception(make_error())
        self._size_watchers.clear()
        self._fail_fast_watchers.clear()
        for task in list(self._tasks):
            task.cancel()


class Seat(Generic[ConnT]):
    """A connecting borrower's place in the waiters' line (a :class:`~aiopgpool.waiting.Waiter`).

    The queue completes it like any waiter, from the loop or (sync facade) from a
    caller thread under the bridge lock while the loop is parked: either way the
    borrower's current attempt or backoff sleep is cancelled on the loop, and
    the borrower takes the slot it was handed.
    """

    __slots__ = ("_core", "_done", "_error", "_handed", "_loop", "_scope")

    #: Handed ready slots only (:meth:`HandoffQueue.add_seat`): it holds a free one.
    ready_only = True

    def __init__(self, core: PoolCore[ConnT]) -> None:
        self._core = core
        self._loop = asyncio.get_running_loop()
        self._done = False
        self._handed: Slot[ConnT] | None = None
        self._error: BaseException | None = None
        self._scope: anyio.CancelScope | None = None
        core.queue.add_seat(self)

    @staticmethod
    @contextlib.contextmanager
    def watching(seat: Seat[ConnT] | None, scope: anyio.CancelScope) -> Iterator[None]:
        """While the block runs, completing ``seat`` (if any) cancels ``scope``."""
        if seat is None:
            yield
            return
        if seat._done:
            scope.cancel()
        seat._scope = scope
        try:
            yield
        finally:
            seat._scope = None

    def done(self) -> bool:
        """True once handed a slot, failed or cancelled."""
        return self._done

    def set_result(self, slot: Slot[ConnT], /) -> None:
        """Handed ``slot`` by the queue."""
        self._handed = slot
        self._finish()

    def set_exception(self, exception: BaseException, /) -> None:
        """Failed by the queue (the pool closed)."""
        self._error = exception
        self._finish()

    def cancel(self) -> bool:
        """Leave the line; False when already completed."""
        if self._done:
            return False
        self._done = True
        self._core.queue.seat_left()
        return True

    def _finish(self) -> None:
        self._done = True
        self._core.queue.seat_left()
        scope = self._scope
        if scope is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            scope.cancel()
        else:  # a caller thread of the sync facade: wake the parked loop
            self._loop.call_soon_threadsafe(self._cancel_if_current, scope)

    def _cancel_if_current(self, scope: anyio.CancelScope) -> None:
        if self._scope is scope:
            scope.cancel()

    def take_instead(self, slot: Slot[ConnT]) -> Slot[ConnT]:
        """The slot to go on with once completed: the ready one handed (``slot``, the
        borrower's free one, goes back to the pool), or ``slot`` itself when it got
        connected meanwhile. Raises what the queue failed it with (the caller still
        holds ``slot``)."""
        core = self._core
        handed, self._handed = self._handed, None
        if self._error is not None:
            raise self._error
        assert handed is not None and handed.conn is not None  # ready only
        if slot.conn is not None:
            core.release_slot(handed)  # to the next in line
            return slot
        core.release_slot(slot)
        return handed

    def leave(self) -> None:
        """The borrower is done with the line: a slot handed too late goes on."""
        if self._core.queue.leave(self):
            return
        handed, self._handed = self._handed, None
        if handed is not None:
            self._core.release_slot(handed)
