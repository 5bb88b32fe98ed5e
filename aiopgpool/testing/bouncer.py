"""PgBouncer in front of a throwaway server, for tests of a pool behind a bouncer.

:class:`PgBouncer` writes a config of its own (an auth file, ``auth_type = trust``, the
chosen ``pool_mode``, every database forwarded to the server), listens on a free loopback
port, and runs the system's ``pgbouncer`` (:func:`find_pgbouncer`) as an unprivileged OS
user when run as root; :meth:`~PgBouncer.close` stops it and removes its files.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import mirakuru

from aiopgpool.testing.base import DaemonServer, PostgresServer
from aiopgpool.testing.daemon import Daemon
from aiopgpool.testing.process import (
    DIR_PREFIX,
    LOOPBACK,
    SERVER_USER,
    Runner,
    check_loopback,
    pick_port,
    release_port,
)

__all__ = ["HOW_TO", "PGBOUNCER_ENV_VAR", "PgBouncer", "PoolMode", "find_pgbouncer"]

PoolMode = Literal["session", "transaction", "statement"]

PGBOUNCER_ENV_VAR = "PGBOUNCER"
"""An environment variable naming the pgbouncer executable to use."""

HOW_TO = (
    "install PgBouncer (Debian/Ubuntu: `apt-get install pgbouncer`, Fedora:"
    " `dnf install pgbouncer`, macOS: `brew install pgbouncer`) or set PGBOUNCER to the"
    " path of a pgbouncer executable"
)
"""How to get a pgbouncer binary."""

_PLACES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")
_SETTING_NAME = re.compile(r"^[a-z_]+$")


def find_pgbouncer() -> Path | None:
    """The pgbouncer executable: ``$PGBOUNCER``, ``PATH``, then the usual places; or None."""
    for candidate in (
        os.environ.get(PGBOUNCER_ENV_VAR),
        shutil.which("pgbouncer"),
        *_PLACES,
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


class PgBouncer(DaemonServer):
    """PgBouncer in front of ``server`` (which must listen on loopback).

    ``dsn`` connects through the bouncer as the ``postgres`` user to the ``postgres``
    database (any database name is forwarded to the server's database of that name);
    ``admin_dsn`` reaches its admin console (database ``pgbouncer``; simple query
    protocol only).  ``settings`` override or add ``[pgbouncer]`` settings
    (``default_pool_size``, ``server_reset_query``...).  The constructor starts it;
    :meth:`stop` (an immediate shutdown, SIGTERM), :meth:`start` and :meth:`restart`
    work on the same port; :meth:`close` stops it and removes its directory.
    """

    def __init__(
        self,
        server: PostgresServer,
        pool_mode: PoolMode = "session",
        settings: Mapping[str, str | int] | None = None,
        *,
        binary: Path | str | None = None,
        startup_timeout: float = 30.0,
        shutdown_timeout: float = 10.0,
    ) -> None:
        found = Path(binary) if binary is not None else find_pgbouncer()
        if found is None:
            raise RuntimeError(f"no pgbouncer executable found: {HOW_TO}")
        if pool_mode not in ("session", "transaction", "statement"):
            raise ValueError(f"pool_mode must be session, transaction or statement: {pool_mode!r}")
        self.binary = found
        self.pool_mode: PoolMode = pool_mode
        self.server = server
        self.host = LOOPBACK
        self.startup_timeout = startup_timeout
        target = check_loopback(server.host, "PgBouncer's server")
        extra = {name: str(value) for name, value in (settings or {}).items()}
        for name, value in extra.items():
            if not _SETTING_NAME.match(name) or "\n" in value:
                raise ValueError(f"not a PgBouncer setting: {name!r} = {value!r}")
        self._runner = Runner.detect()
        self._runner.check_reachable(self.binary)
        base_dir, lock_fd = self._runner.private_dir(DIR_PREFIX + "bouncer-")
        self.port = pick_port()
        try:
            self.base_dir = base_dir
            self.config_path = base_dir / "pgbouncer.ini"
            self.log_path = base_dir / "pgbouncer.log"
            self._pidfile = base_dir / "pgbouncer.pid"
            self._write_config(target, server.port, extra)
            self._runner.own(base_dir)
        except BaseException:
            shutil.rmtree(base_dir, ignore_errors=True)
            os.close(lock_fd)
            release_port(self.port)
            raise
        # SIGTERM is an immediate shutdown, after which pgbouncer exits with code 1.
        self._adopt(
            Daemon(
                "PgBouncer",
                base_dir,
                lock_fd,
                self.host,
                self.port,
                shutdown_timeout=shutdown_timeout,
                stop_signal=signal.SIGTERM,
                stopped_exit_code=1,
            )
        )
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    def _write_config(self, target: str, target_port: int, extra: Mapping[str, str]) -> None:
        auth_file = self.base_dir / "userlist.txt"
        auth_file.write_text(f'"{SERVER_USER}" ""\n')  # trust: no password at all
        auth_file.chmod(0o600)
        settings = {
            "listen_addr": LOOPBACK,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(auth_file),
            "pool_mode": self.pool_mode,
            "admin_users": SERVER_USER,
            "stats_users": SERVER_USER,
            "max_client_conn": "1000",
            "default_pool_size": "20",
            "ignore_startup_parameters": "extra_float_digits",
            "pidfile": str(self._pidfile),
            **extra,
        }
        lines = ["[databases]", f"* = host={target} port={target_port}", "", "[pgbouncer]"]
        lines += [f"{name} = {value}" for name, value in settings.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def admin_dsn(self) -> str:
        """The conninfo of the admin console (``SHOW POOLS``, ``SHOW CONFIG``, ...)."""
        return f"host={self.host} port={self.port} user={SERVER_USER} dbname=pgbouncer"

    def _run(self) -> mirakuru.TCPExecutor:
        """Run pgbouncer; return once it listens."""
        command = self._runner.wrap([str(self.binary), str(self.config_path)], daemon=True)
        try:
            return self._proc.launch(command, self.log_path, self.startup_timeout)
        except mirakuru.ExecutorError as exc:
            tail = "\n".join(self.log_text().strip().splitlines()[-20:])
            raise RuntimeError(
                f"PgBouncer ({self.binary}) did not start on {self.host}:{self.port}:"
                f" {exc}\n--- its log ({self.log_path}) ---\n{tail}"
            ) from exc

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running" if self.running else "stopped"
        return (
            f"<PgBouncer {self.host}:{self.port} {self.pool_mode} mode"
            f" -> {self.server.host}:{self.server.port} {state}>"
        )
