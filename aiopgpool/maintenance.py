"""Maintenance: the periodic timer, idle expiry, ``purge_expired``, ``check``, ``drain``,
``resize``, leaks.

Also the finalizer of a pool dropped while open. The timer holds its pool
only weakly, so that a pool its users dropped without closing it can be
collected (and :func:`close_dropped` then closes its idle connections).
"""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
import weakref
from time import monotonic
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .lifecycle import Lifecycle
from .options import check_sizes
from .slot import Slot
from .waiting import HandoffQueue

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["Maintenance", "borrower_stack", "close_dropped"]

logger = logging.getLogger("aiopgpool")

ConnT = TypeVar("ConnT")


def _has_conn(slot: Slot[Any]) -> bool:
    return slot.conn is not None


def close_dropped(name: str, queue: HandoffQueue[Slot[Any]], lifecycle: Lifecycle[Any]) -> None:
    """The finalizer of a pool dropped while open: close its idle connections.

    Borrowed connections are left to their borrowers: nobody can return them.
    """
    idle = [slot.conn for slot in queue.take(_has_conn)]
    if idle:
        logger.warning(
            "pool %r was dropped without close(): closing its %d idle connections",
            name,
            len(idle),
        )
    for conn in idle:
        lifecycle.close(conn)


class _Anchor:
    """Lives exactly as long as the core holding it, and can be referenced weakly.

    A compiled core cannot be (mypyc gives its classes no weakref slot on Python
    3.12 and later), so the dropped-pool finalizer watches this instead.
    """

    __slots__ = ("__weakref__",)


def on_drop(name: str, queue: HandoffQueue[Slot[Any]], lifecycle: Lifecycle[Any]) -> object:
    """An object for a core to hold: when the core is collected, :func:`close_dropped` runs."""
    anchor = _Anchor()
    weakref.finalize(anchor, close_dropped, name, queue, lifecycle).atexit = False
    return anchor


def _tick(ref: weakref.ref[Maintenance[Any]]) -> None:
    maintenance = ref()
    if maintenance is not None:
        maintenance.run()


_PACKAGE_DIR = os.path.dirname(__file__) + os.sep


def borrower_stack() -> str:
    """The calling thread's stack up to its last frame outside aiopgpool, for leak reports.

    Cut by file, not by a count of frames: compiled modules (see ``aiopgpool.native``)
    have no frames of their own.
    """
    frames = traceback.extract_stack()
    while frames and frames[-1].filename.startswith(_PACKAGE_DIR):
        frames.pop()
    return "".join(traceback.format_list(frames))


class Maintenance(Generic[ConnT]):
    """The background upkeep of one :class:`~aiopgpool.core.PoolCore`."""

    __slots__ = ("__weakref__", "_core", "_timer")

    def __init__(self, core: PoolCore[ConnT]) -> None:
        self._core = core
        self._timer: asyncio.TimerHandle | None = None

    def schedule(self) -> None:
        """Arm the timer for the next run: every half of the shortest period (``max_idle=0``
        included), 50 ms to 10 s; every 10 s without one, for the refill."""
        core = self._core
        # max_idle=0 is a period (close surplus idle connections at once); a
        # max_lifetime of 0 is not (each one expires as it is used: no timer for it).
        periods = [p for p in (core.max_idle, core.max_lifetime or None) if p is not None]
        loop = core.loop
        if loop is None:
            return
        interval = min(max(min(periods) / 2, 0.05), 10.0) if periods else 10.0
        self._timer = loop.call_later(interval, _tick, weakref.ref(self))

    def stop(self) -> None:
        """Cancel the timer (the pool closes)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def run(self) -> None:
        """One run: close expired and surplus idle connections, refill, re-arm."""
        core = self._core
        if core.state != "open":
            return
        try:
            self.expire_idle(core.max_idle, keep_min=True)
        finally:
            self.schedule()

    def expire_idle(self, max_idle: float | None, *, keep_min: bool) -> int:
        """Close idle connections past their lifetime or idle longer than ``max_idle``."""
        core = self._core
        now = monotonic()
        spare = core.size - core.min_size if keep_min else core.size

        def expired(slot: Slot[ConnT]) -> bool:
            nonlocal spare
            if slot.expires_at <= now:
                return True
            if max_idle is not None and spare > 0 and now - slot.returned_at >= max_idle:
                spare -= 1
                return True
            return False

        closed = core.close_idle("expired", expired)
        core.connector.fill()
        return closed

    async def purge_expired(self) -> int:
        """Close idle connections idle longer than ``max_idle`` (or past max_lifetime) now.

        Unlike the background shrinking, ``min_size`` does not protect them;
        the pool then refills ``min_size`` with fresh connections. Returns how
        many were closed.
        """
        self._core.check_open()
        return self.expire_idle(self._core.max_idle, keep_min=False)

    async def check(self) -> None:
        """Make a round trip on every idle connection; replace those that fail."""
        core = self._core
        core.check_open()
        core.check_loop()
        taken = core.queue.take(_has_conn)
        try:
            while taken:
                slot = taken.pop()
                conn = slot.conn
                assert conn is not None
                core.checking.add(slot)
                try:
                    await core.lifecycle.probe(conn)
                except Exception as exc:
                    core.discard(slot, f"check() failed ({exc.__class__.__name__})", lost=True)
                else:
                    # The round trip may bring the news that the server changed role.
                    await core.validation.role_check(slot, held=taken)
                finally:
                    core.checking.discard(slot)
                    core.release_slot(slot)
        finally:
            for slot in taken:
                core.release_slot(slot)
        core.connector.fill()

    async def drain(self) -> None:
        """Replace every connection: idle ones now, borrowed ones when returned."""
        core = self._core
        core.check_open()
        core.new_generation()
        core.close_idle("drained")
        core.connector.fill()

    async def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's sizes (``max_size=None``: ``min_size``, as psycopg_pool).

        Connections beyond a smaller max go as they come back.
        """
        core = self._core
        core.check_open()
        if max_size is None:
            max_size = min_size
        check_sizes(min_size, max_size, null=core.null)
        grow = core.capacity(max_size) - core.capacity(core.max_size)
        core.min_size = min_size
        core.max_size = max_size
        if grow > 0:
            cancel = min(grow, core.excess)
            core.excess -= cancel
            core.queue.add_free(grow - cancel)
        elif grow < 0:
            # Free slots go first, then the least recently used idle connections;
            # whatever is left is dropped as borrowed connections come back.
            shrink = -grow - core.queue.take_free(-grow)
            if shrink:
                idle = core.queue.take(_has_conn)  # least recently used first
                for slot in idle[:shrink]:
                    core.discard(slot, "pool resized")
                for slot in idle[shrink:]:
                    core.queue.put(slot, True)
                shrink -= min(shrink, len(idle))
            core.excess += shrink
        core.update_fast()
        core.connector.fill()

    # -- leaks ---------------------------------------------------------------------------

    def watch_leak(self, slot: Slot[ConnT], stack: str | None) -> None:
        """Report ``slot``'s borrower if it holds the connection past ``leak_timeout``."""
        core = self._core
        loop = core.loop
        assert loop is not None and core.leak_timeout is not None
        if stack is None:
            stack = borrower_stack()
        slot.leak_timer = loop.call_later(core.leak_timeout, self._report_leak, slot, stack)

    def _report_leak(self, slot: Slot[ConnT], stack: str) -> None:
        core = self._core
        slot.leak_timer = None
        core.counters.leaks += 1
        logger.warning(
            "pool %r: a connection has been held for more than %g s (leak_timeout); "
            "borrowed at:\n%s",
            core.name,
            core.leak_timeout,
            stack,
        )
