"""Validation: the slow path of checkout, which makes a slot's connection fit to lend.

A slot taken for a request may hold an idle connection whose socket test is
due, one idle past ``ping_after_idle``, or none. :class:`Validation` tests
(or probes) it, runs the user's ``check``, replaces it when it fails, or
opens a connection on a free slot, within the request's deadline.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING, Generic, TypeVar

from .errors import PoolTimeout
from .slot import Slot, mark_tested

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["Validation"]

ConnT = TypeVar("ConnT")


class Validation(Generic[ConnT]):
    """Prepares slots for lending, for one :class:`~aiopgpool.core.PoolCore`."""

    __slots__ = ("_core",)

    def __init__(self, core: PoolCore[ConnT]) -> None:
        self._core = core

    async def prepare(
        self, slot: Slot[ConnT], start: float | None, timeout: float | None
    ) -> Slot[ConnT]:
        """Make a slot's connection usable: test it, or replace it, or open one.

        ``start``: when the request began (None: now). The caller counted the
        slot in the core's ``_preparing``; this counts it out. On failure the
        slot goes back to the pool.
        """
        core = self._core
        try:
            core.check_loop()
            if start is None:
                start = monotonic()
            timeout = core.effective_timeout(timeout)
            # A slot had at once (timeout=0) still gets connected within the
            # pool's own timeout; when that is 0 too (psycopg2's "fail at
            # once"), one attempt is made and its error raised, as
            # psycopg2.pool does.
            budget = timeout or core.timeout
            deadline = None if budget is None else start + budget
            retry = budget != 0
            while True:
                if slot.conn is not None:
                    if await self._usable(slot):
                        if core.state == "closed":  # closed while we checked it
                            raise core.closed_error()
                        return slot
                    swapped = core.queue.swap_top(slot)
                    if swapped is not None:
                        slot = swapped
                    continue
                await core.connector.connect(slot, None if not retry else deadline, retry=retry)
                core.connector.notify_size()
                if await self._checked(slot):
                    return slot
        except PoolTimeout:
            core.counters.timeouts += 1
            core.release_slot(slot)
            raise
        except BaseException:
            core.release_slot(slot)
            raise
        finally:
            core._preparing -= 1

    async def _usable(self, slot: Slot[ConnT]) -> bool:
        """Whether a connected slot can be handed out; discards it if not."""
        core = self._core
        conn = slot.conn
        assert conn is not None
        now = monotonic()
        if slot.expires_at <= now:
            core.discard(slot, "max_lifetime reached")
            return False
        ping = core.ping_after_idle
        if not slot.quiet() or (ping is not None and now - slot.returned_at > ping):
            try:
                await core.lifecycle.probe(conn)
            except Exception as exc:
                core.discard(slot, f"dead while idle ({exc.__class__.__name__})", lost=True)
                return False
        if not await self._checked(slot):
            return False
        if slot.generation != core.generation:  # drained while we checked it
            core.discard(slot, "drained")
            return False
        mark_tested(slot, monotonic())
        return True

    async def _checked(self, slot: Slot[ConnT]) -> bool:
        """Run the user's ``check`` (if any) on a slot's connection; discards it if it fails."""
        core = self._core
        lifecycle = core.lifecycle
        if not lifecycle.has_check:
            return True
        conn = slot.conn
        assert conn is not None
        try:
            await lifecycle.check(conn)
        except Exception as exc:
            core.discard(slot, f"check failed ({exc.__class__.__name__}: {exc})", lost=True)
            return False
        return True
