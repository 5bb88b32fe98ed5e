"""Admission to the line: how long a request may wait, or the error it gets at once.

Called by the core and the thread port when a request finds nothing to take
(never on the idle hot path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import PoolTimeout, TooManyRequests

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["IN_TRANSIT_WAIT", "timeout_error", "wait_timeout"]

#: With ``timeout=0`` a request fails at once only when every slot is borrowed (or
#: being set up for a borrower); a slot merely in transit (refilled, returned) is
#: waited for, this long at most.
IN_TRANSIT_WAIT = 10.0


def wait_timeout(core: PoolCore[Any], timeout: float | None) -> float | None:
    """How long to wait in line; raises instead when ``timeout`` is 0 or the line is full."""
    timeout = core.effective_timeout(timeout)
    if timeout == 0:
        # Slots neither borrowed nor being set up for a borrower are in
        # transit (refilling, being returned) and will come back; those
        # already promised to the waiters ahead of us do not count.
        # A refill that keeps failing to connect is not coming back soon.
        in_transit = (
            core.capacity(core.max_size)
            - len(core.borrowed)
            - core._preparing
            - core.excess
            - core.connector.stalled_fills()
        )
        if in_transit <= core.queue.waiting:
            core.counters.timeouts += 1
            raise _caused(PoolTimeout("connection pool exhausted"), core)
        timeout = IN_TRANSIT_WAIT
    if core.max_waiting and core.queue.waiting >= core.max_waiting:
        core.counters.timeouts += 1
        raise TooManyRequests(
            f"pool {core.name!r}: {core.queue.waiting} requests already waiting "
            f"(max_waiting={core.max_waiting})"
        )
    return timeout


def timeout_error(core: PoolCore[Any], timeout: float | None) -> PoolTimeout:
    """The error of a request that waited its whole ``timeout`` in vain."""
    timeout = core.effective_timeout(timeout)
    error = PoolTimeout(f"pool {core.name!r}: no connection available after {timeout:g} s")
    return _caused(error, core)


def _caused(error: PoolTimeout, core: PoolCore[Any]) -> PoolTimeout:
    """``error`` chained to the last connection error, if any (what ``raise ... from``
    does; set by hand because mypyc, which compiles this module, drops that cause)."""
    error.__cause__ = core.connector.failure_cause()
    return error
