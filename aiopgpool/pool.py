"""The public asyncio pools: :class:`AsyncConnectionPool` and :class:`AsyncNullConnectionPool`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any

import psycopg

from .core import PoolCore
from .errors import PoolClosed
from .lifecycle import INTRANS, AsyncCallback, AsyncLifecycle
from .options import describe_target, make_name, prepare_connect_kwargs

__all__ = ["AsyncConnectionPool", "AsyncNullConnectionPool"]

AsyncConnection = psycopg.AsyncConnection[Any]


class AsyncConnectionPool(PoolCore[AsyncConnection]):
    """An asyncio pool of psycopg ``AsyncConnection`` objects.

    See the README and ``API.md`` for every option; in short::

        async with AsyncConnectionPool("dbname=app", max_size=10) as pool:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
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
        check: AsyncCallback | None = None,
        configure: AsyncCallback | None = None,
        reset: AsyncCallback | None = None,
        reconnect_timeout: float | None = 300.0,
        reconnect_failed: Callable[[Any], None] | None = None,
        leak_timeout: float | None = None,
        name: str | None = None,
        connection_class: type[AsyncConnection] = psycopg.AsyncConnection,
    ) -> None:
        name = make_name(name)
        for label, func in (("check", check), ("configure", configure), ("reset", reset)):
            if func is not None and not callable(func):
                raise ValueError(f"{label} must be an async callable taking the connection")
        lifecycle = AsyncLifecycle(
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

    def connection(self, timeout: float | None = None) -> _ConnectionContext:
        """``async with pool.connection() as conn``: getconn, then putconn.

        Commits on success and rolls back on error, as ``async with conn``
        does, but returns the connection to the pool instead of closing it.
        """
        return _ConnectionContext(self, timeout)

    async def __aenter__(self) -> AsyncConnectionPool:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _ConnectionContext:
    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: AsyncConnectionPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncConnection:
        self._conn = await self._pool.getconn(timeout=self._timeout)
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        assert conn is not None
        self._conn = None
        try:
            if exc_type is None and conn.pgconn.transaction_status == INTRANS:
                await conn.commit()
            # On error, putconn rolls back (or discards a connection left mid-query).
        finally:
            # Closed under us: closeall() already closed the connection.
            with contextlib.suppress(PoolClosed):
                await self._pool.putconn(conn)


class AsyncNullConnectionPool(AsyncConnectionPool):
    """The same interface, keeping no idle connection (pg_simple's ``disable_pooling``).

    Each getconn connects and each putconn closes; ``max_size`` still bounds
    how many connections are open at once, and extra requests wait in line.
    ``min_size`` must be 0.
    """

    _keeps_idle = False

    def __init__(self, conninfo: str = "", *, min_size: int = 0, **options: Any) -> None:
        if min_size != 0:
            raise ValueError(f"min_size must be 0 for a null pool, got {min_size!r}")
        super().__init__(conninfo, min_size=0, **options)
