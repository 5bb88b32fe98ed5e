"""One primary and read replicas behind one asyncio pool: :class:`AsyncReplicatedPool`.

The replicated pool holds one :class:`~aiopgpool.AsyncConnectionPool` per server (a
*member*, every option applied to each) and routes each checkout to one of them: writes
to the primary, reads to the least busy replica within ``max_replica_lag`` (else the
primary). Roles and lags come from background probes (see
:mod:`aiopgpool.replica_probe`); a checkout only reads their last published result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from types import TracebackType
from typing import Any, Generic

import psycopg
from typing_extensions import Self, TypeVar

from .conninfo import ConnectTarget
from .core import PoolCore
from .errors import PoolClosed, PoolError
from .lifecycle import INTRANS
from .options import check_timeout, make_name
from .pool import AsyncConnectionPool, _ConnectionContext
from .replica_probe import (
    CURRENT_LSN_SQL,
    IDLE,
    LENDER,
    REPLAYED_SQL,
    UNCOMMITTED,
    Member,
    MemberStatus,
    Prober,
    Topology,
    check_setup,
    format_lsn,
    lender_of,
    parse_lsn,
)
from .stats import PoolStats

__all__ = ["AsyncReplicatedPool"]

logger = logging.getLogger("aiopgpool")

ACT = TypeVar(
    "ACT",
    bound="psycopg.AsyncConnection[Any]",
    default="psycopg.AsyncConnection[tuple[Any, ...]]",
)

#: Longest wait for a replica's connection before the read goes elsewhere (the
#: replica is then down or saturated); the request's own timeout bounds it too.
REPLICA_WAIT = 1.0


def replica_wait(probe_interval: float) -> float:
    """How long a read waits on one replica before trying elsewhere."""
    return max(REPLICA_WAIT, probe_interval)


class AsyncReplicatedPool(Generic[ACT]):
    """A primary and read replicas, each with its own :class:`AsyncConnectionPool`.

    ::

        async with AsyncReplicatedPool(primary="host=db1 dbname=app",
                                       replicas=["host=db2 dbname=app"]) as pool:
            async with pool.connection() as conn: ...               # the primary
            async with pool.connection(read_only=True) as conn: ... # a replica

    See the README's "Read replicas" for the routing, the probes and what they cost.
    """

    def __init__(
        self,
        primary: str | Callable[[], Any],
        replicas: Sequence[str | Callable[[], Any]],
        *,
        max_replica_lag: float | None = 1.0,
        probe_interval: float = 1.0,
        name: str | None = None,
        open: bool = False,
        **options: Any,
    ) -> None:
        replicas, lag, interval = check_setup(
            primary, replicas, max_replica_lag, probe_interval, options.get("kwargs")
        )
        self._name = name = make_name(name)
        members: list[Member[AsyncConnectionPool[ACT]]] = []
        for configured, label, conninfo in [("primary", "primary", primary)] + [
            ("replica", f"replica-{i}", c) for i, c in enumerate(replicas, 1)
        ]:
            member_name = f"{name}.{label}"
            pool: AsyncConnectionPool[ACT] = AsyncConnectionPool(
                conninfo, name=member_name, open=open, **options
            )
            target = ConnectTarget(conninfo, options.get("kwargs"), f"{name}.probe")
            members.append(Member(member_name, configured, pool, target, pool.max_size))
        self._members = members
        self._by_name = {m.name: m for m in members}
        self._topology: Topology[AsyncConnectionPool[ACT]] = Topology(
            name, members, lag, interval, _in_use
        )
        self._prober: Prober[AsyncConnectionPool[ACT]] = Prober(self._topology)
        self._task: asyncio.Task[None] | None = None
        self._first_round: asyncio.Event | None = None
        # Which member lent a connection: a connection belongs to one member for life.
        self._keyed: dict[Hashable, Member[AsyncConnectionPool[ACT]]] = {}
        self._replica_wait = replica_wait(interval)
        self._state = "new"
        if open:  # the members opened themselves (or raised without a running loop)
            self._start_prober()

    # -- attributes ------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The pool's name; members are ``"{name}.primary"``, ``"{name}.replica-N"``."""
        return self._name

    @property
    def closed(self) -> bool:
        """True unless the pool is open: before ``open()`` and once closed."""
        return self._state != "open"

    @property
    def primary(self) -> AsyncConnectionPool[ACT]:
        """The member pool that serves writes now (it changes after a failover)."""
        return self._topology.primary.pool

    @property
    def pools(self) -> dict[str, AsyncConnectionPool[ACT]]:
        """Every member pool, by name, the configured primary first."""
        return {m.name: m.pool for m in self._members}

    def members(self) -> dict[str, MemberStatus]:
        """Each member as the last probe saw it: role, lag, position, in use."""
        return {m.name: m.status() for m in self._members}

    def __repr__(self) -> str:
        roles = ", ".join(f"{m.name}={m.role}" for m in self._members)
        return f"<{type(self).__name__} {self._name!r} {self._state} ({roles})>"

    # -- opening and closing ---------------------------------------------------------

    async def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open every member and start the probes.

        ``wait=True``: wait until every member has ``min_size`` connections and for the
        first probe round, so that reads go to the replicas from the first checkout
        (without it, reads go to the primary until that round is done, a few
        milliseconds). Only the configured primary's :class:`PoolTimeout` is raised: a
        replica that does not open in time is logged (WARNING) and gets no reads until
        its probes answer.
        """
        if self._state == "closed":
            raise PoolClosed(f"pool {self._name!r} is closed and cannot be reopened")
        results = await asyncio.gather(
            *(m.pool.open(wait, timeout) for m in self._members), return_exceptions=True
        )
        for member, result in zip(self._members, results, strict=True):
            if isinstance(result, BaseException):
                if member.configured == "primary" or not isinstance(result, PoolError):
                    raise result
                logger.warning(
                    "replicated pool %r: %s did not open (%s); it gets no reads until it does",
                    self._name,
                    member.name,
                    result,
                )
        self._start_prober()
        if wait:
            assert self._first_round is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._first_round.wait(), timeout)

    def _start_prober(self) -> None:
        self._state = "open"
        if self._task is None:
            self._first_round = first = asyncio.Event()
            self._task = task = asyncio.create_task(
                self._prober.run(first.set), name=f"aiopgpool-{self._name}-probe"
            )
            # Dropped without close(): the probes stop (the task holds the members, not
            # this pool), and the members are then collected and closed as any pool is.
            weakref.finalize(self, _cancel_soon, asyncio.get_running_loop(), task).atexit = False

    async def _stop_prober(self) -> None:
        self._state = "closed"
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, wait up to ``timeout`` for borrowed connections, close all."""
        check_timeout("timeout", timeout, allow_none=False)  # before anything stops
        await self._stop_prober()
        await asyncio.gather(*(m.pool.close(timeout) for m in self._members))

    async def closeall(self) -> None:
        """Close every connection of every member now, borrowed ones included."""
        if self._state == "closed" and all(m.pool.closed for m in self._members):
            raise PoolClosed(f"pool {self._name!r} is already closed")
        await self._stop_prober()
        results = await asyncio.gather(
            *(m.pool.closeall() for m in self._members), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- checkout and return -----------------------------------------------------------

    async def getconn(
        self,
        timeout: float | None = None,
        *,
        read_only: bool = False,
        min_lsn: int | str | None = None,
        key: Hashable | None = None,
    ) -> ACT:
        """A connection to the primary, or with ``read_only=True`` to a replica.

        A read goes to the least busy replica within ``max_replica_lag`` that has
        replayed ``min_lsn`` (when given), else to the primary. A replica that cannot
        lend one within a second (or ``probe_interval``) is skipped until its next good
        probe. ``timeout`` bounds the whole request.
        """
        if key is not None:
            keyed = self._keyed.get(key)
            if keyed is not None and (keyed is self._topology.primary or read_only):
                conn = await keyed.pool.getconn(timeout, key=key)
                setattr(conn, LENDER, keyed.ref)
                return conn
        if not read_only:
            if self._state != "open":
                raise self._closed_error()
            member = self._topology.primary
            conn = await member.pool.getconn(timeout, key=key)
            self._lend(conn, member, key)
            return conn
        return await self._read(timeout, min_lsn, key)

    def _lend(
        self, conn: ACT, member: Member[AsyncConnectionPool[ACT]], key: Hashable | None
    ) -> None:
        member.busy += 1
        setattr(conn, LENDER, member.ref)
        if key is not None:
            self._keyed[key] = member

    def _closed_error(self) -> PoolClosed:
        if self._state == "new":
            return PoolClosed(f"pool {self._name!r} is not open yet")
        return PoolClosed(f"pool {self._name!r} is closed")

    async def _read(
        self, timeout: float | None, min_lsn: int | str | None, key: Hashable | None
    ) -> ACT:
        if self._state != "open":
            raise self._closed_error()
        lsn = None if min_lsn is None else parse_lsn(min_lsn)
        topology = self._topology
        member, live = topology.pick_replica(lsn)
        if member is None:  # no replica qualifies: the usual answer, no clock read
            primary = topology.primary
            conn = await primary.pool.getconn(timeout, key=key)
            self._lend(conn, primary, key)
            return conn
        limit = member.pool.timeout if timeout is None else check_timeout("timeout", timeout)
        deadline = None if limit is None else time.monotonic() + limit
        wait = self._replica_wait if limit is None or limit > self._replica_wait else limit
        full = False
        tried: list[Member[AsyncConnectionPool[ACT]]] = []
        while member is not None:
            if tried and deadline is not None:
                wait = max(0.0, min(self._replica_wait, deadline - time.monotonic()))
            tried.append(member)
            try:
                conn = await member.pool.getconn(wait, key=key)
            except PoolClosed:
                raise
            except psycopg.OperationalError as exc:
                if not isinstance(exc, PoolError) or exc.__cause__ is not None:
                    topology.mark_down(member, exc)  # a connection error: down
                else:
                    full = True  # PoolTimeout, TooManyRequests: full, not down
            else:
                if not live or await self._replayed(conn, member, lsn):
                    self._lend(conn, member, key)
                    return conn
                break  # the most advanced replica is not there yet: the primary
            member, live = topology.pick_replica(lsn, tried)
            if full and member is not None and member.busy >= member.capacity:
                break  # the least busy was full, so is this one: no second wait
        primary = topology.primary
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        conn = await primary.pool.getconn(left, key=key)
        self._lend(conn, primary, key)
        return conn

    async def _replayed(
        self, conn: ACT, member: Member[AsyncConnectionPool[ACT]], lsn: int | None
    ) -> bool:
        """Has this replica replayed ``lsn`` now? (its last probe said not yet); if not,
        its connection goes back."""
        ok = False
        try:
            idle = conn.pgconn.transaction_status != INTRANS
            cur = await conn.execute(REPLAYED_SQL, (lsn,))
            row = await cur.fetchone()
            ok = bool(row and row[0])
            if idle and not conn.autocommit:
                await conn.rollback()  # the reader's snapshot starts with its own query
        except Exception:
            ok = False
        finally:
            if not ok:
                await member.pool.putconn(conn)
        return ok

    def _member_of(self, conn: ACT) -> Member[AsyncConnectionPool[ACT]]:
        return lender_of(conn, self._by_name, self._name)

    def _core_for(self, conn: ACT) -> PoolCore[ACT]:
        """The core of the member that lent ``conn`` (for ``connection()``'s exit)."""
        return self._member_of(conn).pool._core

    async def putconn(self, conn: ACT, key: Hashable | None = None, close: bool = False) -> None:
        """Give a connection back to the member that lent it (see ``AsyncConnectionPool``)."""
        member = self._member_of(conn)
        if member.busy:
            member.busy -= 1
        if key is not None:
            self._keyed.pop(key, None)
        await member.pool.putconn(conn, key, close)

    def connection(
        self,
        timeout: float | None = None,
        *,
        read_only: bool = False,
        min_lsn: int | str | None = None,
    ) -> _ReplicatedContext[ACT]:
        """``async with pool.connection(read_only=True) as conn``: getconn, then putconn.

        Commits on success and rolls back on error, as ``async with conn`` does.
        """
        return _ReplicatedContext(self, timeout, read_only, min_lsn)

    async def current_lsn(self, conn: ACT) -> str:
        """The WAL position a later ``min_lsn`` read must have replayed to see what
        ``conn`` committed: on a primary its WAL insert position (``'16/B374D848'``),
        on a replica its replay position. Call it after the commit: in a transaction
        (which may not be committed yet) it raises :class:`PoolError`."""
        if conn.pgconn.transaction_status != IDLE:
            raise PoolError(UNCOMMITTED)
        cur = await conn.execute(CURRENT_LSN_SQL)
        row = await cur.fetchone()
        if not conn.autocommit:
            await conn.rollback()
        assert row is not None
        return format_lsn(int(row[0]))

    # -- the whole set ---------------------------------------------------------------------

    async def check(self) -> None:
        """``check()`` on every member."""
        await asyncio.gather(*(m.pool.check() for m in self._members))

    async def drain(self) -> None:
        """``drain()`` on every member: every connection is replaced."""
        await asyncio.gather(*(m.pool.drain() for m in self._members))

    async def probe(self) -> None:
        """Probe every member now (roles and lags), without waiting for the next round."""
        if self._state != "open":  # its connections would outlive the pool
            raise self._closed_error()
        await self._prober.round()

    def stats(self) -> dict[str, PoolStats]:
        """One :class:`PoolStats` per member, by member name."""
        return {m.name: m.pool.stats() for m in self._members}

    def get_stats(self) -> dict[str, dict[str, int]]:
        """psycopg_pool's counters per member, by member name."""
        return {m.name: m.pool.get_stats() for m in self._members}

    def pop_stats(self) -> dict[str, dict[str, int]]:
        """:meth:`get_stats`, then reset every member's counters."""
        return {m.name: m.pool.pop_stats() for m in self._members}


def _cancel_soon(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
    """Cancel ``task`` from any thread (a finalizer runs wherever the last reference goes)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: the task is gone with it
        loop.call_soon_threadsafe(task.cancel)


def _in_use(pool: AsyncConnectionPool[Any]) -> int:
    return pool.stats().in_use


class _ReplicatedContext(_ConnectionContext[ACT]):
    """``connection()`` of a replicated pool: routed by ``read_only``/``min_lsn``; the exit
    (commit on success, putconn) is the plain pool's."""

    __slots__ = ("_lsn", "_read_only")

    def __init__(
        self,
        pool: AsyncReplicatedPool[ACT],
        timeout: float | None,
        read_only: bool,
        min_lsn: int | str | None,
    ) -> None:
        super().__init__(pool, timeout)
        self._read_only = read_only
        self._lsn = min_lsn

    async def __aenter__(self) -> ACT:
        conn = await self._pool.getconn(self._timeout, read_only=self._read_only, min_lsn=self._lsn)
        return self._hold(conn)
