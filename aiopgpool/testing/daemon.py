"""A daemon's process (a postmaster, a pgbouncer) and the directory it owns: launched
under mirakuru from the spawner thread, stopped by a signal to the daemon itself, removed
(internal to ``aiopgpool.testing``)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mirakuru

from aiopgpool.testing.process import (
    pid_alive,
    port_accepting,
    release_port,
    spawn,
    wait_until,
)

__all__ = ["Daemon"]

log = logging.getLogger("aiopgpool.testing")


@dataclass
class Daemon:
    """A daemon's process state and the directory it owns.

    The server object's finalizer refers to this, never to the server object, so that
    a dropped server is still stopped and removed.  ``pid`` is the daemon's own (under
    runuser it is not mirakuru's child): :meth:`stop` signals it alone, with
    ``stop_signal``, then kills it after ``shutdown_timeout``.
    """

    what: str
    base_dir: Path
    lock_fd: int
    host: str
    port: int
    shutdown_timeout: float
    stop_signal: int = signal.SIGINT
    stopped_exit_code: int = 0  # besides 0, what a daemon stopped by us may exit with
    executor: mirakuru.TCPExecutor | None = None
    pid: int | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    owner_pid: int = field(default_factory=os.getpid)

    def launch(
        self,
        command: list[str],
        log_path: Path,
        timeout: float,
        executor_class: Callable[..., mirakuru.TCPExecutor] = mirakuru.TCPExecutor,
        **options: Any,
    ) -> mirakuru.TCPExecutor:
        """Run ``command`` under mirakuru from the spawner thread (see :func:`spawn`),
        its output appended to ``log_path``; return once it is ready."""
        # The child keeps its own copy of the log's descriptor.
        with open(log_path, "ab") as logfile:
            executor = executor_class(
                command,
                host=self.host,
                port=self.port,
                cwd=str(self.base_dir),
                timeout=timeout,
                sleep=0.05,
                stop_signal=self.stop_signal,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                **options,
            )
            try:
                spawn(executor.start)
            except BaseException:
                with contextlib.suppress(Exception):
                    executor.kill()
                raise
        return executor

    def stop(self) -> None:
        """Stop the daemon; return once it has exited and its port is closed."""
        with self.lock:
            executor, self.executor = self.executor, None
            pid, self.pid = self.pid, None
            if executor is None:
                return
            proc = executor.process
            # The signal goes to the daemon alone, not to its process group: SIGINT to
            # a PostgreSQL backend would cancel its query instead.
            if proc is not None and proc.poll() is None and pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, self.stop_signal)
                try:
                    proc.wait(timeout=self.shutdown_timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "%s on port %d ignored %s for %.0f s; killing it",
                        self.what,
                        self.port,
                        signal.Signals(self.stop_signal).name,
                        self.shutdown_timeout,
                    )
                    executor.kill()
            try:
                # reaps; mirakuru's own sweep
                executor.stop(
                    stop_signal=self.stop_signal, expected_returncode=self.stopped_exit_code
                )
            except mirakuru.ExecutorError as exc:
                log.warning("%s on port %d exited abnormally: %s", self.what, self.port, exc)
            if pid is not None and not wait_until(lambda: not pid_alive(pid), 10.0):
                log.warning("%s %d still runs after stop; killing it", self.what, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not wait_until(lambda: not port_accepting(self.host, self.port), 5.0):
                log.warning("port %d still accepts connections after stop", self.port)

    def cleanup(self) -> None:
        """Stop the daemon, remove its directory, release its lock and port (idempotent)."""
        if os.getpid() != self.owner_pid:
            return  # a forked child exiting: the daemon is its parent's
        try:
            self.stop()
        except Exception:
            log.exception("stopping %s in %s failed", self.what, self.base_dir)
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            release_port(self.port)
