"""The connection lifecycle: connect, configure, check, clean on return, close.

The pool core never touches a connection directly: it asks a
:class:`Lifecycle` to. :class:`AsyncLifecycle` serves psycopg's
``AsyncConnection``; the sync facade plugs in its own lifecycle for sync
connections, so waiting, fairness, timeouts and stats stay the core's.
"""

from __future__ import annotations

import contextlib
import logging
import select
import traceback
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus

from .conninfo import ConnectTarget
from .deadlines import move_on_after
from .pooler import through_pooler_async
from .slot import Baseline, never_quiet
from .teardown import (
    CANCEL_TIMEOUT,
    cancel_in_background,
    close_async,
    prepared_cancel,
    send_in_background,
)

__all__ = [
    "CANCEL_TIMEOUT",
    "AsyncLifecycle",
    "Lifecycle",
    "PoolLink",
    "PsycopgLifecycle",
    "Restore",
    "check_connection",
    "discard_session",
    "forget_prepared",
    "quiet_socket_test",
    "what_to_restore",
]

ConnT = TypeVar("ConnT")

logger = logging.getLogger("aiopgpool")

IDLE = TransactionStatus.IDLE
INTRANS = TransactionStatus.INTRANS
INERROR = TransactionStatus.INERROR
ACTIVE = TransactionStatus.ACTIVE
OK = ConnStatus.OK

_POLLIN = select.POLLIN
# Asked by a role-tracking pool when a connection reports default_transaction_read_only=on
# (the server's setting, or only its session's?), and after a failed transaction, where the
# server's ParameterStatus may not say it (PostgreSQL < 14, a transaction-mode pooler).
# reset_val is what RESET would restore (the configuration file's value, the role's, the
# database's, the startup options'): a session's SET does not change it, a reload does.
ROLE_QUERY = (
    "SELECT pg_is_in_recovery(), reset_val FROM pg_settings"
    " WHERE name = 'default_transaction_read_only'"
)


def role_words(row: Any, read_only_counts: bool = True) -> str | None:
    """Why a server is no longer a writable primary, from :data:`ROLE_QUERY`'s row.

    ``read_only_counts``: a server whose sessions are read-only by default is
    no longer one either (``target_session_attrs=read-write``; not ``primary``).
    """
    if row and row[0]:
        return "pg_is_in_recovery()"
    if read_only_counts and row and row[1] == "on":
        return "default_transaction_read_only=on"
    return None


# ParameterStatus names a server reports when it stops being a writable primary.
_IN_HOT_STANDBY = b"in_hot_standby"
_READ_ONLY = b"default_transaction_read_only"

#: The attributes a return restores, in :data:`Baseline` order after the status.
ATTRIBUTES = ("autocommit", "isolation_level", "read_only", "deferrable")


@dataclass(frozen=True, slots=True)
class Restore:
    """What a returned connection needs before the next borrower may have it."""

    discard: bool
    """Broken, or a query still runs: it cannot be kept."""
    cancel: bool
    """A query still runs: cancel it on the server (then discard)."""
    rollback: bool
    """A transaction is open or failed: roll it back."""
    attributes: tuple[tuple[str, Any], ...]
    """(name, value) of each attribute to set back, names as in :data:`ATTRIBUTES`."""


def what_to_restore(broken: bool, state: Baseline, baseline: Baseline) -> Restore:
    """Decide what a returned connection needs, from its state and its baseline.

    One pure function for every driver: ``state`` and ``baseline`` are
    (libpq transaction status, autocommit, isolation_level, read_only,
    deferrable), the status as libpq numbers it (psycopg 3 and psycopg2 both
    use them); ``broken``: the connection is closed or failed.
    """
    status = state[0] if state else None
    if broken or not state:
        return Restore(True, False, False, ())
    if status == ACTIVE:
        return Restore(True, True, False, ())
    changed = tuple(
        (name, want)
        for name, have, want in zip(ATTRIBUTES, state[1:], baseline[1:], strict=False)
        if have != want
    )
    return Restore(False, False, status in (INTRANS, INERROR), changed)


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
        return never_quiet

    def is_quiet() -> bool:
        try:
            return idle() and not poller.poll(0)
        except Exception:
            return False

    return is_quiet


_STATUS_WORDS = {
    INTRANS: "in a transaction (rolled back)",
    INERROR: "in a failed transaction (rolled back)",
    ACTIVE: "with a query still running (cancelled, then discarded)",
}


def describe_status(status: object) -> str:
    """Words for a libpq transaction status at return."""
    for code, words in _STATUS_WORDS.items():
        if status == code:
            return words
    return "broken (discarded)"


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
    #: raise (psycopg 3: a small Python function reading attributes).
    state_of: Callable[[ConnT], Baseline]

    def is_clean(self, conn: ConnT, baseline: Baseline) -> bool:
        """Idle, and attributes as configured: the state is the baseline."""
        return self.state_of(conn) == baseline

    @abstractmethod
    def is_bad_return(self, conn: ConnT) -> bool:
        """The borrower left it in a transaction, in error, mid-query or broken."""

    #: Follow role changes: the pool's conninfo asks for a writable primary.
    tracks_role = False

    def server_of(self, conn: ConnT) -> Any:
        """The server ``conn`` reached, as a hashable (None: not known)."""
        return None

    def role_lost(self, conn: ConnT) -> str | None:
        """Why ``conn``'s server is no longer a writable primary, from what it reported, or None."""
        return None

    def turned_read_only(self, conn: ConnT, baseline: Baseline) -> bool:
        """``conn`` reports read-only sessions, which it did not when it connected.

        Its server's setting, or only its own session's (a borrower's ``SET``):
        :meth:`ask_role` tells which. Never true for a pool that ignores
        read-only (``target_session_attrs=primary``).
        """
        return False

    def describe_state(self, conn: ConnT) -> str:
        """Words for a bad return's state, for the WARNING it logs (never the conninfo)."""
        state = self.state_of(conn)
        return describe_status(state[0] if state else None)

    @abstractmethod
    async def clean(self, conn: ConnT, baseline: Baseline) -> bool:
        """Roll back and restore attributes; False when it must be discarded."""

    def in_failed_transaction(self, conn: ConnT) -> bool:
        """True when the borrower left a failed transaction (role tracking asks then)."""
        return False

    async def ask_role(self, conn: ConnT) -> str | None:
        """Ask the server why it is no longer a writable primary (None: it still is).

        A session's own settings do not count: only the server's.
        """
        return None

    @abstractmethod
    async def probe(self, conn: ConnT) -> None:
        """A round trip to the server; raises if the connection is unusable."""

    async def check(self, conn: ConnT) -> None:
        """The user's ``check`` callable (only called when ``has_check``)."""

    async def reset(self, conn: ConnT) -> bool:
        """The user's ``reset`` callable; False when the connection must be discarded."""
        return True


async def discard_session(conn: psycopg.AsyncConnection[Any]) -> None:
    """A ready-made ``reset=``: leave no server session state to the next borrower.

    Runs ``DISCARD ALL`` (outside a transaction): settings made with ``SET``
    (those of ``configure`` too), ``SET ROLE``, ``LISTEN``, prepared
    statements, temporary tables, advisory locks and cursors all go. psycopg
    sees the command and forgets its own prepared statements, so its cache
    stays consistent. Costs one round trip per return.
    """
    autocommit = conn.autocommit
    if not autocommit:
        await conn.set_autocommit(True)
    try:
        await conn.execute("DISCARD ALL", prepare=False)
        forget_prepared(conn)
    finally:
        if not autocommit and not conn.closed:
            await conn.set_autocommit(False)


def forget_prepared(conn: psycopg.BaseConnection[Any]) -> None:
    """Make psycopg forget the statements it prepared on ``conn`` (DISCARD ALL dropped them).

    psycopg notices a ``DISCARD ALL`` only the first time a connection runs
    one (it checks a statement's result only when it first sees its text), so
    after the second one its cache would name statements the server no longer
    has ("prepared statement "_pg3_0" does not exist"). There is no public API
    for this: the prepared-statement manager is cleared, and told that the
    server has nothing left to deallocate.
    """
    prepared = getattr(conn, "_prepared", None)
    if prepared is None:
        return
    with contextlib.suppress(Exception):
        prepared.clear()
        prepared._to_flush.clear()


class PoolLink:
    """What a pooled psycopg 3 connection's ``_pool`` attribute points to.

    psycopg's ``conn.close()`` calls ``_pool.putconn(conn)`` instead of
    closing when ``_pool.close_returns`` is true, and ``with conn:`` leaves a
    connection with a ``_pool`` open. The pool is referenced weakly: a
    connection outliving its pool closes for real.
    """

    __slots__ = ("_pool", "close_returns")

    def __init__(self, pool: Any, close_returns: bool) -> None:
        self._pool = weakref.ref(pool)
        self.close_returns = close_returns

    def putconn(self, conn: Any) -> Any:
        """Give ``conn`` back to its pool (what the pool's putconn returns)."""
        pool = self._pool()
        if pool is None:
            conn.pgconn.finish()
            return _nothing() if isinstance(conn, psycopg.AsyncConnection) else None
        return pool.putconn(conn)


async def _nothing() -> None:
    return None


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


_read_state_public = attrgetter("pgconn.transaction_status", *ATTRIBUTES)


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
    for name in ATTRIBUTES:
        prop = getattr(connection_class, name, None)
        fget = getattr(prop, "fget", None)
        if (
            prop is not getattr(psycopg.BaseConnection, name)
            or fget is None
            or fget.__code__.co_names != ("_" + name,)
        ):
            return _read_state_public
    return _read_state_private


def _read_state_private(conn: Any) -> Baseline:
    # A Python function: its attribute loads are specialized by the
    # interpreter, three times cheaper than attrgetter's generic lookups.
    return (
        conn.pgconn.transaction_status,
        conn._autocommit,
        conn._isolation_level,
        conn._read_only,
        conn._deferrable,
    )


def configure_left_transaction() -> psycopg.ProgrammingError:
    """The error for a ``configure`` callable that left a transaction open."""
    return psycopg.ProgrammingError(
        "configure left the connection in a transaction: commit or roll back inside configure"
    )


AsyncCallback = Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]

AsyncConnT = TypeVar("AsyncConnT", bound=psycopg.AsyncConnection[Any])


async def connect_async(
    connection_class: type[AsyncConnT], conninfo: str, kwargs: dict[str, Any]
) -> AsyncConnT:
    """``await connection_class.connect(conninfo, **kwargs)``, leaving nothing open if interrupted.

    Interrupted mid-handshake (a deadline, a cancelled borrower), psycopg
    drops its half-open libpq connection without closing it: a frame in the
    exception's traceback still holds it, and whatever keeps the exception (a
    reference cycle, say, in a multi-host attempt) would keep its backend
    alive, outside any pool's books. Cleared, the frames let it go now, and
    libpq closes it.
    """
    try:
        return await connection_class.connect(conninfo, **kwargs)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        raise


PgConnT = TypeVar("PgConnT", bound="psycopg.BaseConnection[Any]")


class PsycopgLifecycle(Lifecycle[PgConnT]):
    """The inspection shared by psycopg 3 connections, sync or async: none of it blocks."""

    #: Set on every connection as its ``_pool`` (see :class:`PoolLink`).
    link: PoolLink | None = None

    #: A connection of this pool reached its server through a pooler (see :mod:`.pooler`).
    pooler_seen = False

    def adapt_to_pooler(self, conn: PgConnT, kwargs: dict[str, Any]) -> None:
        """``conn`` reached its server through a pooler (PgBouncer).

        Behind a pooler in transaction mode, statements psycopg prepares on
        one server connection are missing on the next, so automatic preparing
        is turned off (unless ``kwargs`` set ``prepare_threshold``: for
        PgBouncer >= 1.21 with ``max_prepared_statements``).
        """
        if "prepare_threshold" not in kwargs:
            conn.prepare_threshold = None
        if not self.pooler_seen:
            self.pooler_seen = True
            logger.info(
                "connected through a connection pooler (the backend pid differs from the "
                "startup key): psycopg's automatic prepared statements are off%s",
                "" if "prepare_threshold" not in kwargs else " (unless prepare_threshold is set)",
            )

    #: Read-only sessions count as a role change (``read-write``, not ``primary``).
    read_only_counts = False

    def follow_role(
        self, state_of: Callable[[Any], Baseline], wants_primary: bool, read_write: bool = False
    ) -> None:
        """Set ``state_of`` (and role tracking, when the conninfo wants a writable primary).

        A tracking pool's state includes the ParameterStatus values that say a
        server stopped being a writable primary (``in_hot_standby``, and for
        ``read_write``, ``default_transaction_read_only``), so that a return
        seeing them changed leaves the hot path: no cost to any other pool.
        Being the baseline's too, a value a connection had from the start (its
        startup options) is no change.
        """
        self.tracks_role = wants_primary
        self.read_only_counts = wants_primary and read_write
        if not wants_primary:
            self.state_of = state_of
            return

        def tracked_state(conn: Any) -> Baseline:
            status = conn.pgconn.parameter_status
            return (*state_of(conn), status(_IN_HOT_STANDBY), status(_READ_ONLY))

        def primary_state(conn: Any) -> Baseline:
            return (*state_of(conn), conn.pgconn.parameter_status(_IN_HOT_STANDBY))

        self.state_of = tracked_state if read_write else primary_state

    def server_of(self, conn: PgConnT) -> Any:
        pgconn = conn.pgconn
        return (pgconn.host, pgconn.port)

    def in_failed_transaction(self, conn: PgConnT) -> bool:
        """True when the borrower left a failed transaction (perhaps a refused write, 25006)."""
        return conn.pgconn.transaction_status == INERROR

    def role_lost(self, conn: PgConnT) -> str | None:
        # default_transaction_read_only is the session's value, set by the server's
        # configuration or by the session itself: turned_read_only() and ask_role() tell.
        if conn.pgconn.parameter_status(_IN_HOT_STANDBY) == b"on":
            return "in_hot_standby=on"
        return None

    def turned_read_only(self, conn: PgConnT, baseline: Baseline) -> bool:
        return (
            self.read_only_counts
            and conn.pgconn.parameter_status(_READ_ONLY) == b"on"
            and baseline[-1:] != (b"on",)
        )

    def linked(self, conn: PgConnT) -> PgConnT:
        """``conn``, made to know its pool (``close_returns``, ``with conn``)."""
        if self.link is not None:
            setattr(conn, "_pool", self.link)  # noqa: B010 (psycopg types it as its own pool)
        return conn

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
        target: ConnectTarget,
        connection_class: type[psycopg.AsyncConnection[Any]],
        configure: AsyncCallback | None,
        reset: AsyncCallback | None,
        check: AsyncCallback | None,
    ) -> None:
        self._target = target
        self._connection_class = connection_class
        self.follow_role(
            state_reader(connection_class), target.wants_primary, target.wants_read_write
        )
        self._configure = configure
        self._reset = reset
        self._check = check
        self.has_check = check is not None
        self.has_reset = reset is not None

    def close(self, conn: psycopg.AsyncConnection[Any]) -> None:
        close_async(conn)  # not under a call in progress: see teardown

    async def connect(self) -> tuple[psycopg.AsyncConnection[Any], Baseline]:
        conninfo, kwargs = await self._target.resolve_async()
        conn = await connect_async(self._connection_class, conninfo, kwargs)
        # Interrupted mid-query here (the attempt's time limit, a cancelled
        # request), psycopg closes the connection and the query runs on in its
        # backend, maybe for good (a lock wait): the backend is told to stop.
        cancel = prepared_cancel(conn) if self._configure is not None else None
        try:
            if await through_pooler_async(conn):
                self.adapt_to_pooler(conn, kwargs)
            if self._configure is not None:
                await self._configure(conn)
                if conn.pgconn.transaction_status != IDLE:
                    raise configure_left_transaction()
        except BaseException as exc:
            if cancel is not None and not isinstance(exc, Exception):
                send_in_background(cancel)
            await conn.close()
            raise
        return self.linked(conn), self.state_of(conn)

    async def clean(self, conn: psycopg.AsyncConnection[Any], baseline: Baseline) -> bool:
        pgconn = conn.pgconn
        todo = what_to_restore(pgconn.status != OK, self.state_of(conn), baseline)
        if todo.cancel and cancel_in_background(conn):
            # Returned mid-query (its task was cancelled twice, or it was
            # handed back with a query running): the query is cancelled, and the
            # connection discarded rather than drained. Let the task running the
            # query take its QueryCanceled and let go of the connection (psycopg
            # holds conn.lock meanwhile) before it is closed: closed under it,
            # that task would wait on a dead socket forever. (Where no cancel is
            # sent, the discard's close shuts the socket down under the query.)
            with move_on_after(CANCEL_TIMEOUT):
                async with conn.lock:
                    pass
        if todo.discard:
            return False
        if todo.rollback:
            await conn.rollback()
        for name, value in todo.attributes:
            await getattr(conn, "set_" + name)(value)
        return pgconn.transaction_status == IDLE

    async def ask_role(self, conn: psycopg.AsyncConnection[Any]) -> str | None:
        """Ask the server whether it is still a writable primary (one round trip)."""
        autocommit = conn.autocommit
        await conn.set_autocommit(True)
        try:
            cur = await conn.execute(ROLE_QUERY, prepare=False)
            return role_words(await cur.fetchone(), self.read_only_counts)
        finally:
            await conn.set_autocommit(autocommit)

    async def probe(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await check_connection(conn)

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self._check is not None:
            await self._check(conn)

    async def reset(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        if self._reset is not None:
            await self._reset(conn)
        return conn.pgconn.status == OK and conn.pgconn.transaction_status == IDLE
