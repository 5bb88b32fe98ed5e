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
from .conninfo import ConnectTarget
from .dropins import DropInBase, PersistentMixin
from .lifecycle import quiet_socket_test, what_to_restore
from .slot import Baseline
from .sync_lifecycle import BlockingLifecycle, SyncCallback
from .teardown import shut_down

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
# psycopg2's names of the attributes a return restores, where they differ from psycopg's.
_PSYCOPG2_NAMES = {"read_only": "readonly"}


class Psycopg2Lifecycle(BlockingLifecycle[Connection]):
    """Lifecycle of psycopg2 connections, through psycopg2's own API."""

    def __init__(
        self,
        target: ConnectTarget,
        configure: SyncCallback | None = None,
        reset: SyncCallback | None = None,
        check: SyncCallback | None = None,
    ) -> None:
        super().__init__(configure, reset, check)
        self._target = target

    def connect_blocking(self) -> tuple[Connection, Baseline]:
        dsn, kwargs = self._target.resolve()
        conn = psycopg2.connect(dsn, **kwargs)
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
        # psycopg2's close() takes the connection's mutex: with a query running
        # in another thread it would hold the pool's loop thread until that
        # query ended. Shut down first, the query fails at once and lets go.
        # Not only when ACTIVE: psycopg2 sends BEGIN and then the query under
        # one hold of the mutex, and in between the status is INTRANS.
        with contextlib.suppress(Exception):
            if conn.info.transaction_status != _IDLE:
                shut_down(conn.fileno())
        with contextlib.suppress(Exception):
            conn.close()

    def quiet_test(self, conn: Connection) -> Callable[[], bool]:
        return quiet_socket_test(
            conn.fileno, lambda: not conn.closed and conn.info.transaction_status == _IDLE
        )

    def is_bad_return(self, conn: Connection) -> bool:
        return bool(conn.closed) or conn.info.transaction_status != _IDLE

    def clean_blocking(self, conn: Connection, baseline: Baseline) -> bool:
        todo = what_to_restore(bool(conn.closed), self.state_of(conn), baseline)
        if todo.cancel:
            conn.cancel()  # a query still runs (another thread uses it): stop it, then discard
        if todo.discard:
            return False
        if todo.rollback:
            conn.rollback()
        for name, value in todo.attributes:
            setattr(conn, _PSYCOPG2_NAMES.get(name, name), value)
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

    def _make_lifecycle(self, target: ConnectTarget) -> BlockingLifecycle[Connection]:
        return Psycopg2Lifecycle(target)


class SimpleConnectionPool(AbstractConnectionPool):
    """psycopg2.pool.SimpleConnectionPool on aiopgpool (thread-safe here too)."""


class ThreadedConnectionPool(AbstractConnectionPool):
    """psycopg2.pool.ThreadedConnectionPool on aiopgpool."""


class PersistentConnectionPool(PersistentMixin[Connection], AbstractConnectionPool):
    """psycopg2.pool.PersistentConnectionPool on aiopgpool."""
