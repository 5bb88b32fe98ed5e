"""Time limits for the slow paths' blocks, kept by one timer per event loop.

``anyio.move_on_after`` (like ``asyncio.wait_for`` and ``asyncio.timeout``)
arms a timer per block and cancels it when the block ends early. asyncio keeps
a cancelled timer in its heap until its time comes, and every later timer of
the loop (psycopg arms one per query it waits for) is pushed and popped past
it with Python comparisons. A pool opening ten connections under the default
30 s limit per attempt left up to twenty of them behind in its user's loop
(the attempts', ``open(wait=True)``'s and the pooler question's), and a
replicated pool's prober one per member and round.

:func:`move_on_after` gives each block a cancel scope and leaves its limit to
the running loop's :class:`Watchdog`, whose timer is armed for the earliest
limit; when it fires it cancels the blocks past their limit and arms itself
for the next. With the usual equal limits a new block's is never the
earliest, so it costs a dictionary entry; no timer is ever cancelled.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from time import monotonic
from typing import Final

import anyio

__all__ = ["Watchdog", "move_on_after"]

# A block whose limit is this close when the timer fires is cancelled then,
# rather than by a timer armed again for a fraction of a millisecond.
SLACK: Final = 0.001

# Neither holds its loop (the key): a watchdog refers to its blocks' scopes
# weakly and keeps no timer handle, so a loop that ends takes its watchdog along.
_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Watchdog] = (
    weakref.WeakKeyDictionary()
)


def move_on_after(seconds: float | None) -> AbstractContextManager[anyio.CancelScope]:
    """As :func:`anyio.move_on_after`: the block is cancelled after ``seconds`` (None:
    never) and ends there; its scope's ``cancelled_caught`` says whether it was.

    The limit is kept by the running loop's :class:`Watchdog`, not by a timer of its own.
    """
    if seconds is None:
        return anyio.CancelScope()
    loop = asyncio.get_running_loop()
    watchdog = _watchdogs.get(loop)
    if watchdog is None:
        watchdog = _watchdogs[loop] = Watchdog()
    return watchdog.block(loop, seconds)


class Watchdog:
    """Cancels the blocks of one event loop past their limit, with one timer armed."""

    __slots__ = ("_armed", "_limits")

    def __init__(self) -> None:
        self._limits: weakref.WeakKeyDictionary[anyio.CancelScope, float] = (
            weakref.WeakKeyDictionary()
        )
        self._armed: list[float] = []  # when the armed timers fire: a heap

    @contextmanager
    def block(self, loop: asyncio.AbstractEventLoop, seconds: float) -> Iterator[anyio.CancelScope]:
        """A block of ``loop`` (the running one) cancelled after ``seconds``."""
        with anyio.CancelScope() as scope:
            limit = monotonic() + seconds
            self._limits[scope] = limit
            try:
                if not self._armed or limit < self._armed[0]:
                    self._arm(loop, limit)
                yield scope
            finally:
                self._limits.pop(scope, None)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        # An earlier limit than the armed timer's arms one more, rather than
        # cancelling that one (which would stay in the heap): it fires, finds
        # nothing due, and leaves.
        heapq.heappush(self._armed, when)
        loop.call_later(max(when - monotonic(), 0.0), self._fire, when)

    def _fire(self, when: float) -> None:
        self._armed.remove(when)
        heapq.heapify(self._armed)
        due = monotonic() + SLACK
        following = math.inf
        for scope, limit in list(self._limits.items()):
            if limit <= due:
                scope.cancel()
            elif limit < following:
                following = limit
        if following != math.inf and (not self._armed or following < self._armed[0]):
            self._arm(asyncio.get_running_loop(), following)
