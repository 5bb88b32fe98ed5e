"""Process plumbing shared by the server providers (internal to ``aiopgpool.testing``).

* :class:`Runner` -- how server binaries run: directly, or, as root, as an unprivileged
  OS user through ``runuser`` (PostgreSQL and PgBouncer refuse to run as root);
* :func:`spawn` -- start daemons from a thread that lives as long as the process, so
  that their parent-death signal fires when the process dies, not when a worker thread
  ends;
* private temporary directories with a lock that marks them as in use, and the sweep
  that removes those left by killed processes;
* free loopback ports (port_for), reserved for as long as a server may come back on them;
* small waits: :func:`wait_until`, :func:`port_accepting`, :func:`pid_alive`.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import queue
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import port_for

log = logging.getLogger("aiopgpool.testing")

LOOPBACK = "127.0.0.1"
SERVER_USER = "postgres"
"""The database superuser initdb creates, and the preferred OS user to run servers as root."""
FALLBACK_OS_USER = "nobody"
"""The OS user servers run as when run as root and there is no ``postgres`` OS user."""
DIR_PREFIX = "aiopgpool-pg-"
"""Prefix of every temporary directory made here (see :func:`sweep_stale_dirs`)."""

_T = TypeVar("_T")


# -- running binaries as an unprivileged user --------------------------------------------


@dataclass
class Runner:
    """How server binaries are run: directly, or (as root) as ``os_user`` through runuser."""

    os_user: str | None = None
    uid: int = -1
    gid: int = -1
    runuser: str | None = None
    setpriv: str | None = None

    @classmethod
    def detect(cls, os_users: Iterable[str] = (SERVER_USER, FALLBACK_OS_USER)) -> Runner:
        """The runner for this process: as root, the first of ``os_users`` that exists."""
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if not (hasattr(os, "geteuid") and os.geteuid() == 0):
            return cls(setpriv=setpriv)
        import pwd

        candidates = list(os_users)
        for name in candidates:
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            break
        else:
            raise RuntimeError(
                "PostgreSQL refuses to run as root, and none of the OS users"
                f" {', '.join(candidates)} exists to run it as: create one (e.g."
                f" `useradd -r {SERVER_USER}`) or run the tests as an unprivileged user"
            )
        runuser = shutil.which("runuser") or next(
            (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)), None
        )
        if runuser is None:
            raise RuntimeError(
                "running as root, but `runuser` (util-linux) is not installed: it is needed to"
                f" run the server binaries as the {name!r} OS user"
            )
        return cls(name, pw.pw_uid, pw.pw_gid, runuser, setpriv)

    def wrap(self, argv: Sequence[str], *, daemon: bool = False) -> list[str]:
        """The command line that runs ``argv`` as the server's OS user.

        For a ``daemon`` (a postmaster, a pgbouncer) with setpriv at hand, a parent-death
        signal makes it shut down fast if this process dies without cleaning up.  The
        signal follows the forking *thread*: start daemons through :func:`spawn`.
        """
        cmd = list(argv)
        pdeathsig = daemon and self.setpriv is not None
        if self.os_user is None:
            if pdeathsig:
                cmd = [str(self.setpriv), "--pdeathsig", "INT", "--", *cmd]
            return cmd
        # runuser forks: the daemon is runuser's child.  runuser ignores SIGINT and
        # answers SIGTERM with a SIGTERM (smart shutdown) to its child and a SIGKILL
        # 2 s later, so stopping signals the daemon itself, and the parent-death
        # signal is armed on both: this process dies -> runuser is killed -> the
        # daemon gets SIGINT, a fast shutdown.
        if pdeathsig:
            cmd = [str(self.setpriv), "--pdeathsig", "INT", "--", *cmd]
        cmd = [str(self.runuser), "-u", self.os_user, "--", *cmd]
        if pdeathsig:
            cmd = [str(self.setpriv), "--pdeathsig", "KILL", "--", *cmd]
        return cmd

    def run(self, argv: Sequence[str], cwd: Path, what: str, timeout: float = 300.0) -> None:
        """Run ``argv`` as the server's OS user; RuntimeError with its output if it fails
        (``what`` names it in the message)."""
        result = subprocess.run(
            self.wrap(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{what} failed with exit code {result.returncode}:\n{result.stdout.strip()}"
            )

    def own(self, path: Path) -> None:
        """Give ``path`` (recursively) to the server's OS user when running as root."""
        if self.os_user is None:
            return
        os.lchown(path, self.uid, self.gid)
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                for name in (*dirs, *files):
                    os.lchown(os.path.join(root, name), self.uid, self.gid)

    def check_reachable(self, path: Path) -> None:
        """Raise RuntimeError when the server's OS user cannot traverse to ``path``."""
        if self.os_user is not None:
            _check_traversable(path, self.uid, self.gid, self.os_user)

    def private_dir(self, prefix: str = DIR_PREFIX) -> tuple[Path, int]:
        """A new mode-0700 temporary directory owned by the server's OS user.

        Returns it with the descriptor of the lock that marks it as in use (see
        :func:`sweep_stale_dirs`); closing that descriptor releases it.
        """
        parent = temp_parent()
        self.check_reachable(parent)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            fd = lock_dir(path)
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


def _check_traversable(path: Path, uid: int, gid: int, user: str) -> None:
    import grp

    groups = {gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
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
                f"the {user!r} OS user cannot reach {path} ({p} is mode"
                f" {stat.S_IMODE(st.st_mode):o}); for temporary directories set TMPDIR to a"
                " directory it can reach, e.g. TMPDIR=/tmp"
            )


# -- the spawner thread ---------------------------------------------------------------

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


def spawn(fn: Callable[[], _T]) -> _T:
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


# -- temporary directories --------------------------------------------------------------

_SHM = Path("/dev/shm")
_SHM_MIN_FREE = 1 << 30
_LOCK_NAME = ".aiopgpool.lock"


def temp_parent() -> Path:
    """Where servers live: /dev/shm (RAM: creating ~1000 files is 10x faster) when it
    has 1 GiB free and no TMPDIR (TEMP, TMP) is set; tempfile.gettempdir() otherwise."""
    if not any(os.environ.get(name) for name in ("TMPDIR", "TEMP", "TMP")):
        try:
            st = os.statvfs(_SHM)
            if os.access(_SHM, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= _SHM_MIN_FREE:
                return _SHM
        except OSError:
            pass
    return Path(tempfile.gettempdir())


def lock_dir(path: Path) -> int:
    """Lock ``path`` as in use by this process (an flock, released when the process dies)."""
    import fcntl

    fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_dir(path: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not in a forked child
        shutil.rmtree(path, ignore_errors=True)


def remove_at_exit(path: Path) -> None:
    """Remove ``path`` when this process exits (its lock goes with the process)."""
    atexit.register(_remove_dir, path, os.getpid())


def sweep_stale_dirs(parent: Path) -> None:
    """Remove the directories that processes killed before their cleanup (SIGKILL) left.

    A directory is stale when nobody holds its lock and no postmaster runs in it.
    Directories without a lock file are never touched.
    """
    import fcntl

    for path in parent.glob(DIR_PREFIX + "*"):
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
                if pid_alive(int(pidfile.read_text().split("\n", 1)[0])):
                    continue
            log.info("removing %s, left behind by a process that was killed", path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


# -- ports and waiting ------------------------------------------------------------------


def check_loopback(host: str, what: str) -> str:
    """Return ``host`` as an IP literal if it is a loopback address, else raise ValueError
    (``what`` names the address in the message)."""
    if host == "localhost":
        return LOOPBACK
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{what} address {host!r} is not a loopback IP address "
            "(only 127.0.0.0/8, ::1 or 'localhost' are allowed)"
        ) from None
    if not addr.is_loopback:
        raise ValueError(
            f"{what} address {host!r} is not loopback "
            "(only 127.0.0.0/8, ::1 or 'localhost' are allowed)"
        )
    return str(addr)


_PORTS_LOCK = threading.Lock()
_RESERVED_PORTS: set[int] = set()  # ports of live servers, even while stopped


def pick_port(previous: int | None = None) -> int:
    """A free loopback port, reserved until :func:`release_port` (``previous`` is released)."""
    with _PORTS_LOCK:
        if previous is not None:
            _RESERVED_PORTS.discard(previous)
        port = int(port_for.select_random(exclude_ports=set(_RESERVED_PORTS)))
        _RESERVED_PORTS.add(port)
        return port


def release_port(port: int) -> None:
    """Let :func:`pick_port` hand out ``port`` again."""
    with _PORTS_LOCK:
        _RESERVED_PORTS.discard(port)


def port_accepting(host: str, port: int) -> bool:
    """True when a TCP connection to ``host:port`` succeeds within a second."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
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
