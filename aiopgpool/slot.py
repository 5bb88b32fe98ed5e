"""One slot of a pool: a place for one connection, with what the pool knows of it.

The pool's hand-off queue holds slots (:mod:`aiopgpool.waiting`): taking one
is taking the right to one connection, so the queue is the semaphore. A slot
with ``conn`` None is free: whoever takes it connects on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["SOCKET_TEST_INTERVAL", "Baseline", "Slot", "mark_tested", "never_quiet"]

ConnT = TypeVar("ConnT")

Baseline = tuple[Any, ...]
"""A connection's state as a return must find it: for psycopg 3,
(transaction status, autocommit, isolation_level, read_only, deferrable),
as configured for the pool (the status idle)."""

# An idle connection's socket is tested at checkout unless it was tested this
# recently: a test that old is nearly as good as one made now, since the server
# can close a connection just after any test. Under load this makes the test
# rare, and it matters: it is a system call, which costs several microseconds
# more than it seems on a busy machine (the SELECT 1 benchmark at 100 tasks
# loses about 5 % with 1 ms here). A connection idle for longer is always tested.
SOCKET_TEST_INTERVAL = 0.01


def never_quiet() -> bool:
    """The quiet test of a slot without a connection: never quiet."""
    return False


class Slot(Generic[ConnT]):
    """One slot of the pool: a connection and its timestamps, or nothing (a free slot)."""

    __slots__ = (
        "baseline",
        "borrowed_at",
        "conn",
        "created_at",
        "expires_at",
        "fresh_until",
        "generation",
        "leak_timer",
        "quiet",
        "returned_at",
        "server",
    )

    def __init__(self) -> None:
        self.conn: ConnT | None = None
        self.baseline: Baseline = ()
        self.created_at = 0.0
        self.expires_at = float("inf")
        self.returned_at = 0.0
        self.borrowed_at = 0.0
        # Until when it may be handed out untested: the earlier of its expiry
        # and SOCKET_TEST_INTERVAL after its last test.
        self.fresh_until = 0.0
        # The lifecycle's quiet_test() of the connection.
        self.quiet: Callable[[], bool] = never_quiet
        self.generation = 0
        self.leak_timer: Any = None
        # The server the connection reached (host, port), for role tracking.
        self.server: Any = None

    def clear(self) -> None:
        """Forget the connection: a free slot."""
        self.conn = None
        self.quiet = never_quiet
        self.fresh_until = 0.0

    def still_ready(self, now: float) -> bool:
        """Past ``fresh_until``: ready if not expired and its socket is quiet (then tested now)."""
        if self.expires_at > now and self.quiet():
            mark_tested(self, now)
            return True
        return False


def mark_tested(slot: Slot[Any], now: float) -> None:
    """Record that ``slot``'s connection was found alive at ``now``."""
    slot.fresh_until = min(slot.expires_at, now + SOCKET_TEST_INTERVAL)
