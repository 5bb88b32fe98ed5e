"""First come, first served while connecting fails: a borrower that took a free slot and
cannot connect (the server refuses: a connection limit) is in line for a connection given
back meanwhile, ahead of any later request, instead of retrying to its timeout while that
connection sits idle."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from helpers import unique_name
from psycopg import sql
from psycopg.conninfo import make_conninfo

from aiopgpool import AsyncConnectionPool, ConnectionPool, PoolClosed, PoolTimeout


@pytest.fixture
def one_connection_dsn(dsn: str) -> Iterator[str]:
    """A conninfo for a role the server lets open one connection at a time."""
    role = unique_name("limited").replace("-", "_")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1").format(sql.Identifier(role))
        )
    try:
        yield make_conninfo(dsn, user=role)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            for _ in range(100):
                left = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,)
                ).fetchone()
                if left is not None and left[0] == 0:
                    break
                time.sleep(0.05)
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@contextlib.asynccontextmanager
async def borrower_connecting(
    dsn: str, label: str
) -> AsyncIterator[tuple[AsyncConnectionPool, Any, asyncio.Task[Any]]]:
    """An open pool whose one possible connection is held, and a task B that took the
    free slot and, unable to connect, waits for its next attempt: (pool, held, B)."""
    async with AsyncConnectionPool(
        dsn, name=unique_name(label), min_size=1, max_size=2, timeout=10
    ) as pool:
        await pool.wait(5)
        held = await pool.getconn()
        b = asyncio.create_task(pool.getconn(timeout=8))
        await asyncio.sleep(0.5)
        assert not b.done()
        yield pool, held, b


async def test_a_borrower_whose_connects_fail_gets_a_connection_given_back(
    one_connection_dsn: str,
) -> None:
    """B takes the free slot and cannot connect; A gives its connection back: B gets it,
    and C, asking after the return, does not overtake B."""
    async with borrower_connecting(one_connection_dsn, "fifo-connect") as (pool, held, b):
        await pool.putconn(held)
        c = asyncio.create_task(pool.getconn(timeout=1))
        got = await asyncio.wait_for(b, 5)
        assert got is held, "B, first in line, gets the connection given back"
        with pytest.raises(PoolTimeout):
            await c
        await pool.putconn(got)
        stats = pool.stats()
        assert (stats.size, stats.in_use, stats.waiting) == (1, 0, 0)


def test_a_sync_borrower_whose_connects_fail_gets_a_connection_given_back(
    one_connection_dsn: str,
) -> None:
    """The same with the sync pool: the return, in another thread, wakes the borrower's
    connect loop on the pool's event loop."""
    name = unique_name("fifo-connect-sync")
    with ConnectionPool(one_connection_dsn, name=name, min_size=1, max_size=2, timeout=10) as pool:
        pool.wait(5)
        held = pool.getconn()
        outcome: list[Any] = []

        def borrow() -> None:
            try:
                outcome.append(pool.getconn(timeout=8))
            except BaseException as exc:
                outcome.append(exc)

        b = threading.Thread(target=borrow)
        b.start()
        time.sleep(0.5)
        assert not outcome
        pool.putconn(held)
        b.join(5)
        assert outcome == [held]
        pool.putconn(held)
        stats = pool.get_stats()
        assert stats["pool_size"] == 1 and stats["requests_waiting"] == 0


async def test_a_borrower_in_line_while_connecting_fails_leaves_it_when_cancelled(
    one_connection_dsn: str,
) -> None:
    """A connecting borrower cancelled while in line leaves it: nothing is lost, and the
    connection given back afterwards stays idle for the next request."""
    async with borrower_connecting(one_connection_dsn, "fifo-connect-cancel") as (pool, held, b):
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        assert pool.stats().waiting == 0
        await pool.putconn(held)
        assert await pool.getconn(timeout=1) is held
        await pool.putconn(held)


async def test_a_borrower_in_line_while_connecting_fails_gets_pool_closed_at_close(
    one_connection_dsn: str,
) -> None:
    """close() while a connecting borrower is in line: it gets PoolClosed at once, not at
    its timeout, and the pool ends with nothing open."""
    name = unique_name("fifo-connect-close")
    pool = AsyncConnectionPool(one_connection_dsn, name=name, min_size=1, max_size=2, timeout=10)
    await pool.open(wait=True, timeout=5)
    held = await pool.getconn()
    b = asyncio.create_task(pool.getconn(timeout=30))
    await asyncio.sleep(0.5)
    await pool.close(timeout=0.1)
    with pytest.raises(PoolClosed):
        await asyncio.wait_for(b, 5)
    assert held.closed
    stats = pool.stats()
    assert (stats.size, stats.in_use, stats.waiting) == (0, 0, 0)


class SlowRefusal:
    """A ``configure`` whose attempts fail slowly while ``refuse`` is set: a borrower's
    attempt is in flight a while (out of line) before it fails."""

    def __init__(self) -> None:
        self.refuse = False

    async def __call__(self, conn: Any) -> None:
        if self.refuse:
            await asyncio.sleep(0.3)
            raise RuntimeError("refused")


async def test_a_free_slot_goes_to_a_waiter_and_the_seats_keep_their_places(dsn: str) -> None:
    """A connection closed on return frees a slot: it goes to the first waiter that has
    none, not down the line of borrowers already connecting (which would cancel their
    attempts and take them out of line); A, first in line, still gets the next connection
    given back, before E and F who asked later."""
    refusal = SlowRefusal()
    async with AsyncConnectionPool(
        dsn, name=unique_name("fifo-free"), min_size=0, max_size=3, timeout=10, configure=refusal
    ) as pool:
        h1, h2 = await pool.getconn(), await pool.getconn()
        refusal.refuse = True
        order: list[str] = []

        async def borrower(name: str) -> Any:
            conn = await pool.getconn(timeout=5)
            order.append(name)
            return conn

        a = asyncio.create_task(borrower("A"))  # the last free slot; fails; in line
        await asyncio.sleep(0.5)
        assert pool.stats().waiting == 1, "a borrower connecting its own slot is pending"
        e = asyncio.create_task(borrower("E"))  # no slot: waits in line, behind A
        await asyncio.sleep(0.1)
        assert pool.stats().waiting == 2
        await pool.putconn(h2, close=True)  # a free slot: to E, A keeps its place
        await asyncio.sleep(0.05)
        f = asyncio.create_task(borrower("F"))
        await asyncio.sleep(0.05)
        await pool.putconn(h1)  # given back: A is first
        await asyncio.sleep(0.05)
        assert order == ["A"]
        refusal.refuse = False
        conns = await asyncio.gather(a, e, f)
        for conn in conns:
            await pool.putconn(conn)
        stats = pool.stats()
        assert (stats.in_use, stats.waiting) == (0, 0)


async def test_borrowers_connecting_do_not_count_against_max_waiting(
    one_connection_dsn: str,
) -> None:
    """Borrowers that hold a slot and are connecting do not wait for one: ``max_waiting``
    does not count them, nor does ``timeout=0``'s check of slots in transit count them
    twice. ``stats().waiting`` shows them, as pending requests."""
    async with AsyncConnectionPool(
        one_connection_dsn,
        name=unique_name("fifo-max-waiting"),
        min_size=0,
        max_size=3,
        timeout=5,
        max_waiting=1,
    ) as pool:
        held = await pool.getconn()
        seated = []
        for _ in range(2):  # one after the other: the first is first in line
            seated.append(asyncio.create_task(pool.getconn()))
            await asyncio.sleep(0.3)
        assert pool.stats().waiting == 2
        late = asyncio.create_task(pool.getconn(timeout=3))  # admitted: nobody waits
        await asyncio.sleep(0.1)
        assert pool.stats().waiting == 3
        await pool.putconn(held)
        first = await asyncio.wait_for(seated[0], 5)
        assert first is held
        for task in (*seated[1:], late):
            task.cancel()
        await asyncio.gather(*seated[1:], late, return_exceptions=True)
        await pool.putconn(first)
        stats = pool.stats()
        assert (stats.in_use, stats.waiting) == (0, 0)


async def test_no_connection_is_lent_during_a_graceful_close(dsn: str) -> None:
    """A borrower whose attempt fails after close() began gets PoolClosed: it does not sit
    in line for a return that was under way when close() began (that connection is
    closed, not lent to be closed under its borrower)."""
    refusal = SlowRefusal()

    async def slow_reset(conn: Any) -> None:
        await asyncio.sleep(0.5)

    pool = AsyncConnectionPool(
        dsn,
        name=unique_name("fifo-closing"),
        min_size=0,
        max_size=2,
        timeout=5,
        configure=refusal,
        reset=slow_reset,
    )
    await pool.open()
    held = await pool.getconn()
    refusal.refuse = True
    b = asyncio.create_task(pool.getconn())  # its attempt in flight
    await asyncio.sleep(0.1)
    returning = asyncio.create_task(pool.putconn(held))  # in reset
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(pool.close(timeout=5))
    with pytest.raises(PoolClosed):
        await asyncio.wait_for(b, 5)
    await returning
    await closing
    assert held.closed
    stats = pool.stats()
    assert (stats.size, stats.in_use, stats.waiting) == (0, 0, 0)
