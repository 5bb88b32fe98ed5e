"""psycopg2.pool drop-ins serving real psycopg2 connections (extra ``aiopgpool[psycopg2]``).

For code that cannot leave psycopg2: the same ``SimpleConnectionPool``,
``ThreadedConnectionPool`` and ``PersistentConnectionPool`` as the top-level
drop-ins, on the same pool core, with health checks and rollbacks made
through psycopg2's own API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

try:
    import psycopg2
    import psycopg2.extensions as ext
    import psycopg2.pool
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "aiopgpool.psycopg2 needs psycopg2: pip install 'aiopgpool[psycopg2]'"
    ) from exc

import contextlib

from . import errors
from .dropins import DropInBase, PersistentMixin
from .lifecycle import Baseline, quiet_socket_test
from .options import describe_target, make_name, prepare_connect_kwargs
from .sync_lifecycle import BlockingLifecycle, SyncCallback
from .sync_pool import SyncPoolFacade

__all__ = [
    "AbstractConnectionPool",
    "PersistentConnectionPool",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "Psycopg2Lifecycle",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
]

Connection = Any  # psycopg2.extensions.connection (psycopg2 ships no type hints)

_IDLE = ext.TRANSACTION_STATUS_IDLE
_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_INERROR = ext.TRANSACTION_STATUS_INERROR
_ACTIVE = ext.TRANSACTION_STATUS_ACTIVE


class Psycopg2Lifecycle(BlockingLifecycle[Connection]):
    """Lifecycle of psycopg2 connections, through psycopg2's own API."""

    def __init__(
        self,
        dsn: str,
        kwargs: dict[str, Any],
        configure: SyncCallback | None = None,
        reset: SyncCallback | None = None,
        check: SyncCallback | None = None,
    ) -> None:
        super().__init__(configure, reset, check)
        self._dsn = dsn
        self._kwargs = kwargs

    def connect_blocking(self) -> tuple[Connection, Baseline]:
        conn = psycopg2.connect(self._dsn, **self._kwargs)
        try:
            if self._configure is not None:
                self._configure(conn)
                if conn.info.transaction_status != _IDLE:
                    raise psycopg2.ProgrammingError(
                        "configure left the connection in a transaction: "
                        "commit or roll back inside configure"
                    )
        except BaseException:
            conn.close()
            raise
        return conn, self.state_of(conn)

    @staticmethod
    def state_of(conn: Connection) -> Baseline:
        if conn.closed:
            return ()  # equal to no baseline
        return (
            conn.info.transaction_status,
            conn.autocommit,
            conn.isolation_level,
            conn.readonly,
            conn.deferrable,
        )

    def close(self, conn: Connection) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def quiet_test(self, conn: Connection) -> Callable[[], bool]:
        return quiet_socket_test(
            conn.fileno, lambda: not conn.closed and conn.info.transaction_status == _IDLE
        )

    def is_bad_return(self, conn: Connection) -> bool:
        return bool(conn.closed) or conn.info.transaction_status != _IDLE

    def clean_blocking(self, conn: Connection, baseline: Baseline) -> bool:
        if conn.closed:
            return False
        if conn.info.transaction_status == _ACTIVE:
            conn.cancel()  # a query still runs (another thread uses it): stop it, then discard
            return False
        if conn.info.transaction_status in (_INTRANS, _INERROR):
            conn.rollback()
        _, autocommit, isolation_level, readonly, deferrable = baseline
        if conn.autocommit != autocommit:
            conn.autocommit = autocommit
        if conn.isolation_level != isolation_level:
            conn.isolation_level = isolation_level
        if conn.readonly != readonly:
            conn.readonly = readonly
        if conn.deferrable != deferrable:
            conn.deferrable = deferrable
        return bool(conn.info.transaction_status == _IDLE)

    def probe_blocking(self, conn: Connection) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        if not conn.autocommit:
            conn.rollback()

    def in_transaction(self, conn: Connection) -> bool:
        return bool(conn.info.transaction_status == _INTRANS)

    def transaction_idle(self, conn: Connection) -> bool:
        return not conn.closed and conn.info.transaction_status == _IDLE


# Both drivers' Error classes define ``diag``; psycopg's (the first base) serves.
class PoolError(errors.PoolError, psycopg2.pool.PoolError):  # type: ignore[misc]
    """aiopgpool's :class:`~aiopgpool.PoolError` that is also ``psycopg2.pool.PoolError``.

    These drop-ins raise it (and the two below) so that code written for
    psycopg2.pool, which catches ``psycopg2.pool.PoolError``, keeps working.
    """


class PoolTimeout(errors.PoolTimeout, PoolError):  # type: ignore[misc]
    """:class:`~aiopgpool.PoolTimeout` ("connection pool exhausted"), a psycopg2 PoolError."""


class PoolClosed(errors.PoolClosed, PoolError):  # type: ignore[misc]
    """:class:`~aiopgpool.PoolClosed`, a psycopg2 PoolError."""


class AbstractConnectionPool(DropInBase[Connection]):
    """psycopg2.pool.AbstractConnectionPool's contract, serving psycopg2 connections.

    Its pool errors are also ``psycopg2.pool.PoolError`` (see :class:`PoolError`).
    """

    _error_classes: ClassVar[Mapping[type[errors.PoolError], type[errors.PoolError]]] = {
        errors.PoolError: PoolError,
        errors.PoolTimeout: PoolTimeout,
        errors.PoolClosed: PoolClosed,
    }

    def _make_facade(
        self,
        dsn: str,
        params: dict[str, Any],
        *,
        min_size: int,
        max_size: int,
        max_idle: float,
        null: bool,
        name: str | None,
    ) -> SyncPoolFacade[Connection]:
        name = make_name(name)
        return SyncPoolFacade(
            Psycopg2Lifecycle(dsn, prepare_connect_kwargs(dsn, params, name)),
            name=name,
            target=describe_target(dsn, params),
            min_size=min_size,
            max_size=max_size,
            timeout=0,
            max_waiting=0,
            max_idle=max_idle,
            max_lifetime=3600.0,
            reconnect_timeout=300.0,
            reconnect_failed=None,
            leak_timeout=None,
            keep_idle=not null,
        )


class SimpleConnectionPool(AbstractConnectionPool):
    """psycopg2.pool.SimpleConnectionPool on aiopgpool (thread-safe here too)."""


class ThreadedConnectionPool(AbstractConnectionPool):
    """psycopg2.pool.ThreadedConnectionPool on aiopgpool."""


class PersistentConnectionPool(PersistentMixin[Connection], AbstractConnectionPool):
    """psycopg2.pool.PersistentConnectionPool on aiopgpool."""
