"""Throwaway PostgreSQL servers for tests and benchmarks.

Three kinds of :class:`PostgresServer`:

* :class:`ExternalServer` -- a server somebody else runs, given by a DSN; it cannot be
  stopped or started from here (``controllable`` is False).
* :class:`LocalCluster` -- a private cluster made from the local server binaries
  (see :func:`find_pg_bindir`), listening on a free loopback port, with trust
  authentication; it can be stopped, started again on the same port and data
  directory, and removed.  When running as root every server binary runs as the
  ``postgres`` OS user through ``runuser``.
* :class:`ContainerServer` -- the official ``postgres`` image run by testcontainers,
  used when a Docker daemon answers.

:func:`provide_server` picks one for a test session; :func:`private_server` gives a
test a server of its own that it may stop and restart.  :func:`count_backends` and
:func:`terminate_backends` look at and kill a pool's backends by ``application_name``.

The postmaster is run and waited for with mirakuru; a free port comes from port_for.
Nothing here ever uses or prints a password: clusters use ``trust`` authentication.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import mirakuru
import port_for
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "BASE_SETTINGS",
    "DEFAULT_ENV_VAR",
    "ContainerServer",
    "ExternalServer",
    "LocalCluster",
    "NoServerAvailable",
    "PostgresServer",
    "count_backends",
    "docker_available",
    "find_pg_bindir",
    "how_to_provide_server",
    "local_cluster",
    "private_server",
    "provide_server",
    "terminate_backends",
]

log = logging.getLogger("aiopgpool.testing")

DEFAULT_ENV_VAR = "AIOPGPOOL_TEST_DSN"
"""The environment variable :func:`provide_server` reads a server's DSN from."""

BASE_SETTINGS: Mapping[str, str] = {
    "max_connections": "300",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
"""postgresql.conf values every throwaway server gets (callers' settings override them)."""

_LOOPBACK = "127.0.0.1"
_SERVER_USER = "postgres"  # the database superuser initdb creates, and the OS user as root
_DOCKER_IMAGE_ENV = "AIOPGPOOL_TEST_IMAGE"
_DEFAULT_IMAGE = "postgres:16-alpine"
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
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")

_S = TypeVar("_S", bound="PostgresServer")


class NoServerAvailable(RuntimeError):
    """No PostgreSQL server could be provided; the message says how to provide one."""


def how_to_provide_server(env_var: str | None = DEFAULT_ENV_VAR) -> str:
    """The how-to text of :class:`NoServerAvailable` (no DSN option when ``env_var`` is None)."""
    lines = ["No PostgreSQL server is available for the tests. Provide one in one of these ways:"]
    if env_var:
        lines.append(
            f"  * set {env_var} to the libpq DSN of a server the tests may use, e.g."
            f" {env_var}='host=127.0.0.1 port=5432 user=postgres dbname=postgres'"
            " (a superuser is best: the tests terminate their own backends);"
        )
    lines.append(
        "  * start a Docker daemon (`docker info` must work; set DOCKER_HOST if it does not"
        " listen on /var/run/docker.sock): a postgres container is then started with"
        " testcontainers;"
    )
    lines.append(
        "  * install the PostgreSQL server binaries (Debian/Ubuntu: `apt-get install postgresql`,"
        " Fedora: `dnf install postgresql-server`, macOS: `brew install postgresql`), or set"
        " PG_BINDIR to the directory that holds `postgres` and `initdb`: a throwaway cluster"
        " is then created on a free loopback port."
    )
    return "\n".join(lines)


# -- servers ---------------------------------------------------------------------------


class PostgresServer:
    """A PostgreSQL server the tests can connect to (base class of the three kinds).

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
            "", host=self.host, port=str(self.port), user=_SERVER_USER, dbname=_SERVER_USER
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


class ExternalServer(PostgresServer):
    """A server run by somebody else, known by its DSN (libpq conninfo or URL).

    It is never stopped, started or closed from here (``controllable`` is False).
    ``host`` and ``port`` are the first ones the DSN names (libpq defaults otherwise).
    """

    controllable = False

    def __init__(self, dsn: str) -> None:
        params = conninfo_to_dict(dsn)  # also validates it
        is_url = dsn.lstrip().startswith(("postgresql://", "postgres://"))
        self._dsn = make_conninfo("", **params) if is_url else dsn.strip()
        host = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST", ""))
        port = str(params.get("port") or os.environ.get("PGPORT", "") or "5432")
        self.host = host.split(",")[0] or "localhost"
        self.port = int(port.split(",")[0] or "5432")

    @property
    def dsn(self) -> str:
        """The DSN as given, as a libpq conninfo string."""
        return self._dsn


@dataclass
class _Runner:
    """How server binaries are run: directly, or (as root) as ``os_user`` through runuser."""

    os_user: str | None = None
    uid: int = -1
    gid: int = -1
    runuser: str | None = None
    setpriv: str | None = None

    @classmethod
    def detect(cls) -> _Runner:
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if not (hasattr(os, "geteuid") and os.geteuid() == 0):
            return cls(setpriv=setpriv)
        import pwd

        try:
            pw = pwd.getpwnam(_SERVER_USER)
        except KeyError:
            raise RuntimeError(
                f"PostgreSQL refuses to run as root, and there is no {_SERVER_USER!r} OS user"
                f" to run it as: create one (e.g. `useradd -r {_SERVER_USER}`) or run the"
                " tests as an unprivileged user"
            ) from None
        runuser = shutil.which("runuser") or next(
            (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)), None
        )
        if runuser is None:
            raise RuntimeError(
                "running as root, but `runuser` (util-linux) is not installed: it is needed to"
                f" run the PostgreSQL server as the {_SERVER_USER!r} OS user"
            )
        return cls(_SERVER_USER, pw.pw_uid, pw.pw_gid, runuser, setpriv)

    def wrap(self, argv: Sequence[str], *, daemon: bool = False) -> list[str]:
        """The command line that runs ``argv`` as the server's OS user.

        For a ``daemon`` (the postmaster) with setpriv at hand, a parent-death signal
        makes it do a fast shutdown if this process dies without cleaning up.  The
        signal follows the forking *thread*: start daemons through :func:`_spawn`.
        """
        cmd = list(argv)
        pdeathsig = daemon and self.setpriv is not None
        if self.os_user is None:
            if pdeathsig:
                cmd = [str(self.setpriv), "--pdeathsig", "INT", "--", *cmd]
            return cmd
        # runuser forks: the postmaster is runuser's child.  runuser ignores SIGINT
        # and answers SIGTERM with a SIGTERM (smart shutdown) to its child and a
        # SIGKILL 2 s later, so stop() signals the postmaster itself, and the
        # parent-death signal is armed on both: this process dies -> runuser is
        # killed -> the postmaster gets SIGINT, a fast shutdown.
        if pdeathsig:
            cmd = [str(self.setpriv), "--pdeathsig", "INT", "--", *cmd]
        cmd = [str(self.runuser), "-u", self.os_user, "--", *cmd]
        if pdeathsig:
            cmd = [str(self.setpriv), "--pdeathsig", "KILL", "--", *cmd]
        return cmd

    def own(self, path: Path) -> None:
        """Give ``path`` (recursively) to the server's OS user when running as root."""
        if self.os_user is None:
            return
        os.lchown(path, self.uid, self.gid)
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                for name in (*dirs, *files):
                    os.lchown(os.path.join(root, name), self.uid, self.gid)

    def private_dir(self, prefix: str) -> tuple[Path, int]:
        """A new mode-0700 temporary directory owned by the server's OS user.

        Returns it with the descriptor of the lock that marks it as in use (see
        :func:`_sweep_stale_dirs`); closing that descriptor releases it.
        """
        parent = _temp_parent()
        if self.os_user is not None:
            _check_traversable(parent, self.uid, self.gid, self.os_user)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            fd = _lock_dir(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        try:
            self.own(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)
            raise
        return path, fd


_T = TypeVar("_T")
_SPAWNER_LOCK = threading.Lock()
_spawner_queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] | None = None
_spawner_pid = 0


def _spawner_loop(jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
    while True:
        fn, future = jobs.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


def _spawn(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` (which starts a daemon process) on a thread that lives as long as
    this process: the main thread, or else one daemon thread kept for this, so that
    the daemon's parent-death signal fires when the process dies, not when a worker
    thread (``asyncio.to_thread``, a thread pool) ends."""
    global _spawner_queue, _spawner_pid
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _SPAWNER_LOCK:
        if _spawner_queue is None or _spawner_pid != os.getpid():  # none yet, or forked
            _spawner_queue, _spawner_pid = queue.SimpleQueue(), os.getpid()
            threading.Thread(
                target=_spawner_loop,
                args=(_spawner_queue,),
                name="aiopgpool-testing-spawner",
                daemon=True,
            ).start()
        jobs = _spawner_queue
    future: Future[_T] = Future()
    jobs.put((fn, future))
    return future.result()


_SHM = Path("/dev/shm")
_SHM_MIN_FREE = 1 << 30
_LOCK_NAME = ".aiopgpool.lock"
_DIR_PREFIX = "aiopgpool-pg-"


def _temp_parent() -> Path:
    """Where clusters live: /dev/shm (RAM: creating ~1000 files is 10x faster) when it
    has 1 GiB free and no TMPDIR (TEMP, TMP) is set; tempfile.gettempdir() otherwise."""
    if not any(os.environ.get(name) for name in ("TMPDIR", "TEMP", "TMP")):
        try:
            st = os.statvfs(_SHM)
            if os.access(_SHM, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= _SHM_MIN_FREE:
                return _SHM
        except OSError:
            pass
    return Path(tempfile.gettempdir())


def _lock_dir(path: Path) -> int:
    """Lock ``path`` as in use by this process (an flock, released when the process dies)."""
    import fcntl

    fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sweep_stale_dirs(parent: Path) -> None:
    """Remove the directories that processes killed before their cleanup (SIGKILL) left.

    A directory is stale when nobody holds its lock and no postmaster runs in it.
    Directories without a lock file are never touched.
    """
    import fcntl

    for path in parent.glob(_DIR_PREFIX + "*"):
        try:
            fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            pidfile = path / "data" / "postmaster.pid"
            with contextlib.suppress(OSError, ValueError):
                if _pid_alive(int(pidfile.read_text().split("\n", 1)[0])):
                    continue
            log.info("removing %s, left behind by a process that was killed", path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _check_traversable(path: Path, uid: int, gid: int, user: str) -> None:
    groups = {gid, *(g for g in _groups_of(user))}
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise RuntimeError(
                f"the {user!r} OS user cannot reach the temporary directory {path} ({p} is"
                f" mode {stat.S_IMODE(st.st_mode):o}); set TMPDIR to a directory it can reach,"
                " e.g. TMPDIR=/tmp"
            )


def _groups_of(user: str) -> list[int]:
    import grp

    return [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]


# -- local binaries --------------------------------------------------------------------


def _is_bindir(path: Path) -> bool:
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
        if _is_bindir(Path(env)):
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
        if out and _is_bindir(Path(out)):
            return Path(out)
    for parent, pattern in ((Path("/usr/lib/postgresql"), "*/bin"), (Path("/usr"), "pgsql-*/bin")):
        candidates = [p for p in parent.glob(pattern) if _is_bindir(p)]
        if candidates:
            return max(candidates, key=_version_key)
    postgres = shutil.which("postgres")
    if postgres:
        bindir = Path(postgres).resolve().parent
        if _is_bindir(bindir):
            return bindir
    return None


def _supports_small_wal(bindir: Path) -> bool:
    try:
        out = subprocess.run(
            [str(bindir / "initdb"), "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--wal-segsize" in out


def _remove_template(base: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not in a forked child
        shutil.rmtree(base, ignore_errors=True)


_TEMPLATE_LOCK = threading.Lock()
_TEMPLATES: dict[tuple[str, str | None], Path] = {}


def _template_data_dir(bindir: Path, runner: _Runner) -> Path:
    """A data directory initdb made once per process (per bindir), to be copied."""
    key = (str(bindir), runner.os_user)
    with _TEMPLATE_LOCK:
        cached = _TEMPLATES.get(key)
        if cached is not None and cached.is_dir():
            return cached
        with contextlib.suppress(OSError):
            _sweep_stale_dirs(_temp_parent())
        base, lock_fd = runner.private_dir(_DIR_PREFIX + "template-")
        data = base / "data"
        argv = [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "--auth=trust",
            "-U",
            _SERVER_USER,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        if _supports_small_wal(bindir):
            argv.append("--wal-segsize=1")  # 1 MB instead of 16 MB of WAL to copy per cluster
        started = time.monotonic()
        try:
            result = subprocess.run(
                runner.wrap(argv),
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=300,
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"initdb ({bindir}) failed with exit code {result.returncode}:\n"
                    + result.stdout.strip()
                )
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            os.close(lock_fd)
            raise
        atexit.register(_remove_template, base, os.getpid())  # the lock goes with the process
        log.debug("initdb template %s made in %.2f s", data, time.monotonic() - started)
        _TEMPLATES[key] = data
        return data


# -- local clusters --------------------------------------------------------------------


_PORTS_LOCK = threading.Lock()
_RESERVED_PORTS: set[int] = set()  # ports of live LocalClusters, even while stopped


def _pick_port(previous: int | None = None) -> int:
    with _PORTS_LOCK:
        if previous is not None:
            _RESERVED_PORTS.discard(previous)
        port = int(port_for.select_random(exclude_ports=set(_RESERVED_PORTS)))
        _RESERVED_PORTS.add(port)
        return port


def _port_accepting(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _accepts_connections(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2, autocommit=True):
            return True
    except psycopg.Error:
        return False


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


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
        return _port_accepting(self.host, self.port) and _accepts_connections(self._dsn)


@dataclass
class _ClusterProcess:
    """A cluster's process state; its finalizer refers to this, never to the cluster."""

    base_dir: Path
    lock_fd: int
    host: str
    port: int
    shutdown_timeout: float
    executor: _PostmasterExecutor | None = None
    pm_pid: int | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    owner_pid: int = field(default_factory=os.getpid)

    def stop(self) -> None:
        with self.lock:
            executor, self.executor = self.executor, None
            pm_pid, self.pm_pid = self.pm_pid, None
            if executor is None:
                return
            proc = executor.process
            # SIGINT to the postmaster alone (not to its process group: SIGINT to a
            # backend cancels its query) is a fast shutdown: clients are disconnected.
            if proc is not None and proc.poll() is None and pm_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pm_pid, signal.SIGINT)
                try:
                    proc.wait(timeout=self.shutdown_timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "PostgreSQL on port %d ignored a fast shutdown for %.0f s; killing it",
                        self.port,
                        self.shutdown_timeout,
                    )
                    executor.kill()
            try:
                executor.stop(stop_signal=signal.SIGINT)  # reaps; mirakuru's own sweep
            except mirakuru.ExecutorError as exc:
                log.warning("PostgreSQL on port %d exited abnormally: %s", self.port, exc)
            if pm_pid is not None and not _wait_until(lambda: not _pid_alive(pm_pid), 10.0):
                log.warning("postmaster %d still runs after stop; killing it", pm_pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pm_pid, signal.SIGKILL)
            if not _wait_until(lambda: not _port_accepting(self.host, self.port), 5.0):
                log.warning("port %d still accepts connections after stop", self.port)

    def cleanup(self) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked child exiting: the cluster is its parent's
        try:
            self.stop()
        except Exception:
            log.exception("stopping the PostgreSQL cluster in %s failed", self.base_dir)
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            with _PORTS_LOCK:
                _RESERVED_PORTS.discard(self.port)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as gone (it no longer serves anything).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


class LocalCluster(PostgresServer):
    """A throwaway cluster from the local server binaries, on a free loopback port.

    The data directory is a copy of a template made by initdb once per process
    (``--auth=trust -U postgres -E UTF8 --locale=C``).  The server listens on
    127.0.0.1 only (TCP) plus a unix socket in its private temporary directory
    (under /dev/shm when it has room and no TMPDIR is set, else the temporary
    directory), with :data:`BASE_SETTINGS` and the caller's ``settings`` in
    postgresql.conf.  As root, files belong to and binaries run as the ``postgres``
    OS user.

    The constructor prepares the directory; :meth:`start` runs the server.  Use
    :func:`local_cluster` for a started one.  Normal interpreter exit (or garbage
    collection) closes a cluster left open; if this process is killed, the
    postmaster gets a fast shutdown (a parent-death signal; Linux with setpriv) and
    the next process that makes a cluster removes the directory.
    """

    controllable = True

    def __init__(
        self,
        settings: Mapping[str, str] | None = None,
        *,
        bindir: Path | str | None = None,
        startup_timeout: float = 60.0,
        shutdown_timeout: float = 30.0,
    ) -> None:
        found = Path(bindir) if bindir is not None else find_pg_bindir()
        if found is None or not _is_bindir(found):
            raise NoServerAvailable(
                f"no PostgreSQL server binaries found ({found or 'nowhere'}).\n"
                + how_to_provide_server(None)
            )
        extra = dict(settings or {})
        for name in extra:
            if not _SETTING_NAME.match(name):
                raise ValueError(f"not a PostgreSQL setting name: {name!r}")
        self.bindir: Path = found
        self.host = _LOOPBACK
        self.settings: dict[str, str] = {**BASE_SETTINGS, **{k: str(v) for k, v in extra.items()}}
        self.startup_timeout = startup_timeout
        self._runner = _Runner.detect()
        self._lock = threading.RLock()
        self._started_once = False
        template = _template_data_dir(self.bindir, self._runner)
        base_dir, lock_fd = self._runner.private_dir(_DIR_PREFIX)
        self.port = 0
        try:
            self.base_dir = base_dir
            self.data_dir = base_dir / "data"
            self.socket_dir = base_dir / "sock"
            self.log_path = base_dir / "postgres.log"
            shutil.copytree(template, self.data_dir, symlinks=True, copy_function=shutil.copy)
            self.data_dir.chmod(0o700)
            self.socket_dir.mkdir(mode=0o700)
            self.log_path.touch(mode=0o600)
            self._write_conf()
            self._runner.own(base_dir)
            self.port = _pick_port()
        except BaseException:
            shutil.rmtree(base_dir, ignore_errors=True)
            os.close(lock_fd)
            raise
        self._proc = _ClusterProcess(base_dir, lock_fd, self.host, self.port, shutdown_timeout)
        self._finalizer = weakref.finalize(self, self._proc.cleanup)

    def _write_conf(self) -> None:
        lines = [
            "",
            "# --- aiopgpool.testing ---",
            f"listen_addresses = {_conf_value(_LOOPBACK)}",
            f"unix_socket_directories = {_conf_value(self.socket_dir)}",
        ]
        lines += [f"{name} = {_conf_value(value)}" for name, value in self.settings.items()]
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        """True while the postmaster runs."""
        executor = self._proc.executor
        return executor is not None and executor.running()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return not self._finalizer.alive

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._proc.pm_pid if self.running else None

    def log_text(self, offset: int = 0) -> str:
        """The server log (stdout and stderr of the postmaster) from byte ``offset``."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def start(self) -> None:
        """Start the server (the same port and data as before, after a stop); wait until ready."""
        with self._lock, self._proc.lock:
            if self.closed:
                raise RuntimeError(f"{self!r} is closed")
            if self.running:
                return
            if self._proc.executor is not None:  # died on its own: reap it
                self._proc.stop()
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
                        self.port = self._proc.port = _pick_port(self.port)
                        continue
                    tail = "\n".join(output.strip().splitlines()[-30:])
                    raise RuntimeError(
                        f"PostgreSQL ({self.bindir}) did not start on {self.host}:{self.port}:"
                        f" {_why(exc, self.startup_timeout)}\n"
                        f"--- server log ({self.log_path}) ---\n{tail}"
                    ) from exc
                break
            self._proc.executor = executor
            self._proc.pm_pid = self._read_pm_pid(executor)
            self._started_once = True
            log.debug("PostgreSQL started on %s:%d (pid %s)", self.host, self.port, self.pid)

    def _launch(self) -> _PostmasterExecutor:
        """Run the postmaster under mirakuru; return once it accepts connections."""
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        # The child keeps its own copy of the log's descriptor.
        with open(self.log_path, "ab") as logfile:
            executor = _PostmasterExecutor(
                self._runner.wrap(argv, daemon=True),
                host=self.host,
                port=self.port,
                dsn=self.dsn,
                cwd=str(self.base_dir),
                timeout=self.startup_timeout,
                sleep=0.05,
                stop_signal=signal.SIGINT,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
            )
            try:
                _spawn(executor.start)
            except BaseException:
                with contextlib.suppress(Exception):
                    executor.kill()
                raise
        return executor

    def _read_pm_pid(self, executor: _PostmasterExecutor) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            proc = executor.process
            return proc.pid if proc is not None and self._runner.os_user is None else None

    def stop(self) -> None:
        """Fast shutdown: SIGINT to the postmaster; clients are disconnected.

        Returns once the postmaster has exited and the port no longer accepts
        connections.  A no-op when not running.
        """
        with self._lock:
            self._proc.stop()

    def close(self) -> None:
        """Stop the server and remove its temporary directory (idempotent)."""
        with self._lock:
            self._finalizer()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running" if self.running else "stopped"
        return f"<LocalCluster {self.host}:{self.port} {state}>"


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
    cluster = LocalCluster(settings)
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    return cluster


# -- containers ------------------------------------------------------------------------


_DOCKER_SOCKET = "/var/run/docker.sock"


def docker_available(timeout: float = 3.0) -> bool:
    """True when a Docker daemon answers a ping within ``timeout`` seconds; never raises.

    Uses ``DOCKER_HOST`` if set, else ``/var/run/docker.sock`` (returns False at once
    when neither exists).
    """
    try:
        if not os.environ.get("DOCKER_HOST") and not os.path.exists(_DOCKER_SOCKET):
            return False
        answer: list[bool] = []

        def ping() -> None:
            try:
                docker = importlib.import_module("docker")
                client = docker.from_env(timeout=max(1, int(timeout)))
                try:
                    answer.append(bool(client.ping()))
                finally:
                    client.close()
            except Exception as exc:
                log.debug("no Docker daemon: %s", exc)
                answer.append(False)

        thread = threading.Thread(target=ping, name="aiopgpool-docker-ping", daemon=True)
        thread.start()
        thread.join(timeout)
        return bool(answer and answer[0])
    except Exception:
        return False


def _postgres_container_class() -> Any:
    for module in ("testcontainers.community.postgres", "testcontainers.postgres"):
        try:
            base: Any = importlib.import_module(module).PostgresContainer
        except ImportError:
            continue

        class TrustPostgresContainer(base):  # type: ignore[misc]
            """PostgresContainer with trust authentication and no password at all."""

            def _configure(self) -> None:
                super()._configure()
                env = getattr(self, "env", None)
                if isinstance(env, dict):
                    env.pop("POSTGRES_PASSWORD", None)
                    env["POSTGRES_HOST_AUTH_METHOD"] = "trust"

        return TrustPostgresContainer
    raise RuntimeError(
        "testcontainers[postgres] is not installed (pip install 'aiopgpool[testing]')"
    )


class ContainerServer(PostgresServer):
    """The official ``postgres`` image run by testcontainers, on a fixed free host port.

    Trust authentication (``POSTGRES_HOST_AUTH_METHOD=trust``), :data:`BASE_SETTINGS`
    plus ``settings`` as server options.  Controllable: :meth:`stop` stops the
    container (the image's stop signal, SIGINT, is a fast shutdown) and :meth:`start`
    starts it again with the same port and data.  The image is
    ``$AIOPGPOOL_TEST_IMAGE`` or ``postgres:16-alpine``.
    """

    controllable = True

    def __init__(
        self,
        settings: Mapping[str, str] | None = None,
        *,
        image: str | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        container_class = _postgres_container_class()
        self.image = image or os.environ.get(_DOCKER_IMAGE_ENV) or _DEFAULT_IMAGE
        self.startup_timeout = startup_timeout
        self.settings = {**BASE_SETTINGS, **{k: str(v) for k, v in (settings or {}).items()}}
        command = ["postgres"]
        for name, value in self.settings.items():
            command += ["-c", f"{name}={value}"]
        host_port = self._host_port = _pick_port()
        container = container_class(
            self.image, username=_SERVER_USER, dbname=_SERVER_USER, driver=None
        )
        container.with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
        container.with_bind_ports(5432, host_port)
        container.with_command(command)
        self._container: Any = container
        self._closed = False
        try:
            container.start()
            self.host = str(container.get_container_host_ip())
            self.port = int(container.get_exposed_port(5432))
            if not _wait_until(lambda: _accepts_connections(self.dsn), startup_timeout, 0.2):
                raise RuntimeError(f"the {self.image} container does not accept connections")
        except BaseException:
            self._remove()
            raise

    def stop(self) -> None:
        """Stop the container (fast shutdown); return once the port is closed."""
        self._container.get_wrapped_container().stop(timeout=30)
        _wait_until(lambda: not _port_accepting(self.host, self.port), 10.0, 0.1)

    def start(self) -> None:
        """Start the container again; return once it accepts connections."""
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        if wrapped.status != "running":
            wrapped.start()
        if not _wait_until(lambda: _accepts_connections(self.dsn), self.startup_timeout, 0.2):
            raise RuntimeError(f"the {self.image} container did not come back")

    def close(self) -> None:
        """Remove the container (idempotent)."""
        if not self._closed:
            self._closed = True
            self._remove()

    def _remove(self) -> None:
        with _PORTS_LOCK:
            _RESERVED_PORTS.discard(self._host_port)
        try:
            self._container.stop()
        except Exception as exc:
            log.warning("removing the postgres container failed: %s", exc)


# -- choosing a server -----------------------------------------------------------------


def provide_server(env_var: str = DEFAULT_ENV_VAR) -> PostgresServer:
    """The server for a test session.

    In order: the DSN in ``env_var`` if set (an :class:`ExternalServer`); a
    :class:`ContainerServer` when a Docker daemon answers; a :class:`LocalCluster`
    when local binaries exist.  Otherwise :class:`NoServerAvailable` (a
    RuntimeError) saying how to provide one.
    """
    dsn = os.environ.get(env_var, "").strip()
    if dsn:
        return ExternalServer(dsn)
    return _new_server({}, env_var, prefer_local=False)


def private_server(**settings: str) -> PostgresServer:
    """A new controllable server of the caller's own, never a shared or external one.

    A :class:`LocalCluster` when local binaries exist, else a :class:`ContainerServer`
    when Docker answers, else :class:`NoServerAvailable`.
    """
    return _new_server(settings, None, prefer_local=True)


def _new_server(
    settings: Mapping[str, str], env_var: str | None, *, prefer_local: bool
) -> PostgresServer:
    have_local = find_pg_bindir() is not None
    if prefer_local and have_local:
        return local_cluster(**settings)
    container_error: BaseException | None = None
    if docker_available():
        try:
            return ContainerServer(settings)
        except Exception as exc:
            if not have_local:
                raise NoServerAvailable(
                    f"the postgres container did not start: {exc}\n"
                    + how_to_provide_server(env_var)
                ) from exc
            log.warning("the postgres container did not start (%s); using local binaries", exc)
            container_error = exc
    if have_local:
        return local_cluster(**settings)
    raise NoServerAvailable(how_to_provide_server(env_var)) from container_error


# -- backends --------------------------------------------------------------------------


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

        _wait_until(gone, 5.0)
        return len(pids)
