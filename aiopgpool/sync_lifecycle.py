"""Lifecycles of blocking connections (psycopg 3 sync, psycopg2) for the sync facade.

The core awaits a lifecycle's coroutines on its event loop; a blocking
connection's work (connect, round trips) must not run there, so these
coroutines hand it to a worker thread (``anyio.to_thread``). The caller-side
work of the sync facade (its rollback, its reset) calls the ``*_blocking``
methods directly, in the caller's own thread.

Because the facade resets connections in the caller's thread, these
lifecycles tell the core ``has_reset = False``.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio.to_thread
import psycopg

from .conninfo import ConnectTarget
from .lifecycle import (
    CANCEL_TIMEOUT,
    IDLE,
    INTRANS,
    OK,
    ROLE_QUERY,
    Lifecycle,
    PsycopgLifecycle,
    configure_left_transaction,
    forget_prepared,
    role_words,
    state_reader,
    what_to_restore,
)
from .pooler import through_pooler_blocking
from .slot import Baseline
from .teardown import cancel_in_background, close_blocking

__all__ = [
    "BlockingLifecycle",
    "SyncLifecycle",
    "check_connection_blocking",
    "discard_session_blocking",
]

C = TypeVar("C")
R = TypeVar("R")
SyncCallback = Callable[[Any], None]


class BlockingLifecycle(Lifecycle[C], Generic[C]):
    """A lifecycle whose connections block: async methods run in worker threads."""

    def __init__(
        self,
        configure: SyncCallback | None,
        reset: SyncCallback | None,
        check: SyncCallback | None,
    ) -> None:
        self._configure = configure
        self._reset = reset
        self._check = check
        self.has_check = check is not None
        # Resetting happens in the caller's thread (SyncPoolFacade.putconn).
        self.has_reset = False
        self.resets = reset is not None

    # -- blocking work, callable from any thread ----------------------------------

    @abstractmethod
    def connect_blocking(self) -> tuple[C, Baseline]:
        """Connect and configure; the attributes to restore on return."""

    @abstractmethod
    def clean_blocking(self, conn: C, baseline: Baseline) -> bool:
        """Roll back and restore attributes; False when it must be discarded."""

    def ask_role_blocking(self, conn: C) -> str | None:
        """Ask the server why it is no longer a writable primary (None: it still is)."""
        return None

    @abstractmethod
    def probe_blocking(self, conn: C) -> None:
        """One round trip; raises if the connection is unusable."""

    @abstractmethod
    def in_transaction(self, conn: C) -> bool:
        """True when a transaction is open and could be committed."""

    @abstractmethod
    def transaction_idle(self, conn: C) -> bool:
        """True when the connection is open and idle, outside any transaction."""

    def reset_blocking(self, conn: C) -> bool:
        """The user's ``reset``; False when it must be discarded."""
        if self._reset is not None:
            self._reset(conn)
        return self.transaction_idle(conn)

    # -- the core's coroutines -----------------------------------------------------

    async def connect(self) -> tuple[C, Baseline]:
        return await _run_or_dispose(self.connect_blocking, lambda result: self.close(result[0]))

    async def clean(self, conn: C, baseline: Baseline) -> bool:
        return await anyio.to_thread.run_sync(self.clean_blocking, conn, baseline)

    async def ask_role(self, conn: C) -> str | None:
        return await anyio.to_thread.run_sync(self.ask_role_blocking, conn)

    async def probe(self, conn: C) -> None:
        await anyio.to_thread.run_sync(self.probe_blocking, conn)

    async def check(self, conn: C) -> None:
        if self._check is not None:
            await anyio.to_thread.run_sync(self._check, conn)


async def _run_or_dispose(func: Callable[[], R], dispose: Callable[[R], None]) -> R:
    """Run ``func`` in a worker thread; if the caller gives up, dispose of its late result.

    A connect can block for a long time (a black-holed network): the caller's
    deadline must not wait for it, and the connection it makes after the
    caller left must not leak.
    """
    lock = threading.Lock()
    state: dict[str, Any] = {"gone": False}

    def run() -> R:
        result = func()
        with lock:
            if state["gone"]:
                dispose(result)
            else:
                state["result"] = result
        return result

    try:
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except BaseException:
        with lock:
            state["gone"] = True
            if "result" in state:
                dispose(state["result"])
        raise


def check_connection_blocking(conn: psycopg.Connection[Any]) -> None:
    """A ready-made sync ``check=``: one round trip; raises if the connection is unusable."""
    autocommit = conn.autocommit
    if not autocommit:
        conn.autocommit = True
    try:
        conn.execute("")
    finally:
        if not autocommit and not conn.closed:
            conn.autocommit = False


def discard_session_blocking(conn: psycopg.Connection[Any]) -> None:
    """The sync twin of :func:`aiopgpool.discard_session`: ``DISCARD ALL`` as ``reset=``."""
    autocommit = conn.autocommit
    if not autocommit:
        conn.autocommit = True
    try:
        conn.execute("DISCARD ALL", prepare=False)
        forget_prepared(conn)
    finally:
        if not autocommit and not conn.closed:
            conn.autocommit = False


class SyncLifecycle(
    PsycopgLifecycle[psycopg.Connection[Any]], BlockingLifecycle[psycopg.Connection[Any]]
):
    """Lifecycle of psycopg 3 sync ``Connection`` objects."""

    def __init__(
        self,
        target: ConnectTarget,
        connection_class: type[psycopg.Connection[Any]],
        configure: SyncCallback | None,
        reset: SyncCallback | None,
        check: SyncCallback | None,
    ) -> None:
        BlockingLifecycle.__init__(self, configure, reset, check)
        self._target = target
        self._connection_class = connection_class
        self.follow_role(
            state_reader(connection_class), target.wants_primary, target.wants_read_write
        )

    def close(self, conn: psycopg.Connection[Any]) -> None:
        close_blocking(conn)  # not under a call in progress: see teardown

    def connect_blocking(self) -> tuple[psycopg.Connection[Any], Baseline]:
        conninfo, kwargs = self._target.resolve()
        conn = self._connection_class.connect(conninfo, **kwargs)
        try:
            if through_pooler_blocking(conn):
                self.adapt_to_pooler(conn, kwargs)
            if self._configure is not None:
                self._configure(conn)
                if conn.pgconn.transaction_status != IDLE:
                    raise configure_left_transaction()
        except BaseException:
            conn.close()
            raise
        return self.linked(conn), self.state_of(conn)

    def clean_blocking(self, conn: psycopg.Connection[Any], baseline: Baseline) -> bool:
        pgconn = conn.pgconn
        todo = what_to_restore(pgconn.status != OK, self.state_of(conn), baseline)
        # A query still runs (another thread uses it): cancel it, then let that
        # thread take its QueryCanceled and let go of the connection (psycopg
        # holds conn.lock while it runs a query) before the caller discards it:
        # closed under it, the thread would wait on a dead socket forever, and
        # libpq must not serve two threads on one connection. Where no cancel is
        # sent, the discard's close shuts the socket down under it (teardown).
        if todo.cancel and cancel_in_background(conn) and conn.lock.acquire(timeout=CANCEL_TIMEOUT):
            conn.lock.release()
        if todo.discard:
            return False
        if todo.rollback:
            conn.rollback()
        for name, value in todo.attributes:
            setattr(conn, name, value)
        return pgconn.transaction_status == IDLE

    def ask_role_blocking(self, conn: psycopg.Connection[Any]) -> str | None:
        """Ask the server whether it is still a writable primary (one round trip)."""
        autocommit = conn.autocommit
        conn.autocommit = True
        try:
            return role_words(
                conn.execute(ROLE_QUERY, prepare=False).fetchone(), self.read_only_counts
            )
        finally:
            conn.autocommit = autocommit

    def probe_blocking(self, conn: psycopg.Connection[Any]) -> None:
        check_connection_blocking(conn)

    def in_transaction(self, conn: psycopg.Connection[Any]) -> bool:
        return conn.pgconn.transaction_status == INTRANS

    def transaction_idle(self, conn: psycopg.Connection[Any]) -> bool:
        return conn.pgconn.status == OK and conn.pgconn.transaction_status == IDLE
