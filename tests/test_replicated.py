"""AsyncReplicatedPool against a real primary and two streaming standbys (and the
topology's lag arithmetic without a server).

One cluster serves the module's tests that leave roles alone (they may pause replay, delay
it, or stop and restart a standby, and put things back); a test that promotes a standby
makes a cluster of its own.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from helpers import until

from aiopgpool import (
    AsyncConnectionPool,
    AsyncReplicatedPool,
    PoolClosed,
    PoolError,
    ReplicatedPool,
)
from aiopgpool.replica_probe import Member, ProbeResult, Topology, format_lsn, parse_lsn
from aiopgpool.testing import LocalCluster, ReplicatedCluster, count_backends
from aiopgpool.testing.proxy import TcpProxy

FAST = {"probe_interval": 0.2, "max_replica_lag": 0.5}
"""Probes five times a second, so that a test sees every change within a second."""


@pytest.fixture(scope="module")
def rc() -> Iterator[ReplicatedCluster]:
    """A primary and two standbys, shared by the tests that do not change roles."""
    with ReplicatedCluster(standbys=2) as cluster:
        with psycopg.connect(cluster.primary.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 1000) g")
        cluster.wait_caught_up()
        yield cluster


def make_pool(rc: ReplicatedCluster, name: str, **options: Any) -> AsyncReplicatedPool:
    options = {**FAST, **options}
    return AsyncReplicatedPool(
        rc.primary.dsn, [node.dsn for node in rc.standbys], name=name, **options
    )


def rounds(pool: AsyncReplicatedPool) -> int:
    """Probe rounds done so far: timing bounds are counted in probes, not seconds, so that
    a busy machine (slower rounds) does not fail them."""
    return pool._topology.rounds


def role(pool: AsyncReplicatedPool, member: str) -> str:
    return pool.members()[f"{pool.name}.{member}"].role


async def where(conn: psycopg.AsyncConnection[Any]) -> tuple[bool, int]:
    """(in recovery, server port) of the connection's server."""
    cur = await conn.execute("SELECT pg_is_in_recovery(), inet_server_port()")
    row = await cur.fetchone()
    assert row is not None
    return bool(row[0]), int(row[1])


def set_apply_delay(node: LocalCluster, delay: str | None) -> None:
    """recovery_min_apply_delay on a standby, in place (reload)."""
    with psycopg.connect(node.dsn, autocommit=True) as conn:
        if delay is None:
            conn.execute("ALTER SYSTEM RESET recovery_min_apply_delay")
        else:
            conn.execute(f"ALTER SYSTEM SET recovery_min_apply_delay = '{delay}'")
        conn.execute("SELECT pg_reload_conf()")


# -- bad input (no server) ------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_error() -> None:
    a, b = "host=db1 port=5432 dbname=app", "host=db2 port=5432 dbname=app"
    with pytest.raises(ValueError, match="replicas is empty"):
        AsyncReplicatedPool(primary=a, replicas=[])
    with pytest.raises(ValueError, match="replicas must be a list"):
        AsyncReplicatedPool(primary=a, replicas=b)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replica 1 and primary name the same server"):
        AsyncReplicatedPool(primary=a, replicas=["postgresql://db1/app"])
    with pytest.raises(ValueError, match="replica 2 and replica 1"):
        AsyncReplicatedPool(primary=a, replicas=[b, b + " user=x"])
    with pytest.raises(ValueError, match="max_replica_lag"):
        AsyncReplicatedPool(primary=a, replicas=[b], max_replica_lag=-1)
    with pytest.raises(ValueError, match="probe_interval"):
        AsyncReplicatedPool(primary=a, replicas=[b], probe_interval=0)
    # Below 10 ms the probes are a busy loop: refused by both pools, naming the floor.
    for too_small in (1e-320, 0.009):
        for cls in (AsyncReplicatedPool, ReplicatedPool):
            with pytest.raises(ValueError, match=r"probe_interval must be >= 0\.01 s"):
                cls(primary=a, replicas=[b], probe_interval=too_small)
    AsyncReplicatedPool(primary=a, replicas=[b], probe_interval=0.01)
    with pytest.raises(ValueError, match="min_size"):
        AsyncReplicatedPool(primary=a, replicas=[b], min_size=5, max_size=2)
    with pytest.raises(ValueError, match="conninfo string"):
        AsyncReplicatedPool(primary=a, replicas=[b, 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="min_lsn"):
        parse_lsn("nonsense")
    with pytest.raises(ValueError, match="kwargs must be a mapping"):
        AsyncReplicatedPool(primary=a, replicas=[b], kwargs=[("user", "x")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replica 1: conninfo is not a valid"):
        AsyncReplicatedPool(primary=a, replicas=["host=db2 bogus=1"])
    # "For ever" limits are taken, not an OverflowError.
    AsyncReplicatedPool(primary=a, replicas=[b], max_replica_lag=float("inf"))
    AsyncReplicatedPool(primary=a, replicas=[b], probe_interval=float("inf"))
    # Another database on the same server is another member.
    pool = AsyncReplicatedPool(primary=a, replicas=["host=db1 port=5432 dbname=other"])
    assert list(pool.pools) == [f"{pool.name}.primary", f"{pool.name}.replica-1"]
    assert parse_lsn(format_lsn(0x16B374D848)) == 0x16B374D848 == parse_lsn("16/B374D848")


async def test_closed_and_unopened_pools_refuse() -> None:
    pool = AsyncReplicatedPool("host=db1 dbname=a", ["host=db2 dbname=a"], name="never")
    assert pool.closed
    with pytest.raises(PoolClosed, match="not open"):
        await pool.getconn(read_only=True)
    with pytest.raises(PoolClosed, match="not open"):
        await pool.probe()  # its probe connections would outlive the pool
    with pytest.raises(ValueError, match="timeout"):
        await pool.close(-1)  # refused before anything stops
    await pool.close()
    with pytest.raises(PoolClosed, match="closed"):
        await pool.probe()


# -- the topology, with made-up probes (no server) ------------------------------------------


def _topology(lag: float | None = 1.0) -> Topology[None]:
    from aiopgpool.conninfo import ConnectTarget

    target = ConnectTarget("", None, "t")
    members = [
        Member("t.primary", "primary", None, target, 10),
        Member("t.replica-1", "replica", None, target, 10),
        Member("t.replica-2", "replica", None, target, 10),
    ]
    return Topology("t", members, lag, 1.0, lambda pool: 0)


def _p(lsn: int, read_only: bool = False, tli: int | None = None) -> ProbeResult:
    return ProbeResult(False, lsn, False, read_only, tli)


def _r(lsn: int, paused: bool = False, tli: int | None = None) -> ProbeResult:
    return ProbeResult(True, lsn, paused, False, tli)


def test_topology_lag_is_time_since_the_primary_got_past_the_replay_position() -> None:
    topo = _topology(lag=1.0)
    p, r1, r2 = topo.members
    topo.update([_p(100), _r(100), _r(100)], now=0.0)
    assert topo.readable == (r1, r2) and r1.lag == 0.0
    # An idle primary: nobody is behind, however long.
    topo.update([_p(100), _r(100), _r(100)], now=50.0)
    assert topo.readable == (r1, r2) and r1.lag == 0.0
    # The primary moves on at t=51; r1 follows, r2 does not.
    topo.update([_p(200), _r(200), _r(100)], now=51.0)
    assert r2.lag == 0.0 and topo.readable == (r1, r2)
    topo.update([_p(300), _r(300), _r(100)], now=52.0)
    assert r2.lag == pytest.approx(1.0) and r2.role == "replica"  # at the limit
    topo.update([_p(300), _r(300), _r(150)], now=53.0)
    assert r2.lag == pytest.approx(2.0) and r2.role == "lagging" and topo.readable == (r1,)
    assert r2.status().lag == pytest.approx(2.0)
    # Down, or out of recovery (fenced): no lag shown, not the last one measured.
    topo.update([_p(300), _r(300), ConnectionError("refused")], now=53.5)
    assert r2.role == "down" and r2.status().lag is None
    topo.update([_p(300), _r(300), _p(150)], now=53.6)
    assert r2.role == "fenced" and r2.status().lag is None
    topo.update([_p(300), _r(300), _r(300)], now=54.0)
    assert r2.lag == 0.0 and topo.readable == (r1, r2)
    # Paused and behind: out at once; paused but caught up: still in.
    topo.update([_p(400), _r(400), _r(300, paused=True)], now=54.5)
    assert r2.role == "paused" and topo.readable == (r1,)
    topo.update([_p(400), _r(400), _r(400, paused=True)], now=55.0)
    assert r2.role == "replica"
    # No limit: a lagging replica still reads.
    topo.max_replica_lag = None
    topo.update([_p(900), _r(900), _r(400)], now=90.0)
    topo.update([_p(900), _r(900), _r(400)], now=99.0)
    assert r2.lag > 5 and r2.role == "replica"
    assert p.role == "primary" and p.lag == 0.0


def test_topology_follows_a_promotion_and_fences_an_old_primary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    topo = _topology()
    p, r1, r2 = topo.members
    topo.update([_p(100), _r(100), _r(100)], now=0.0)
    down = ConnectionError("refused")
    topo.update([down, _r(100), _r(100)], now=1.0)
    assert topo.primary is p and r1.role == "replica"  # nobody else out of recovery
    with caplog.at_level(logging.WARNING, "aiopgpool"):
        topo.update([down, _p(120), _r(100)], now=2.0)
    assert topo.primary is r1 and "t.replica-1 is out of recovery" in caplog.text
    assert p.role == "down" and topo.readable == (r2,)
    # The old primary comes back as a primary of its own: sticky, it is fenced.
    with caplog.at_level(logging.WARNING, "aiopgpool"):
        topo.update([_p(110), _p(130), _r(100)], now=3.0)
    assert (
        topo.primary is r1
        and p.role == "fenced"
        and "t.primary is not in recovery" in (caplog.text)
    )
    # Rejoined as a standby of the new primary: a replica again.
    topo.update([_r(130), _p(130), _r(130)], now=4.0)
    assert p.role == "replica" and set(topo.readable) == {p, r2}
    # Two primaries at the start: the configured one, unless it is read-only.
    topo = _topology()
    p, r1, r2 = topo.members
    topo.update([_p(1), _p(1), _r(1)], now=0.0)
    assert topo.primary is p and r1.role == "fenced"
    topo = _topology()
    p, r1, r2 = topo.members
    topo.update([_p(1, read_only=True), _p(1), _r(1)], now=0.0)
    assert topo.primary is r1 and p.role == "fenced"


def test_topology_a_replica_on_another_timeline_gets_no_reads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a failover: r1 promoted (timeline 2), r2 still streams the old primary's
    timeline 1 and replays past r1's position: diverged, whatever its position."""
    topo = _topology()
    p, r1, r2 = topo.members
    topo.update([_p(100, tli=1), _r(100, tli=1), _r(100, tli=1)], now=0.0)
    assert topo.readable == (r1, r2) and topo.timeline == 1
    with caplog.at_level(logging.WARNING, "aiopgpool"):
        topo.update([ConnectionError("down"), _p(120, tli=2), _r(100, tli=1)], now=1.0)
    assert topo.primary is r1 and topo.timeline == 2
    assert r2.role == "diverged" and topo.readable == ()
    assert (
        "t.replica-2 follows timeline 1 but the primary t.replica-1 is on timeline 2" in caplog.text
    )
    # The old primary back alone, r2 streaming from it past the new primary's position.
    caplog.clear()
    with caplog.at_level(logging.WARNING, "aiopgpool"):
        topo.update([_p(900, tli=1), _p(130, tli=2), _r(900, tli=1)], now=2.0)
        assert p.role == "fenced" and r2.role == "diverged" and topo.readable == ()
        assert r2.status().lag is None and r2.status().lsn == 900
        # No WAL receiver (or no right to see it): the last timeline seen is kept.
        topo.update([_p(900, tli=1), _p(130, tli=2), _r(950)], now=3.0)
    assert r2.role == "diverged" and r2.timeline == 1 and topo.readable == ()
    assert "follows timeline" not in caplog.text  # one WARNING, on the transition
    # Following the primary's timeline again: a replica as its positions say.
    with caplog.at_level(logging.INFO, "aiopgpool"):
        topo.update([_p(900, tli=1), _p(130, tli=2), _r(130, tli=2)], now=4.0)
    assert r2.role == "replica" and r2.lag == 0.0 and topo.readable == (r2,)
    assert "t.replica-2 gets reads again" in caplog.text


def test_topology_without_timelines_positions_alone_decide() -> None:
    """No timeline known for a replica (no WAL receiver seen, or a probe user without
    pg_read_all_stats), or for the primary: the judgement of positions alone."""
    topo = _topology(lag=1.0)
    _, r1, r2 = topo.members
    topo.update([_p(100, tli=2), _r(100), _r(100, tli=2)], now=0.0)
    assert r1.timeline is None and topo.readable == (r1, r2)
    topo.update([_p(200, tli=2), _r(250), _r(200, tli=2)], now=1.0)
    assert r1.role == "replica" and r1.lag == 0.0
    topo.update([_p(300, tli=2), _r(250), _r(300, tli=2)], now=2.0)
    topo.update([_p(300, tli=2), _r(250), _r(300, tli=2)], now=3.5)
    assert r1.role == "lagging" and r1.lag == pytest.approx(1.5)
    # A primary whose timeline is not known: no replica is judged diverged.
    topo = _topology()
    _, r1, r2 = topo.members
    topo.update([_p(100), _r(100, tli=1), _r(100, tli=2)], now=0.0)
    assert topo.timeline is None and topo.readable == (r1, r2)


def test_topology_a_primary_on_a_new_timeline_starts_a_new_history() -> None:
    """The same member primary on two timelines (demoted, rewound, promoted again
    between two probes): its old positions compare with nothing."""
    topo = _topology(lag=1.0)
    _, r1, r2 = topo.members
    for i in range(5):
        topo.update([_p(1000 + i, tli=1), _r(1000 + i, tli=1), _r(1000 + i, tli=1)], now=i)
    assert len(topo.history) == 5
    # Back on timeline 3 at a lower position; the replicas follow it.
    topo.update([_p(500, tli=3), _r(400, tli=3), _r(500, tli=3)], now=10.0)
    assert list(topo.history) == [(10.0, 500)] and topo.timeline == 3
    assert r1.role == "replica" and r1.lag == 0.0  # not 10 s behind position 1000
    topo.update([_p(600, tli=3), _r(500, tli=3), _r(600, tli=3)], now=11.0)
    assert r1.lag == pytest.approx(0.0) and topo.readable == (r1, r2)
    topo.update([_p(600, tli=3), _r(500, tli=3), _r(600, tli=3)], now=12.5)
    assert r1.lag == pytest.approx(1.5) and r1.role == "lagging"


def test_topology_a_stuck_replica_lag_keeps_growing() -> None:
    """The history holds max_replica_lag + 10 probes; a replica behind every kept
    position still reports the time since the primary got past its position."""
    topo = _topology(lag=1.0)  # probe_interval 1.0: 13 positions kept
    _, r1, r2 = topo.members
    topo.update([_p(100), _r(100), _r(100)], now=0.0)
    for t in range(1, 101):  # the primary writes every second from t=1; r2 is stuck at 100
        topo.update([_p(100 + t), _r(100 + t), _r(100)], now=float(t))
    assert len(topo.history) == topo.history.maxlen == 13
    assert r2.role == "lagging" and r2.lag == pytest.approx(99.0)
    topo.update([_p(200), _r(200), _r(100)], now=3600.0)
    assert r2.lag == pytest.approx(3599.0)
    # It moves past the position it was anchored on (101, t=1), still behind every kept
    # one: anchored on the oldest kept (190, t=90), a lower bound of its true lag.
    topo.update([_p(200), _r(200), _r(150)], now=3700.0)
    assert r2.behind == (90.0, 190) and r2.lag == pytest.approx(3610.0)
    # Still behind that anchor after it left the history: the lag goes on growing.
    topo.update([_p(200), _r(200), _r(160)], now=3800.0)
    assert topo.history[0][0] > 90.0
    assert r2.behind == (90.0, 190) and r2.lag == pytest.approx(3710.0)
    # Within the kept positions again (the primary got past 199 at t=100), then caught up.
    topo.update([_p(200), _r(200), _r(199)], now=3801.0)
    assert r2.behind is None and r2.lag == pytest.approx(3701.0)
    topo.update([_p(200), _r(200), _r(200)], now=3802.0)
    assert r2.lag == 0.0 and r2.role == "replica" and r2.behind is None
    # Stuck again, then the primary changes: the old primary's positions are forgotten.
    for t in range(20):
        topo.update([_p(300 + t), _r(300 + t), _r(200)], now=3900.0 + t)
    assert r2.behind is not None and r2.lag > 15
    topo.update([ConnectionError("gone"), _p(400), _r(200)], now=4000.0)
    assert topo.primary is r1 and r2.behind == (4000.0, 400) and r2.lag == 0.0
    topo.update([ConnectionError("gone"), _p(400), _r(200)], now=4002.0)
    assert r2.lag == pytest.approx(2.0)


def test_pick_replica_least_busy_then_in_turn_and_min_lsn() -> None:
    topo = _topology()
    _, r1, r2 = topo.members
    topo.update([_p(100), _r(100), _r(100)], now=0.0)
    picks = {topo.pick_replica(None)[0] for _ in range(4)}
    assert picks == {r1, r2}  # equal load and lag: in turn
    topo.update([_p(100), _r(100), _r(90)], now=0.1)
    assert r2.lag == pytest.approx(0.1)
    assert {topo.pick_replica(None)[0] for _ in range(4)} == {r1}  # equal load: less lag
    r1.busy = 3
    assert {topo.pick_replica(None)[0] for _ in range(4)} == {r2}
    assert topo.pick_replica(100) == (r1, False)  # only r1 has replayed 100
    assert topo.pick_replica(150) == (r1, True)  # nobody: the most advanced, checked live
    topo.mark_down(r1, OSError("gone"))
    assert topo.readable == (r2,) and topo.pick_replica(100) == (r2, True)


# -- against the cluster ---------------------------------------------------------------------


async def test_writes_go_to_the_primary_and_reads_spread_over_the_replicas(
    rc: ReplicatedCluster,
) -> None:
    async with make_pool(rc, "spread", min_size=2, max_size=6) as pool:
        await pool.open(wait=True)
        assert {m.role for m in pool.members().values()} == {"primary", "replica"}
        async with pool.connection() as conn:
            assert await where(conn) == (False, rc.primary.port)
            await conn.execute("INSERT INTO items VALUES (100001, 'w') ON CONFLICT DO NOTHING")
        seen: list[tuple[bool, int]] = []

        async def read() -> None:
            async with pool.connection(read_only=True) as conn:
                seen.append(await where(conn))
                cur = await conn.execute("SELECT v FROM items WHERE id = 7")
                assert await cur.fetchone() == ("v7",)
                await asyncio.sleep(0.05)

        await asyncio.gather(*(read() for _ in range(40)))
        ports = {port for _, port in seen}
        assert all(in_recovery for in_recovery, _ in seen)
        assert ports == {node.port for node in rc.standbys}
        counts = {port: sum(1 for _, p in seen if p == port) for port in ports}
        assert min(counts.values()) >= 10, counts  # least busy first: an even spread
        # Each member's backends carry its name, on its own server only.
        members = ["primary", "replica-1", "replica-2"]
        for member in members:
            for where_, other in zip(rc.nodes, members, strict=True):
                found = count_backends(where_.dsn, f"spread.{member}")
                assert found >= 2 if other == member else found == 0, (member, other)
        stats = pool.stats()
        assert list(stats) == ["spread.primary", "spread.replica-1", "spread.replica-2"]
        assert stats["spread.primary"].requests >= 1
        assert sum(stats[f"spread.replica-{i}"].requests for i in (1, 2)) == 40
        assert set(pool.get_stats()["spread.replica-1"]) >= {"pool_size", "requests_num"}
        # getconn / putconn route back to the lender.
        conn = await pool.getconn(read_only=True)
        assert (await where(conn))[0]
        await pool.putconn(conn)
        with pytest.raises(PoolError, match=r"twice|not"):
            await pool.putconn(conn)
        assert all(m.in_use == 0 for m in pool.members().values())
        await pool.check()
        await pool.drain()
    assert pool.closed and all(p.closed for p in pool.pools.values())


async def test_a_replica_over_the_lag_limit_gets_no_reads_until_it_catches_up(
    rc: ReplicatedCluster,
) -> None:
    slow, other = rc.standbys
    async with make_pool(rc, "lag") as pool:
        await pool.open(wait=True)
        set_apply_delay(slow, "4s")
        try:
            # The primary writes steadily; the slow standby replays 4 s late.
            stop = asyncio.Event()

            async def writer() -> None:
                while not stop.is_set():
                    async with pool.connection() as conn:
                        await conn.execute("UPDATE items SET v = v WHERE id = 1")
                    await asyncio.sleep(0.05)

            task = asyncio.create_task(writer())
            r0 = rounds(pool)
            took = await until(
                lambda: role(pool, "replica-1") == "lagging", 10.0, "replica-1 lagging"
            )
            period = took / max(1, rounds(pool) - r0)  # wall time per probe round
            # Out within two probes of crossing the limit (plus the round in flight).
            assert pool.members()["lag.replica-1"].lag <= 0.5 + 3 * period
            for _ in range(20):
                async with pool.connection(read_only=True) as conn:
                    assert await where(conn) == (True, other.port)
            assert role(pool, "replica-2") == "replica"
            stop.set()
            await task
        finally:
            set_apply_delay(slow, None)
        await until(lambda: role(pool, "replica-1") == "replica", 10.0, "replica-1 back")
        ports = set()
        for _ in range(10):
            async with pool.connection(read_only=True) as conn:
                ports.add((await where(conn))[1])
        assert ports == {slow.port, other.port}


async def test_a_paused_replica_is_out_within_two_probes_and_back_after_resume(
    rc: ReplicatedCluster,
) -> None:
    paused, other = rc.standbys
    async with make_pool(rc, "paused") as pool:
        await pool.open(wait=True)
        rc.pause_replay(paused)
        try:
            async with pool.connection() as conn:
                await conn.execute("UPDATE items SET v = v WHERE id = 2")
            r0 = rounds(pool)
            await until(lambda: role(pool, "replica-1") == "paused", 10.0, "paused")
            assert rounds(pool) - r0 <= 3  # two probes, plus the round in flight
            for _ in range(10):
                async with pool.connection(read_only=True) as conn:
                    assert (await where(conn))[1] == other.port
        finally:
            rc.resume_replay(paused)
        r0 = rounds(pool)
        await until(lambda: role(pool, "replica-1") == "replica", 10.0, "back")
        assert rounds(pool) - r0 <= 3


async def test_a_killed_replica_never_fails_a_read_and_comes_back(rc: ReplicatedCluster) -> None:
    victim, other = rc.standbys
    async with make_pool(rc, "killed", min_size=2) as pool:
        await pool.open(wait=True)
        done = 0
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def reader() -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    async with pool.connection(read_only=True, timeout=10) as conn:
                        await where(conn)
                    done += 1
                except psycopg.OperationalError as exc:
                    # A read in flight when the server went down may fail; a checkout may not.
                    failures.append(exc)
                await asyncio.sleep(0.01)

        readers = [asyncio.create_task(reader()) for _ in range(4)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(rc.stop, victim)
        await until(lambda: role(pool, "replica-1") == "down", 5.0, "replica-1 down")
        before = done
        await asyncio.sleep(1.0)
        assert done - before >= 5  # reads kept flowing
        await asyncio.to_thread(rc.start, victim)
        await until(lambda: role(pool, "replica-1") == "replica", 15.0, "replica-1 back")
        stop.set()
        await asyncio.gather(*readers)
        # Only reads on the victim's connections as it stopped (a connection the server
        # closed just after its checkout's socket test): never a checkout.
        assert not any(isinstance(exc, PoolError) for exc in failures), failures
        assert len(failures) <= 12, failures
        ports = set()
        for _ in range(6):
            async with pool.connection(read_only=True) as conn:
                ports.add((await where(conn))[1])
        assert ports == {victim.port, other.port}


async def test_a_replica_that_stops_answering_is_out_and_comes_back(rc: ReplicatedCluster) -> None:
    """Bytes to a replica dropped both ways: its probe query never answers and is given
    up at the probe's limit, the replica is counted down and gets no reads (the other one
    takes them), and it is a replica again once the bytes flow."""
    victim, other = rc.standbys
    with TcpProxy(victim.host, victim.port) as cut:
        async with AsyncReplicatedPool(
            rc.primary.dsn, [cut.dsn(victim.dsn), other.dsn], name="silent", **FAST
        ) as pool:
            await pool.open(wait=True)
            assert role(pool, "replica-1") == "replica"
            cut.blackhole()
            await until(lambda: role(pool, "replica-1") == "down", 15.0, "replica-1 down")
            for _ in range(4):
                async with pool.connection(read_only=True, timeout=10) as conn:
                    assert (await where(conn))[1] == other.port
            cut.forward()
            await until(lambda: role(pool, "replica-1") == "replica", 20.0, "back")


async def test_read_your_writes_is_never_stale(rc: ReplicatedCluster) -> None:
    """Randomized and bounded: writers insert rows, each read with the write's min_lsn must
    see the row, from whichever member serves it."""
    rng = random.Random(20261130)
    async with make_pool(rc, "ryw", max_size=8) as pool:
        await pool.open(wait=True)
        async with pool.connection() as conn:
            await conn.execute("DROP TABLE IF EXISTS ryw")  # once per event loop the test runs on
            await conn.execute("CREATE TABLE ryw (id int PRIMARY KEY)")
        served = {"replica": 0, "primary": 0}

        async def one(i: int) -> None:
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO ryw VALUES (%s)", (i,))
            # connection() committed; a fresh connection's position covers the commit too.
            async with pool.connection() as conn:
                lsn = await pool.current_lsn(conn)
            await asyncio.sleep(rng.random() * 0.02)
            async with pool.connection(read_only=True, min_lsn=lsn) as conn:
                cur = await conn.execute(
                    "SELECT count(*), pg_is_in_recovery() FROM ryw WHERE id = %s", (i,)
                )
                row = await cur.fetchone()
                assert row is not None and row[0] == 1, f"row {i} not seen (stale read)"
                served["replica" if row[1] else "primary"] += 1

        ids = list(range(1, 121))
        for start in range(0, len(ids), 12):
            await asyncio.gather(*(one(i) for i in ids[start : start + 12]))
        assert sum(served.values()) == 120
        logging.getLogger(__name__).info("read-your-writes served by %s", served)
        # And on the same connection, after an explicit commit.
        conn = await pool.getconn()
        await conn.execute("INSERT INTO ryw VALUES (0)")
        with pytest.raises(PoolError, match="after the write's commit"):
            await pool.current_lsn(conn)
        await conn.commit()
        lsn = await pool.current_lsn(conn)
        await pool.putconn(conn)
        async with pool.connection(read_only=True, min_lsn=lsn) as conn:
            cur = await conn.execute("SELECT count(*) FROM ryw WHERE id = 0")
            assert await cur.fetchone() == (1,)
        # Once the replicas have it, they serve it.
        await until(
            lambda: all(
                m.lsn is not None and m.lsn >= parse_lsn(lsn) for m in pool.members().values()
            ),
            5.0,
            "replicas caught up",
        )
        async with pool.connection(read_only=True, min_lsn=lsn) as conn:
            assert (await where(conn))[0]


async def test_cancellation_and_close_with_requests_in_flight_on_every_member(
    rc: ReplicatedCluster,
) -> None:
    pool = make_pool(rc, "inflight", max_size=3)
    await pool.open(wait=True)

    async def hold(read_only: bool) -> None:
        async with pool.connection(read_only=read_only, timeout=10) as conn:
            await conn.execute("SELECT pg_sleep(5)")

    tasks = [asyncio.create_task(hold(i % 3 != 0)) for i in range(12)]  # some wait in line
    await asyncio.sleep(0.5)
    stats = pool.stats()
    assert all(s.in_use >= 1 for s in stats.values()), stats
    for task in tasks[:6]:
        task.cancel()
    await asyncio.gather(*tasks[:6], return_exceptions=True)
    await until(lambda: sum(s.in_use for s in pool.stats().values()) <= 6, 5.0, "returned")
    # Nothing lost: every slot of every member can still be had.
    start = time.monotonic()
    await asyncio.wait_for(pool.close(timeout=0.5), 10)
    assert time.monotonic() - start < 5
    results = await asyncio.gather(*tasks[6:], return_exceptions=True)
    assert all(
        isinstance(r, (psycopg.OperationalError, asyncio.CancelledError)) or r is None
        for r in results
    ), results
    assert pool.closed and all(p.closed for p in pool.pools.values())
    with pytest.raises(PoolClosed):
        await pool.getconn()
    with pytest.raises(PoolClosed):
        await pool.getconn(read_only=True)


async def test_cancelled_checkouts_lose_no_slot(rc: ReplicatedCluster) -> None:
    async with make_pool(rc, "cancel", max_size=2) as pool:
        await pool.open(wait=True)
        # Every member full: reads wait on a replica, then on the primary.
        held = [(m, await m.getconn()) for m in pool.pools.values() for _ in range(2)]
        for read_only, after in ((False, 0.1), (True, 0.1), (True, 1.5)):
            waiters = [
                asyncio.create_task(pool.getconn(read_only=read_only, timeout=5)) for _ in range(3)
            ]
            await asyncio.sleep(after)
            for w in waiters:
                w.cancel()
            results = await asyncio.gather(*waiters, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        for member, conn in held:
            await member.putconn(conn)
        for name, member in pool.pools.items():
            conns = [await member.getconn(timeout=10) for _ in range(member.max_size)]
            for conn in conns:
                await member.putconn(conn)
            assert member.stats().in_use == 0, name


async def test_closeall_closes_borrowed_connections_on_every_member(rc: ReplicatedCluster) -> None:
    pool = make_pool(rc, "closeall")
    await pool.open(wait=True)
    writer = await pool.getconn()
    reader = await pool.getconn(read_only=True)
    await pool.closeall()
    assert writer.closed and reader.closed and pool.closed
    with pytest.raises(PoolError):
        await pool.closeall()


async def test_a_replica_that_is_a_primary_gets_no_reads(
    rc: ReplicatedCluster, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "aiopgpool"):
        pool = AsyncReplicatedPool(rc.primary.dsn, [rc.standbys[0].dsn, dsn], name="wrong", **FAST)
        async with pool:
            await pool.open(wait=True)
            assert role(pool, "replica-2") == "fenced"
            assert pool.primary is pool.pools["wrong.primary"]
            for _ in range(6):
                async with pool.connection(read_only=True) as conn:
                    assert (await where(conn)) == (True, rc.standbys[0].port)
    assert "wrong.replica-2 is not in recovery" in caplog.text


async def test_reads_go_to_the_primary_when_no_replica_qualifies(rc: ReplicatedCluster) -> None:
    pool = AsyncReplicatedPool(
        rc.primary.dsn,
        ["host=127.0.0.1 port=1 dbname=postgres connect_timeout=1"],
        name="alone",
        reconnect_timeout=1,
        **FAST,
    )
    async with pool:
        await pool.open()
        await until(lambda: role(pool, "replica-1") == "down", 5.0, "down")
        async with pool.connection(read_only=True, timeout=5) as conn:
            assert (await where(conn)) == (False, rc.primary.port)


async def test_a_promotion_moves_the_writes_without_drain() -> None:
    with ReplicatedCluster(standbys=2) as rc:
        old, new, third = rc.nodes
        pool = AsyncReplicatedPool(
            old.dsn, [new.dsn, third.dsn], name="failover", timeout=2, reconnect_timeout=30, **FAST
        )
        async with pool:
            await pool.open(wait=True)
            async with pool.connection() as conn:
                await conn.execute("CREATE TABLE f (x int)")
            writes: list[int] = []
            errors: list[BaseException] = []
            stop = asyncio.Event()

            async def writer() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        async with pool.connection(timeout=2) as conn:
                            await conn.execute("INSERT INTO f VALUES (%s)", (i,))
                            writes.append((await where(conn))[1])
                    except psycopg.OperationalError as exc:
                        errors.append(exc)
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.02)

            task = asyncio.create_task(writer())
            await asyncio.sleep(0.3)
            await asyncio.to_thread(rc.stop, old)
            await asyncio.to_thread(rc.promote, new)
            r0 = rounds(pool)
            await until(lambda: pool.primary is pool.pools["failover.replica-1"], 5.0, "moved")
            moved_after = rounds(pool) - r0
            n = len(writes)
            await until(lambda: len(writes) >= n + 10, 10.0, "writes on the new primary")
            stop.set()
            await task
            assert writes[-1] == new.port and moved_after <= 3
            assert role(pool, "primary") == "down"
            # The old primary back as a primary of its own: it serves nothing.
            await asyncio.to_thread(rc.start, old)
            await until(lambda: role(pool, "primary") == "fenced", 10.0, "fenced")
            async with pool.connection() as conn:
                assert (await where(conn)) == (False, new.port)
            for _ in range(6):
                async with pool.connection(read_only=True) as conn:
                    assert (await where(conn))[1] != old.port
            # Rejoined as a standby of the new primary: it reads again.
            await asyncio.to_thread(rc.rejoin, old)
            await until(lambda: role(pool, "primary") == "replica", 15.0, "rejoined")
            async with pool.connection(read_only=True) as conn:
                assert (await where(conn))[0]


async def test_a_foreign_connection_is_refused(rc: ReplicatedCluster) -> None:
    async with make_pool(rc, "foreign") as pool, AsyncConnectionPool(rc.primary.dsn) as other:
        conn = await other.getconn()
        with pytest.raises(PoolError, match="not lent by this pool"):
            await pool.putconn(conn)
        await other.putconn(conn)


async def test_a_pool_dropped_without_close_stops_probing(rc: ReplicatedCluster) -> None:
    pool = make_pool(rc, "dropped")
    await pool.open(wait=True)
    assert count_backends(rc.primary.dsn, "dropped.probe") == 1

    def probing() -> bool:
        return any(t.get_name() == "aiopgpool-dropped-probe" for t in asyncio.all_tasks())

    assert probing()
    del pool
    gc.collect()
    await until(lambda: not probing(), 5.0, "the probe task ended")
    await until(lambda: count_backends(rc.primary.dsn, "dropped.probe") == 0, 5.0, "probe closed")


async def test_full_replicas_send_reads_to_the_primary_without_marking_them_down(
    rc: ReplicatedCluster,
) -> None:
    async with make_pool(rc, "full", max_size=1) as pool:
        await pool.open(wait=True)
        members = [pool.pools[f"full.replica-{i}"] for i in (1, 2)]
        held = [(m, await m.getconn()) for m in members]  # around the router: seen at probes
        await pool.probe()
        start = time.monotonic()
        async with pool.connection(read_only=True, timeout=10) as conn:
            assert (await where(conn)) == (False, rc.primary.port)
        took = time.monotonic() - start
        assert 0.9 <= took < 2.0, took  # one bounded wait on one replica, not one per replica
        assert role(pool, "replica-1") == role(pool, "replica-2") == "replica"
        for m, conn in held:
            await m.putconn(conn)
