"""What every server provider shares: :class:`PostgresServer`, :class:`NoServerAvailable`,
the settings every throwaway server gets, and :func:`count_backends` /
:func:`terminate_backends`, which look at and kill a pool's backends by ``application_name``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import mirakuru
import psycopg
from psycopg.conninfo import make_conninfo

from aiopgpool.testing.daemon import Daemon
from aiopgpool.testing.process import SERVER_USER, Runner, wait_until

__all__ = [
    "BASE_SETTINGS",
    "Closing",
    "DaemonServer",
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

_S = TypeVar("_S", bound="Closing")


class NoServerAvailable(RuntimeError):
    """No PostgreSQL server could be provided; the message says how to provide one."""


class Closing:
    """A context manager whose exit calls :meth:`close`."""

    def close(self) -> None:
        """Release everything (idempotent)."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PostgresServer(Closing):
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

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port}>"


class DaemonServer(PostgresServer):
    """A server whose daemon this process runs (a postmaster, a pgbouncer), in a
    directory of its own: controllable, and stopped and removed by :meth:`close`, by
    garbage collection or at interpreter exit, whichever comes first.

    A subclass prepares its directory, calls :meth:`_adopt` with its :class:`Daemon`,
    and implements :meth:`_run`.
    """

    controllable = True
    log_path: Path
    _pidfile: Path
    _runner: Runner
    _proc: Daemon
    _finalizer: weakref.finalize[[], Any]
    _lock: threading.RLock

    def _adopt(self, daemon: Daemon) -> None:
        self._proc = daemon
        self._lock = threading.RLock()
        self._finalizer = weakref.finalize(self, daemon.cleanup)

    def _run(self) -> mirakuru.TCPExecutor:
        """Run the daemon; return its executor once it is ready."""
        raise NotImplementedError

    def _read_pid(self, executor: mirakuru.TCPExecutor) -> int | None:
        """The daemon's pid: from its pidfile, else mirakuru's child unless under runuser."""
        try:
            return int(self._pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            proc = executor.process
            return proc.pid if proc is not None and self._runner.os_user is None else None

    @property
    def running(self) -> bool:
        """True while the daemon runs."""
        executor = self._proc.executor
        return executor is not None and executor.running()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return not self._finalizer.alive

    @property
    def pid(self) -> int | None:
        """The daemon's process id while it runs."""
        return self._proc.pid if self.running else None

    def log_text(self, offset: int = 0) -> str:
        """The daemon's log (its stdout and stderr) from byte ``offset``."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def start(self) -> None:
        """Start (on the same port and data as before, after a stop); return once ready."""
        with self._lock, self._proc.lock:
            if self.closed:
                raise RuntimeError(f"{self!r} is closed")
            if self.running:
                return
            if self._proc.executor is not None:  # died on its own: reap it
                self._proc.stop()
            executor = self._run()
            self._proc.executor = executor
            self._proc.pid = self._read_pid(executor)

    def stop(self) -> None:
        """Stop the daemon with its stop signal (clients are disconnected); return once it
        has exited and its port no longer accepts connections.  A no-op when stopped."""
        with self._lock:
            self._proc.stop()

    def close(self) -> None:
        """Stop the daemon and remove its directory (idempotent)."""
        with self._lock:
            self._finalizer()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"


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
