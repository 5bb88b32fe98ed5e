"""The public asyncio pools: :class:`AsyncConnectionPool` and :class:`AsyncNullConnectionPool`.

A public pool holds a :class:`~aiopgpool.core.PoolCore` and shows the API
and nothing else. ``getconn`` and ``putconn`` are the core's own coroutine
functions, bound on each instance: no frame between a caller and the core.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any, Generic, cast

import psycopg
from typing_extensions import Self, TypeVar

from .attributes import PoolAttributes
from .conninfo import ConnectTarget
from .core import PoolCore
from .errors import PoolClosed, PoolError
from .lifecycle import INTRANS, AsyncLifecycle, Lifecycle, PoolLink, check_connection
from .options import DEFAULTS, PoolOptions
from .stats import PoolStats, psycopg_pool_stats

__all__ = ["AsyncConnectionPool", "AsyncNullConnectionPool"]

ACT = TypeVar(
    "ACT",
    bound="psycopg.AsyncConnection[Any]",
    default="psycopg.AsyncConnection[tuple[Any, ...]]",
)
AsyncCallback = Callable[[Any], Awaitable[Any]]


class AsyncConnectionPool(PoolAttributes, Generic[ACT]):
    """An asyncio pool of psycopg ``AsyncConnection`` objects.

    See the README and ``API.md`` for every option; in short::

        async with AsyncConnectionPool("dbname=app", max_size=10) as pool:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
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
        check: AsyncCallback | None = DEFAULTS.check,
        configure: AsyncCallback | None = DEFAULTS.configure,
        reset: AsyncCallback | None = DEFAULTS.reset,
        reconnect_timeout: float | None = DEFAULTS.reconnect_timeout,
        reconnect_failed: Callable[[Any], Any] | None = DEFAULTS.reconnect_failed,
        leak_timeout: float | None = DEFAULTS.leak_timeout,
        name: str | None = None,
        connection_class: type[ACT] = psycopg.AsyncConnection,  # type: ignore[assignment]
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
            isinstance(connection_class, type)
            and issubclass(connection_class, psycopg.AsyncConnection)
        ):
            raise ValueError("connection_class must be a subclass of psycopg.AsyncConnection")
        target = ConnectTarget(conninfo, kwargs, options.name)  # type: ignore[arg-type]
        lifecycle = AsyncLifecycle(
            target, connection_class, configure=configure, reset=reset, check=check
        )
        lifecycle.link = PoolLink(self, close_returns)
        self._core: PoolCore[ACT] = PoolCore(
            cast("Lifecycle[ACT]", lifecycle), options, target.describe(), owner=self
        )
        self.connection_class = connection_class
        if type(self).getconn is AsyncConnectionPool.getconn:
            # The core's coroutine functions themselves (subclasses that
            # override them keep their own): no frame between caller and core.
            self.getconn = self._core.getconn  # type: ignore[method-assign]
        if type(self).putconn is AsyncConnectionPool.putconn:
            self.putconn = self._core.putconn  # type: ignore[method-assign]
        if open:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                raise PoolError(
                    f"pool {options.name!r}: open=True needs a running event loop; "
                    "create the pool inside a coroutine, or call 'await pool.open()' later"
                ) from None
            self._core.open_nowait()

    def __repr__(self) -> str:
        return repr(self._core)

    # -- opening and closing ---------------------------------------------------------

    async def open(
        self, wait: bool = False, timeout: float = 30.0, *, fail_fast: bool = False
    ) -> None:
        """Start the pool; ``wait=True`` waits for ``min_size`` connections (PoolTimeout).

        ``fail_fast=True`` (with ``wait=True``): the first connection error is
        raised at once, instead of retrying until ``timeout``.
        """
        await self._core.open(wait, timeout, fail_fast=fail_fast)

    async def wait(self, timeout: float = 30.0, *, fail_fast: bool = False) -> None:
        """Wait until ``min_size`` connections are open, or raise PoolTimeout.

        ``fail_fast=True``: raise the first connection error instead. A null
        pool makes one real connection attempt.
        """
        await self._core.connector.wait(timeout, fail_fast=fail_fast)

    async def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, wait up to ``timeout`` for borrowed connections, close."""
        await self._core.closing.close(timeout)

    async def closeall(self) -> None:
        """Close every connection now, borrowed ones included; the pool is closed."""
        await self._core.closing.closeall()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- checkout and return ---------------------------------------------------------

    async def getconn(self, timeout: float | None = None, *, key: Hashable | None = None) -> ACT:
        """A connection, waiting up to ``timeout`` (default: the pool's) for one.

        The same ``key`` while its connection is held returns that connection
        again, without taking another slot.
        """
        return await self._core.getconn(timeout, key=key)

    async def putconn(self, conn: ACT, key: Hashable | None = None, close: bool = False) -> None:
        """Give a connection back; ``close=True`` discards it.

        A connection left in a transaction or in error is rolled back, one left
        mid-query or broken is discarded, and changed attributes (autocommit,
        isolation level, read only, deferrable) are restored.
        """
        await self._core.putconn(conn, key, close)

    def _core_for(self, conn: ACT) -> PoolCore[ACT]:
        """The core that lent ``conn`` (for ``connection()``'s exit)."""
        return self._core

    def connection(self, timeout: float | None = None) -> _ConnectionContext[ACT]:
        """``async with pool.connection() as conn``: getconn, then putconn.

        Commits on success and rolls back on error, as ``async with conn``
        does, but returns the connection to the pool instead of closing it.
        """
        return _ConnectionContext(self, timeout)

    # -- the rest ----------------------------------------------------------------------

    async def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the sizes (``max_size=None``: ``min_size``, as psycopg_pool)."""
        await self._core.maintenance.resize(min_size, max_size)

    async def check(self) -> None:
        """Make a round trip on every idle connection; replace those that fail."""
        await self._core.maintenance.check()

    async def drain(self) -> None:
        """Replace every connection: idle ones now, borrowed ones when returned."""
        await self._core.maintenance.drain()

    async def purge_expired(self) -> int:
        """Close idle connections idle longer than ``max_idle`` now; how many."""
        return await self._core.maintenance.purge_expired()

    def stats(self) -> PoolStats:
        """A snapshot of the pool's state, counters and histograms."""
        return self._core.stats()

    def get_stats(self) -> dict[str, int]:
        """The counters with psycopg_pool's keys (``pool_min``, ``requests_num``, ...)."""
        return psycopg_pool_stats(self._core.stats())

    def pop_stats(self) -> dict[str, int]:
        """:meth:`get_stats`, then reset the counters."""
        stats = self.get_stats()
        self._core.reset_stats()
        return stats

    check_connection = staticmethod(check_connection)


class _ConnectionContext(Generic[ACT]):
    """``async with pool.connection()``: getconn; on exit commit (on success) and putconn."""

    __slots__ = ("_conn", "_lender", "_loan", "_pool", "_timeout")

    def __init__(self, pool: Any, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: ACT | None = None
        self._lender: PoolCore[ACT] | None = None
        self._loan: float | None = None

    async def __aenter__(self) -> ACT:
        return self._hold(await self._pool.getconn(self._timeout))

    def _hold(self, conn: ACT) -> ACT:
        """Note the loan of ``conn`` just checked out, for the exit (see there)."""
        self._conn = conn
        lender = self._lender = self._pool._core_for(conn)
        self._loan = lender.loan_of(conn)
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        assert conn is not None
        self._conn = None
        lender = self._lender
        assert lender is not None
        if lender.loan_ended(conn, self._loan):
            # Given back inside the block (conn.close() with close_returns): no
            # longer this block's, perhaps another borrower's now; not touched.
            return
        try:
            if exc_type is None and conn.pgconn.transaction_status == INTRANS:
                await conn.commit()
            # On error, putconn rolls back (or discards a connection left mid-query).
        finally:
            # Closed under us: closeall() already closed the connection.
            with contextlib.suppress(PoolClosed):
                await self._pool.putconn(conn)


class AsyncNullConnectionPool(AsyncConnectionPool[ACT]):
    """The same interface, keeping no idle connection (pg_simple's ``disable_pooling``).

    Each getconn connects and each putconn closes (before it returns);
    ``max_size`` still bounds how many connections are open at once (0: no
    bound), and extra requests wait in line. ``min_size`` must be 0.
    """

    _null = True

    def __init__(
        self,
        conninfo: str | Callable[[], Any] = DEFAULTS.conninfo,
        *,
        min_size: int = 0,
        connection_class: type[ACT] = psycopg.AsyncConnection,  # type: ignore[assignment]
        **options: Any,
    ) -> None:
        # connection_class is spelled out so that type checkers infer ACT from it.
        super().__init__(conninfo, min_size=min_size, connection_class=connection_class, **options)
