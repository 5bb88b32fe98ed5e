"""The thread port: how the sync facade's caller threads reach a core without a thread hop.

**The rule.** Every ``*_nowait`` method here touches the core's state from a
caller thread. That is safe only while the caller holds the bridge's parking
lock (:attr:`aiopgpool.bridge.LoopThread.lock`): the loop holds it whenever it
runs Python code and releases it only while it waits for I/O, so a thread
holding it knows the loop is parked. These methods never suspend, never
schedule a callback on the loop, and complete only this port's own waiters
(:class:`ThreadWaiter`, which are safe to complete from any thread holding
the lock). Each asserts that the lock is held. The coroutines (``prepare``,
``finish_return``) run on the loop, through the bridge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from .admission import timeout_error, wait_timeout
from .options import check_timeout
from .slot import Slot

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["Claim", "ThreadPort", "ThreadWaiter"]

ConnT = TypeVar("ConnT")

_PENDING: Final = 0
_DONE: Final = 1
_CANCELLED: Final = 2
monotonic: Final = time.monotonic  # a C static when compiled (see core.py)


class Claim:
    """A caller thread's claim on the connection :meth:`ThreadPort.prepare` lends it.

    ``abandoned``: the thread was interrupted (``KeyboardInterrupt``) and left;
    set in the caller thread and read on the loop, both under the bridge's lock.
    """

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


class ThreadWaiter(Generic[ConnT]):
    """A caller thread's place in the core's line: the lightest future that will do.

    Every transition happens under the bridge's lock (in a caller thread, or
    on the loop, which holds it while it runs), so the state needs no lock of
    its own; the waiting thread sleeps on a lock that completing releases.
    Whoever hands it a slot also finishes the checkout (counts the wait,
    lends the connection if it is ready, else counts the slot as being
    prepared), under the lock it already holds: the woken thread then needs
    no lock at all, instead of queueing on the one its waker still holds.
    """

    __slots__ = ("_core", "_exception", "_key", "_result", "_start", "_state", "_wake")

    def __init__(self, core: PoolCore[ConnT], key: Hashable | None, start: float) -> None:
        self._core = core
        self._key = key
        self._start = start
        self._state = _PENDING
        self._result: ConnT | Slot[ConnT] | None = None
        self._exception: BaseException | None = None
        self._wake = threading.Lock()
        self._wake.acquire()

    def done(self) -> bool:
        """True once completed or cancelled."""
        return self._state != _PENDING

    def result(self) -> ConnT | Slot[ConnT]:
        """The connection lent (or the slot to prepare); raises what it was completed with."""
        if self._exception is not None:
            raise self._exception
        assert self._result is not None
        return self._result

    def set_result(self, slot: Slot[ConnT], /) -> None:
        """Take ``slot`` (handed over under the lock): lend it if ready, and wake the thread."""
        core = self._core
        now = monotonic()
        core._waited(now - self._start)
        result: ConnT | Slot[ConnT] | None = None
        if (
            self._key is None
            and core._fast
            and slot.conn is not None
            and slot.generation == core.generation
        ):
            result = core._lend_ready(slot, now)
        if result is None:
            core._preparing += 1
            result = slot
        self._result = result
        self._state = _DONE
        self._wake.release()

    def set_exception(self, exception: BaseException, /) -> None:
        """Complete it with ``exception`` and wake the thread."""
        self._exception = exception
        self._state = _DONE
        self._wake.release()

    def cancel(self) -> bool:
        """Withdraw it; False when it was completed already."""
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        return True

    def sleep(self, timeout: float | None) -> bool:
        """Sleep until completed or ``timeout`` seconds passed; True if completed."""
        return self._wake.acquire(timeout=-1 if timeout is None else timeout)


class ThreadPort(Generic[ConnT]):
    """The facade-only protocol of a :class:`~aiopgpool.core.PoolCore` (see the module rule)."""

    __slots__ = ("_core", "_lock")

    def __init__(self, core: PoolCore[ConnT], lock: threading.Lock) -> None:
        self._core = core
        self._lock = lock
        core.threaded = True

    # -- checkout ----------------------------------------------------------------------

    def request_nowait(self, timeout: object, key: Hashable | None) -> ConnT | Slot[ConnT] | None:
        """Go on with a checkout ``PoolCore.lend_idle`` did not serve, in the same hold of the lock.

        A connection (the key's, held already), a slot to :meth:`prepare` on
        the loop, or None: the request must wait; the caller puts its waiter in line with
        :meth:`join_nowait` in the same hold of the lock. Raises what
        ``getconn`` raises at once (bad arguments, closed pool, exhausted with
        ``timeout=0``, too many waiting).
        """
        assert self._lock.locked(), "ThreadPort: call *_nowait methods under the bridge lock"
        core = self._core
        seconds = None if timeout is None else check_timeout("timeout", timeout)
        conn = core._request(key)
        if conn is not None:
            return conn
        kept = core.queue.get_nowait()
        if kept is not None:
            core._preparing += 1
            return kept
        wait_timeout(core, seconds)
        core.counters.requests_waited += 1
        return None

    def join_nowait(self, waiter: ThreadWaiter[ConnT]) -> None:
        """Put ``waiter`` in line, right after :meth:`request_nowait` returned None.

        It will be completed with a connection or a slot, or with an exception
        when the pool closes; a thread that stops sleeping without it calls
        :meth:`end_wait_nowait`.
        """
        assert self._lock.locked(), "ThreadPort: call *_nowait methods under the bridge lock"
        self._core.queue.add_waiter(waiter)

    def wait_timeout(self, timeout: float | None) -> float | None:
        """How long a waiter put in line by :meth:`request_nowait` sleeps."""
        timeout = self._core.effective_timeout(timeout)
        return 10.0 if timeout == 0 else timeout

    def end_wait_nowait(
        self, waiter: ThreadWaiter[ConnT], timeout: float | None
    ) -> ConnT | Slot[ConnT]:
        """The thread slept its time out: what it got meanwhile, or :class:`~aiopgpool.PoolTimeout`.

        Also raises the exception the pool completed it with.
        """
        assert self._lock.locked(), "ThreadPort: call *_nowait methods under the bridge lock"
        core = self._core
        if core.queue.leave(waiter):
            core._waited(monotonic() - waiter._start)
            core.counters.timeouts += 1
            raise timeout_error(core, timeout)
        return waiter.result()

    def give_up_wait_nowait(self, waiter: ThreadWaiter[ConnT]) -> None:
        """The waiting thread was interrupted: leave the line, pass on what it got."""
        assert self._lock.locked(), "ThreadPort: call *_nowait methods under the bridge lock"
        core = self._core
        if core.queue.leave(waiter):
            core._waited(monotonic() - waiter._start)
            return
        try:
            got = waiter.result()
        except Exception:
            return
        if isinstance(got, Slot):
            core._preparing -= 1
            core.release_slot(got)
        else:
            slot = core.give_back(got, None, False)
            # Ended here, not with after_return(), which is for the loop.
            if slot is not None and core.end_return(slot) and core.loop is not None:
                # A close() waits for this return: wake it, on its loop.
                core.loop.call_soon_threadsafe(core.closing.all_returned)

    async def prepare(
        self,
        slot: Slot[ConnT],
        key: Hashable | None,
        timeout: float | None,
        start: float,
        waited: bool,
        stack: str | None,
        claim: Claim,
    ) -> ConnT:
        """On the loop: check, replace or connect a slot from :meth:`request_nowait`, lend it.

        ``start`` is the ``time.monotonic()`` at which the request began, ``waited``
        whether it waited in line;
        ``stack`` the borrower's stack, for leak reports. If the caller thread
        gave up meanwhile (``claim.abandoned``), the connection is given back
        here, and returned to nobody.
        """
        core = self._core
        conn = core._lend(await core.validation.prepare(slot, start, timeout, waited), key, stack)
        # The loop holds the bridge's lock from here until the caller's future has
        # this result: the caller reads the claim and the future under that lock.
        if claim.abandoned:
            returned = core.give_back(conn, key, False)
            if returned is not None:
                await core.validation.restore(returned, True)
        return conn

    # -- return ------------------------------------------------------------------------

    def note_bad_return_nowait(self, description: str) -> None:
        """Count (and log) a connection returned in a transaction, in error or mid-query."""
        assert self._lock.locked(), "ThreadPort: call *_nowait methods under the bridge lock"
        self._core.validation.note_bad_return(description)

    def server_trouble_nowait(self, server: object, lost: str | None) -> None:
        """A returned connection broke (``lost`` None) or showed its server is no longer primary."""
        assert self._lock.locked(), "ThreadPort: call *_nowait methods under the bridge lock"
        # No refill from here (a caller thread): the return it finishes on the loop refills.
        if lost is None:
            self._core.validation.test_server(server, refill=False)
        else:
            self._core.validation.forget_server(server, lost, refill=False)

    def discard_nowait(self, slot: Slot[ConnT], reason: str) -> None:
        """Count out a returned connection its thread closed: ``slot`` is free from now on."""
        assert self._lock.locked(), "ThreadPort: call *_nowait methods under the bridge lock"
        self._core.discard(slot, reason)

    async def finish_return(self, slot: Slot[ConnT], close: bool) -> None:
        """On the loop: the rest of a return begun with ``PoolCore.give_back`` under the lock.

        ``close``: the connection was closed and counted out (:meth:`discard_nowait`);
        only its slot goes back.
        """
        await self._core.validation.restore(slot, close)

    def held_by_key_nowait(self, key: Hashable) -> ConnT | None:
        """The connection checked out under ``key``, if any."""
        assert self._lock.locked(), "ThreadPort: call *_nowait methods under the bridge lock"
        return self._core.held_by_key(key)
