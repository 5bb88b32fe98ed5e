"""The sync bridge: one event loop in a background thread, reached through anyio's portal.

A :class:`LoopThread` runs an asyncio event loop (``anyio.run``) serving an
:class:`anyio.from_thread.BlockingPortal`; blocking callers reach the pool
core through the portal. Two things go beyond a plain portal:

* The loop's selector holds :attr:`LoopThread.lock` whenever the loop runs
  Python code and releases it only while the loop waits in ``select()``.
  A caller thread holding the lock therefore knows the loop is parked, and
  may run the core's synchronous fast paths (``try_getconn_nowait`` and
  ``try_putconn_nowait``, which never complete a future nor schedule a
  callback) without a thread hop. A hop costs tens of microseconds; the
  fast path costs a few.
* The thread is a daemon, started by us rather than by
  ``anyio.from_thread.start_blocking_portal``, whose executor thread is
  joined at interpreter exit: a pool the program never closed would hang
  the exit. At exit, pools still open are closed with a short deadline.

After ``os.fork()`` the child has no loop thread; every bridge is marked so
that any use raises a clear error, and the parent's connections are kept
referenced (never finalized) so that the child never writes to sockets it
shares with the parent.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import selectors
import threading
import weakref
from collections.abc import Awaitable, Callable
from threading import get_ident
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from .errors import PoolError

__all__ = ["LoopThread"]

logger = logging.getLogger("aiopgpool")

T = TypeVar("T")

_bridges: weakref.WeakSet[LoopThread] = weakref.WeakSet()
# Bridges of the parent process, kept alive forever in a forked child.
_orphans: list[LoopThread] = []

EXIT_CLOSE_TIMEOUT = 2.0


class _ParkingSelector(selectors.DefaultSelector):
    """A selector that gives the lock away only while the loop waits for I/O."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self._lock = lock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._lock.release()
        try:
            result: list[tuple[selectors.SelectorKey, int]] = super().select(timeout)
            return result
        finally:
            self._lock.acquire()


class LoopThread:
    """An event loop in a daemon thread, with a portal and a parking lock."""

    def __init__(self, name: str, keepalive: Any, on_exit: Callable[[], Awaitable[Any]]) -> None:
        self.name = name
        self.lock = threading.Lock()
        # Referenced so that a forked child never finalizes the parent's connections.
        self._keepalive = keepalive
        self._on_exit = on_exit
        self._portal: BlockingPortal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ident: int | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Lock()  # close() may come from two threads at once
        self.forked = False
        #: True while the portal serves (and this is not a forked child): the
        #: hot paths' one test before they try the lock (see ``serves_caller``).
        self.serving = False

    # -- lifetime ------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread and wait until its portal serves."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"aiopgpool-{self.name}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._portal is None:
            raise PoolError(f"pool {self.name!r}: could not start its event loop thread") from (
                self._error
            )
        _bridges.add(self)

    @property
    def running(self) -> bool:
        """True while the loop thread serves."""
        return self._portal is not None

    def _run(self) -> None:
        self.lock.acquire()
        try:
            anyio.run(
                self._serve, backend="asyncio", backend_options={"loop_factory": self._make_loop}
            )
        except BaseException as exc:
            self._error = exc
            logger.exception("pool %r: event loop thread failed", self.name)
        finally:
            self._portal = None
            self.serving = False
            self._ident = None  # a thread started later may get the same ident
            self.lock.release()
            self._ready.set()

    def _make_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(_ParkingSelector(self.lock))

    async def _serve(self) -> None:
        async with BlockingPortal() as portal:
            self._loop = asyncio.get_running_loop()
            self._ident = get_ident()
            self._portal = portal
            self.serving = True
            self._ready.set()
            await portal.sleep_until_stopped()

    def stop(self) -> None:
        """Stop the loop and join the thread (not from the loop thread itself)."""
        if self.on_loop_thread():
            raise self._loop_thread_error()
        with self._stopping:
            portal, thread = self._portal, self._thread
            if portal is None or thread is None or self.forked:
                return
            with contextlib.suppress(RuntimeError):  # it stopped meanwhile (the finalizer)
                portal.call(portal.stop)
            thread.join()
            _bridges.discard(self)

    def stop_from_finalizer(self, cleanup: Callable[[], object]) -> None:
        """For a finalizer: run ``cleanup()`` on the loop, then end the thread; never blocks.

        It may run in any thread, the loop's own included: garbage collection
        runs wherever the last reference goes.
        """
        loop, portal = self._loop, self._portal
        if loop is None or portal is None or self.forked:
            return
        _bridges.discard(self)

        def on_loop() -> None:
            try:
                cleanup()
            finally:
                loop.create_task(portal.stop())

        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(on_loop)

    # -- calls -----------------------------------------------------------------------

    def on_loop_thread(self) -> bool:
        """True in the loop's own thread (which holds :attr:`lock` whenever it runs)."""
        return get_ident() == self._ident

    def serves_caller(self) -> bool:
        """True when the loop runs and this thread may call into it (the hot paths' check).

        False: :meth:`check_caller` raises the reason, or the loop is not running.
        """
        return self._portal is not None and not self.forked and get_ident() != self._ident

    def check_caller(self) -> None:
        """Raise a clear error where a call would deadlock or touch a parent's sockets."""
        if self.forked:
            raise PoolError(
                f"pool {self.name!r} was created in another process and cannot be used after "
                "fork(): create a new pool in the child process"
            )
        if get_ident() == self._ident:
            raise self._loop_thread_error()

    def _loop_thread_error(self) -> RuntimeError:
        return RuntimeError(
            f"pool {self.name!r}: a blocking pool method was called from the pool's own event "
            "loop thread (for example from reconnect_failed), which would deadlock; "
            "call it from another thread"
        )

    def call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await func(*args)`` on the loop and wait for its result."""
        return self.submit(func, *args).result()

    def submit(self, func: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
        """Start ``await func(*args)`` on the loop; the future of its result.

        :class:`PoolError` if the loop does not run (it stopped: the pool closed).
        """
        self.check_caller()
        portal = self._portal
        if portal is not None:
            try:
                return portal.start_task_soon(func, *args)
            except RuntimeError:  # "This portal is not running": stopped since the test
                pass
        raise PoolError(f"pool {self.name!r}: its event loop thread is not running")

    def call_soon(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``func(*args)`` on the loop without waiting; failures are logged."""
        self.submit(func, *args).add_done_callback(self._log_failure)

    def _log_failure(self, future: concurrent.futures.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.warning("pool %r: background call failed: %s", self.name, future.exception())

    def close_at_exit(self) -> None:
        """Run the pool's exit handler with a short deadline (never blocks long)."""
        portal = self._portal
        if portal is None or self.forked:
            return
        try:
            future = portal.start_task_soon(self._on_exit)
            future.result(timeout=EXIT_CLOSE_TIMEOUT)
        except BaseException:
            pass


def _close_all_at_exit() -> None:
    for bridge in list(_bridges):
        bridge.close_at_exit()


def _after_fork_in_child() -> None:
    for bridge in list(_bridges):
        bridge.forked = True
        bridge.serving = False
        bridge._portal = None
        _orphans.append(bridge)
    _bridges.clear()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
