"""The thread-safe sync facade: :class:`ConnectionPool` and :class:`NullConnectionPool`.

A facade owns a :class:`~aiopgpool.core.PoolCore` (waiting, fairness,
timeouts, lifecycle and stats are all the core's) and a
:class:`~aiopgpool.bridge.LoopThread` that runs it. Each blocking call is
the core's coroutine run through the bridge, except for two things done in
the caller's own thread so that 16 threads do not queue behind one loop:

* the fast paths of getconn and putconn, under the bridge's parking lock;
* the blocking work that belongs to the borrower: commit, rollback, restoring
  attributes and the user's ``reset``, before the connection goes back.
"""

from __future__ import annotations

import threading
import time
import traceback
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from types import TracebackType
from typing import Any, Generic, NoReturn, TypeVar

import psycopg

from .bridge import LoopThread
from .core import PoolCore
from .errors import PoolClosed, PoolError
from .lifecycle import Holder
from .options import describe_target, make_name, prepare_connect_kwargs
from .stats import PoolStats
from .sync_lifecycle import BlockingLifecycle, SyncCallback, SyncLifecycle

__all__ = ["ConnectionPool", "NullConnectionPool", "SyncPoolFacade"]

C = TypeVar("C")
T = TypeVar("T")
Self = TypeVar("Self", bound="SyncPoolFacade[Any]")


_PENDING, _DONE, _CANCELLED = 0, 1, 2


class _ThreadWaiter(Generic[T]):
    """A waiter for a thread, in the core's line: the lightest future that will do.

    Every transition happens under the bridge's lock (in a caller thread, or
    on the loop, which holds it while it runs), so the state needs no lock of
    its own; the waiting thread sleeps on a lock that completing releases.
    """

    __slots__ = ("_exception", "_result", "_state", "_wake")

    def __init__(self) -> None:
        self._state = _PENDING
        self._result: T | None = None
        self._exception: BaseException | None = None
        self._wake = threading.Lock()
        self._wake.acquire()

    def done(self) -> bool:
        return self._state != _PENDING

    def result(self) -> T:
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[return-value]

    def set_result(self, result: T, /) -> None:
        self._result = result
        self._state = _DONE
        self._wake.release()

    def set_exception(self, exception: BaseException, /) -> None:
        self._exception = exception
        self._state = _DONE
        self._wake.release()

    def cancel(self) -> bool:
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        return True

    def wait(self, timeout: float | None) -> bool:
        """Sleep until completed or ``timeout`` seconds passed; True if completed."""
        return self._wake.acquire(timeout=-1 if timeout is None else timeout)


class SyncPoolFacade(Generic[C]):
    """Blocking pool methods over a pool core running in a background event loop."""

    def __init__(
        self,
        lifecycle: BlockingLifecycle[C],
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
        keep_idle: bool,
    ) -> None:
        self._lifecycle = lifecycle
        self._core: PoolCore[C] = PoolCore(
            lifecycle,
            name=name,
            target=target,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            max_waiting=max_waiting,
            max_idle=max_idle,
            max_lifetime=max_lifetime,
            reconnect_timeout=reconnect_timeout,
            reconnect_failed=reconnect_failed,
            leak_timeout=leak_timeout,
            keep_idle=keep_idle,
            owner=self,
        )
        self._bridge = LoopThread(name, keepalive=self._core, on_exit=partial(self._core.close, 0))
        # Dropped without close(): closed on its loop (borrowed connections
        # left to their borrowers), and its thread ends.
        weakref.finalize(self, self._bridge.abandon, self._core.abandon).atexit = False

    # -- attributes ------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The pool's name (logs, stats, application_name)."""
        return self._core.name

    @property
    def min_size(self) -> int:
        """The number of connections the pool keeps open."""
        return self._core.min_size

    @property
    def max_size(self) -> int:
        """The most connections the pool opens at once."""
        return self._core.max_size

    @property
    def closed(self) -> bool:
        """True once the pool is closed."""
        return self._core.closed

    def __repr__(self) -> str:
        return repr(self._core)

    # -- opening and closing ---------------------------------------------------------

    def open(self, wait: bool = False, timeout: float = 30.0, *, fail_fast: bool = False) -> None:
        """Start the pool (and its loop thread); see ``AsyncConnectionPool.open``."""
        if self._core.closed:
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
            if self._core.closed:
                raise PoolClosed(f"pool {self.name!r} is already closed")
            self._bridge.check_caller()
            self._bridge.start()
        try:
            self._bridge.call(self._core.closeall)
        finally:
            self._bridge.stop()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, wait up to ``timeout`` for borrowed connections, close."""
        if not self._bridge.running:
            self._bridge.check_caller()
            if not self._core.closed:
                self._bridge.start()
            else:
                return
        try:
            self._bridge.call(self._core.close, timeout)
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
        raise self._core._closed_error()

    # -- checkout and return ---------------------------------------------------------

    def getconn(self, key: Hashable | None = None, timeout: float | None = None) -> C:
        """A connection, waiting up to ``timeout`` (default: the pool's) for one.

        The caller's thread waits on its own future in the core's line, so a
        connection returned by another thread is handed over without going
        through the event loop; the loop is only needed to open or check one.
        """
        bridge = self._bridge
        if not bridge.serves_caller():  # _running_bridge(), inlined: the hot path
            self._refuse_caller()
        core = self._core
        with bridge.lock:
            # The socket test is a system call, which lets other threads run:
            # it is made below, outside the lock they would queue on.
            conn = core.try_getconn_nowait(key, test=False)
            if conn is not None:
                return conn
            start = time.monotonic()
            waiter: _ThreadWaiter[Holder[C]] = _ThreadWaiter()
            got = core.request_nowait(key, waiter, timeout)
            if got is not None and not isinstance(got, Holder):
                return got  # a keyed connection already held
        if got is None:
            got, conn = self._wait(waiter, key, timeout, start)
        else:
            try:
                core.test_slot(got)  # the slot is this thread's own until checked out
            except BaseException:  # interrupted (KeyboardInterrupt): give the slot back
                with bridge.lock:
                    core.release_slot_nowait(got)
                raise
            with bridge.lock:
                conn = core.checkout_slot_nowait(got, key)
        if conn is None:
            # Leak reports show the borrower's stack: take it here, not on the loop.
            stack = None if core.leak_timeout is None else "".join(traceback.format_stack()[:-1])
            conn = bridge.call(core.checkout_slot, got, key, timeout, start, stack)
        return conn

    def _wait(
        self,
        waiter: _ThreadWaiter[Holder[C]],
        key: Hashable | None,
        timeout: float | None,
        start: float,
    ) -> tuple[Holder[C], C | None]:
        """Wait in the core's line; the slot got, and its connection if ready as it is."""
        bridge, core = self._bridge, self._core
        try:
            waiter.wait(core.wait_timeout(timeout))
        except BaseException:  # interrupted (KeyboardInterrupt): leave the line
            with bridge.lock:
                try:
                    holder = core.abandon_wait(waiter, time.monotonic() - start, timeout)
                except PoolError:
                    pass
                else:
                    core.release_slot_nowait(holder)
            raise
        with bridge.lock:
            holder = core.abandon_wait(waiter, time.monotonic() - start, timeout)
            return holder, core.checkout_slot_nowait(holder, key)

    def putconn(self, conn: C, key: Hashable | None = None, close: bool = False) -> None:
        """Give a connection back (rolled back and restored first); ``close=True`` discards it.

        Once this returns the connection is no longer borrowed (its key is
        free, a second return raises :class:`PoolError`), even when closing
        it is left to the loop.
        """
        bridge = self._bridge
        if not bridge.serves_caller():  # _running_bridge(), inlined: the hot path
            self._refuse_caller()
        core = self._core
        lifecycle = self._lifecycle
        with bridge.lock:
            # Waiters are this facade's threads: handing over to them is safe here.
            if (
                key is None
                and not close
                and not lifecycle.resets
                and core.try_putconn_nowait(conn, handoff=True)
            ):
                return
            baseline = core.borrowed_baseline(conn)  # PoolError: foreign, or returned twice
        bad = False
        if not close:
            try:
                if not lifecycle.is_clean(conn, baseline):
                    bad = lifecycle.is_bad_return(conn)
                    close = not lifecycle.clean_blocking(conn, baseline)
                if lifecycle.resets and not close:
                    close = not lifecycle.reset_blocking(conn)
            except Exception:
                close = True
        if close:
            lifecycle.close(conn)  # now, as psycopg2 does; the caller still owns it
        with bridge.lock:
            if not close and core.try_putconn_nowait(conn, handoff=True, bad=bad):
                return
            holder = core.take_return_nowait(conn, bad=bad)
        # The rest (closing it, expiry, refilling) happens on the loop; the
        # bookkeeping above already made the return final.
        bridge.call_soon(core.finish_return, holder, close)

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[C]:
        """``with pool.connection() as conn``: getconn, commit or roll back, putconn."""
        conn = self.getconn(timeout=timeout)
        try:
            yield conn
            if self._lifecycle.in_transaction(conn):
                conn.commit()  # type: ignore[attr-defined]
        finally:
            # On error, putconn rolls back (or discards a broken connection).
            with suppress(PoolClosed):
                self.putconn(conn)

    def held_by_key(self, key: Hashable) -> C | None:
        """The connection checked out under ``key``, if any."""
        bridge = self._running_bridge()
        with bridge.lock:
            return self._core.held_by_key(key)

    # -- the rest, straight from the core ----------------------------------------------

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's sizes (as ``AsyncConnectionPool.resize``)."""
        self._running_bridge().call(self._core.resize, min_size, max_size)

    def wait(self, timeout: float = 30.0, *, fail_fast: bool = False) -> None:
        """Wait until ``min_size`` connections are open, or raise PoolTimeout.

        ``fail_fast=True``: raise the first connection error instead (see
        ``AsyncConnectionPool.wait``).
        """
        self._running_bridge().call(partial(self._core.wait, timeout, fail_fast=fail_fast))

    def check(self) -> None:
        """Make a round trip on every idle connection; replace those that fail."""
        self._running_bridge().call(self._core.check)

    def drain(self) -> None:
        """Replace every connection: idle ones now, borrowed ones when returned."""
        self._running_bridge().call(self._core.drain)

    def purge_expired(self) -> int:
        """Close idle connections idle longer than ``max_idle`` now; returns how many."""
        return self._running_bridge().call(self._core.purge_expired)

    def stats(self) -> PoolStats:
        """A snapshot of the pool's state and counters."""
        if not self._bridge.running:
            return self._core.stats()
        return self._running_bridge().call(_stats_of, self._core)


async def _stats_of(core: PoolCore[Any]) -> PoolStats:
    return core.stats()


Connection = psycopg.Connection[Any]


class ConnectionPool(SyncPoolFacade[Connection]):
    """A thread-safe pool of psycopg ``Connection`` objects.

    The same options as :class:`~aiopgpool.AsyncConnectionPool`, with sync
    callables for ``check``, ``configure`` and ``reset``::

        with ConnectionPool("dbname=app", max_size=10) as pool:
            with pool.connection() as conn:
                conn.execute("SELECT 1")
    """

    _keeps_idle = True

    def __init__(
        self,
        conninfo: str = "",
        *,
        kwargs: dict[str, Any] | None = None,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float | None = 30.0,
        max_waiting: int = 0,
        max_idle: float | None = 600.0,
        max_lifetime: float | None = 3600.0,
        check: SyncCallback | None = None,
        configure: SyncCallback | None = None,
        reset: SyncCallback | None = None,
        reconnect_timeout: float | None = 300.0,
        reconnect_failed: Callable[[Any], None] | None = None,
        leak_timeout: float | None = None,
        name: str | None = None,
        connection_class: type[Connection] = psycopg.Connection,
    ) -> None:
        name = make_name(name)
        for label, func in (("check", check), ("configure", configure), ("reset", reset)):
            if func is not None and not callable(func):
                raise ValueError(f"{label} must be a callable taking the connection")
        lifecycle = SyncLifecycle(
            conninfo,
            prepare_connect_kwargs(conninfo, kwargs, name),
            connection_class,
            configure=configure,
            reset=reset,
            check=check,
        )
        super().__init__(
            lifecycle,
            name=name,
            target=describe_target(conninfo, kwargs),
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            max_waiting=max_waiting,
            max_idle=max_idle,
            max_lifetime=max_lifetime,
            reconnect_timeout=reconnect_timeout,
            reconnect_failed=reconnect_failed,
            leak_timeout=leak_timeout,
            keep_idle=self._keeps_idle,
        )


class NullConnectionPool(ConnectionPool):
    """The sync twin of :class:`~aiopgpool.AsyncNullConnectionPool`: no idle connections."""

    _keeps_idle = False

    def __init__(self, conninfo: str = "", *, min_size: int = 0, **options: Any) -> None:
        if min_size != 0:
            raise ValueError(f"min_size must be 0 for a null pool, got {min_size!r}")
        super().__init__(conninfo, min_size=0, **options)
