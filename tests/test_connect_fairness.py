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
