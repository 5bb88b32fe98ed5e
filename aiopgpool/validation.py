"""Validation: the slow paths of checkout and return, which keep connections fit to lend.

On the way out, a slot taken for a request may hold an idle connection
whose socket test is due, one idle past ``ping_after_idle``, or none:
:meth:`Validation.prepare` tests (or probes) it, runs the user's ``check``,
replaces it when it fails, or opens a connection on a free slot, within the
request's deadline. On the way back, :meth:`Validation.restore` rolls back,
restores attributes, runs the user's ``reset``, or discards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Hashable
from time import monotonic
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .backoff import Backoff
from .errors import PoolClosed, PoolError, PoolTimeout
from .slot import Slot, mark_tested

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["Validation"]

logger = logging.getLogger("aiopgpool")

#: Longest wait, in seconds, for the round trip of a checkout probe (a connection idle past
#: ``ping_after_idle``, or whose socket was not quiet): a server behind a silent network
#: partition never answers, and the request must neither hang nor outlive its deadline.
PROBE_TIMEOUT = 5.0

ConnT = TypeVar("ConnT")


async def _within(probe: Coroutine[Any, Any, None], limit: float) -> None:
    """Await ``probe``; TimeoutError when it has not finished within ``limit`` seconds.

    Not ``asyncio.wait_for``: cancelled mid-query, psycopg first sends the
    server a cancel request and waits for the query to end (5 s each), which a
    partitioned server never answers. Interrupted a second time, psycopg
    closes the connection at once (psycopg #1435): the probe is cancelled
    twice, and the connection, discarded anyway, goes quickly.
    """
    task = asyncio.ensure_future(probe)
    try:
        done, _ = await asyncio.wait({task}, timeout=limit)
    except BaseException:
        task.cancel()
        raise
    if done:
        task.result()
        return
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: no "exception never retrieved" warning
    raise TimeoutError(f"no answer within {limit:.3g} s")


class Validation(Generic[ConnT]):
    """Prepares slots for lending, for one :class:`~aiopgpool.core.PoolCore`."""

    __slots__ = ("_core",)

    def __init__(self, core: PoolCore[ConnT]) -> None:
        self._core = core

    async def prepare(
        self, slot: Slot[ConnT], start: float | None, timeout: float | None, waited: bool
    ) -> Slot[ConnT]:
        """Make a slot's connection usable: test it, or replace it, or open one.

        ``start``: when the request began (None: now). The caller counted the
        slot in the core's ``_preparing``; this counts it out. On failure the
        slot goes back to the pool.

        ``waited``: the request waited in line, and its wait is counted. One that
        did not, but has to open a connection, waits for it: it is counted as a
        waited request (as psycopg_pool counts it) and pending while it connects
        (not in a null pool, where every checkout connects).
        """
        core = self._core
        connecting = False
        if start is None:
            start = monotonic()
        try:
            core.check_loop()
            timeout = core.effective_timeout(timeout)
            # A slot had at once (timeout=0) still gets connected within the
            # pool's own timeout; when that is 0 too (psycopg2's "fail at
            # once"), one attempt is made and its error raised, as
            # psycopg2.pool does.
            budget = timeout or core.timeout
            deadline = None if budget is None else start + budget
            retry = budget != 0
            backoff: Backoff | None = None
            check_error: Exception | None = None
            while True:
                if slot.conn is not None:
                    core.checking.add(slot)
                    try:
                        usable = await self._usable(slot, deadline)
                    finally:
                        core.checking.discard(slot)
                    if usable:
                        if core.state != "open":  # closing or closed while we checked it
                            raise core.closed_error()
                        return slot
                    swapped = core.queue.swap_top(slot)
                    if swapped is not None:
                        slot = swapped
                    continue
                if not waited and not connecting and not core.null:
                    # Counted as it starts waiting (as a queued request is): counted at
                    # the end, it would show as a wait of 0 meanwhile, then move.
                    connecting = True
                    core.connecting_borrowers += 1
                    core.counters.requests_waited += 1
                try:
                    got = await core.connector.connect(
                        slot, None if not retry else deadline, retry=retry, borrower=True
                    )
                except PoolTimeout as exc:
                    if check_error is None or exc.__cause__ is not None:
                        raise
                    raise PoolTimeout(
                        f"pool {core.name!r}: no connection passed the check before the deadline"
                    ) from check_error
                if got is not slot:  # a connection given back while connecting failed
                    slot = got
                    continue
                core.connector.notify_size()
                core.checking.add(slot)
                try:
                    check_error = await self._checked(slot)
                finally:
                    core.checking.discard(slot)
                if check_error is None:
                    if core.state != "open":  # closing or closed while it connected
                        raise core.closed_error()
                    return slot
                # A fresh connection failed the check: back off as after a failed
                # connect, and give up at the deadline with the check's error chained.
                backoff = backoff or Backoff()
                delay = backoff.next()
                if retry and deadline is not None:
                    delay = min(delay, deadline - monotonic())
                if retry and delay > 0:
                    await asyncio.sleep(delay)
                if not retry or (deadline is not None and monotonic() >= deadline):
                    raise PoolTimeout(
                        f"pool {core.name!r}: no connection passed the check before the deadline"
                    ) from check_error
        except PoolTimeout:
            core.counters.timeouts += 1
            core.release_slot(slot)
            raise
        except BaseException:
            core.release_slot(slot)
            raise
        finally:
            core._preparing -= 1
            if connecting:
                core.connecting_borrowers -= 1
                core._waited(monotonic() - start)

    async def _usable(self, slot: Slot[ConnT], deadline: float | None = None) -> bool:
        """Whether a connected slot can be handed out; discards it if not.

        A probe lasts at most :data:`PROBE_TIMEOUT`, and never past ``deadline``.
        """
        core = self._core
        conn = slot.conn
        assert conn is not None
        now = monotonic()
        if slot.expires_at <= now:
            core.discard(slot, "max_lifetime reached")
            return False
        ping = core.ping_after_idle
        lifecycle = core.lifecycle
        probed = False
        if not slot.quiet() or (ping is not None and now - slot.returned_at > ping):
            limit = PROBE_TIMEOUT if deadline is None else min(PROBE_TIMEOUT, deadline - now)
            try:
                await _within(lifecycle.probe(conn), max(limit, 0.001))
            except Exception as exc:
                core.discard(slot, f"dead while idle ({exc.__class__.__name__})", lost=True)
                return False
            probed = True
        if await self._checked(slot) is not None:
            return False
        # A round trip brings the server's reports: one saying it is no longer a writable
        # primary must keep this connection from being handed out.
        if (
            lifecycle.tracks_role
            and (probed or lifecycle.has_check)
            and not await self.role_check(slot, deadline=deadline)
        ):
            return False
        if slot.generation != core.generation:  # drained while we checked it
            core.discard(slot, "drained")
            return False
        mark_tested(slot, monotonic())
        return True

    async def _checked(self, slot: Slot[ConnT]) -> Exception | None:
        """Run the user's ``check`` (if any) on a slot's connection: its error, if it failed.

        A connection that fails it is discarded.
        """
        core = self._core
        lifecycle = core.lifecycle
        if not lifecycle.has_check:
            return None
        conn = slot.conn
        assert conn is not None
        try:
            await lifecycle.check(conn)
        except Exception as exc:
            core.discard(slot, f"check failed ({exc.__class__.__name__}: {exc})", lost=True)
            return exc
        return None

    def unkey(self, conn: ConnT, slot: Slot[ConnT], key: Hashable | None) -> None:
        """A return of a connection taken or returned under a key: free the key.

        Raises :class:`PoolError` (the connection stays borrowed) when ``key``
        is not the one it was taken under.
        """
        core = self._core
        held = core._key_of.get(conn)
        if key is not None and held != key:
            core._borrowed[conn] = slot
            raise PoolError(
                f"pool {core.name!r}: this connection was taken "
                + ("without a key" if held is None else f"under key {held!r}")
                + f", not {key!r}"
            )
        if held is not None:
            del core._key_of[conn]
            del core._keyed[held]

    def not_borrowed(self, conn: ConnT, slot: Slot[ConnT] | None) -> PoolError:
        """The error for a return of a connection this pool did not lend (or lent and got back)."""
        core = self._core
        if slot is not None and slot.conn is not None:
            # another connection that compares equal to it: put that one back
            core._borrowed[slot.conn] = slot
        if core.state == "closed":
            return PoolClosed(f"pool {core.name!r} is closed")
        return PoolError(
            f"pool {core.name!r}: this connection is not borrowed from this pool "
            "(a foreign connection, or returned twice)"
        )

    async def restore(self, slot: Slot[ConnT], close: bool) -> None:
        """The rest of a return that needs work: clean, reset, expire or discard.

        ``close``: discard it; its connection may be closed and counted out
        already (the sync facade does that in the borrower's thread), and then
        only the slot goes back.
        """
        core = self._core
        conn = slot.conn
        lifecycle = core.lifecycle
        try:
            if close:
                core.discard(slot, "closed by its borrower")  # nothing to do if done already
            elif core.state != "open" or core.null or core.excess:
                if conn is not None and lifecycle.is_bad_return(conn):
                    self.note_bad_return(lifecycle.describe_state(conn))  # counted all the same
                core.discard(slot, "not kept")
            elif slot.generation != core.generation:
                core.discard(slot, "drained")
            else:
                assert conn is not None
                core.check_loop()
                if lifecycle.is_bad_return(conn):
                    self.note_bad_return(lifecycle.describe_state(conn))
                failed = lifecycle.tracks_role and lifecycle.in_failed_transaction(conn)
                if not lifecycle.is_clean(conn, slot.baseline) and not await lifecycle.clean(
                    conn, slot.baseline
                ):
                    if lifecycle.tracks_role:
                        self.test_server(slot.server)
                    core.discard(slot, "could not be cleaned after return")
                elif lifecycle.tracks_role and not await self.role_check(slot, failed=failed):
                    pass  # discarded, with every connection to its server if that changed role
                elif lifecycle.has_reset and not await self._reset(conn):
                    core.discard(slot, "reset failed or left it unusable")
                elif slot.expires_at <= monotonic():
                    core.discard(slot, "max_lifetime reached")
        except BaseException as exc:
            # Cleaning failed or was interrupted (the borrower cancelled again):
            # the connection is in an unknown state, so it goes; the slot stays.
            core.discard(slot, f"cleaning failed ({exc.__class__.__name__})")
            if not isinstance(exc, Exception):
                raise
            logger.warning("pool %r: discarded a returned connection: %s", core.name, exc)
        finally:
            slot.returned_at = monotonic()
            core.after_return(slot)

    async def _reset(self, conn: ConnT) -> bool:
        """Run the user's ``reset``; False (logged at WARNING) when it failed."""
        core = self._core
        try:
            if await core.lifecycle.reset(conn):
                return True
            logger.warning("pool %r: reset left a connection unusable", core.name)
        except Exception as exc:
            logger.warning(
                "pool %r: reset of a returned connection failed, discarded: %s: %s",
                core.name,
                exc.__class__.__name__,
                exc,
            )
        return False

    def note_bad_return(self, description: str) -> None:
        """Count (and log at WARNING) a connection returned in a bad state."""
        core = self._core
        core.counters.returns_bad += 1
        logger.warning("pool %r: a connection was returned %s", core.name, description)

    # -- role tracking ------------------------------------------------------------------

    def forget_server(
        self,
        server: Any,
        reason: str,
        *,
        refill: bool = True,
        held: list[Slot[ConnT]] | None = None,
    ) -> None:
        """``server`` is no longer a writable primary: replace every connection to it.

        Idle ones go now, borrowed ones when they come back; new connections
        go through the conninfo again (``target_session_attrs`` finds the
        primary). ``refill=False``: the caller is not on the loop, and a
        return it finishes there refills. ``held``: idle slots the caller took
        out of the queue and holds; those to ``server`` go too (removed from it).
        """
        core = self._core
        idle = core.queue.take(lambda slot: slot.server == server)
        if held:
            mine = [slot for slot in held if slot.server == server]
            held[:] = [slot for slot in held if slot.server != server]
            idle += mine
        borrowed = [slot for slot in core.borrowed.values() if slot.server == server]
        logger.warning(
            "pool %r: server %s is no longer a writable primary (%s): replacing its "
            "%d idle and %d borrowed connections",
            core.name,
            _server_words(server),
            reason,
            len(idle),
            len(borrowed),
        )
        for slot in borrowed:
            # Expired, so that its return leaves the hot path; an old generation, so
            # that the slow path discards it.
            slot.expires_at = 0.0
            slot.generation = -1
        for slot in idle:
            core.discard(slot, f"server no longer primary ({reason})")
            core.release_slot(slot)
        if refill:
            core.connector.fill()

    def test_server(self, server: Any, *, refill: bool = True) -> None:
        """A connection to ``server`` broke: test its idle ones now, replace the dead."""
        core = self._core
        for slot in core.queue.take(lambda slot: slot.server == server):
            if not slot.quiet():
                core.discard(slot, "dead (its server dropped another connection)", lost=True)
            core.release_slot(slot)
        if refill:
            core.connector.fill()

    async def role_check(
        self,
        slot: Slot[ConnT],
        *,
        failed: bool = False,
        deadline: float | None = None,
        held: list[Slot[ConnT]] | None = None,
    ) -> bool:
        """After a round trip on a role-tracking pool's connection: may it still be lent?

        False, and the connection discarded, when it shows that its server is
        no longer a writable primary (every connection to that server is then
        replaced, see :meth:`forget_server`), or that only its own session was
        made read-only (a borrower's ``SET default_transaction_read_only``:
        only it goes, logged at DEBUG). A report of read-only sessions, or
        ``failed`` (it came back in a failed transaction, perhaps a refused
        write), costs one more round trip, within :data:`PROBE_TIMEOUT` and
        ``deadline``: the server tells whether it is its setting. ``held``: as
        for :meth:`forget_server` (``pool.check()``'s slots). Always True on a
        pool that does not track roles.
        """
        core = self._core
        lifecycle = core.lifecycle
        conn = slot.conn
        if not lifecycle.tracks_role or conn is None:
            return True
        lost = lifecycle.role_lost(conn)
        if lost is None:
            session_only = lifecycle.turned_read_only(conn, slot.baseline)
            if not (failed or session_only):
                return True
            answer: list[str | None] = []

            async def ask() -> None:
                answer.append(await lifecycle.ask_role(conn))

            limit = (
                PROBE_TIMEOUT if deadline is None else min(PROBE_TIMEOUT, deadline - monotonic())
            )
            try:
                await _within(ask(), max(limit, 0.001))
            except Exception as exc:
                core.discard(slot, f"role query failed ({exc.__class__.__name__})", lost=True)
                return False
            lost = answer[0]
            if lost is None:
                if not session_only:
                    return True
                core.discard(
                    slot,
                    "its session was made read-only (default_transaction_read_only=on); "
                    "the server is still a writable primary",
                )
                return False
        self.forget_server(slot.server, lost, held=held)
        core.discard(slot, f"server no longer primary ({lost})")
        return False


def _server_words(server: Any) -> str:
    try:
        host, port = (part.decode() for part in server)
    except Exception:
        return repr(server)
    return f"{host}:{port}"
