"""The sync twin of :class:`~aiopgpool.AsyncReplicatedPool`: :class:`ReplicatedPool`.

It holds one sync :class:`~aiopgpool.ConnectionPool` per server, so each member keeps
the facade's design (its own loop thread, fast paths in the caller's thread), and
routes in the caller's thread: a checkout reads the topology's published tuple and
calls the chosen member's ``getconn``, with no extra thread hop. The probes are the
async pool's own :class:`~aiopgpool.replica_probe.Prober`, run on an event loop in one
daemon thread per replicated pool; that thread touches only its probe connections, the
members' ``stats()`` (thread-safe) and the topology, whose results it replaces whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from functools import partial
from types import TracebackType
from typing import Any, Generic

import psycopg
from typing_extensions import Self, TypeVar

from .conninfo import ConnectTarget
from .errors import PoolClosed, PoolError
from .lifecycle import INTRANS
from .options import check_timeout, make_name
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
from .replicated import replica_wait
from .stats import PoolStats
from .sync_pool import ConnectionPool

__all__ = ["ReplicatedPool"]

logger = logging.getLogger("aiopgpool")

CT = TypeVar("CT", bound="psycopg.Connection[Any]", default="psycopg.Connection[tuple[Any, ...]]")


class _ProbeThread:
    """The prober's event loop, in a daemon thread of its own."""

    def __init__(self, prober: Prober[Any], name: str) -> None:
        self.prober = prober
        self.first_round = threading.Event()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"aiopgpool-{name}-probe", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self.first_round.set()
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self.prober.run(self.first_round.set)

    def round_now(self) -> None:
        """Run a probe round on the probes' loop now, and wait for it."""
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            raise PoolError("the probes are not running")
        asyncio.run_coroutine_threadsafe(self.prober.round(), loop).result()

    def stop(self, wait: bool = True) -> None:
        """Cancel the probes and end the thread; ``wait``: join it (unless called from it)."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(task.cancel)
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)


class ReplicatedPool(Generic[CT]):
    """A primary and read replicas, each with its own thread-safe :class:`ConnectionPool`.

    The same API as :class:`~aiopgpool.AsyncReplicatedPool`, blocking::

        with ReplicatedPool(primary="host=db1 dbname=app",
                            replicas=["host=db2 dbname=app"]) as pool:
            with pool.connection(read_only=True) as conn:
                conn.execute("SELECT 1")
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
        members: list[Member[ConnectionPool[CT]]] = []
        for configured, label, conninfo in [("primary", "primary", primary)] + [
            ("replica", f"replica-{i}", c) for i, c in enumerate(replicas, 1)
        ]:
            member_name = f"{name}.{label}"
            pool: ConnectionPool[CT] = ConnectionPool(conninfo, name=member_name, **options)
            target = ConnectTarget(conninfo, options.get("kwargs"), f"{name}.probe")
            members.append(Member(member_name, configured, pool, target, pool.max_size))
        self._members = members
        self._by_name = {m.name: m for m in members}
        self._topology: Topology[ConnectionPool[CT]] = Topology(
            name, members, lag, interval, _in_use
        )
        self._probes = _ProbeThread(Prober(self._topology), name)
        self._keyed: dict[Hashable, Member[ConnectionPool[CT]]] = {}
        self._replica_wait = replica_wait(interval)
        self._state = "new"
        self._lock = threading.Lock()
        # Dropped without close(): the probe thread ends (the members have their own).
        weakref.finalize(self, self._probes.stop, False).atexit = False
        if open:  # as ConnectionPool: started, connections come in the background
            try:
                self.open()
            except BaseException:
                self.close(0)  # the caller gets no object to close
                raise

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
    def primary(self) -> ConnectionPool[CT]:
        """The member pool that serves writes now (it changes after a failover)."""
        return self._topology.primary.pool

    @property
    def pools(self) -> dict[str, ConnectionPool[CT]]:
        """Every member pool, by name, the configured primary first."""
        return {m.name: m.pool for m in self._members}

    def members(self) -> dict[str, MemberStatus]:
        """Each member as the last probe saw it: role, lag, position, in use."""
        return {m.name: m.status() for m in self._members}

    def __repr__(self) -> str:
        roles = ", ".join(f"{m.name}={m.role}" for m in self._members)
        return f"<{type(self).__name__} {self._name!r} {self._state} ({roles})>"

    # -- opening and closing ---------------------------------------------------------

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open every member and start the probes (see ``AsyncReplicatedPool.open``)."""
        with self._lock:
            if self._state == "closed":
                raise PoolClosed(f"pool {self._name!r} is closed and cannot be reopened")
            # In parallel: open(wait=True) takes one timeout at most, not one per member.
            self._on_each(partial(self._open_member, wait=wait, timeout=timeout))
            if self._state == "new":
                self._probes.start()
                self._state = "open"
        if wait:
            self._probes.first_round.wait(timeout)

    def _open_member(self, m: Member[ConnectionPool[CT]], wait: bool, timeout: float) -> None:
        try:
            m.pool.open(wait, timeout)
        except PoolError as exc:
            if m.configured == "primary":
                raise
            logger.warning(
                "replicated pool %r: %s did not open (%s); it gets no reads until it does",
                self._name,
                m.name,
                exc,
            )

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _stop_probes(self) -> None:
        with self._lock:
            self._state = "closed"
        self._probes.stop()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, wait up to ``timeout`` for borrowed connections, close all.

        The members close in parallel (one thread each), so the whole takes ``timeout``
        at most, not one ``timeout`` per member.
        """
        check_timeout("timeout", timeout, allow_none=False)  # before anything stops
        self._stop_probes()
        self._on_each(lambda m: m.pool.close(timeout))

    def closeall(self) -> None:
        """Close every connection of every member now, borrowed ones included."""
        if self._state == "closed" and all(m.pool.closed for m in self._members):
            raise PoolClosed(f"pool {self._name!r} is already closed")
        self._stop_probes()
        self._on_each(lambda m: m.pool.closeall())

    def _on_each(self, call: Callable[[Member[ConnectionPool[CT]]], Any]) -> None:
        """``call(member)`` for every member, in parallel; the first error is raised."""
        errors: list[BaseException] = []

        def run(member: Member[ConnectionPool[CT]]) -> None:
            try:
                call(member)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(m,)) for m in self._members[1:]]
        for thread in threads:
            thread.start()
        run(self._members[0])
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    # -- checkout and return -----------------------------------------------------------

    def getconn(
        self,
        timeout: float | None = None,
        *,
        read_only: bool = False,
        min_lsn: int | str | None = None,
        key: Hashable | None = None,
    ) -> CT:
        """A connection to the primary, or with ``read_only=True`` to a replica (see
        ``AsyncReplicatedPool.getconn``)."""
        if key is not None:
            keyed = self._keyed.get(key)
            if keyed is not None and (keyed is self._topology.primary or read_only):
                conn = keyed.pool.getconn(timeout, key=key)
                setattr(conn, LENDER, keyed.ref)
                return conn
        if not read_only:
            if self._state != "open":
                raise self._closed_error()
            member = self._topology.primary
            conn = member.pool.getconn(timeout, key=key)
            self._lend(conn, member, key)
            return conn
        return self._read(timeout, min_lsn, key)

    def _lend(self, conn: CT, member: Member[ConnectionPool[CT]], key: Hashable | None) -> None:
        member.busy += 1  # a hint for the least-busy choice; made exact at each probe round
        setattr(conn, LENDER, member.ref)
        if key is not None:
            self._keyed[key] = member

    def _closed_error(self) -> PoolClosed:
        if self._state == "new":
            return PoolClosed(f"pool {self._name!r} is not open yet")
        return PoolClosed(f"pool {self._name!r} is closed")

    def _read(self, timeout: float | None, min_lsn: int | str | None, key: Hashable | None) -> CT:
        if self._state != "open":
            raise self._closed_error()
        lsn = None if min_lsn is None else parse_lsn(min_lsn)
        topology = self._topology
        member, live = topology.pick_replica(lsn)
        if member is None:
            primary = topology.primary
            conn = primary.pool.getconn(timeout, key=key)
            self._lend(conn, primary, key)
            return conn
        limit = member.pool.timeout if timeout is None else check_timeout("timeout", timeout)
        deadline = None if limit is None else time.monotonic() + limit
        wait = self._replica_wait if limit is None or limit > self._replica_wait else limit
        full = False
        tried: list[Member[ConnectionPool[CT]]] = []
        while member is not None:
            if tried and deadline is not None:
                wait = max(0.0, min(self._replica_wait, deadline - time.monotonic()))
            tried.append(member)
            try:
                conn = member.pool.getconn(wait, key=key)
            except PoolClosed:
                raise
            except psycopg.OperationalError as exc:
                if not isinstance(exc, PoolError) or exc.__cause__ is not None:
                    topology.mark_down(member, exc)  # a connection error: down
                else:
                    full = True  # PoolTimeout, TooManyRequests: full, not down
            else:
                if not live or self._replayed(conn, member, lsn):
                    self._lend(conn, member, key)
                    return conn
                break  # the most advanced replica is not there yet: the primary
            member, live = topology.pick_replica(lsn, tried)
            if full and member is not None and member.busy >= member.capacity:
                break  # the least busy was full, so is this one: no second wait
        primary = topology.primary
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        conn = primary.pool.getconn(left, key=key)
        self._lend(conn, primary, key)
        return conn

    def _replayed(self, conn: CT, member: Member[ConnectionPool[CT]], lsn: int | None) -> bool:
        ok = False
        try:
            idle = conn.pgconn.transaction_status != INTRANS
            row = conn.execute(REPLAYED_SQL, (lsn,)).fetchone()
            ok = bool(row and row[0])
            if idle and not conn.autocommit:
                conn.rollback()
        except Exception:
            ok = False
        finally:
            if not ok:
                member.pool.putconn(conn)
        return ok

    def _member_of(self, conn: CT) -> Member[ConnectionPool[CT]]:
        return lender_of(conn, self._by_name, self._name)

    def putconn(self, conn: CT, key: Hashable | None = None, close: bool = False) -> None:
        """Give a connection back to the member that lent it (see ``ConnectionPool``)."""
        member = self._member_of(conn)
        if member.busy:
            member.busy -= 1
        if key is not None:
            self._keyed.pop(key, None)
        member.pool.putconn(conn, key, close)

    @contextlib.contextmanager
    def connection(
        self,
        timeout: float | None = None,
        *,
        read_only: bool = False,
        min_lsn: int | str | None = None,
    ) -> Iterator[CT]:
        """``with pool.connection(read_only=True) as conn``: getconn, commit or roll back,
        putconn."""
        conn = self.getconn(timeout, read_only=read_only, min_lsn=min_lsn)
        with self._member_of(conn).pool._lent(conn, self.putconn):
            yield conn

    def current_lsn(self, conn: CT) -> str:
        """See ``AsyncReplicatedPool.current_lsn``: call it after the write's commit."""
        if conn.pgconn.transaction_status != IDLE:
            raise PoolError(UNCOMMITTED)
        row = conn.execute(CURRENT_LSN_SQL).fetchone()
        if not conn.autocommit:
            conn.rollback()
        assert row is not None
        return format_lsn(int(row[0]))

    # -- the whole set ---------------------------------------------------------------------

    def probe(self) -> None:
        """Probe every member now (roles and lags), without waiting for the next round."""
        if self._state != "open":  # its connections would outlive the pool
            raise self._closed_error()
        self._probes.round_now()

    def check(self) -> None:
        """``check()`` on every member."""
        self._on_each(lambda m: m.pool.check())

    def drain(self) -> None:
        """``drain()`` on every member: every connection is replaced."""
        self._on_each(lambda m: m.pool.drain())

    def stats(self) -> dict[str, PoolStats]:
        """One :class:`PoolStats` per member, by member name."""
        return {m.name: m.pool.stats() for m in self._members}

    def get_stats(self) -> dict[str, dict[str, int]]:
        """psycopg_pool's counters per member, by member name."""
        return {m.name: m.pool.get_stats() for m in self._members}

    def pop_stats(self) -> dict[str, dict[str, int]]:
        """:meth:`get_stats`, then reset every member's counters."""
        return {m.name: m.pool.pop_stats() for m in self._members}


def _in_use(pool: ConnectionPool[Any]) -> int:
    return pool.stats().in_use
