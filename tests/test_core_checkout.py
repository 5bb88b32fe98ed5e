"""Checkout guarantees of the asyncio core: bounds, exclusivity, keys, timeouts, fairness,
the hot path, dead idle connections, the null pool and stats."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import psycopg
import pytest
from helpers import call, eventually, monitor, opened, unique_name

from aiopgpool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    PoolError,
    PoolTimeout,
    TooManyRequests,
)

# -- bounds and exclusivity -----------------------------------------------------------


async def test_never_more_than_max_size_backends(dsn: str, backends: Any) -> None:
    """Many concurrent borrowers never make the pool open more than max_size backends."""
    name = unique_name("max-size")
    async with opened(dsn, name, min_size=1, max_size=3) as pool:

        async def borrower() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(0.02)")

        tasks = [asyncio.create_task(borrower()) for _ in range(20)]
        peak_backends = peak_size = 0
        while not all(t.done() for t in tasks):
            peak_backends = max(peak_backends, await call(backends, name))
            peak_size = max(peak_size, pool.stats().size)
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        stats = pool.stats()
    assert peak_backends <= 3
    assert peak_size <= 3
    assert stats.connections_created <= 3
    assert peak_backends == 3, "the test did not reach max_size concurrency"


async def test_no_connection_held_by_two_borrowers(dsn: str) -> None:
    """A connection is never handed to a second borrower while the first holds it."""
    name = unique_name("exclusive")
    held: set[int] = set()
    overlaps: list[int] = []
    async with opened(dsn, name, min_size=2, max_size=4) as pool:

        async def borrower(i: int) -> None:
            for _ in range(5):
                conn = await pool.getconn()
                if id(conn) in held:
                    overlaps.append(i)
                held.add(id(conn))
                if i % 2:
                    await conn.execute("SELECT 1")  # a dirty return: the slow path
                await asyncio.sleep(random.random() * 0.003)
                held.discard(id(conn))
                await pool.putconn(conn)

        await asyncio.wait_for(asyncio.gather(*(borrower(i) for i in range(30))), 10)
        stats = pool.stats()
    assert overlaps == []
    assert stats.in_use == 0
    assert stats.size <= 4


async def test_same_key_returns_same_connection_without_another_slot(dsn: str) -> None:
    """getconn(key=k) twice: the same connection, one slot; putconn(key=k) frees it."""
    name = unique_name("keyed")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        first = await pool.getconn(key="k")
        second = await pool.getconn(key="k", timeout=0)  # would fail if it needed a slot
        assert second is first
        assert pool.stats().in_use == 1
        await pool.putconn(first, key="k")
        stats = pool.stats()
        assert (stats.in_use, stats.idle) == (0, 1)
        again = await pool.getconn(timeout=0)
        assert again is first
        await pool.putconn(again)


# -- timeouts and waiting ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["getconn", "pool"])
async def test_pool_timeout_at_deadline(dsn: str, where: str) -> None:
    """A waiter gets PoolTimeout at its deadline (given to getconn or the pool's default)."""
    name = unique_name(f"timeout-{where}")
    pool_timeout = 0.3 if where == "pool" else 5.0
    async with opened(dsn, name, min_size=1, max_size=1, timeout=pool_timeout) as pool:
        held = await pool.getconn()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(PoolTimeout):
            # wait_for only guards against a hang: PoolTimeout must come first.
            if where == "pool":
                await asyncio.wait_for(pool.getconn(), 5)
            else:
                await asyncio.wait_for(pool.getconn(timeout=0.3), 5)
        elapsed = loop.time() - start
        assert 0.25 <= elapsed < 1.3
        assert pool.stats().timeouts == 1
        await pool.putconn(held)


async def test_timeout_zero_fails_at_once_when_exhausted(dsn: str) -> None:
    """timeout=0 with every connection out fails at once: 'connection pool exhausted'."""
    name = unique_name("exhausted")
    async with opened(dsn, name, min_size=2, max_size=2) as pool:
        held = [await pool.getconn(), await pool.getconn()]
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(PoolTimeout, match="connection pool exhausted") as info:
            await pool.getconn(timeout=0)
        assert loop.time() - start < 0.2
        assert isinstance(info.value, PoolError)
        for conn in held:
            await pool.putconn(conn)


async def test_timeout_zero_pool_connects_on_free_slots(dsn: str) -> None:
    """A pool with timeout=0 (psycopg2 style) still connects on free slots; only full fails."""
    name = unique_name("timeout0-connects")
    async with opened(dsn, name, min_size=0, max_size=2, timeout=0) as pool:
        first = await pool.getconn()
        second = await pool.getconn()
        cur = await second.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        with pytest.raises(PoolTimeout, match="connection pool exhausted"):
            await pool.getconn()
        await pool.putconn(first)
        await pool.putconn(second)


async def test_max_waiting_gives_too_many_requests(dsn: str) -> None:
    """With max_waiting requests queued, one more fails at once with TooManyRequests."""
    name = unique_name("max-waiting")
    async with opened(dsn, name, min_size=1, max_size=1, max_waiting=2) as pool:
        held = await pool.getconn()
        waiters = [asyncio.create_task(pool.getconn()) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert pool.stats().waiting == 2
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TooManyRequests):
            await pool.getconn(timeout=2)
        assert loop.time() - start < 0.5
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await pool.putconn(held)
        assert pool.stats().waiting == 0


async def test_waiters_served_first_come_first_served(dsn: str) -> None:
    """Waiters get connections in arrival order; a newcomer does not jump the queue."""
    name = unique_name("fifo")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        conn = await pool.getconn()
        served: list[tuple[int, Any]] = []

        async def waiter(i: int) -> None:
            served.append((i, await pool.getconn()))

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(waiter(i)))
            await asyncio.sleep(0.01)
        assert pool.stats().waiting == 5
        for i in range(5):
            await pool.putconn(conn)
            # The connection is already promised to the oldest waiter.
            with pytest.raises(PoolTimeout):
                await pool.getconn(timeout=0)
            await asyncio.wait_for(tasks[i], 2)
            assert [n for n, _ in served] == list(range(i + 1))
            conn = served[-1][1]
        await pool.putconn(conn)


# -- the hot path and reuse order ---------------------------------------------------


async def test_hot_path_makes_no_server_round_trip(dsn: str) -> None:
    """getconn + putconn of a clean idle connection sends nothing to the server."""
    name = unique_name("hot-path")
    sql = "SELECT query, state, state_change FROM pg_stat_activity WHERE pid = %s"
    async with opened(dsn, name, min_size=1, max_size=1) as pool, await monitor(dsn) as mon:
        conn = await pool.getconn()
        pid = conn.info.backend_pid
        await conn.execute("SELECT 'hot path marker'")
        await conn.commit()
        await pool.putconn(conn)
        before = await (await mon.execute(sql, (pid,))).fetchone()
        waited = pool.stats().requests_waited
        for _ in range(100):
            again = await pool.getconn()
            assert again is conn
            await pool.putconn(again)
        after = await (await mon.execute(sql, (pid,))).fetchone()
        assert pool.stats().requests_waited == waited
    assert before is not None and before[0] == "COMMIT"
    assert after == before


async def test_idle_connections_reused_most_recent_first(dsn: str) -> None:
    """The most recently returned idle connection is handed out first (LIFO)."""
    name = unique_name("lifo")
    async with opened(dsn, name, min_size=2, max_size=2) as pool:
        a = await pool.getconn()
        b = await pool.getconn()
        await pool.putconn(a)
        await pool.putconn(b)
        got = await pool.getconn()
        assert got is b
        await pool.putconn(got)
        c = await pool.getconn()
        d = await pool.getconn()
        await pool.putconn(d)
        await pool.putconn(c)
        got = await pool.getconn()
        assert got is c
        await pool.putconn(got)


async def test_server_killed_idle_connection_not_handed_out(
    dsn: str, backends: Any, terminate: Any
) -> None:
    """An idle connection the server killed is replaced, not handed out; connections_lost grows."""
    name = unique_name("killed-idle")
    async with opened(dsn, name, min_size=2, max_size=2) as pool:
        conn = await pool.getconn()
        old_pid = conn.info.backend_pid
        await pool.putconn(conn)
        assert await call(terminate, name, "idle") == 2
        assert await eventually(backends, name, expect=0) == 0
        conn = await pool.getconn()
        assert not conn.closed
        cur = await conn.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None and row[0] != old_pid
        await pool.putconn(conn)
        assert pool.stats().connections_lost >= 1


async def test_check_replaces_killed_idle_connections(
    dsn: str, backends: Any, terminate: Any
) -> None:
    """check() finds idle connections the server killed and replaces them."""
    name = unique_name("check")
    async with opened(dsn, name, min_size=2, max_size=3) as pool:
        assert await call(terminate, name) == 2
        assert await eventually(backends, name, expect=0) == 0
        await pool.check()
        stats = pool.stats()
        assert stats.connections_lost == 2
        await pool.wait(5)
        assert await eventually(backends, name, expect=2) == 2
        assert pool.stats().size == 2
        async with pool.connection(timeout=0) as conn:
            await conn.execute("SELECT 1")


async def test_getconn_bad_timeout_loses_no_slot(dsn: str) -> None:
    """getconn(timeout=-1) raises ValueError and the pool keeps all its slots."""
    name = unique_name("bad-timeout")
    async with opened(dsn, name, min_size=0, max_size=1) as pool:
        with pytest.raises(ValueError, match="timeout"):
            await pool.getconn(timeout=-1)
        conn = await pool.getconn(timeout=1)
        await pool.putconn(conn)
        assert pool.stats().in_use == 0


# -- the null pool -------------------------------------------------------------------------


async def test_null_pool_connects_and_closes_each_time(dsn: str, backends: Any) -> None:
    """AsyncNullConnectionPool: each getconn connects, each putconn closes."""
    name = unique_name("null")
    pool = AsyncNullConnectionPool(dsn, name=name, max_size=2, timeout=5)
    async with pool:
        assert await call(backends, name) == 0
        pids = []
        for _ in range(2):
            conn = await pool.getconn()
            assert await call(backends, name) == 1
            pids.append(conn.info.backend_pid)
            await pool.putconn(conn)
            assert conn.closed
            assert await eventually(backends, name, expect=0) == 0
        stats = pool.stats()
    assert pids[0] != pids[1]
    assert stats.connections_created == 2
    assert (stats.size, stats.idle, stats.in_use) == (0, 0, 0)


async def test_null_pool_max_size_bounds_concurrency(dsn: str, backends: Any) -> None:
    """AsyncNullConnectionPool: extra borrowers wait; never more than max_size backends."""
    name = unique_name("null-bound")
    pool = AsyncNullConnectionPool(dsn, name=name, max_size=2, timeout=5)
    async with pool:
        held = [await pool.getconn(), await pool.getconn()]
        waiter = asyncio.create_task(pool.getconn())
        await asyncio.sleep(0.1)
        assert not waiter.done()
        assert pool.stats().waiting == 1
        assert await call(backends, name) == 2
        await pool.putconn(held.pop())
        conn = await asyncio.wait_for(waiter, 2)
        assert await call(backends, name) <= 2
        await pool.putconn(conn)
        await pool.putconn(held.pop())
        assert await eventually(backends, name, expect=0) == 0


def test_null_pool_rejects_min_size() -> None:
    """AsyncNullConnectionPool(min_size=1) raises ValueError."""
    with pytest.raises(ValueError, match="min_size"):
        AsyncNullConnectionPool("dbname=x", min_size=1)


# -- stats -------------------------------------------------------------------------------------

STAT_KEYS = {
    "size", "idle", "in_use", "waiting", "min_size", "max_size", "requests",
    "requests_waited", "wait_time_total", "timeouts", "connections_created",
    "connections_failed", "connections_lost", "returns_bad",
}  # fmt: skip


async def test_stats_consistent_in_a_simple_scenario(dsn: str) -> None:
    """stats().as_dict() has every documented key, with values matching what happened."""
    name = unique_name("stats")
    pool = AsyncConnectionPool(dsn, name=name, min_size=1, max_size=2, timeout=5)
    async with pool:
        await pool.wait(5)
        first = pool.stats().as_dict()
        assert set(first) >= STAT_KEYS
        assert (first["size"], first["idle"], first["in_use"]) == (1, 1, 0)
        assert (first["min_size"], first["max_size"]) == (1, 2)
        assert first["requests"] == first["requests_waited"] == first["timeouts"] == 0

        a = await pool.getconn()
        b = await pool.getconn()  # connects a second one
        s = pool.stats().as_dict()
        assert (s["size"], s["idle"], s["in_use"], s["waiting"]) == (2, 0, 2, 0)
        assert s["requests"] == 2
        assert s["connections_created"] == 2
        assert s["requests_waited"] == 1  # b waited for its connection to open

        with pytest.raises(PoolTimeout):
            await asyncio.wait_for(pool.getconn(timeout=0.1), 5)
        s = pool.stats().as_dict()
        assert s["requests"] == 3
        assert s["requests_waited"] == 2
        assert s["timeouts"] == 1
        assert 0.1 <= s["wait_time_total"] < 1.5

        await a.execute("SELECT 1")  # returned in a transaction: a bad return
        await pool.putconn(a)
        await pool.putconn(b)
        s = pool.stats().as_dict()
        assert (s["size"], s["idle"], s["in_use"], s["waiting"]) == (2, 2, 0, 0)
        assert s["returns_bad"] == 1
        assert s["connections_failed"] == 0
        assert s["connections_lost"] == 0


async def test_getconn_connection_is_usable(dsn: str) -> None:
    """A connection from getconn is an open psycopg AsyncConnection with no transaction."""
    name = unique_name("usable")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        conn = await pool.getconn()
        assert isinstance(conn, psycopg.AsyncConnection)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        cur = await conn.execute("SELECT current_setting('application_name')")
        assert await cur.fetchone() == (name,)
        await pool.putconn(conn)
