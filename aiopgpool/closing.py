"""Closing: gracefully (``close``), at once (``closeall``), or for a pool nobody references."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Generic, TypeVar

from .deadlines import move_on_after
from .errors import PoolClosed
from .options import check_timeout

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["Closing"]

logger = logging.getLogger("aiopgpool")

ConnT = TypeVar("ConnT")


class Closing(Generic[ConnT]):
    """Closes one :class:`~aiopgpool.core.PoolCore`."""

    __slots__ = ("_all_returned", "_core")

    def __init__(self, core: PoolCore[ConnT]) -> None:
        self._core = core
        # Set while a close() waits for borrowed connections to come back.
        self._all_returned: asyncio.Future[None] | None = None

    def all_returned(self) -> None:
        """The last borrowed connection came back while closing."""
        if self._all_returned is not None and not self._all_returned.done():
            self._all_returned.set_result(None)

    async def closeall(self) -> None:
        """Close every connection now, borrowed ones included; the pool is closed."""
        core = self._core
        if core.state == "closed":
            raise PoolClosed(f"pool {core.name!r} is already closed")
        self.close_now()

    async def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, wait up to ``timeout`` for borrowed connections, close.

        A return under way (a connection being rolled back or reset, in
        another task or thread) counts as borrowed until it is over.

        When it returns the pool is closed, even when another ``close()`` is
        still waiting for returns (this one waits with it, up to its own
        ``timeout``).
        """
        core = self._core
        check_timeout("timeout", timeout, allow_none=False)
        if core.state == "closed":
            return
        if core.state == "new":
            self.close_now()
            return
        if core.state == "open":
            core.state = "closing"
            core.update_fast()
            core.queue.fail_waiters(core.closed_error)
            core.close_idle("pool closing")  # nobody may borrow them now
            if core.borrowed or core.returning:
                self._all_returned = asyncio.get_running_loop().create_future()
        if self._all_returned is not None and not self._all_returned.done():
            try:
                with move_on_after(timeout) as scope:
                    await asyncio.shield(self._all_returned)
            except BaseException:
                # Cancelled (a scope around `async with pool`): close at once, as
                # at the timeout, rather than leave the pool closing for good.
                if core.state != "closed":
                    self.close_now()
                raise
            if scope.cancelled_caught and core.state != "closed":
                logger.warning(
                    "pool %r: %d connections still borrowed or being returned after %g s: "
                    "closing them",
                    core.name,
                    len(core.borrowed) + len(core.returning),
                    timeout,
                )
        if core.state != "closed":
            self.close_now()

    def close_dropped(self) -> None:
        """Close now, leaving borrowed connections open: for a pool object nobody references.

        Nobody can give those connections back any more, and closing them
        would break whoever still uses one; each closes with its own object.
        """
        core = self._core
        if core.state == "closed":
            return
        if core.borrowed:
            logger.warning(
                "pool %r was dropped without close(): %d borrowed connections are left "
                "to their borrowers",
                core.name,
                len(core.borrowed),
            )
        self.close_now(keep_borrowed=True)

    async def close_at_exit(self) -> None:
        """Interpreter exit: close the idle connections and stop the background work.

        The pool stays open. Whatever still uses it is a daemon thread (the others
        were joined before the exit handlers ran), which the interpreter stops where
        it stands, closing its sockets with the process. Closed, the pool would raise
        ``PoolClosed`` into each (a traceback per thread of a threaded server stopped
        by Ctrl-C), or close connections under their queries; and holding such a
        thread instead could hang the exit (a later exit handler joins it, or needs a
        lock it holds).
        """
        core = self._core
        if core.state != "open":
            return
        core.maintenance.stop()
        core.close_idle("interpreter exit")

    def close_now(self, *, keep_borrowed: bool = False) -> None:
        """Close at once: fail waiters, stop background work, close connections."""
        core = self._core
        core.state = "closed"
        core.update_fast()
        if self._all_returned is not None and not self._all_returned.done():
            self._all_returned.set_result(None)  # a close() waiting for returns: stop waiting
        core.maintenance.stop()
        core.queue.fail_waiters(core.closed_error)
        core.connector.stop(core.closed_error)
        core.close_idle("pool closed")
        for slot in core.borrowed.values():
            if slot.leak_timer is not None:
                slot.leak_timer.cancel()
            if not keep_borrowed:
                core.discard(slot, "pool closed while borrowed")
        core.forget_borrowed()
        if not keep_borrowed:
            # Returns still rolling back or running `reset`, connections being tested
            # (`check`, a ping): a hung one would keep its backend for good. Shut down
            # under that work, which then fails at once and counts the connection out.
            for slot in (*core.returning, *core.checking):
                if slot.conn is not None:
                    core.lifecycle.close(slot.conn)
        logger.info("pool %r closed", core.name)
