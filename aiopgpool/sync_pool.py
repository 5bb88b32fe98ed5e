"""The thread-safe sync facade: :class:`ConnectionPool` and :class:`NullConnectionPool`.

A facade owns a :class:`~aiopgpool.core.PoolCore` (waiting, fairness,
timeouts, lifecycle and stats are all the core's) and a
:class:`~aiopgpool.bridge.LoopThread` that runs it. Each blocking call is
the core's coroutine run through the bridge, except for two things done in
the caller's own thread so that 16 threads do not queue behind one loop:

* the fast paths of getconn and putconn (the core's own, shared with the
  async pool), under the bridge's parking lock;
* the blocking work that belongs to the borrower: commit, rollback, restoring
  attributes and the user's ``reset``, before the connection goes back.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from types import TracebackType
from typing import Any, Generic, NoReturn, cast

import psycopg
from typing_extensions import TypeVar

from .attributes import PoolAttributes
from .bridge import LoopThread
from .conninfo import ConnectTarget
from .core import PoolCore
from .errors import PoolClosed, PoolError
from .lifecycle import PoolLink
from .maintenance import borrower_stack
from .options import DEFAULTS, PoolOptions, check_timeout
from .slot import Slot
from .stats import PoolStats, psycopg_pool_stats
from .sync_lifecycle import (
    BlockingLifecycle,
    SyncCallback,
    SyncLifecycle,
    check_connection_blocking,
)
from .threadport import Claim, ThreadPort, ThreadWaiter

__all__ = ["ConnectionPool", "NullConnectionPool", "SyncPoolFacade"]

logger = logging.getLogger("aiopgpool")

C = TypeVar("C")
T = TypeVar("T")
Self = TypeVar("Self", bound="SyncPoolFacade[Any]")


class SyncPoolFacade(PoolAttributes, Generic[C]):
    """Blocking pool methods over a pool core running in a background event loop."""

    def __init__(self, lifecycle: BlockingLifecycle[C], options: PoolOptions, target: str) -> None:
        self._lifecycle = lifecycle
        self._core: PoolCore[C] = PoolCore(lifecycle, options, target, owner=self)
        self._bridge = LoopThread(
            options.name,  # type: ignore[arg-type]  # set by PoolOptions
            keepalive=self._core,
            on_exit=self._core.closing.close_at_exit,
        )
        self._lock = self._bridge.lock
        self._port: ThreadPort[C] = ThreadPort(self._core, self._lock)
        # Every return of a null pool or of a pool with a reset leaves the hot path.
        self._returns_need_work = self._core.null or lifecycle.resets
        # Dropped without close(): closed on its loop (borrowed connections
        # left to their borrowers), and its thread ends.
        weakref.finalize(
            self, self._bridge.stop_from_finalizer, self._core.closing.close_dropped
        ).atexit = False

    def __repr__(self) -> str:
        return repr(self._core)

    # -- opening and closing ---------------------------------------------------------

    def open(self, wait: bool = False, timeout: float = 30.0, *, fail_fast: bool = False) -> None:
        """Start the pool (and its loop thread); see ``AsyncConnectionPool.open``."""
        if self._core.state == "closed":
            raise PoolClosed(f"pool {self.name!r} is closed and cannot be reopened")
        self._bridge.check_caller()
        self._bridge.start()
        self._bridge.call(partial(self._core.open, wait, timeout, fail_fast=fail_fast))

    def __enter__(self: Self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def closeall(self) -> None:
        """Close every connection now, borrowed ones included; the pool is closed."""
        if not self._bridge.running:
            if self._core.state == "closed":
                raise PoolClosed(f"pool {self.name!r} is already closed")
            self._bridge.check_caller()
            self._bridge.start()
        try:
            self._bridge.call(self._core.closing.closeall)
        except PoolError:
            if self._core.state == "closed":  # by another thread, since the test above
                raise PoolClosed(f"pool {self.name!r} is already closed") from None
            raise
        finally:
            self._bridge.stop()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, wait up to ``timeout`` for borrowed connections, close."""
        check_timeout("timeout", timeout, allow_none=False)  # before the loop stops
        if not self._bridge.running:
            self._bridge.check_caller()
            if self._core.state == "closed":
                return
            self._bridge.start()
        try:
            self._bridge.call(self._core.closing.close, timeout)
        except PoolError:
            if self._core.state != "closed":  # else closed by another thread meanwhile
                raise
        finally:
            self._bridge.stop()

    def _running_bridge(self) -> LoopThread:
        bridge = self._bridge
        if not bridge.serves_caller():
            self._refuse_caller()
        return bridge

    def _refuse_caller(self) -> NoReturn:
        """Raise why this thread cannot use the pool now (see ``LoopThread.serves_caller``)."""
        self._bridge.check_caller()
        raise self._core.closed_error()

    # -- checkout and return ---------------------------------------------------------

    def getconn(self, timeout: float | None = None, *, key: Hashable | None = None) -> C:
        """A connection, waiting up to ``timeout`` (default: the pool's) for one.

        The caller's thread waits on its own waiter in the core's line, so a
        connection returned by another thread is handed over without going
        through the event loop; the loop is only needed to open or check one.
        """
        lock = self._lock
        if not (self._bridge.serving and lock.acquire(False)):
            self._lock_slowly()
        waiter = None
        try:
            conn = self._core.lend_idle(timeout, key)  # the hot path, shared with the async pool
            if conn is not None:
                return conn
            # In the same hold of the lock: under contention, a thread that
            # must wait takes the lock once, not twice.
            got = self._port.request_nowait(timeout, key)
            start = time.monotonic()
            if got is None:
                waiter = ThreadWaiter(self._core, key, start)
                self._port.join_nowait(waiter)
        finally:
            lock.release()
        return self._getconn_slowly(got, waiter, start, timeout, key)

    def _lock_slowly(self) -> None:
        """Take the bridge's lock, waiting for it; raise if this thread cannot use the pool.

        The hot paths try the lock without waiting first: the loop thread
        itself always fails to, since it holds the lock while it runs.
        """
        if not self._bridge.serves_caller():
            self._refuse_caller()
        self._lock.acquire()

    def _getconn_slowly(
        self,
        got: C | Slot[C] | None,
        waiter: ThreadWaiter[C] | None,
        start: float,
        timeout: float | None,
        key: Hashable | None,
    ) -> C:
        """The rest of a checkout the hot path could not serve: wait, or prepare on the loop."""
        if waiter is not None:
            got = self._wait(waiter, timeout)
        assert got is not None
        if not isinstance(got, Slot):
            return got  # lent by whoever woke us, or the key's connection again
        # Leak reports show the borrower's stack: take it here, not on the loop.
        stack = None if self._core.leak_timeout is None else borrower_stack()
        claim = Claim()
        bridge = self._running_bridge()
        future = bridge.submit(
            self._port.prepare, got, key, timeout, start, waiter is not None, stack, claim
        )
        try:
            return future.result()
        except BaseException:
            # Interrupted (KeyboardInterrupt) while the loop prepares the connection:
            # whichever of this thread and the loop comes second gives it back.
            with bridge.lock:
                claim.abandoned = True
                lent = future.done() and not future.cancelled() and future.exception() is None
            if lent:
                with suppress(PoolError):  # closed meanwhile: closed with the pool
                    self.putconn(future.result(), key)
            raise

    def _wait(self, waiter: ThreadWaiter[C], timeout: float | None) -> C | Slot[C]:
        """Sleep in the core's line; the connection, or the slot to prepare."""
        bridge, port = self._bridge, self._port
        try:
            if waiter.sleep(port.wait_timeout(timeout)):
                return waiter.result()  # finished by whoever woke us: no lock needed
        except BaseException:  # interrupted (KeyboardInterrupt): leave the line
            with bridge.lock:
                port.give_up_wait_nowait(waiter)
            raise
        with bridge.lock:
            return port.end_wait_nowait(waiter, timeout)

    def putconn(self, conn: C, key: Hashable | None = None, close: bool = False) -> None:
        """Give a connection back (rolled back and restored first); ``close=True`` discards it.

        Once this returns the connection is no longer borrowed (its key is
        free, a second return raises :class:`PoolError`); a connection the
        pool does not keep is closed before it returns.
        """
        lock = self._lock
        if not (self._bridge.serving and lock.acquire(False)):
            self._lock_slowly()
        try:
            # Unchanged and nothing to reset: straight back, or handed to a waiting thread.
            slot = self._core.give_back(conn, key, close or self._returns_need_work)
        finally:
            lock.release()
        if slot is not None:
            self._finish_return(conn, slot, bool(close))

    def _finish_return(self, conn: C, slot: Slot[C], close: bool) -> None:
        """A return off the hot path, after ``give_back``: clean, reset or close, then pass on."""
        bridge, port, lifecycle = self._bridge, self._port, self._lifecycle
        # The borrower's own blocking work, in its own thread: the connection is
        # no longer borrowed, and no other thread can have it until it is passed on.
        bad = lost = None
        broken = False
        interrupted: BaseException | None = None
        if self._core.null and not close:
            # Not kept, so not cleaned: a bad return is counted all the same.
            if lifecycle.is_bad_return(conn):
                bad = lifecycle.describe_state(conn)
            close = True
        if not close:
            stage = "cleaning"
            try:
                failed = lifecycle.tracks_role and lifecycle.in_failed_transaction(conn)
                if not lifecycle.is_clean(conn, slot.baseline):
                    if lifecycle.is_bad_return(conn):
                        bad = lifecycle.describe_state(conn)
                    broken = close = not lifecycle.clean_blocking(conn, slot.baseline)
                if lifecycle.tracks_role and not close:
                    lost = lifecycle.role_lost(conn)
                    session_only = lost is None and lifecycle.turned_read_only(conn, slot.baseline)
                    if lost is None and (failed or session_only):
                        lost = lifecycle.ask_role_blocking(conn)
                    close = lost is not None or session_only
                    if lost is None and session_only:
                        logger.debug(
                            "pool %r: a returned connection's session was made read-only "
                            "(the server is still a writable primary): discarded",
                            self.name,
                        )
                if lifecycle.resets and not close:
                    stage = "reset"
                    close = not lifecycle.reset_blocking(conn)
                    if close:
                        logger.warning("pool %r: reset left a connection unusable", self.name)
            except Exception as exc:
                logger.warning(
                    "pool %r: %s a returned connection failed, discarded: %s: %s",
                    self.name,
                    stage,
                    exc.__class__.__name__,
                    exc,
                )
                close = True
            except BaseException as exc:  # KeyboardInterrupt mid-rollback: state unknown
                interrupted, close = exc, True
        if close:
            lifecycle.close(conn)  # now, as psycopg2 does
        trouble = lifecycle.tracks_role and (lost is not None or broken)
        if close or bad is not None or trouble:
            with bridge.lock:
                if bad is not None:
                    port.note_bad_return_nowait(bad)
                if trouble:
                    port.server_trouble_nowait(slot.server, lost)
                if close:
                    # Counted out now, so that stats() right after putconn() agree.
                    port.discard_nowait(slot, "closed on return")
        # The rest (back to the idle ones or to a waiter, expiry, refilling)
        # happens on the loop, without keeping the caller waiting.
        try:
            bridge.call_soon(port.finish_return, slot, close)
        except PoolError:
            # The pool closed while this return was under way (close() in another
            # thread): nothing takes the connection back now.
            with bridge.lock:
                port.discard_nowait(slot, "pool closed")
        if interrupted is not None:
            raise interrupted

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[C]:
        """``with pool.connection() as conn``: getconn, commit or roll back, putconn."""
        with self._lent(self.getconn(timeout), self.putconn) as conn:
            yield conn

    @contextmanager
    def _lent(self, conn: C, give_back: Callable[[C], None]) -> Iterator[C]:
        """The block of a ``connection()`` around ``conn``, lent by this pool: commit on
        success, then ``give_back(conn)`` (the pool's ``putconn``, or a replicated
        pool's); on error, that putconn rolls back or discards a broken connection.

        Given back inside the block (``conn.close()`` with ``close_returns``), the
        connection is no longer the block's, perhaps another borrower's: not touched.
        """
        core = self._core
        loan = core.loan_of(conn)
        try:
            yield conn
            if not core.loan_ended(conn, loan) and self._lifecycle.in_transaction(conn):
                conn.commit()  # type: ignore[attr-defined]
        finally:
            if not core.loan_ended(conn, loan):
                with suppress(PoolClosed):
                    give_back(conn)

    def _held_by_key(self, key: Hashable) -> C | None:
        """The connection checked out under ``key``, if any (for the psycopg2 drop-ins)."""
        bridge = self._running_bridge()
        with bridge.lock:
            return self._port.held_by_key_nowait(key)

    # -- the rest, straight from the core ----------------------------------------------

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the sizes (``max_size=None``: ``min_size``, as psycopg_pool)."""
        self._running_bridge().call(self._core.maintenance.resize, min_size, max_size)

    def wait(self, timeout: float = 30.0, *, fail_fast: bool = False) -> None:
        """Wait until ``min_size`` connections are open, or raise PoolTimeout.

        ``fail_fast=True``: raise the first connection error instead. A null
        pool makes one real connection attempt.
        """
        self._running_bridge().call(
            partial(self._core.connector.wait, timeout, fail_fast=fail_fast)
        )

    def check(self) -> None:
        """Make a round trip on every idle connection; replace those that fail."""
        self._running_bridge().call(self._core.maintenance.check)

    def drain(self) -> None:
        """Replace every connection: idle ones now, borrowed ones when returned."""
        self._running_bridge().call(self._core.maintenance.drain)

    def purge_expired(self) -> int:
        """Close idle connections idle longer than ``max_idle`` now; returns how many."""
        return self._running_bridge().call(self._core.maintenance.purge_expired)

    def stats(self) -> PoolStats:
        """A snapshot of the pool's state, counters and histograms.

        Callable from the pool's loop thread too (``reconnect_failed``).
        """
        return self._parked(self._core.stats)

    def get_stats(self) -> dict[str, int]:
        """The counters with psycopg_pool's keys (``pool_min``, ``requests_num``, ...)."""
        return psycopg_pool_stats(self.stats())

    def pop_stats(self) -> dict[str, int]:
        """:meth:`get_stats`, then reset the counters."""
        return psycopg_pool_stats(self._parked(self._pop_stats))

    def _pop_stats(self) -> PoolStats:
        stats = self._core.stats()
        self._core.reset_stats()
        return stats

    def _parked(self, read: Callable[[], T]) -> T:
        """``read()`` with the loop parked: under the bridge's lock, which the loop's own
        thread holds already (taking it there would deadlock), as does a stopped loop."""
        bridge = self._bridge
        if not bridge.running or bridge.on_loop_thread():
            return read()
        with bridge.lock:
            return read()


CT = TypeVar("CT", bound="psycopg.Connection[Any]", default="psycopg.Connection[tuple[Any, ...]]")


class ConnectionPool(SyncPoolFacade[CT]):
    """A thread-safe pool of psycopg ``Connection`` objects.

    The same options as :class:`~aiopgpool.AsyncConnectionPool`, with sync
    callables for ``check``, ``configure`` and ``reset``::

        with ConnectionPool("dbname=app", max_size=10) as pool:
            with pool.connection() as conn:
                conn.execute("SELECT 1")
    """

    _null = False

    def __init__(
        self,
        conninfo: str | Callable[[], Any] = DEFAULTS.conninfo,
        *,
        kwargs: dict[str, Any] | Callable[[], Any] | None = DEFAULTS.kwargs,
        min_size: int = DEFAULTS.min_size,
        max_size: int | None = DEFAULTS.max_size,
        timeout: float | None = DEFAULTS.timeout,
        max_waiting: int = DEFAULTS.max_waiting,
        max_idle: float | None = DEFAULTS.max_idle,
        max_lifetime: float | None = DEFAULTS.max_lifetime,
        check: SyncCallback | None = DEFAULTS.check,
        configure: SyncCallback | None = DEFAULTS.configure,
        reset: SyncCallback | None = DEFAULTS.reset,
        reconnect_timeout: float | None = DEFAULTS.reconnect_timeout,
        reconnect_failed: Callable[[Any], Any] | None = DEFAULTS.reconnect_failed,
        leak_timeout: float | None = DEFAULTS.leak_timeout,
        name: str | None = None,
        connection_class: type[CT] = psycopg.Connection,  # type: ignore[assignment]
        open: bool = False,
        close_returns: bool = DEFAULTS.close_returns,
        ping_after_idle: float | None = DEFAULTS.ping_after_idle,
    ) -> None:
        if max_size is None:
            # As psycopg_pool: max_size=None means min_size (which a null pool lacks).
            if self._null:
                raise ValueError("a null pool needs max_size (0: no bound), not None")
            max_size = min_size
        options = PoolOptions(
            conninfo=conninfo,
            kwargs=kwargs,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            max_waiting=max_waiting,
            max_idle=max_idle,
            max_lifetime=max_lifetime,
            check=check,
            configure=configure,
            reset=reset,
            reconnect_timeout=reconnect_timeout,
            reconnect_failed=reconnect_failed,
            leak_timeout=leak_timeout,
            name=name,
            close_returns=close_returns,
            ping_after_idle=ping_after_idle,
            null=self._null,
        )
        if not (
            isinstance(connection_class, type) and issubclass(connection_class, psycopg.Connection)
        ):
            raise ValueError("connection_class must be a subclass of psycopg.Connection")
        target = ConnectTarget(conninfo, kwargs, options.name)  # type: ignore[arg-type]
        lifecycle = SyncLifecycle(
            target, connection_class, configure=configure, reset=reset, check=check
        )
        super().__init__(cast("BlockingLifecycle[CT]", lifecycle), options, target.describe())
        lifecycle.link = PoolLink(self, close_returns)
        self.connection_class = connection_class
        if open:
            self.open()  # as psycopg_pool: started, connections come in the background

    check_connection = staticmethod(check_connection_blocking)


class NullConnectionPool(ConnectionPool[CT]):
    """The sync twin of :class:`~aiopgpool.AsyncNullConnectionPool`: no idle connections."""

    _null = True

    def __init__(
        self,
        conninfo: str | Callable[[], Any] = DEFAULTS.conninfo,
        *,
        min_size: int = 0,
        connection_class: type[CT] = psycopg.Connection,  # type: ignore[assignment]
        **options: Any,
    ) -> None:
        # connection_class is spelled out so that type checkers infer CT from it.
        super().__init__(conninfo, min_size=min_size, connection_class=connection_class, **options)
