"""What every server provider shares: :class:`PostgresServer`, :class:`NoServerAvailable`,
the settings every throwaway server gets, and :func:`count_backends` /
:func:`terminate_backends`, which look at and kill a pool's backends by ``application_name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo

from aiopgpool.testing.process import SERVER_USER, wait_until

__all__ = [
    "BASE_SETTINGS",
    "NoServerAvailable",
    "PostgresServer",
    "accepts_connections",
    "count_backends",
    "terminate_backends",
]

BASE_SETTINGS: Mapping[str, str] = {
    "max_connections": "300",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
"""postgresql.conf values every throwaway server gets (callers' settings override them)."""

_PG_STATES = frozenset(
    {
        "active",
        "idle",
        "idle in transaction",
        "idle in transaction (aborted)",
        "fastpath function call",
        "disabled",
    }
)

_S = TypeVar("_S", bound="PostgresServer")


class NoServerAvailable(RuntimeError):
    """No PostgreSQL server could be provided; the message says how to provide one."""


class PostgresServer:
    """A PostgreSQL server the tests can connect to (base class of every provider's kind).

    ``dsn`` is a libpq conninfo string without a password.  ``controllable`` is True
    when :meth:`stop`, :meth:`start` and :meth:`restart` work.
    """

    host: str
    port: int
    controllable: bool = False

    @property
    def dsn(self) -> str:
        """A libpq conninfo string: ``host=... port=... user=postgres dbname=postgres``."""
        return make_conninfo(
            "", host=self.host, port=str(self.port), user=SERVER_USER, dbname=SERVER_USER
        )

    def stop(self) -> None:
        """Fast shutdown (clients are disconnected); return once the server is down."""
        raise RuntimeError(f"{self!r} is not controllable: it cannot be stopped from here")

    def start(self) -> None:
        """Start again on the same port and data; return once it accepts connections."""
        raise RuntimeError(f"{self!r} is not controllable: it cannot be started from here")

    def restart(self) -> None:
        """:meth:`stop` then :meth:`start`."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove everything it owns (idempotent)."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port}>"


def accepts_connections(dsn: str) -> bool:
    """True when a libpq connection to ``dsn`` succeeds within 2 s (the port opens before
    the server accepts logins)."""
    try:
        with psycopg.connect(dsn, connect_timeout=2, autocommit=True):
            return True
    except psycopg.Error:
        return False


def _monitor(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        dsn, autocommit=True, connect_timeout=10, application_name="aiopgpool-testing-monitor"
    )


def count_backends(dsn: str, application_name: str) -> int:
    """How many backends in pg_stat_activity have ``application_name`` (not this query's own)."""
    with _monitor(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            (application_name,),
        ).fetchone()
    return int(row[0]) if row else 0


def terminate_backends(dsn: str, application_name: str, state: str | None = None) -> int:
    """``pg_terminate_backend`` the backends with ``application_name``; return how many.

    With ``state`` ('idle', 'active', 'idle in transaction', ...) only those in that
    state.  Waits (up to 5 s each) until they are gone, so :func:`count_backends`
    no longer sees them.
    """
    if state is not None and state not in _PG_STATES:
        raise ValueError(f"state must be None or one of {sorted(_PG_STATES)}, not {state!r}")
    where = "application_name = %s AND pid <> pg_backend_pid()"
    params: list[Any] = [application_name]
    if state is not None:
        where += " AND state = %s"
        params.append(state)
    with _monitor(dsn) as conn:
        if conn.info.server_version >= 140000:
            query = f"SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE {where}"
            rows = conn.execute(query, params).fetchall()
            return sum(1 for (ok,) in rows if ok)
        rows = conn.execute(
            f"SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE {where}", params
        ).fetchall()
        pids = [pid for pid, ok in rows if ok]

        def gone() -> bool:
            left = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            ).fetchone()
            return not left or left[0] == 0

        wait_until(gone, 5.0)
        return len(pids)
