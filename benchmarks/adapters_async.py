"""Async pool adapters: each pool behind the same small interface.

Every adapter opens its pool pre-filled to ``min_size`` (``open``), lends and takes
back a connection (``acquire``/``release``), runs ``SELECT 1`` and fetches the row
(``select1``) and closes (``close``). psycopg connections are made with
``autocommit=True`` everywhere (asyncpg is autocommit by nature), so ``select1``
is one round trip and no pool has a transaction to end on return.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from benchmarks.floors import AsyncFloorPool

#: Connection options given to every psycopg connection the benchmark makes.
PSYCOPG_KWARGS: dict[str, Any] = {"autocommit": True}

#: Seconds a pool may take to open (pre-fill) before it counts as broken.
OPEN_TIMEOUT = 60.0


class AdapterUnavailable(Exception):
    """The pool cannot run here (its package is missing or does not import)."""


def unavailable(what: str, exc: BaseException) -> AdapterUnavailable:
    """The error for "``what`` does not import", with the import error's gist."""
    return AdapterUnavailable(f"cannot import {what} ({type(exc).__name__}: {exc})")


class AsyncAdapter(abc.ABC):
    """One async pool under test."""

    name: ClassVar[str]
    driver: ClassVar[str] = "psycopg"
    is_floor: ClassVar[bool] = False
    #: A reference row (shown, never the fastest pool): the FIFO floor.
    is_reference: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @abc.abstractmethod
    async def open(
        self, dsn: str, min_size: int, max_size: int, *, timeout: float | None = None
    ) -> None:
        """Create the pool and wait until ``min_size`` connections exist.

        ``timeout``: how long ``acquire`` waits before it raises (None: as long as
        it takes; the floor always waits).
        """

    @abc.abstractmethod
    async def acquire(self) -> Any:
        """Borrow a connection, waiting as long as it takes."""

    @abc.abstractmethod
    async def release(self, conn: Any) -> None:
        """Give back a borrowed connection."""

    async def select1(self, conn: Any) -> None:
        """Run ``SELECT 1`` on a borrowed connection and fetch the row."""
        cur = await conn.execute("SELECT 1")
        await cur.fetchone()

    async def query_once(self) -> None:
        """Acquire, ``select1``, release (also when the query raises)."""
        conn = await self.acquire()
        try:
            await self.select1(conn)
        finally:
            await self.release(conn)

    @abc.abstractmethod
    def raw_calls(self) -> tuple[Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[Any]]]:
        """The pool's own borrow and return calls, without this adapter's layer.

        The cycles command times these, in each pool's own idiom.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the pool and its connections."""


def psycopg_style_pool(
    class_path: str, dsn: str, min_size: int, max_size: int, **options: Any
) -> Any:
    """A pool of the psycopg_pool family (aiopgpool's take the same arguments), not opened.

    ``class_path`` is ``"module.Class"``; it is called with the conninfo,
    ``kwargs=PSYCOPG_KWARGS``, the sizes and ``options``. Raises
    :class:`AdapterUnavailable` when it does not import.
    """
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as exc:
        raise unavailable(class_path, exc) from exc
    return cls(dsn, kwargs=dict(PSYCOPG_KWARGS), min_size=min_size, max_size=max_size, **options)


class _GetconnPutconnAsync(AsyncAdapter):
    """A pool with psycopg_pool's interface: ``open(wait=True)``, getconn/putconn, close."""

    #: The pool class (``"module.Class"``) and its options beyond conninfo and sizes.
    pool_class: ClassVar[str]
    pool_options: ClassVar[dict[str, Any]]

    def __init__(self) -> None:
        self._pool: Any = None

    @classmethod
    def _options(cls) -> dict[str, Any]:
        """The pool's options beyond conninfo and sizes."""
        return dict(cls.pool_options)

    async def open(
        self, dsn: str, min_size: int, max_size: int, *, timeout: float | None = None
    ) -> None:
        """Create the pool (``timeout`` as its default wait), then ``await open(wait=True)``."""
        options = self._options()
        if timeout is not None:
            options["timeout"] = timeout
        self._pool = psycopg_style_pool(self.pool_class, dsn, min_size, max_size, **options)
        await self._pool.open(wait=True, timeout=OPEN_TIMEOUT)

    async def acquire(self) -> Any:
        """``await pool.getconn()``."""
        return await self._pool.getconn()

    async def release(self, conn: Any) -> None:
        """``await pool.putconn(conn)``."""
        await self._pool.putconn(conn)

    def raw_calls(self) -> tuple[Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[Any]]]:
        """``pool.getconn``, ``pool.putconn``."""
        return self._pool.getconn, self._pool.putconn

    async def close(self) -> None:
        """``await pool.close()``."""
        if self._pool is not None:
            await self._pool.close()


class AiopgpoolAsync(_GetconnPutconnAsync):
    """aiopgpool.AsyncConnectionPool, through getconn()/putconn()."""

    name = "aiopgpool"
    description = "aiopgpool.AsyncConnectionPool"
    pool_class = "aiopgpool.AsyncConnectionPool"
    pool_options: ClassVar[dict[str, Any]] = {"name": "bench-aiopgpool"}


class AiopgpoolDiscardAsync(AiopgpoolAsync):
    """aiopgpool.AsyncConnectionPool with ``reset=aiopgpool.discard_session``.

    Its rows against the plain aiopgpool rows are the cost of leaving no session
    state behind (one DISCARD ALL round trip per return).
    """

    name = "aiopgpool-discard"
    description = "aiopgpool.AsyncConnectionPool, reset=discard_session"

    @classmethod
    def _options(cls) -> dict[str, Any]:
        import aiopgpool

        return {"name": "bench-aiopgpool-discard", "reset": aiopgpool.discard_session}


class PsycopgPoolAsync(_GetconnPutconnAsync):
    """psycopg_pool.AsyncConnectionPool, through getconn()/putconn()."""

    name = "psycopg_pool"
    description = "psycopg_pool.AsyncConnectionPool"
    pool_class = "psycopg_pool.AsyncConnectionPool"
    pool_options: ClassVar[dict[str, Any]] = {"open": False, "name": "bench-psycopg_pool"}


def asyncpg_connect_kwargs(dsn: str) -> dict[str, Any]:
    """Translate a libpq conninfo string or URL into asyncpg.connect() keywords."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    out: dict[str, Any] = {}
    for libpq_key, asyncpg_key in (
        ("host", "host"),
        ("port", "port"),
        ("user", "user"),
        ("password", "password"),
        ("dbname", "database"),
        ("sslmode", "ssl"),
    ):
        if params.get(libpq_key) is not None:
            out[asyncpg_key] = params[libpq_key]
    if "port" in out:
        out["port"] = int(out["port"])
    return out


class AsyncpgDefault(AsyncAdapter):
    """asyncpg.create_pool() as shipped: every release runs asyncpg's reset query."""

    name = "asyncpg"
    driver = "asyncpg"
    description = "asyncpg.create_pool() (default reset on release)"

    def __init__(self) -> None:
        self._pool: Any = None
        self._timeout: float | None = None

    def _pool_options(self) -> dict[str, Any]:
        return {}

    async def open(
        self, dsn: str, min_size: int, max_size: int, *, timeout: float | None = None
    ) -> None:
        """``await asyncpg.create_pool(...)`` (it connects min_size before returning)."""
        self._timeout = timeout
        try:
            import asyncpg
        except Exception as exc:
            raise unavailable("asyncpg", exc) from exc
        self._pool = await asyncpg.create_pool(
            min_size=min_size,
            max_size=max_size,
            server_settings={"application_name": f"bench-{self.name}"},
            **self._pool_options(),
            **asyncpg_connect_kwargs(dsn),
        )

    async def acquire(self) -> Any:
        """``await pool.acquire()`` (with the ``timeout`` given to ``open``)."""
        return await self._pool.acquire(timeout=self._timeout)

    async def release(self, conn: Any) -> None:
        """``await pool.release(conn)``."""
        await self._pool.release(conn)

    def raw_calls(self) -> tuple[Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[Any]]]:
        """``pool.acquire``, ``pool.release``."""
        return self._pool.acquire, self._pool.release

    async def select1(self, conn: Any) -> None:
        """``await conn.fetchval("SELECT 1")``."""
        await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        """``await pool.close()``; terminate() if that takes more than 10 s."""
        if self._pool is None:
            return
        try:
            await asyncio.wait_for(self._pool.close(), 10.0)
        except asyncio.TimeoutError:
            self._pool.terminate()


def _no_reset_connection_class() -> type[Any]:
    """An asyncpg Connection whose reset query is empty (asyncpg >= 0.30).

    asyncpg's pool calls ``Connection.reset()`` on release, which ends any open
    transaction and then runs ``get_reset_query()`` (advisory unlock, CLOSE ALL,
    UNLISTEN *, RESET ALL) only if that query is non-empty.
    """
    import asyncpg

    class NoResetConnection(asyncpg.Connection):  # type: ignore[misc]
        def get_reset_query(self) -> str:
            return ""

    return NoResetConnection


class AsyncpgNoReset(AsyncpgDefault):
    """asyncpg.create_pool() with the per-release reset query turned off."""

    name = "asyncpg-noreset"
    description = "asyncpg.create_pool(connection_class=<get_reset_query() returns ''>)"

    def _pool_options(self) -> dict[str, Any]:
        return {"connection_class": _no_reset_connection_class()}


class AsyncFloor(AsyncAdapter):
    """The async floor (benchmarks.floors.AsyncFloorPool)."""

    name = "floor"
    is_floor = True
    description = "minimal fair queue of psycopg AsyncConnections (no pool logic)"

    def __init__(self) -> None:
        self._pool: AsyncFloorPool | None = None

    async def open(
        self, dsn: str, min_size: int, max_size: int, *, timeout: float | None = None
    ) -> None:
        """Connect ``min_size`` connections; more connect lazily up to ``max_size``.

        The floor has no timeout: ``timeout`` must be None.
        """
        if timeout is not None:
            raise ValueError("the floor always waits: it takes no timeout")
        self._pool = AsyncFloorPool(dsn, max_size, dict(PSYCOPG_KWARGS))
        await self._pool.fill(min_size)

    async def acquire(self) -> Any:
        """``await floor.getconn()``."""
        assert self._pool is not None
        return await self._pool.getconn()

    async def release(self, conn: Any) -> None:
        """``floor.putconn(conn)``."""
        assert self._pool is not None
        self._pool.putconn(conn)

    def raw_calls(self) -> tuple[Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[Any]]]:
        """``floor.getconn``, ``floor.aputconn`` (awaited, like the pools' putconn)."""
        assert self._pool is not None
        return self._pool.getconn, self._pool.aputconn

    async def close(self) -> None:
        """Close the idle connections."""
        if self._pool is not None:
            await self._pool.close()


#: The async pools, in table order (the floor last).
ASYNC_ADAPTERS: tuple[type[AsyncAdapter], ...] = (
    AiopgpoolAsync,
    AiopgpoolDiscardAsync,
    PsycopgPoolAsync,
    AsyncpgDefault,
    AsyncpgNoReset,
    AsyncFloor,
)
