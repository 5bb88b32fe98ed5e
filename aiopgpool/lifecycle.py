"""The connection lifecycle: connect, configure, check, clean on return, close.

The pool core never touches a connection directly: it asks a
:class:`Lifecycle` to. :class:`AsyncLifecycle` serves psycopg's
``AsyncConnection``; the sync facade plugs in its own lifecycle for sync
connections, so waiting, fairness, timeouts and stats stay the core's.
"""

from __future__ import annotations

import contextlib
import select
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from operator import attrgetter
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus

__all__ = [
    "CANCEL_TIMEOUT",
    "AsyncLifecycle",
    "Baseline",
    "Holder",
    "Lifecycle",
    "PsycopgLifecycle",
    "check_connection",
    "quiet_socket_test",
]

ConnT = TypeVar("ConnT")

IDLE = TransactionStatus.IDLE
INTRANS = TransactionStatus.INTRANS
INERROR = TransactionStatus.INERROR
ACTIVE = TransactionStatus.ACTIVE
OK = ConnStatus.OK

Baseline = tuple[Any, ...]
"""A connection's state as a return must find it: for psycopg 3,
(transaction status, autocommit, isolation_level, read_only, deferrable),
as configured for the pool (the status idle)."""

_POLLIN = select.POLLIN
# Seconds to wait for the server to take a cancel request for a query left
# running on a returned connection.
CANCEL_TIMEOUT = 5.0


class Holder(Generic[ConnT]):
    """One slot of the pool: holds a connection, or nothing (a free slot)."""

    __slots__ = (
        "baseline",
        "conn",
        "created_at",
        "expires_at",
        "fresh_until",
        "generation",
        "leak_timer",
        "quiet",
        "returned_at",
    )

    def __init__(self) -> None:
        self.conn: ConnT | None = None
        self.baseline: Baseline = ()
        self.created_at = 0.0
        self.expires_at = float("inf")
        self.returned_at = 0.0
        # Until when it may be handed out untested: the earlier of its expiry
        # and a short while after its last test (see core.SOCKET_TEST_INTERVAL).
        self.fresh_until = 0.0
        # The lifecycle's quiet_test() of the connection.
        self.quiet: Callable[[], bool] = _never_quiet
        self.generation = 0
        self.leak_timer: Any = None

    def clear(self) -> None:
        """Forget the connection: an empty slot."""
        self.conn = None
        self.quiet = _never_quiet


def quiet_socket_test(fileno: Callable[[], int], idle: Callable[[], bool]) -> Callable[[], bool]:
    """A connection's ``quiet_test()``: ``idle()`` and nothing arrived on its socket.

    A non-blocking readability test: an idle backend sends nothing unless it
    is going away (or sends a notice/notification), so a readable socket
    means the connection needs a real check before it is handed out. The
    poll object is registered once, so each test is a single system call.
    ``idle()`` (open, idle) is asked first: once the connection is closed,
    the socket's number may belong to another file. Never quiet when the
    socket cannot be polled (the connection is already closed).
    """
    poller = select.poll()
    try:
        poller.register(fileno(), _POLLIN)
    except Exception:
        return _never_quiet

    def is_quiet() -> bool:
        try:
            return idle() and not poller.poll(0)
        except Exception:
            return False

    return is_quiet


def _never_quiet() -> bool:
    return False


class Lifecycle(ABC, Generic[ConnT]):
    """What the core needs to do to connections of one kind."""

    has_check = False
    has_reset = False

    @abstractmethod
    async def connect(self) -> tuple[ConnT, Baseline]:
        """A new connection, configured, with the attributes to restore on return."""

    @abstractmethod
    def close(self, conn: ConnT) -> None:
        """Close without blocking; never raises."""

    @abstractmethod
    def quiet_test(self, conn: ConnT) -> Callable[[], bool]:
        """A test of ``conn``, made once when it connects: open, idle, nothing pending.

        The core calls it before handing out a connection idle for a while:
        it must be cheap, never block and never raise.
        """

    #: Reads a connection's state, to compare with its baseline. The core
    #: calls it on every return: it must be cheap, never block and never
    #: raise (a C-level callable such as an attrgetter, where possible).
    state_of: Callable[[ConnT], Baseline]

    def is_clean(self, conn: ConnT, baseline: Baseline) -> bool:
        """Idle, and attributes as configured: the state is the baseline."""
        return self.state_of(conn) == baseline

    @abstractmethod
    def is_bad_return(self, conn: ConnT) -> bool:
        """The borrower left it in a transaction, in error, mid-query or broken."""

    @abstractmethod
    async def clean(self, conn: ConnT, baseline: Baseline) -> bool:
        """Roll back and restore attributes; False when it must be discarded."""

    @abstractmethod
    async def probe(self, conn: ConnT) -> None:
        """A round trip to the server; raises if the connection is unusable."""

    async def check(self, conn: ConnT) -> None:
        """The user's ``check`` callable (only called when ``has_check``)."""

    async def reset(self, conn: ConnT) -> bool:
        """The user's ``reset`` callable; False when the connection must be discarded."""
        return True


async def check_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """A ready-made ``check=``: one round trip; raises if the connection is unusable."""
    autocommit = conn.autocommit
    if not autocommit:
        await conn.set_autocommit(True)
    try:
        await conn.execute("")
    finally:
        if not autocommit and not conn.closed:
            await conn.set_autocommit(False)


_ATTRIBUTES = ("autocommit", "isolation_level", "read_only", "deferrable")
_read_state_public = attrgetter("pgconn.transaction_status", *_ATTRIBUTES)


def baseline_of(conn: psycopg.BaseConnection[Any]) -> Baseline:
    """The clean state of a freshly configured psycopg 3 connection, to restore on return."""
    baseline: Baseline = _read_state_public(conn)
    return baseline


def state_reader(
    connection_class: type[psycopg.BaseConnection[Any]],
) -> Callable[[Any], Baseline]:
    """A function reading a psycopg 3 connection's state (see :data:`Baseline`).

    Every return compares it, and psycopg's properties cost a Python call
    each. When ``connection_class`` keeps psycopg's own properties and each of
    them only returns the attribute of the same name with a leading
    underscore (checked on their code, so a psycopg that changes them is
    read through the properties), it reads those attributes in one C call.
    """
    for name in _ATTRIBUTES:
        prop = getattr(connection_class, name, None)
        fget = getattr(prop, "fget", None)
        if (
            prop is not getattr(psycopg.BaseConnection, name)
            or fget is None
            or fget.__code__.co_names != ("_" + name,)
        ):
            return _read_state_public
    return attrgetter("pgconn.transaction_status", *("_" + name for name in _ATTRIBUTES))


def configure_left_transaction() -> psycopg.ProgrammingError:
    """The error for a ``configure`` callable that left a transaction open."""
    return psycopg.ProgrammingError(
        "configure left the connection in a transaction: commit or roll back inside configure"
    )


AsyncCallback = Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]


PgConnT = TypeVar("PgConnT", bound="psycopg.BaseConnection[Any]")


class PsycopgLifecycle(Lifecycle[PgConnT]):
    """The inspection shared by psycopg 3 connections, sync or async: none of it blocks."""

    def close(self, conn: PgConnT) -> None:
        # close() has no suspension point for AsyncConnection either:
        # pgconn.finish() is a non-blocking write of Terminate. Calling it
        # directly keeps close synchronous, so a second cancellation cannot
        # interrupt it.
        with contextlib.suppress(Exception):
            conn.pgconn.finish()

    def quiet_test(self, conn: PgConnT) -> Callable[[], bool]:
        pgconn = conn.pgconn
        return quiet_socket_test(
            lambda: pgconn.socket,
            lambda: pgconn.status == OK and pgconn.transaction_status == IDLE,
        )

    state_of: Callable[[Any], Baseline] = _read_state_public

    def is_bad_return(self, conn: PgConnT) -> bool:
        return conn.pgconn.status != OK or conn.pgconn.transaction_status != IDLE


class AsyncLifecycle(PsycopgLifecycle[psycopg.AsyncConnection[Any]]):
    """Lifecycle of psycopg ``AsyncConnection`` objects."""

    def __init__(
        self,
        conninfo: str,
        kwargs: dict[str, Any],
        connection_class: type[psycopg.AsyncConnection[Any]],
        configure: AsyncCallback | None,
        reset: AsyncCallback | None,
        check: AsyncCallback | None,
    ) -> None:
        self._conninfo = conninfo
        self._kwargs = kwargs
        self._connection_class = connection_class
        self.state_of = state_reader(connection_class)
        self._configure = configure
        self._reset = reset
        self._check = check
        self.has_check = check is not None
        self.has_reset = reset is not None

    async def connect(self) -> tuple[psycopg.AsyncConnection[Any], Baseline]:
        conn = await self._connection_class.connect(self._conninfo, **self._kwargs)
        try:
            if self._configure is not None:
                await self._configure(conn)
                if conn.pgconn.transaction_status != IDLE:
                    raise configure_left_transaction()
        except BaseException:
            await conn.close()
            raise
        return conn, baseline_of(conn)

    async def clean(self, conn: psycopg.AsyncConnection[Any], baseline: Baseline) -> bool:
        pgconn = conn.pgconn
        if pgconn.status != OK:
            return False
        status = pgconn.transaction_status
        if status == ACTIVE:
            # Returned mid-query (its task was cancelled twice, or it was
            # handed back with a query running): stop the query on the server,
            # then discard the connection rather than drain it.
            await conn.cancel_safe(timeout=CANCEL_TIMEOUT)
            return False
        if status in (INTRANS, INERROR):
            await conn.rollback()
        _, autocommit, isolation_level, read_only, deferrable = baseline
        if conn.autocommit != autocommit:
            await conn.set_autocommit(autocommit)
        if conn.isolation_level != isolation_level:
            await conn.set_isolation_level(isolation_level)
        if conn.read_only != read_only:
            await conn.set_read_only(read_only)
        if conn.deferrable != deferrable:
            await conn.set_deferrable(deferrable)
        return pgconn.transaction_status == IDLE

    async def probe(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await check_connection(conn)

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self._check is not None:
            await self._check(conn)

    async def reset(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        if self._reset is not None:
            await self._reset(conn)
        return conn.pgconn.status == OK and conn.pgconn.transaction_status == IDLE
