"""Failover on a real replicated cluster (issue #14): a pool whose conninfo asks for
``target_session_attrs=read-write`` follows the primary when it moves, without
``drain()``, under load, and loses no slot on the way.

Every test here changes roles, so each builds a cluster of its own (a primary and one
standby, on loopback). The figures printed (``-s``) are those quoted in the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from helpers import primary_and_standby, unique_name

from aiopgpool import AsyncConnectionPool, ConnectionPool
from aiopgpool.testing import LocalCluster, ReplicatedCluster, count_backends

WRITERS = 20
MAX_SIZE = 8
# Generous bound on the time from promotion to 100 % successful writes (no timing test).
RECOVERY_BOUND = 10.0
# Once this long passes with every write succeeding, the pool is taken as recovered.
CLEAN_STRETCH = 1.0
# From stopping the primary to promoting the standby: longer than a checkout's timeout,
# so that waiters fail too and the pool's reconnect backoff grows.
OUTAGE = 2.0


@pytest.fixture
def pair() -> Iterator[ReplicatedCluster]:
    """A primary and one standby, with a table to write to, for a test that moves roles."""
    with primary_and_standby("writes (writer int, at timestamptz DEFAULT now())") as cluster:
        yield cluster


def _conninfo(cluster: ReplicatedCluster) -> str:
    return cluster.conninfo(target_session_attrs="read-write", connect_timeout="2")


def _backends(node: LocalCluster, name: str) -> int:
    if not node.running:
        return 0
    return count_backends(node.dsn, name)


@dataclass
class Tally:
    """Outcomes of the writers: (monotonic time, succeeded) in order, under a lock."""

    outcomes: list[tuple[float, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool) -> None:
        with self.lock:
            self.outcomes.append((time.monotonic(), ok))

    def clean_since(self, since: float) -> bool:
        """Every write in the last CLEAN_STRETCH succeeded; that stretch began after ``since``."""
        now = time.monotonic()
        with self.lock:
            recent = [ok for at, ok in self.outcomes if at >= max(since, now - CLEAN_STRETCH)]
        return now - since >= CLEAN_STRETCH and len(recent) >= WRITERS and all(recent)

    def figures(self, promoted: float) -> tuple[float, float, int, int]:
        """(promotion to first success, promotion to 100 % success, failures, successes)."""
        with self.lock:
            after = [(at, ok) for at, ok in self.outcomes if at >= promoted]
            failures = sum(not ok for _, ok in self.outcomes)
            successes = sum(ok for _, ok in self.outcomes)
        first_ok = next(at for at, ok in after if ok)
        last_failure = max((at for at, ok in after if not ok), default=promoted)
        all_ok = next(at for at, ok in after if ok and at > last_failure)
        return first_ok - promoted, all_ok - promoted, failures, successes


def _report(label: str, tally: Tally, requested: float, promoted: float) -> tuple[float, float]:
    """Print the figures, from the moment promotion was requested (pg_promote)."""
    first, full, failures, successes = tally.figures(requested)
    print(
        f"\n{label}: pg_promote -> first write {first * 1000:.0f} ms, -> 100 % writes"
        f" {full * 1000:.0f} ms; out of recovery after {(promoted - requested) * 1000:.0f} ms"
        f" ({failures} failed and {successes} succeeded writes in all)"
    )
    return first, full


async def _until_recovered(tally: Tally, promoted: float) -> None:
    deadline = promoted + RECOVERY_BOUND + CLEAN_STRETCH
    while not tally.clean_since(promoted) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


# -- the async pool ---------------------------------------------------------------------


async def _async_writers(
    pool: AsyncConnectionPool, tally: Tally, stop: asyncio.Event
) -> list[asyncio.Task[None]]:
    async def write(n: int) -> None:
        while not stop.is_set():
            try:
                async with pool.connection(timeout=1.0) as conn:
                    await conn.execute("INSERT INTO writes (writer) VALUES (%s)", (n,))
            except psycopg.Error:
                tally.add(False)
                await asyncio.sleep(0.02)
            else:
                tally.add(True)
                await asyncio.sleep(0.005)

    return [asyncio.create_task(write(n)) for n in range(WRITERS)]


async def _no_slot_lost(pool: AsyncConnectionPool, port: int) -> None:
    """max_size connections at once, all writable on ``port``; then nothing in use."""
    conns = await asyncio.gather(*(pool.getconn(5.0) for _ in range(pool.max_size)))
    try:
        assert len({id(conn) for conn in conns}) == pool.max_size
        for conn in conns:
            assert conn.info.port == port
            await conn.execute("INSERT INTO writes (writer) VALUES (-1)")
    finally:
        for conn in conns:
            await pool.putconn(conn)
    stats = pool.stats()
    assert (stats.in_use, stats.waiting) == (0, 0), stats
    assert stats.size <= pool.max_size


async def test_async_pool_follows_a_failover_under_load(pair: ReplicatedCluster) -> None:
    old, new = pair.primary, pair.standbys[0]
    name = unique_name("failover-async")
    pool = AsyncConnectionPool(_conninfo(pair), name=name, min_size=4, max_size=MAX_SIZE)
    await pool.open(wait=True, timeout=10.0)
    tally, stop = Tally(), asyncio.Event()
    try:
        tasks = await _async_writers(pool, tally, stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(pair.stop, old)
        await asyncio.sleep(OUTAGE)  # every write fails
        requested = time.monotonic()
        await asyncio.to_thread(pair.promote, new)
        promoted = time.monotonic()
        await _until_recovered(tally, promoted)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10.0)
        _, full = _report("async pool", tally, requested, promoted)
        assert full < RECOVERY_BOUND, "writes did not all succeed again"
        assert tally.clean_since(promoted)
        await _no_slot_lost(pool, new.port)
        assert _backends(new, name) >= 1
    finally:
        stop.set()
        await pool.close(timeout=2.0)


async def test_read_only_in_place_then_promotion_replaces_every_old_connection(
    pair: ReplicatedCluster,
) -> None:
    """The primary is made read-only in place (it keeps running, and accepting
    connections) and the standby promoted: writes succeed again on the new primary
    without drain(), and the pool keeps no connection to the old one."""
    old, new = pair.primary, pair.standbys[0]
    name = unique_name("failover-ro")
    pool = AsyncConnectionPool(_conninfo(pair), name=name, min_size=4, max_size=MAX_SIZE)
    await pool.open(wait=True, timeout=10.0)
    tally, stop = Tally(), asyncio.Event()
    try:
        assert _backends(old, name) >= 4
        tasks = await _async_writers(pool, tally, stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(pair.make_read_only, old)
        await asyncio.sleep(OUTAGE)
        requested = time.monotonic()
        await asyncio.to_thread(pair.promote, new)
        promoted = time.monotonic()
        await _until_recovered(tally, promoted)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10.0)
        _report("async pool, read-only in place", tally, requested, promoted)
        assert tally.clean_since(promoted)
        await _no_slot_lost(pool, new.port)
        deadline = time.monotonic() + 5.0
        while _backends(old, name) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert _backends(old, name) == 0
        # Backends closed a moment ago may linger in pg_stat_activity: eventually.
        while _backends(new, name) > MAX_SIZE and time.monotonic() < deadline + 5.0:
            await asyncio.sleep(0.05)
        with psycopg.connect(new.dsn) as mon:
            rows = mon.execute(
                "SELECT pid, backend_start, state, query FROM pg_stat_activity"
                " WHERE application_name = %s",
                (name,),
            ).fetchall()
        assert 1 <= len(rows) <= MAX_SIZE, (pool.stats(), rows)
    finally:
        stop.set()
        await pool.close(timeout=2.0)


async def test_cancelled_during_the_outage_loses_no_slot(pair: ReplicatedCluster) -> None:
    """Tasks cancelled while they wait for a slot or while their connection attempt
    runs (no primary anywhere) give every slot back: after the promotion max_size
    connections can be had at once."""
    old, new = pair.primary, pair.standbys[0]
    pool = AsyncConnectionPool(
        _conninfo(pair), name=unique_name("failover-cancel"), min_size=2, max_size=4
    )
    await pool.open(wait=True, timeout=10.0)
    try:
        await asyncio.to_thread(pair.stop, old)

        async def use() -> None:
            async with pool.connection(timeout=20.0) as conn:
                await conn.execute("SELECT 1")

        doomed = [asyncio.create_task(use()) for _ in range(12)]
        await asyncio.sleep(1.0)  # connecting and waiting, in vain
        stats = pool.stats()
        assert stats.waiting >= 1, stats
        for task in doomed:
            task.cancel()
        outcomes = await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True), 10.0)
        assert all(isinstance(out, asyncio.CancelledError | psycopg.Error) for out in outcomes)
        assert any(isinstance(out, asyncio.CancelledError) for out in outcomes)
        survivors = [asyncio.create_task(use()) for _ in range(6)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(pair.promote, new)
        await asyncio.wait_for(asyncio.gather(*survivors), 15.0)
        await _no_slot_lost(pool, new.port)
        stats = pool.stats()
        assert stats.size <= 4
    finally:
        await pool.close(timeout=2.0)


# -- the sync pool ----------------------------------------------------------------------


def test_sync_pool_follows_a_failover_under_load(pair: ReplicatedCluster) -> None:
    old, new = pair.primary, pair.standbys[0]
    name = unique_name("failover-sync")
    pool = ConnectionPool(_conninfo(pair), name=name, min_size=4, max_size=MAX_SIZE)
    pool.open(wait=True, timeout=10.0)
    tally, stop = Tally(), threading.Event()

    def write(n: int) -> None:
        while not stop.is_set():
            try:
                with pool.connection(timeout=1.0) as conn:
                    conn.execute("INSERT INTO writes (writer) VALUES (%s)", (n,))
            except psycopg.Error:
                tally.add(False)
                time.sleep(0.02)
            else:
                tally.add(True)
                time.sleep(0.005)

    threads = [threading.Thread(target=write, args=(n,), daemon=True) for n in range(WRITERS)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        pair.stop(old)
        time.sleep(OUTAGE)
        requested = time.monotonic()
        pair.promote(new)
        promoted = time.monotonic()
        deadline = promoted + RECOVERY_BOUND + CLEAN_STRETCH
        while not tally.clean_since(promoted) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(10.0)
        assert not any(thread.is_alive() for thread in threads)
        _, full = _report("sync pool", tally, requested, promoted)
        assert full < RECOVERY_BOUND
        assert tally.clean_since(promoted)
        conns = [pool.getconn(5.0) for _ in range(MAX_SIZE)]
        try:
            assert {conn.info.port for conn in conns} == {new.port}
            for conn in conns:
                conn.execute("INSERT INTO writes (writer) VALUES (-1)")
        finally:
            for conn in conns:
                pool.putconn(conn)
        stats = pool.stats()
        assert (stats.in_use, stats.waiting) == (0, 0), stats
        assert _backends(new, name) >= 1
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            pool.close(timeout=2.0)
