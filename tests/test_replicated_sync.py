"""ReplicatedPool, the sync twin, against a real primary and two streaming standbys: the
main paths (routing, threads, lag, a killed replica, read-your-writes, close)."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from aiopgpool import PoolClosed, PoolError, ReplicatedPool
from aiopgpool.testing import ReplicatedCluster

FAST = {"probe_interval": 0.2, "max_replica_lag": 0.5}


@pytest.fixture(scope="module")
def rc() -> Iterator[ReplicatedCluster]:
    with ReplicatedCluster(standbys=2) as cluster:
        with psycopg.connect(cluster.primary.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g")
        cluster.wait_caught_up()
        yield cluster


def make_pool(rc: ReplicatedCluster, name: str, **options: Any) -> ReplicatedPool:
    return ReplicatedPool(
        rc.primary.dsn, [node.dsn for node in rc.standbys], name=name, **{**FAST, **options}
    )


def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def where(conn: psycopg.Connection[Any]) -> tuple[bool, int]:
    row = conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone()
    assert row is not None
    return bool(row[0]), int(row[1])


def role(pool: ReplicatedPool, member: str) -> str:
    return pool.members()[f"{pool.name}.{member}"].role


def test_routing_from_many_threads(rc: ReplicatedCluster) -> None:
    with make_pool(rc, "sync-spread", min_size=2, max_size=4) as pool:
        pool.open(wait=True)
        with pool.connection() as conn:
            assert where(conn) == (False, rc.primary.port)
            conn.execute("UPDATE items SET v = v WHERE id = 1")
        seen: list[tuple[bool, int]] = []
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                for _ in range(10):
                    with pool.connection(read_only=True) as conn:
                        seen.append(where(conn))
                        time.sleep(0.01)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert len(seen) == 60 and all(in_recovery for in_recovery, _ in seen)
        assert {port for _, port in seen} == {node.port for node in rc.standbys}
        stats = pool.stats()
        assert sum(stats[f"sync-spread.replica-{i}"].requests for i in (1, 2)) == 60
        assert set(pool.get_stats()) == set(stats)
        conn = pool.getconn(read_only=True)
        pool.putconn(conn)
        with pytest.raises(PoolError):
            pool.putconn(conn)
        pool.check()
        pool.drain()
    assert pool.closed and all(p.closed for p in pool.pools.values())
    with pytest.raises(PoolClosed):
        pool.getconn(read_only=True)


def test_a_paused_replica_is_out_and_back(rc: ReplicatedCluster) -> None:
    paused, other = rc.standbys
    with make_pool(rc, "sync-paused") as pool:
        pool.open(wait=True)
        rc.pause_replay(paused)
        try:
            with pool.connection() as conn:
                conn.execute("UPDATE items SET v = v WHERE id = 2")
            eventually(lambda: role(pool, "replica-1") == "paused", 5.0, "paused")
            for _ in range(6):
                with pool.connection(read_only=True) as conn:
                    assert where(conn)[1] == other.port
        finally:
            rc.resume_replay(paused)
        eventually(lambda: role(pool, "replica-1") == "replica", 5.0, "back")


def test_a_killed_replica_never_fails_a_checkout(rc: ReplicatedCluster) -> None:
    victim, other = rc.standbys
    with make_pool(rc, "sync-killed") as pool:
        pool.open(wait=True)
        rc.stop(victim)
        try:
            for _ in range(20):  # before and after the probes notice
                try:
                    with pool.connection(read_only=True, timeout=10) as conn:
                        assert where(conn)[1] == other.port
                except psycopg.OperationalError as exc:
                    # Only a read on a connection the stop killed; never the checkout.
                    assert not isinstance(exc, PoolError), exc
            eventually(lambda: role(pool, "replica-1") == "down", 5.0, "down")
        finally:
            rc.start(victim)
        eventually(lambda: role(pool, "replica-1") == "replica", 15.0, "back")


def test_read_your_writes_and_close(rc: ReplicatedCluster) -> None:
    pool = make_pool(rc, "sync-ryw", open=True)
    with pool.connection() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ryw (id int PRIMARY KEY)")
    for i in range(30):
        conn = pool.getconn()
        conn.execute("INSERT INTO ryw VALUES (%s)", (i,))
        with pytest.raises(PoolError, match="after the write's commit"):
            pool.current_lsn(conn)
        conn.commit()
        lsn = pool.current_lsn(conn)
        pool.putconn(conn)
        with pool.connection(read_only=True, min_lsn=lsn) as conn:
            row = conn.execute("SELECT count(*) FROM ryw WHERE id = %s", (i,)).fetchone()
            assert row == (1,), f"row {i} not seen (stale read)"
    held = [pool.getconn(), pool.getconn(read_only=True)]
    start = time.monotonic()
    pool.close(timeout=0.3)
    assert time.monotonic() - start < 3  # members close in parallel
    assert pool.closed and all(c.closed for c in held)
    with pytest.raises(PoolClosed):
        pool.open()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="replicas is empty"):
        ReplicatedPool("host=a dbname=x", [])
    with pytest.raises(ValueError, match="same server"):
        ReplicatedPool("host=a dbname=x", ["host=a port=5432 dbname=x"])


def test_a_pool_dropped_without_close_ends_its_probe_thread(rc: ReplicatedCluster) -> None:
    pool = make_pool(rc, "sync-dropped")
    pool.open(wait=True)

    def probing() -> bool:
        return any(t.name == "aiopgpool-sync-dropped-probe" for t in threading.enumerate())

    assert probing()
    del pool
    gc.collect()
    eventually(lambda: not probing(), 5.0, "the probe thread ended")


def test_a_promotion_moves_the_writes() -> None:
    with ReplicatedCluster(standbys=1) as pair:
        old, new = pair.nodes
        pool = ReplicatedPool(old.dsn, [new.dsn], name="sync-failover", timeout=2, **FAST)
        with pool:
            pool.open(wait=True)
            with pool.connection() as conn:
                assert where(conn) == (False, old.port)
            pair.stop(old)
            pair.promote(new)
            r0 = pool._topology.rounds
            eventually(lambda: pool.primary is pool.pools["sync-failover.replica-1"], 10.0)
            assert pool._topology.rounds - r0 <= 3
            with pool.connection() as conn:
                conn.execute("CREATE TABLE after (x int)")
                assert where(conn) == (False, new.port)
            with pool.connection(read_only=True) as conn:  # no replica left: the primary
                assert where(conn) == (False, new.port)
            assert role(pool, "primary") == "down"


class _Interrupted(Exception):
    pass


def test_an_interrupted_wait_loses_no_slot_on_any_member(rc: ReplicatedCluster) -> None:
    """The sync twin's cancellation: a getconn interrupted while it waits (a signal, as
    Ctrl-C would), for the primary or for a replica, raises that interrupt, leaves the
    line it was in, and every member keeps all its slots."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted

    pool = make_pool(rc, "sync-interrupted", min_size=1, max_size=1)
    pool.open(wait=True)  # the first probes done: reads go to the replicas
    try:
        held = [pool.getconn(), pool.getconn(read_only=True), pool.getconn(read_only=True)]
        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            for read_only in (False, True):
                signal.setitimer(signal.ITIMER_REAL, 0.3)
                with pytest.raises(_Interrupted):
                    pool.getconn(timeout=5.0, read_only=read_only)
                signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        for conn in held:
            pool.putconn(conn)
        members = pool.stats()
        assert all(s.waiting == 0 and s.in_use == 0 for s in members.values()), members
        again = [pool.getconn(timeout=5.0), pool.getconn(timeout=5.0, read_only=True)]
        for conn in again:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            pool.putconn(conn)
        assert all(s.in_use == 0 for s in pool.stats().values())
    finally:
        pool.close()


def test_open_true_does_not_wait_for_the_servers() -> None:
    """``open=True`` opens as ``open()`` does, without waiting (as ConnectionPool): with
    every server down it returns at once, open, and closes cleanly, threads and all."""
    from helpers import closed_port

    primary, replica = (f"host=127.0.0.1 port={closed_port()} connect_timeout=2",) * 2
    replica += " dbname=other"
    before = {t.name for t in threading.enumerate()}
    start = time.monotonic()
    pool = ReplicatedPool(primary, [replica], open=True, name="open-true", probe_interval=0.2)
    assert time.monotonic() - start < 5.0  # waiting would take the 30 s open timeout
    assert not pool.closed
    pool.close(0)
    assert pool.closed
    gc.collect()
    eventually(lambda: not {t.name for t in threading.enumerate()} - before, 5.0, "threads ended")


def test_probe_now(rc: ReplicatedCluster) -> None:
    """``probe()`` (as the async twin's): a probe round now; refused once closed."""
    pool = make_pool(rc, "sync-probe-now")
    with pytest.raises(PoolClosed, match="not open"):
        pool.probe()
    pool.open(wait=True)
    before = pool._topology.rounds
    pool.probe()
    assert pool._topology.rounds > before
    pool.close()
    with pytest.raises(PoolClosed):
        pool.probe()
