"""Sync (thread) pool adapters: each pool behind the same small blocking interface.

The same contract as :mod:`benchmarks.adapters_async`, with plain blocking calls
that any number of threads may make at once.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from benchmarks.adapters_async import OPEN_TIMEOUT, PSYCOPG_KWARGS, psycopg_style_pool, unavailable
from benchmarks.floors import SyncFloorPool


class SyncAdapter(abc.ABC):
    """One thread-safe pool under test."""

    name: ClassVar[str]
    driver: ClassVar[str] = "psycopg"
    is_floor: ClassVar[bool] = False
    #: A reference row (shown, never the fastest pool): the FIFO floor.
    is_reference: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @abc.abstractmethod
    def open(self, dsn: str, min_size: int, max_size: int) -> None:
        """Create the pool and wait until ``min_size`` connections exist."""

    @abc.abstractmethod
    def acquire(self) -> Any:
        """Borrow a connection, blocking as long as it takes."""

    @abc.abstractmethod
    def release(self, conn: Any) -> None:
        """Give back a borrowed connection."""

    def select1(self, conn: Any) -> None:
        """Run ``SELECT 1`` on a borrowed connection and fetch the row."""
        conn.execute("SELECT 1").fetchone()

    @abc.abstractmethod
    def raw_calls(self) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
        """The pool's own borrow and return calls, without this adapter's layer."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the pool and its connections."""


class _GetconnPutconnSync(SyncAdapter):
    """A pool with psycopg_pool's interface: ``open(wait=True)``, getconn/putconn, close."""

    #: The pool class (``"module.Class"``) and its options beyond conninfo and sizes.
    pool_class: ClassVar[str]
    pool_options: ClassVar[dict[str, Any]]

    def __init__(self) -> None:
        self._pool: Any = None

    def open(self, dsn: str, min_size: int, max_size: int) -> None:
        """Create the pool, then ``open(wait=True)``."""
        self._pool = psycopg_style_pool(
            self.pool_class, dsn, min_size, max_size, **self.pool_options
        )
        self._pool.open(wait=True, timeout=OPEN_TIMEOUT)

    def acquire(self) -> Any:
        """``pool.getconn()``."""
        return self._pool.getconn()

    def release(self, conn: Any) -> None:
        """``pool.putconn(conn)``."""
        self._pool.putconn(conn)

    def raw_calls(self) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
        """``pool.getconn``, ``pool.putconn``."""
        return self._pool.getconn, self._pool.putconn

    def close(self) -> None:
        """``pool.close()``."""
        if self._pool is not None:
            self._pool.close()


class AiopgpoolSync(_GetconnPutconnSync):
    """aiopgpool.ConnectionPool (the thread-safe facade), through getconn()/putconn()."""

    name = "aiopgpool"
    description = "aiopgpool.ConnectionPool (sync facade)"
    pool_class = "aiopgpool.ConnectionPool"
    pool_options: ClassVar[dict[str, Any]] = {"name": "bench-aiopgpool-sync"}


class PsycopgPoolSync(_GetconnPutconnSync):
    """psycopg_pool.ConnectionPool, through getconn()/putconn()."""

    name = "psycopg_pool"
    description = "psycopg_pool.ConnectionPool"
    pool_class = "psycopg_pool.ConnectionPool"
    pool_options: ClassVar[dict[str, Any]] = {"open": False, "name": "bench-psycopg_pool-sync"}


class Psycopg2Threaded(SyncAdapter):
    """psycopg2.pool.ThreadedConnectionPool, made to wait instead of raising.

    psycopg2's pool raises "connection pool exhausted" when all ``maxconn`` are
    out; a ``threading.Semaphore(maxconn)`` around getconn()/putconn() turns
    that into waiting, which is how it is used under load.
    """

    name = "psycopg2"
    driver = "psycopg2"
    description = "psycopg2.pool.ThreadedConnectionPool + Semaphore(maxconn)"

    def __init__(self) -> None:
        self._pool: Any = None
        self._slots = threading.Semaphore(1)

    def open(self, dsn: str, min_size: int, max_size: int) -> None:
        """Construct the pool (it connects ``minconn`` at once); set autocommit on them."""
        try:
            from psycopg2.pool import ThreadedConnectionPool
        except Exception as exc:
            raise unavailable("psycopg2.pool", exc) from exc
        self._pool = ThreadedConnectionPool(
            min_size, max_size, dsn, application_name="bench-psycopg2"
        )
        self._slots = threading.Semaphore(max_size)
        conns = [self._pool.getconn() for _ in range(min_size)]
        for conn in conns:
            conn.autocommit = True
        for conn in conns:
            self._pool.putconn(conn)

    def acquire(self) -> Any:
        """Take a semaphore slot, then ``pool.getconn()``."""
        self._slots.acquire()
        try:
            return self._pool.getconn()
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: Any) -> None:
        """``pool.putconn(conn)``, then free the slot."""
        try:
            self._pool.putconn(conn)
        finally:
            self._slots.release()

    def raw_calls(self) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
        """``acquire``, ``release``: the semaphore is part of how this pool is used."""
        return self.acquire, self.release

    def select1(self, conn: Any) -> None:
        """A cursor, ``execute("SELECT 1")``, ``fetchone()``."""
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()

    def close(self) -> None:
        """``pool.closeall()``."""
        if self._pool is not None and not self._pool.closed:
            self._pool.closeall()


class SyncFloor(SyncAdapter):
    """The sync floor (benchmarks.floors.SyncFloorPool)."""

    name = "floor"
    is_floor = True
    description = "minimal fair queue of psycopg Connections (no pool logic)"
    #: Hand out the least recently returned idle connection first.
    fifo: ClassVar[bool] = False

    def __init__(self) -> None:
        self._pool: SyncFloorPool | None = None

    def open(self, dsn: str, min_size: int, max_size: int) -> None:
        """Connect ``min_size`` connections; more connect lazily up to ``max_size``."""
        self._pool = SyncFloorPool(dsn, max_size, dict(PSYCOPG_KWARGS), fifo=self.fifo)
        self._pool.fill(min_size)

    def acquire(self) -> Any:
        """``floor.getconn()``."""
        assert self._pool is not None
        return self._pool.getconn()

    def release(self, conn: Any) -> None:
        """``floor.putconn(conn)``."""
        assert self._pool is not None
        self._pool.putconn(conn)

    def raw_calls(self) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
        """``floor.getconn``, ``floor.putconn``."""
        assert self._pool is not None
        return self._pool.getconn, self._pool.putconn

    def close(self) -> None:
        """Close the idle connections."""
        if self._pool is not None:
            self._pool.close()


class SyncFloorFifo(SyncFloor):
    """The sync floor in psycopg_pool's order: a reference row, not the ratios' base.

    With one thread and ten idle connections, psycopg_pool hands out each in
    turn while aiopgpool and the floor reuse the one just returned; on a VM that
    order alone can change SELECT 1's speed (README, Benchmarks). This row shows
    by how much in the same run.
    """

    name = "floor-fifo"
    is_floor = False
    is_reference = True
    description = "the sync floor, least recently returned connection first (psycopg_pool's order)"
    fifo = True


#: The sync pools, in table order (the floor last).
SYNC_ADAPTERS: tuple[type[SyncAdapter], ...] = (
    AiopgpoolSync,
    PsycopgPoolSync,
    Psycopg2Threaded,
    SyncFloorFifo,
    SyncFloor,
)
