"""Cancellation guarantees of the asyncio core: a cancelled task loses no slot and hands
no dirty connection to the next borrower."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from helpers import activity, call, closed_port, eventually, finish, opened, unique_name
from psycopg.pq import TransactionStatus

from aiopgpool import AsyncConnectionPool, PoolTimeout
from aiopgpool.testing import PostgresServer

IDLE = TransactionStatus.IDLE


async def test_cancelled_waiters_lose_no_slot(dsn: str) -> None:
    """Tasks cancelled while waiting leave every slot takeable afterwards."""
    name = unique_name("cancel-waiting")
    async with opened(dsn, name, min_size=2, max_size=2) as pool:
        held = [await pool.getconn(), await pool.getconn()]
        waiters = [asyncio.create_task(pool.getconn()) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert pool.stats().waiting == 5
        for task in waiters:
            task.cancel()
        for task in waiters:
            await finish(task)
            assert task.cancelled()
        assert pool.stats().waiting == 0
        for conn in held:
            await pool.putconn(conn)
        again = [await pool.getconn(timeout=1), await pool.getconn(timeout=1)]
        assert {id(c) for c in again} == {id(c) for c in held}
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use) == (2, 0, 2)
        for conn in again:
            await pool.putconn(conn)


async def test_cancelled_while_connecting_loses_no_slot(dsn: str, backends: Any) -> None:
    """A borrower cancelled while its connection is being made leaves the slot free."""
    name = unique_name("cancel-connecting")
    async with opened(dsn, name, min_size=0, max_size=1) as pool:
        task = asyncio.create_task(pool.getconn())
        await asyncio.sleep(0)  # the task is now connecting on the free slot
        task.cancel()
        await finish(task)
        assert task.cancelled()
        conn = await pool.getconn(timeout=2)
        await conn.execute("SELECT 1")
        assert await call(backends, name) <= 1
        await pool.putconn(conn)
        assert pool.stats().in_use == 0


@contextlib.asynccontextmanager
async def _replies_held(server: PostgresServer) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A conninfo naming first a closed port, then ``server`` through a relay that passes
    the client's bytes on and holds back every reply, and an event set once a client
    closes its end of the relay (which then closes the server's).

    A connect fails on the first host, then stays mid-handshake on the second while its
    backend starts: a failover's connect, where the old primary refused to be written to.
    """
    client_closed = asyncio.Event()
    upstreams: list[asyncio.StreamWriter] = []

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        _, up_w = await asyncio.open_connection(server.host, server.port)
        upstreams.append(up_w)
        with contextlib.suppress(ConnectionError):
            while data := await client_r.read(65536):
                up_w.write(data)
        client_closed.set()
        up_w.close()
        client_w.close()

    listener = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    conninfo = psycopg.conninfo.make_conninfo(
        server.dsn,
        host="127.0.0.1,127.0.0.1",
        port=f"{closed_port()},{port}",
        sslmode="disable",
        gssencmode="disable",
    )
    try:
        yield conninfo, client_closed
    finally:
        for up_w in upstreams:
            up_w.close()
        listener.close()


@pytest.mark.parametrize("give_up", ["deadline", "cancel"])
async def test_connect_given_up_mid_handshake_closes_its_connection(
    pg_server: PostgresServer, backends: Any, give_up: str
) -> None:
    """A borrower that gives up (its deadline, a cancellation) while psycopg's connect
    waits for a server's reply leaves no connection behind. Interrupted, psycopg drops its
    half-open connection unclosed, held by a frame that an earlier host's error keeps in a
    reference cycle: its backend outlived the pool's books until the garbage collector ran
    (it is off here), as in the failover test."""
    name = unique_name(f"handshake-{give_up}")
    gc.disable()
    try:
        async with _replies_held(pg_server) as (conninfo, client_closed):
            pool = AsyncConnectionPool(conninfo, name=name, min_size=0, max_size=1)
            await pool.open()
            try:
                if give_up == "deadline":
                    task = asyncio.create_task(pool.getconn(timeout=0.5))
                else:
                    task = asyncio.create_task(pool.getconn(timeout=30.0))
                    # The backend started, idle, no query yet (query ''): as in the failover.
                    assert await eventually(backends, name, expect=1) == 1
                    task.cancel()
                await finish(task)
                with pytest.raises(
                    PoolTimeout if give_up == "deadline" else asyncio.CancelledError
                ):
                    task.result()
                assert await eventually(client_closed.is_set, expect=True)
                assert await eventually(backends, name, expect=0) == 0
                stats = pool.stats()
                assert (stats.size, stats.in_use) == (0, 0)
            finally:
                await pool.close()
    finally:
        gc.enable()


@pytest.mark.parametrize("dirty", [False, True], ids=["clean", "dirty"])
async def test_connection_handed_to_cancelled_waiter_goes_to_next(dsn: str, dirty: bool) -> None:
    """A connection given to a waiter cancelled in the same step goes to the next waiter."""
    name = unique_name("cancel-handoff")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        holder = await pool.getconn()
        if dirty:
            await holder.execute("SELECT 1")  # returned INTRANS: the slow path
        w1 = asyncio.create_task(pool.getconn())
        await asyncio.sleep(0.02)
        w2 = asyncio.create_task(pool.getconn())
        await asyncio.sleep(0.02)
        assert pool.stats().waiting == 2
        await pool.putconn(holder)  # hands the connection to w1 ...
        w1.cancel()  # ... which is cancelled before it can run
        got = await asyncio.wait_for(w2, 2)
        assert got is holder
        await finish(w1)
        assert w1.cancelled()
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use, stats.waiting) == (1, 0, 1, 0)
        await pool.putconn(got)
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use) == (1, 1, 0)


async def test_cancelled_putconn_via_ensure_future_goes_to_next(dsn: str) -> None:
    """putconn scheduled with ensure_future while the first waiter is cancelled: the next
    waiter gets the connection."""
    name = unique_name("cancel-ensure")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        holder = await pool.getconn()
        w1 = asyncio.create_task(pool.getconn())
        await asyncio.sleep(0.02)
        w2 = asyncio.create_task(pool.getconn())
        await asyncio.sleep(0.02)
        put = asyncio.ensure_future(pool.putconn(holder))
        w1.cancel()
        got = await asyncio.wait_for(w2, 2)
        await put
        await finish(w1)
        assert got is holder
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use, stats.waiting) == (1, 0, 1, 0)
        await pool.putconn(got)


async def test_cancelled_mid_query_returns_clean_connection(dsn: str, backends: Any) -> None:
    """A task cancelled mid-query inside pool.connection() gives back a clean connection;
    no backend keeps running the query and the pool stays within max_size."""
    name = unique_name("cancel-mid-query")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        started = asyncio.Event()

        async def borrower() -> None:
            async with pool.connection() as conn:
                started.set()
                await conn.execute("SELECT pg_sleep(10)")

        task = asyncio.create_task(borrower())
        await asyncio.wait_for(started.wait(), 2)
        await asyncio.sleep(0.2)
        rows = await activity(dsn, name)
        assert [r[1] for r in rows] == ["active"]
        loop = asyncio.get_running_loop()
        start = loop.time()
        task.cancel()
        await finish(task, timeout=5)
        assert task.cancelled()
        assert loop.time() - start < 3

        async with pool.connection(timeout=2) as conn:
            assert conn.info.transaction_status == IDLE
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        assert await call(backends, name) <= 1
        stats = pool.stats()
        assert stats.size <= 1
        assert stats.in_use == 0

        async def sleeping() -> int:
            rows = await activity(dsn, name)
            return sum(1 for r in rows if r[1] == "active" and "pg_sleep" in r[2])

        assert await eventually(sleeping, expect=0, timeout=2) == 0


async def test_cancelled_putconn_loses_no_slot(dsn: str) -> None:
    """A return cancelled while the pool rolls the connection back loses no slot and hands
    out no dirty connection."""
    name = unique_name("cancel-putconn")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        conn = await pool.getconn()
        await conn.execute("SELECT 1")  # INTRANS: putconn must roll back (a round trip)
        task = asyncio.create_task(pool.putconn(conn))
        await asyncio.sleep(0)  # putconn is now waiting for the server
        task.cancel()
        await finish(task)
        async with pool.connection(timeout=2) as again:
            assert again.info.transaction_status == IDLE
            await again.execute("SELECT 1")
        stats = pool.stats()
        assert stats.in_use == 0
        assert stats.size <= 1


async def test_cancelled_check_loses_no_slot(dsn: str) -> None:
    """pool.check() cancelled while probing a connection loses neither slot nor connection."""
    name = unique_name("cancel-check")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        task = asyncio.create_task(pool.check())
        await asyncio.sleep(0)  # check() is now waiting for the server's reply
        task.cancel()
        await finish(task)
        conn = await pool.getconn(timeout=1)
        await conn.execute("SELECT 1")
        await pool.putconn(conn)
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use) == (1, 1, 0)
