"""What the replicated pools share: the members, the lag probes and the routing choice.

:class:`AsyncReplicatedPool <aiopgpool.replicated.AsyncReplicatedPool>` and its sync twin
:class:`ReplicatedPool <aiopgpool.sync_replicated.ReplicatedPool>` hold one ordinary pool
per server (a *member*) and a :class:`Topology`: which member is the primary now, and
which replicas may serve reads. A :class:`Prober` (asyncio; the sync twin runs it in a
thread of its own) asks every server, every ``probe_interval`` seconds and over one
dedicated connection per server (never one of the members' connections)::

    pg_is_in_recovery(), the replay position (a standby) or the current WAL position
    (a primary), pg_is_wal_replay_paused(), default_transaction_read_only, and the
    timeline: the primary's current one, or the one a standby's WAL receiver streams

and hands the answers to :meth:`Topology.update`, which decides the roles and the
lags and publishes the readable replicas as one tuple. Checkouts read that tuple
and two integers per member (no lock, no await): the routing costs a loop over the
replicas.

Lag is time, measured from positions: the topology keeps the primary's recent WAL
positions with the time each was seen; a replica's lag is how long ago the primary
first got past the position the replica has replayed (0 when it has replayed the
primary's latest position). An idle primary writes nothing, so its replicas stay at
lag 0; a replica whose replay is stuck falls behind as soon as the primary writes.

Positions are only comparable on one timeline. After a failover, a standby that still
streams from the old primary (restarted alone, out of recovery: fenced) replays the
old timeline, and its positions may run past the new primary's while its data
differ: a replica whose WAL receiver streams another timeline than the primary's is
*diverged* and gets no reads, whatever its position. The standby's timeline is
``received_tli`` of ``pg_stat_wal_receiver``, which PostgreSQL shows only to
superusers and members of ``pg_read_all_stats`` (or ``pg_monitor``); for anyone else,
and while no WAL receiver runs, the last timeline seen is kept (None before any: then
positions alone decide, as without timelines). Kept, because a diverged standby whose
old primary stops again has no WAL receiver either and must stay out; the price is that
a standby switching timelines from a WAL archive alone stays out until its WAL receiver
runs. Timelines are compared by number only: two servers promoted independently from
one timeline take the same number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg

from .conninfo import ConnectTarget, check_dbname, parse_conninfo
from .deadlines import move_on_after
from .errors import PoolError
from .lifecycle import connect_async
from .options import check_timeout

__all__ = [
    "LENDER",
    "MIN_PROBE_INTERVAL",
    "Member",
    "MemberStatus",
    "ProbeResult",
    "Prober",
    "Topology",
    "format_lsn",
    "lender_of",
    "parse_lsn",
]

logger = logging.getLogger("aiopgpool")

P = TypeVar("P")

# One round trip per server and probe. CASE evaluates only the branch taken:
# pg_current_wal_lsn() and pg_walfile_name() raise on a standby, the replay functions
# return NULL on a primary. A primary's timeline is the first 8 hex digits of its
# current WAL file's name (the new timeline from the promotion on, on any session);
# a standby's is its WAL receiver's received_tli: no row without a WAL receiver, NULL
# for a user without pg_read_all_stats.
PROBE_SQL = """\
SELECT pg_is_in_recovery(),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::int8,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END,
       current_setting('default_transaction_read_only') = 'on',
       CASE WHEN pg_is_in_recovery() THEN (SELECT received_tli FROM pg_stat_wal_receiver)
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END"""

#: The position a read-your-writes read must wait for, asked on the connection that
#: wrote, after its commit. On a primary, the WAL *insert* position: with
#: ``synchronous_commit = off`` the commit record may not be written yet, so the write
#: position (``pg_current_wal_lsn()``) can lie before it and a replica at that
#: position would not show the write.
CURRENT_LSN_SQL = """\
SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_insert_lsn() END - '0/0'::pg_lsn)::int8"""

#: current_lsn() on a connection in a transaction: its writes may not be committed.
UNCOMMITTED = (
    "current_lsn() must be called after the write's commit, on a connection outside a "
    "transaction: the position of an uncommitted write does not make a read see it"
)
IDLE = psycopg.pq.TransactionStatus.IDLE

#: Asked on a replica's connection when its last probe was short of ``min_lsn``.
REPLAYED_SQL = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8 >= %s"


#: The attribute that names, on a lent connection, the member that lent it (a connection
#: belongs to one member for life), as a weak reference to the member: set and read in
#: about 0.1 µs, where a weak mapping from connection to member cost about 0.7 µs per
#: getconn/putconn pair.
LENDER = "_aiopgpool_lender"


def parse_lsn(lsn: int | str) -> int:
    """An LSN as an integer, from ``'16/B374D848'`` (PostgreSQL's notation) or an integer."""
    if isinstance(lsn, bool):
        raise ValueError(f"min_lsn must be an LSN like '0/16B3748' or an integer, not {lsn!r}")
    if isinstance(lsn, int):
        if lsn < 0:
            raise ValueError(f"min_lsn must be >= 0, got {lsn}")
        return lsn
    if isinstance(lsn, str):
        high, sep, low = lsn.partition("/")
        try:
            if sep:
                return (int(high, 16) << 32) | int(low, 16)
        except ValueError:
            pass
    raise ValueError(f"min_lsn must be an LSN like '0/16B3748' or an integer, not {lsn!r}")


def format_lsn(lsn: int) -> str:
    """PostgreSQL's notation of an integer LSN (``'16/B374D848'``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One server's answer to :data:`PROBE_SQL`."""

    in_recovery: bool
    lsn: int
    """Replay position (a standby) or current WAL write position (a primary)."""
    paused: bool
    read_only: bool
    timeline: int | None = None
    """The current timeline (a primary), or the one the WAL receiver streams (a standby;
    None when none runs or the probe's user may not see it)."""


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """A member as the last probe saw it (``pool.members()``)."""

    name: str
    configured: str
    """``"primary"`` or ``"replica"``: its place in the constructor."""
    role: str
    """``"primary"`` (serves writes), ``"replica"`` (serves reads), ``"lagging"``
    (over ``max_replica_lag``), ``"paused"`` (replay paused and behind), ``"diverged"``
    (in recovery on another timeline than the primary's, e.g. still following the old
    primary after a failover: no reads), ``"fenced"`` (out of recovery but not the
    primary: serves nothing), ``"down"`` (unreachable), ``"unknown"`` (not probed
    yet)."""
    lag: float | None
    """Seconds behind the primary (replicas; None when not known: the primary, and a
    member diverged, fenced, down or not probed yet)."""
    lsn: int | None
    """The last probed position (replay position on a replica)."""
    in_use: int
    """Connections lent through the replicated pool and not returned yet."""
    error: str | None
    """Why the last probe failed."""


# The roles whose last probe measured a lag: any other's is stale or meaningless.
_MEASURED_LAG = frozenset({"replica", "lagging", "paused"})


class Member(Generic[P]):
    """One server: its member pool and what the probes found (read by the checkouts)."""

    __slots__ = (
        "__weakref__",
        "behind",
        "busy",
        "capacity",
        "configured",
        "error",
        "in_recovery",
        "lag",
        "lsn",
        "name",
        "paused",
        "pool",
        "reachable",
        "read_only",
        "ref",
        "role",
        "target",
        "timeline",
    )

    def __init__(self, name: str, configured: str, pool: P, target: ConnectTarget, capacity: int):
        self.name = name
        self.configured = configured
        self.pool = pool
        self.target = target
        #: Lent through the replicated pool and not returned yet (the least-busy
        #: choice); made exact again from the member's stats after every probe round.
        self.busy = 0
        self.capacity = max(capacity, 1)
        self.reachable = False
        self.in_recovery: bool | None = None
        self.paused = False
        self.read_only = False
        self.lsn = 0
        self.lag = 0.0
        #: The last timeline a probe reported (kept while probes report none).
        self.timeline: int | None = None
        #: (time, position) of the primary, from the topology's history, that the member
        #: was behind when it fell behind every kept position: its lag goes on growing
        #: from there after that entry leaves the history.
        self.behind: tuple[float, int] | None = None
        self.role = "unknown"
        self.error: str | None = None
        #: What a lent connection carries (:data:`LENDER`): it does not keep the member
        #: pool alive after the replicated pool is gone.
        self.ref = weakref.ref(self)

    def status(self) -> MemberStatus:
        probed = self.in_recovery is not None
        return MemberStatus(
            self.name,
            self.configured,
            self.role,
            self.lag if probed and self.role in _MEASURED_LAG else None,
            self.lsn if probed else None,
            self.busy,
            self.error,
        )

    def __repr__(self) -> str:
        return f"<member {self.name} {self.role}>"


def lender_of(conn: object, members: Mapping[str, Member[P]], pool_name: str) -> Member[P]:
    """The member of ``members`` (by name) that lent ``conn``, by its :data:`LENDER`;
    :class:`PoolError` if none did."""
    ref = getattr(conn, LENDER, None)
    member = None if ref is None else ref()
    if member is None or members.get(member.name) is not member:
        raise PoolError(f"pool {pool_name!r}: this connection was not lent by this pool")
    assert member is not None
    return member


def server_key(conninfo: Any, kwargs: Any) -> tuple[str, str, str] | None:
    """(host, port, dbname) of a static conninfo, libpq's defaults filled in; None if dynamic."""
    if not isinstance(conninfo, str) or callable(kwargs):
        return None
    params = {**parse_conninfo(conninfo), **(kwargs or {})}
    check_dbname(params.get("dbname"))
    host = params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "localhost"
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    user = params.get("user") or os.environ.get("PGUSER") or ""
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or user
    return str(host), port, str(dbname)


#: The shortest ``probe_interval`` accepted, in seconds.
MIN_PROBE_INTERVAL = 0.01


def check_setup(
    primary: Any, replicas: Any, max_replica_lag: Any, probe_interval: Any, kwargs: Any
) -> tuple[list[Any], float | None, float]:
    """Validate the replicated pools' own arguments; ValueError names what is wrong."""
    if isinstance(replicas, (str, bytes)) or not isinstance(replicas, Sequence):
        raise ValueError(
            "replicas must be a list of conninfo strings (one per replica), "
            f"got {type(replicas).__name__}"
        )
    replicas = list(replicas)
    if not replicas:
        raise ValueError(
            "replicas is empty: a replicated pool needs at least one replica "
            "(use AsyncConnectionPool / ConnectionPool for a primary alone)"
        )
    for label, conninfo in [("primary", primary)] + [
        (f"replica {i}", c) for i, c in enumerate(replicas, 1)
    ]:
        if not (isinstance(conninfo, str) or callable(conninfo)):
            raise ValueError(
                f"{label} must be a conninfo string or a callable returning one, "
                f"got {type(conninfo).__name__}"
            )
    if not (kwargs is None or callable(kwargs) or isinstance(kwargs, Mapping)):
        raise ValueError(
            f"kwargs must be a mapping (or a callable returning one), got {type(kwargs).__name__}"
        )
    seen: dict[tuple[str, str, str], str] = {}
    for label, conninfo in [("primary", primary)] + [
        (f"replica {i}", c) for i, c in enumerate(replicas, 1)
    ]:
        try:
            key = server_key(conninfo, kwargs)
        except ValueError as exc:  # its message names no password (parse_conninfo)
            raise ValueError(f"{label}: {exc}") from None
        if key is None:
            continue
        if key in seen:
            host, port, dbname = key
            raise ValueError(
                f"{label} and {seen[key]} name the same server and database "
                f"(host={host} port={port} dbname={dbname}): each member must be another server"
            )
        seen[key] = label
    lag = check_timeout("max_replica_lag", max_replica_lag)
    interval = check_timeout("probe_interval", probe_interval, allow_none=False)
    assert interval is not None
    if interval < MIN_PROBE_INTERVAL:
        raise ValueError(
            f"probe_interval must be >= {MIN_PROBE_INTERVAL:g} s (a shorter one probes "
            f"every server in a busy loop), got {probe_interval!r}"
        )
    return replicas, lag, interval


class Topology(Generic[P]):
    """The roles and lags of the members, decided from each probe round's answers.

    ``primary`` and ``readable`` are replaced whole, never mutated: a checkout in any
    thread reads a consistent value without a lock.
    """

    def __init__(
        self,
        name: str,
        members: list[Member[P]],
        max_replica_lag: float | None,
        probe_interval: float,
        in_use: Callable[[P], int],
    ) -> None:
        self.name = name
        self.members = members
        self.configured_primary = members[0]
        self.primary: Member[P] = members[0]
        self.readable: tuple[Member[P], ...] = ()
        self.max_replica_lag = max_replica_lag
        self.probe_interval = probe_interval
        self._in_use = in_use
        # (time, position) of the primary, oldest first: long enough to measure a lag
        # up to max_replica_lag plus a few probes.
        span = (max_replica_lag or 0.0) + 10 * probe_interval
        probes = span / probe_interval  # inf or nan for the limits "for ever"
        self.history: deque[tuple[float, int]] = deque(
            maxlen=int(probes) + 2 if probes < 100_000 else 100_000
        )
        #: The timeline of the positions in :attr:`history`: the primary's, as its last
        #: probe out of recovery reported it (None: not known).
        self.timeline: int | None = None
        self.rounds = 0
        self._turn = 0
        self._primary_lost = False

    # -- the probe round -------------------------------------------------------------

    def update(self, results: Sequence[ProbeResult | BaseException], now: float) -> None:
        """Decide every member's role and lag from one round of answers."""
        for member, result in zip(self.members, results, strict=True):
            if isinstance(result, ProbeResult):
                member.reachable = True
                member.error = None
                member.in_recovery = result.in_recovery
                member.lsn = result.lsn
                member.paused = result.paused
                member.read_only = result.read_only
                if result.timeline is not None:
                    member.timeline = result.timeline
            else:
                member.reachable = False
                member.error = _describe(result)
        self._choose_primary()
        primary = self.primary
        if primary.reachable and not primary.in_recovery:
            if primary.timeline != self.timeline:
                # The same member promoted again (demoted, then promoted on a new
                # timeline): its positions on the old timeline compare with nothing.
                self._forget_history()
                self.timeline = primary.timeline
            self.history.append((now, primary.lsn))
            primary.lag = 0.0
            self._set_role(primary, "primary")
        elif not self._primary_lost:
            # Unreachable (or in recovery) and no other member out of recovery: writes
            # still go there, and fail or wait as the member pool does.
            logger.warning(
                "replicated pool %r: the primary %s does not answer its probe (%s)",
                self.name,
                primary.name,
                primary.error or "in recovery",
            )
        self._primary_lost = not (primary.reachable and not primary.in_recovery)
        readable = []
        for member in self.members:
            if member is primary:
                continue
            role = self._replica_role(member, now)
            self._set_role(member, role)
            if role == "replica":
                readable.append(member)
            with contextlib.suppress(Exception):
                member.busy = self._in_use(member.pool)
        with contextlib.suppress(Exception):
            primary.busy = self._in_use(primary.pool)
        self.readable = tuple(readable)
        self.rounds += 1

    def _choose_primary(self) -> None:
        current = self.primary
        writers = [m for m in self.members if m.reachable and m.in_recovery is False]
        if current in writers and not current.read_only:
            return  # sticky: a node restarted as a primary of its own does not take over
        if not writers:
            return
        writable = [m for m in writers if not m.read_only] or writers
        if current in writable:
            return
        chosen = self.configured_primary if self.configured_primary in writable else writable[0]
        if chosen is not current:
            logger.warning(
                "replicated pool %r: %s is out of recovery and now serves writes (was %s)",
                self.name,
                chosen.name,
                current.name,
            )
            self._forget_history()  # another server's positions
            self.primary = chosen

    def _forget_history(self) -> None:
        self.history.clear()
        for member in self.members:
            member.behind = None

    def _replica_role(self, member: Member[P], now: float) -> str:
        if not member.reachable:
            return "down"
        if not member.in_recovery:
            return "fenced"
        if (
            member.timeline is not None
            and self.timeline is not None
            and member.timeline != self.timeline
        ):
            member.behind = None
            return "diverged"
        history = self.history
        if not history or member.lsn >= history[-1][1]:
            member.lag = 0.0
            member.behind = None
            behind = False
        elif member.lsn < history[0][1]:
            # Behind every kept position: the primary got past the member's position
            # before the oldest one was seen. Remember that entry, so that the lag keeps
            # growing once it leaves the history (until the member replays past it).
            anchor = member.behind
            if anchor is None or member.lsn >= anchor[1]:
                anchor = member.behind = history[0]
            member.lag = max(0.0, now - anchor[0])
            behind = True
        else:
            # The oldest position the primary had that the member has not replayed.
            member.behind = None
            since = history[-1][0]
            for seen, lsn in reversed(history):
                if lsn <= member.lsn:
                    break
                since = seen
            member.lag = max(0.0, now - since)
            behind = True
        if member.paused and behind:
            return "paused"
        limit = self.max_replica_lag
        if limit is not None and member.lag > limit:
            return "lagging"
        return "replica"

    def _set_role(self, member: Member[P], role: str) -> None:
        old = member.role
        if role == old:
            return
        member.role = role
        if role == "fenced":
            logger.warning(
                "replicated pool %r: %s is not in recovery but %s is the primary: it gets "
                "neither reads nor writes (a misconfigured replica, or an old primary "
                "after a failover)",
                self.name,
                member.name,
                self.primary.name,
            )
        elif role == "diverged":
            logger.warning(
                "replicated pool %r: %s follows timeline %s but the primary %s is on "
                "timeline %s: it gets no reads until it follows the primary's timeline "
                "(a standby still following an old primary after a failover?)",
                self.name,
                member.name,
                member.timeline,
                self.primary.name,
                self.timeline,
            )
        elif role in ("down", "lagging", "paused") and old != "unknown":
            logger.warning(
                "replicated pool %r: %s gets no reads (%s%s)",
                self.name,
                member.name,
                role,
                f", {member.lag:.1f} s behind" if role == "lagging" else "",
            )
        elif role == "replica" and old != "unknown":
            logger.info("replicated pool %r: %s gets reads again", self.name, member.name)

    # -- the checkouts' side -----------------------------------------------------------

    def pick_replica(
        self, min_lsn: int | None, skip: Sequence[Member[P]] = ()
    ) -> tuple[Member[P] | None, bool]:
        """The least busy readable replica (ties: the least lag, then in turn), and whether
        it must be checked live because its last probe was short of ``min_lsn``."""
        readable = self.readable
        n = len(readable)
        if not n:
            return None, False
        self._turn = turn = (self._turn + 1) % n
        best: Member[P] | None = None
        best_load = 0.0
        late: Member[P] | None = None
        for i in range(n):
            member = readable[(turn + i) % n]
            if skip and member in skip:
                continue
            load = member.busy / member.capacity
            if min_lsn is not None and member.lsn < min_lsn:
                if late is None or member.lsn > late.lsn:
                    late = member
                continue
            if best is None or load < best_load or (load == best_load and member.lag < best.lag):
                best, best_load = member, load
        if best is None and late is not None:
            return late, True
        return best, False

    def mark_down(self, member: Member[P], error: BaseException) -> None:
        """A checkout on ``member`` failed: no reads for it until a probe finds it well."""
        if member in self.readable:
            self.readable = tuple(m for m in self.readable if m is not member)
            member.error = _describe(error)
            logger.warning(
                "replicated pool %r: %s gets no reads until its next good probe (%s)",
                self.name,
                member.name,
                member.error,
            )


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


#: The longest a probe connection may take to open (it opens in the background: a
#: round waits for it at most ``Prober.timeout``, except the very first round).
CONNECT_TIMEOUT = 10.0


class Prober(Generic[P]):
    """Probes every member of a :class:`Topology`, every ``probe_interval`` seconds.

    One connection per server, in autocommit, named ``"{name}.probe"``. A probe query
    that fails or takes longer than :attr:`timeout` (``max(2 s, 2 x probe_interval)``)
    closes its connection and counts the member unreachable for that round. A new
    connection opens in the background, over as many rounds as it takes (up to
    :data:`CONNECT_TIMEOUT`), so that a server that drops packets delays no round by
    more than :attr:`timeout`; the first round waits for every connection.
    """

    def __init__(self, topology: Topology[P]) -> None:
        self.topology = topology
        interval = topology.probe_interval
        self.timeout = max(2.0, 2 * interval)
        self._conns: dict[int, psycopg.AsyncConnection[Any]] = {}
        self._connecting: dict[int, asyncio.Task[psycopg.AsyncConnection[Any]]] = {}
        self._lock = asyncio.Lock()

    async def round(self) -> None:
        """Probe every member once, concurrently, and update the topology."""
        async with self._lock:  # pool.probe() and the background rounds take turns
            members = self.topology.members
            results = await asyncio.gather(
                *(self._probe(i, m) for i, m in enumerate(members)), return_exceptions=True
            )
            self.topology.update(results, time.monotonic())

    async def run(self, first_done: Callable[[], Any] | None = None) -> None:
        """Probe forever (until cancelled); ``first_done()`` after the first round."""
        interval = self.topology.probe_interval
        try:
            while True:
                start = time.monotonic()
                try:
                    await self.round()
                except Exception:  # never let the prober die
                    logger.exception("replicated pool %r: probe round failed", self.topology.name)
                if first_done is not None:
                    first_done()
                    first_done = None
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - start)))
        finally:
            await self.aclose()

    async def _probe(self, index: int, member: Member[P]) -> ProbeResult:
        conn = self._conns.get(index)
        if conn is None or conn.closed:
            conn = self._conns[index] = await self._connected(index, member)
        try:
            with move_on_after(self.timeout) as scope:
                row = await self._ask(conn)
            if scope.cancelled_caught:
                raise TimeoutError(f"the probe took longer than {self.timeout:g} s")
        except BaseException:
            dropped = self._conns.pop(index, None)
            if dropped is not None:
                with contextlib.suppress(Exception):
                    await dropped.close()
            raise
        in_recovery, lsn, paused, read_only, timeline = row
        return ProbeResult(
            bool(in_recovery),
            int(lsn or 0),
            bool(paused),
            bool(read_only),
            None if timeline is None else int(timeline),
        )

    async def _connected(self, index: int, member: Member[P]) -> psycopg.AsyncConnection[Any]:
        """The member's new probe connection, opening in the background; raises while it
        is not open yet (this round counts the member unreachable) or when it failed."""
        task = self._connecting.get(index)
        if task is None:
            task = self._connecting[index] = asyncio.ensure_future(
                asyncio.wait_for(self._connect(member), CONNECT_TIMEOUT)
            )
        first = self.topology.rounds == 0
        await asyncio.wait({task}, timeout=None if first else self.timeout)
        if not task.done():
            raise ConnectionError("the probe connection is still opening")
        del self._connecting[index]
        return task.result()

    async def _connect(self, member: Member[P]) -> psycopg.AsyncConnection[Any]:
        conninfo, kwargs = await member.target.resolve_async()
        kwargs = {**kwargs, "autocommit": True}
        if "connect_timeout" not in kwargs and "connect_timeout" not in conninfo:
            kwargs["connect_timeout"] = int(CONNECT_TIMEOUT)
        return await connect_async(psycopg.AsyncConnection, conninfo, kwargs)

    @staticmethod
    async def _ask(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
        cur = await conn.execute(PROBE_SQL, prepare=False)
        row = await cur.fetchone()
        assert row is not None
        return tuple(row)

    async def aclose(self) -> None:
        """Close the probe connections (those still opening too)."""
        conns, self._conns = list(self._conns.values()), {}
        tasks, self._connecting = list(self._connecting.values()), {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                conns.append(await task)
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()
