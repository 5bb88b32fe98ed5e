"""psycopg2.pool's classes on the sync facade: drop-ins for legacy threaded code.

``SimpleConnectionPool``, ``ThreadedConnectionPool`` and
``PersistentConnectionPool`` keep psycopg2's signature
``(minconn, maxconn, *args, **kwargs)`` and its errors: ``minconn``
connections at construction, :class:`PoolError` "connection pool exhausted"
at once when ``maxconn`` are out, errors on an unkeyed put, on use after
``closeall()`` and on a second ``closeall()``.

Differences from psycopg2.pool, all on the safe side: every class is
thread-safe; a connection returned in a transaction is rolled back and its
attributes restored; connections beyond ``minconn`` are kept until idle for
``max_idle`` seconds (pg_simple's ``expiration``, default 600) instead of
being closed as soon as they come back.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Hashable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar, Generic, TypeVar

import psycopg

from .conninfo import ConnectTarget
from .errors import PoolError
from .options import DEFAULTS, PoolOptions, check_count, check_timeout
from .sync_lifecycle import BlockingLifecycle, SyncLifecycle
from .sync_pool import SyncPoolFacade

__all__ = [
    "AbstractConnectionPool",
    "PersistentConnectionPool",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
]

C = TypeVar("C")

# How long construction waits for ``minconn`` connections. As in psycopg2, a
# connection attempt that fails raises its error at once; this bounds attempts
# that neither fail nor succeed (PoolTimeout).
OPEN_TIMEOUT = 10.0


def check_flag(label: str, value: object) -> bool:
    """Validate a yes/no option: a bool, or psycopg2-era code's 0 or 1; anything else raises."""
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise ValueError(f"{label} must be True or False (or 1 or 0), got {value!r}")


def connect_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """psycopg2.connect-style ``(dsn, **params)`` to a conninfo and keyword parameters."""
    if len(args) > 1:
        raise TypeError(
            f"expected at most one positional connection argument (the dsn), got {len(args)}"
        )
    dsn = args[0] if args else kwargs.pop("dsn", "")
    if dsn is None:
        dsn = ""
    if "database" in kwargs:
        if "dbname" in kwargs:
            raise TypeError("give either database= or dbname=, not both")
        kwargs["dbname"] = kwargs.pop("database")
    return dsn, kwargs


class DropInBase(Generic[C]):
    """The psycopg2.pool contract over a :class:`~aiopgpool.sync_pool.SyncPoolFacade`.

    Beyond psycopg2's arguments: ``expiration`` (pg_simple: close connections
    idle longer than that; default 600 s), ``disable_pooling`` (connect for
    each checkout), ``min_kept`` (how many connections expiration spares;
    default ``minconn``) and ``name``.
    """

    #: Pool error classes raised as others by getconn/putconn/closeall and
    #: at construction (see aiopgpool.psycopg2: errors that are also
    #: psycopg2.pool.PoolError). Empty: raised as they are.
    _error_classes: ClassVar[Mapping[type[PoolError], type[PoolError]]] = {}

    def __init__(
        self,
        minconn: int,
        maxconn: int,
        *args: Any,
        expiration: float | None = None,
        disable_pooling: bool = False,
        min_kept: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Validated before any connection, each named as the caller named it.
        disable_pooling = check_flag("disable_pooling", disable_pooling)
        check_count("minconn", minconn)
        check_count("maxconn", maxconn, least=0 if disable_pooling else 1)
        if not disable_pooling and minconn > maxconn:
            raise ValueError(f"minconn ({minconn}) must not be greater than maxconn ({maxconn})")
        if min_kept is not None:
            check_count("min_kept", min_kept)
            if not disable_pooling and min_kept > maxconn:
                raise ValueError(
                    f"min_kept ({min_kept}) must not be greater than maxconn ({maxconn})"
                )
        check_timeout("expiration", expiration)
        dsn, params = connect_arguments(args, dict(kwargs))
        self.minconn = minconn
        self.maxconn = maxconn
        options = PoolOptions(
            conninfo=dsn,
            kwargs=params,
            min_size=0 if disable_pooling else minconn,
            max_size=maxconn,
            timeout=0,
            max_idle=DEFAULTS.max_idle if expiration is None else expiration,
            name=name,
            null=disable_pooling,
        )
        target = ConnectTarget(dsn, params, options.name)  # type: ignore[arg-type]
        self._pool: SyncPoolFacade[C] = SyncPoolFacade(
            self._make_lifecycle(target), options, target.describe()
        )
        try:
            self._pool.open(wait=True, timeout=OPEN_TIMEOUT, fail_fast=True)
            if min_kept is not None and not disable_pooling and min_kept != minconn:
                # ``minconn`` are made now, but only ``min_kept`` are kept open
                # through ``expiration`` (pg_simple closes any expired connection).
                self._pool.resize(min_kept, maxconn)
        except BaseException as exc:
            # Nothing leaks: no connection open, no loop thread left retrying.
            self._pool.close(0)
            if isinstance(exc, PoolError):
                raise self._translated(exc) from exc.__cause__
            raise

    @abstractmethod
    def _make_lifecycle(self, target: ConnectTarget) -> BlockingLifecycle[C]:
        """The lifecycle of this pool's connections."""

    @property
    def closed(self) -> bool:
        """True after ``closeall()``."""
        return self._pool.closed

    @property
    def name(self) -> str:
        """The pool's name (logs, stats, application_name)."""
        return self._pool.name

    @property
    def _inherited(self) -> bool:
        """True in a child of ``os.fork()`` for a pool its parent opened: unusable here
        (every use raises PoolError), and never to be closed from here."""
        return self._pool._bridge.forked

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} minconn={self.minconn} maxconn={self.maxconn} {self._pool!r}>"
        )

    def _translated(self, exc: PoolError) -> PoolError:
        """``exc`` as this class raises it (see ``_error_classes``), same message."""
        cls = self._error_classes.get(type(exc))
        if cls is None:
            return exc
        return cls(*exc.args).with_traceback(exc.__traceback__)

    def getconn(self, key: Hashable | None = None) -> C:
        """A connection (the same one for the same ``key``); PoolError when exhausted."""
        try:
            return self._pool.getconn(0, key=key)
        except PoolError as exc:
            raise self._translated(exc) from exc.__cause__

    def putconn(
        self, conn: C | None = None, key: Hashable | None = None, close: bool = False
    ) -> None:
        """Give a connection back (by ``conn`` or by ``key``); ``close=True`` discards it."""
        try:
            if conn is None:
                if key is None:
                    raise PoolError("trying to put unkeyed connection")
                conn = self._pool._held_by_key(key)
                if conn is None:
                    raise PoolError(f"no connection is checked out under key {key!r}")
            self._pool.putconn(conn, key, close)
        except PoolError as exc:
            raise self._translated(exc) from exc.__cause__

    def closeall(self) -> None:
        """Close every connection, borrowed ones included; PoolError if already closed."""
        try:
            self._pool.closeall()
        except PoolError as exc:
            raise self._translated(exc) from exc.__cause__

    @contextmanager
    def connection(self) -> Iterator[C]:
        """``with pool.connection() as conn``: getconn, commit or roll back, putconn."""
        with ExitStack() as stack:
            try:
                conn = stack.enter_context(self._pool.connection(timeout=0))
            except PoolError as exc:
                raise self._translated(exc) from exc.__cause__
            yield conn

    def purge_expired_connections(self) -> int:
        """Close connections idle longer than ``expiration`` now (pg_simple); how many."""
        return self._pool.purge_expired()

    def stats(self) -> Any:
        """The underlying pool's :class:`~aiopgpool.PoolStats`."""
        return self._pool.stats()


class AbstractConnectionPool(DropInBase[Any]):
    """psycopg2.pool.AbstractConnectionPool's contract, serving psycopg 3 connections."""

    def _make_lifecycle(self, target: ConnectTarget) -> BlockingLifecycle[Any]:
        return SyncLifecycle(target, psycopg.Connection, configure=None, reset=None, check=None)


class SimpleConnectionPool(AbstractConnectionPool):
    """psycopg2.pool.SimpleConnectionPool (thread-safe here too)."""


class ThreadedConnectionPool(AbstractConnectionPool):
    """psycopg2.pool.ThreadedConnectionPool."""


class PersistentMixin(DropInBase[C]):
    """Keys connections by thread: a thread gets the same one until it puts it back."""

    def getconn(self, key: Hashable | None = None) -> C:
        """This thread's connection (``key`` is ignored, as in psycopg2)."""
        return super().getconn(("thread", threading.get_ident()))

    # API.md's drop-in signature, ``putconn(conn, key=None, close=False)``: psycopg2
    # 2.7/2.8's ``putconn(conn=None, close=False)`` took ``close`` second; here the
    # second positional argument is the key (ignored), so ``close=`` goes by keyword.
    def putconn(
        self, conn: C | None = None, key: Hashable | None = None, close: bool = False
    ) -> None:
        """Give back this thread's connection (``conn`` may be omitted); ``close=True``
        discards it. ``key`` is ignored: the thread is the key."""
        thread_key = ("thread", threading.get_ident())
        try:
            if conn is None:
                conn = self._pool._held_by_key(thread_key)
                if conn is None:
                    raise PoolError("this thread holds no connection from this pool")
        except PoolError as exc:
            raise self._translated(exc) from exc.__cause__
        super().putconn(conn, thread_key, close)


class PersistentConnectionPool(PersistentMixin[Any], AbstractConnectionPool):
    """psycopg2.pool.PersistentConnectionPool."""
