"""Interrupted calls and races with close(), and a connection given back inside its own
``connection()`` block: no slot lost, no connection left open, no connection touched
once another borrower may hold it, no deadlock."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from helpers import eventually, eventually_blocking, unique_name, until

from aiopgpool import AsyncConnectionPool, ConnectionPool, PoolClosed, PoolTimeout


class _Interrupt(BaseException):
    """What a signal handler raises here: a BaseException, as KeyboardInterrupt is."""


@contextmanager
def interrupted_after(seconds: float) -> Iterator[None]:
    """Raise :class:`_Interrupt` in this (the main) thread after ``seconds``."""

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sleeper(seconds: float) -> Callable[[Any], None]:
    def sleep(conn: Any) -> None:
        time.sleep(seconds)

    return sleep


def assert_serves_max_size(pool: ConnectionPool) -> None:
    """Every slot can be had again (none was lost)."""
    conns = [pool.getconn(timeout=5.0) for _ in range(pool.max_size)]
    for conn in conns:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pool.putconn(conn)
    assert pool.stats().in_use == 0


# -- the sync pool: interrupted calls ------------------------------------------------------


def test_a_getconn_interrupted_while_its_connection_opens_loses_no_slot(dsn: str) -> None:
    """Interrupted while the loop connects for it: the connection, once open, goes back to
    the pool instead of staying lent to nobody."""
    with ConnectionPool(
        dsn, min_size=0, max_size=1, configure=sleeper(0.6), name=unique_name("int-connect")
    ) as pool:
        with pytest.raises(_Interrupt), interrupted_after(0.2):
            pool.getconn(timeout=5.0)
        eventually_blocking(lambda: (pool.stats().size, pool.stats().in_use), (1, 0))
        assert_serves_max_size(pool)


def test_a_putconn_interrupted_in_its_reset_loses_no_slot(dsn: str) -> None:
    """Interrupted in the borrower's thread while the return runs ``reset``: the connection,
    in an unknown state, is closed, and its slot goes back."""
    with ConnectionPool(
        dsn, min_size=1, max_size=1, reset=sleeper(0.6), name=unique_name("int-reset")
    ) as pool:
        conn = pool.getconn()
        with pytest.raises(_Interrupt), interrupted_after(0.2):
            pool.putconn(conn)
        assert conn.closed
        eventually_blocking(lambda: pool.stats().in_use, 0)
        assert_serves_max_size(pool)


def test_stats_from_reconnect_failed_does_not_deadlock(dsn: str) -> None:
    """``reconnect_failed`` runs on the pool's loop thread, whose lock stats() would take."""
    seen: list[int] = []
    done = threading.Event()

    def failed(pool: Any) -> None:
        seen.append(pool.stats().size)
        pool.get_stats()
        pool.pop_stats()
        done.set()

    pool = ConnectionPool(
        "host=127.0.0.1 port=1 connect_timeout=2",
        min_size=1,
        reconnect_timeout=0.2,
        reconnect_failed=failed,
        name=unique_name("stats-in-callback"),
    )
    pool.open()
    try:
        assert done.wait(10.0)
        assert seen == [0]
        assert pool.stats().size == 0  # the pool still answers
    finally:
        pool.close(0)


# -- the sync pool: close() racing other threads ---------------------------------------------


def test_close_from_many_threads_at_once(dsn: str) -> None:
    for _ in range(5):
        pool = ConnectionPool(dsn, min_size=1, max_size=2, name=unique_name("close-many"))
        pool.open(wait=True)
        errors: list[BaseException] = []

        def close(pool: ConnectionPool = pool, errors: list[BaseException] = errors) -> None:
            try:
                pool.close(1.0)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=close) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert pool.closed


@pytest.mark.parametrize("close_timeout", [0.1, 10.0], ids=["timeout-first", "graceful"])
def test_a_return_under_way_when_the_pool_closes(
    dsn: str, backends: Any, close_timeout: float
) -> None:
    """close() in one thread while another thread's putconn still runs ``reset``. A return
    under way counts as borrowed: a graceful close() waits for it (when close() returns,
    the return is over). At close()'s timeout it ends quietly instead. Either way its
    connection is closed with the pool, not left connected."""
    name = unique_name("close-mid-return")
    pool = ConnectionPool(dsn, min_size=1, max_size=1, reset=sleeper(0.6), name=name)
    pool.open(wait=True)
    conn = pool.getconn()
    outcome: list[BaseException | None] = []

    def give_back() -> None:
        try:
            pool.putconn(conn)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    returning = threading.Thread(target=give_back)
    returning.start()
    time.sleep(0.2)  # in reset now
    pool.close(close_timeout)
    if close_timeout > 1:
        assert outcome == [None], "close() returned before the return under way was over"
        assert conn.closed
    returning.join()
    assert outcome == [None]
    assert conn.closed
    assert eventually_blocking(lambda: backends(name), 0) == 0


async def test_an_async_graceful_close_waits_for_a_return_under_way(
    dsn: str, backends: Any
) -> None:
    """The same with the asyncio pool: a putconn still in its ``reset`` in another task."""
    name = unique_name("aclose-waits-return")
    in_reset = asyncio.Event()

    async def slow_reset(conn: Any) -> None:
        in_reset.set()
        await asyncio.sleep(0.5)

    pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, reset=slow_reset, name=name)
    await pool.open(wait=True)
    conn = await pool.getconn()
    returning = asyncio.create_task(pool.putconn(conn))
    await in_reset.wait()
    await pool.close(10)
    assert returning.done(), "close() returned before the return under way was over"
    assert returning.exception() is None
    assert conn.closed
    assert await eventually(backends, name, expect=0) == 0


# -- connection(): the connection given back inside its own block ----------------------------


async def test_a_connection_given_back_in_its_block_is_not_touched_by_the_exit(dsn: str) -> None:
    """With ``close_returns``, ``conn.close()`` inside ``async with pool.connection()`` gives it
    back, and a waiting borrower may have it at once: the block's exit neither commits that
    borrower's transaction nor returns its connection."""
    name = unique_name("given-back-async")
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=1, close_returns=True, name=name
    ) as pool:
        await pool.wait()
        other_has_it = asyncio.Event()
        other_done = asyncio.Event()

        async def other() -> None:
            async with pool.connection() as conn:
                await conn.execute("CREATE TEMP TABLE given_back (x int)")
                await conn.commit()
                await conn.execute("INSERT INTO given_back VALUES (1)")  # left open
                other_has_it.set()
                await other_done.wait()
                await conn.rollback()
                cur = await conn.execute("SELECT count(*) FROM given_back")
                assert await cur.fetchone() == (0,)

        async with pool.connection() as conn:
            task = asyncio.create_task(other())
            await asyncio.sleep(0.05)  # the other task waits in line
            await conn.close()  # close_returns: back to the pool, to the other task
            await other_has_it.wait()
        assert pool.stats().in_use == 1  # still the other task's
        other_done.set()
        await task
        stats = pool.stats()
        assert (stats.in_use, stats.idle) == (0, 1)


def test_a_connection_given_back_in_its_sync_block(dsn: str) -> None:
    with ConnectionPool(
        dsn, min_size=1, max_size=1, close_returns=True, name=unique_name("given-back-sync")
    ) as pool:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
            conn.close()  # close_returns: back to the pool
        eventually_blocking(lambda: (pool.stats().in_use, pool.stats().idle), (0, 1))
        again = pool.getconn(timeout=1.0)
        assert again is conn and not again.closed
        pool.putconn(again)


# -- the async pool: close() cancelled, close() during a check --------------------------------


async def test_a_cancelled_close_closes_at_once(dsn: str, backends: Any) -> None:
    """close() cancelled while it waits for a borrowed connection closes the pool at once,
    as at its timeout, instead of leaving it closing with its idle connections open."""
    name = unique_name("close-cancelled")
    pool = AsyncConnectionPool(dsn, min_size=2, max_size=2, name=name)
    await pool.open(wait=True)
    held = await pool.getconn()
    closing = asyncio.create_task(pool.close(timeout=30))
    await asyncio.sleep(0.1)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert pool.closed and pool.stats().size == 0
    assert held.closed
    with pytest.raises(PoolClosed):
        await pool.putconn(held)
    assert await asyncio.to_thread(backends, name) == 0


async def test_no_connection_is_lent_once_close_returned(dsn: str, backends: Any) -> None:
    """A new connection whose ``check`` runs while the pool closes is not handed out."""
    name = unique_name("check-vs-close")

    async def slow_check(conn: psycopg.AsyncConnection[Any]) -> None:
        await asyncio.sleep(0.4)

    pool = AsyncConnectionPool(dsn, min_size=0, max_size=1, check=slow_check, name=name)
    await pool.open()
    request = asyncio.create_task(pool.getconn(timeout=5))
    await asyncio.sleep(0.2)
    await pool.close(0)
    with pytest.raises(PoolClosed):
        await request
    assert pool.stats().in_use == 0
    assert await asyncio.to_thread(backends, name) == 0


async def test_a_configure_query_given_up_at_the_deadline_is_stopped_on_the_server(
    dsn: str, backends: Any
) -> None:
    """``configure`` blocks on a lock past the request's deadline: the request fails with
    PoolTimeout and the backend running that query is told to stop, rather than left
    running (holding a server connection) for as long as the lock is held."""
    name = unique_name("configure-stuck")
    table = name.replace("-", "_")

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(f"SELECT count(*) FROM {table}")
        await conn.commit()

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute(f"CREATE TABLE {table} (x int)")
        try:
            async with await psycopg.AsyncConnection.connect(dsn) as locker:
                await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                pool = AsyncConnectionPool(
                    dsn, min_size=0, max_size=2, timeout=0.5, configure=configure, name=name
                )
                await pool.open()
                for _ in range(3):
                    with pytest.raises(PoolTimeout):
                        await pool.getconn()
                await pool.close()
                for _ in range(100):  # the cancel requests travel from their threads
                    if await asyncio.to_thread(backends, name) == 0:
                        break
                    await asyncio.sleep(0.05)
                assert await asyncio.to_thread(backends, name) == 0
                await locker.rollback()
        finally:
            await admin.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize("timeout", [float("nan"), -1.0])
def test_a_bad_close_timeout_is_refused_before_anything_stops(
    dsn: str, backends: Any, timeout: float
) -> None:
    """close() refuses a bad timeout with the pool as it was: it still serves, and a
    close() with a good one closes it, its connections included."""
    name = unique_name("close-bad-timeout")
    pool = ConnectionPool(dsn, min_size=2, max_size=2, name=name)
    pool.open(wait=True)
    with pytest.raises(ValueError, match="timeout"):
        pool.close(timeout)
    assert not pool.closed
    assert_serves_max_size(pool)
    pool.close()
    assert pool.closed
    assert backends(name) == 0


async def test_a_huge_min_size_does_not_freeze_the_loop() -> None:
    """Nothing bounds min_size above: open() and resize() start a few connects at a time,
    not a task per missing connection (which froze the loop for minutes)."""
    from helpers import closed_port

    pool = AsyncConnectionPool(
        f"host=127.0.0.1 port={closed_port()}",
        min_size=10**9,
        max_size=10**9,
        name=unique_name("huge-min-size"),
    )
    await asyncio.wait_for(pool.open(), 10)
    await asyncio.wait_for(pool.resize(10**12), 10)
    await asyncio.sleep(0.1)  # the loop runs: the retrying connects do not hold it
    await asyncio.wait_for(pool.close(0), 10)


async def test_drain_replaces_connections_out_of_the_queue_too(dsn: str) -> None:
    """drain() while check() probes the idle connections, or while a return rolls back:
    those connections, out of the queue when drain() ran, are replaced too."""
    async with AsyncConnectionPool(
        dsn, min_size=2, max_size=2, name=unique_name("drain-in-transit")
    ) as pool:
        await pool.wait()

        async def pids() -> set[int]:
            conns = [await pool.getconn() for _ in range(2)]
            for conn in conns:
                await pool.putconn(conn)
            return {conn.pgconn.backend_pid for conn in conns}

        before = await pids()
        checking = asyncio.create_task(pool.check())
        await asyncio.sleep(0)  # check() took the idle connections
        await pool.drain()
        await checking
        assert not before & await pids()

        conn = await pool.getconn()
        old = conn.pgconn.backend_pid
        await conn.execute("SELECT 1")  # in a transaction: putconn rolls back
        returning = asyncio.create_task(pool.putconn(conn))
        await asyncio.sleep(0)  # the return waits for its ROLLBACK
        await pool.drain()
        await returning
        assert old not in await pids()


def test_a_waiter_interrupted_while_close_waits_wakes_close(dsn: str) -> None:
    """A waiting thread handed a connection, then interrupted while close() waits for that
    very connection: giving it back tells close(), which returns at once instead of
    sitting out its timeout."""
    pool = ConnectionPool(dsn, name=unique_name("interrupted-closing"), min_size=1, max_size=1)
    pool.open(wait=True)
    held = pool.getconn()

    def interrupt(signum: int, frame: Any) -> None:
        while pool._core.state != "closing":  # until close() has begun
            time.sleep(0.01)
        raise _Interrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    main = threading.get_ident()
    took: list[float] = []

    def other() -> None:
        time.sleep(0.3)  # the main thread waits in line now
        signal.pthread_kill(main, signal.SIGUSR1)
        time.sleep(0.1)
        pool.putconn(held)  # handed to the main thread's waiter
        start = time.monotonic()
        pool.close(timeout=30)
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        with pytest.raises(_Interrupt):
            pool.getconn()
    finally:
        thread.join(60)
        signal.signal(signal.SIGUSR1, previous)
    assert took and took[0] < 20, "close() waited for a connection nobody held"
    assert held.closed
    assert pool.closed


async def test_a_connect_under_way_when_close_begins_is_not_lent(dsn: str, backends: Any) -> None:
    """A checkout whose connection is still opening when a graceful close() begins gets
    PoolClosed once it is open (close() refuses new requests), and that connection is
    closed, rather than lent and then closed under its borrower."""
    name = unique_name("connect-under-close")

    async def slow_configure(conn: Any) -> None:
        await asyncio.sleep(0.5)

    pool = AsyncConnectionPool(dsn, name=name, min_size=0, max_size=2, configure=slow_configure)
    await pool.open()
    held = await pool.getconn()  # close() waits for it: the pool stays "closing" a while
    borrower = asyncio.create_task(pool.getconn())
    await asyncio.sleep(0.2)  # its connection is opening
    closing = asyncio.create_task(pool.close(timeout=10))
    with pytest.raises(PoolClosed):
        await borrower
    assert not closing.done()
    # The refused connection is closed at once, not kept idle until close() ends.
    assert pool.stats().size == 1
    assert await eventually(backends, name, expect=1) == 1
    await pool.putconn(held)
    await closing
    stats = pool.stats()
    assert (stats.size, stats.in_use) == (0, 0)
    assert await eventually(backends, name, expect=0) == 0


async def test_a_background_fill_ending_while_close_waits_is_closed(
    dsn: str, backends: Any
) -> None:
    """Idle connections, and one the background refill opens after a graceful close()
    began, are closed at once rather than kept idle until close() ends."""
    name = unique_name("fill-under-close")

    async def slow_configure(conn: Any) -> None:
        await asyncio.sleep(0.5)

    pool = AsyncConnectionPool(dsn, name=name, min_size=3, max_size=3, configure=slow_configure)
    await pool.open(wait=True)
    held = await pool.getconn()
    await pool.putconn(held, close=True)  # the refill opens another one
    held = await pool.getconn()
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(pool.close(timeout=10))
    await asyncio.sleep(0.1)
    assert not closing.done()
    await until(lambda: pool.stats().size == 1, timeout=5)
    assert await eventually(backends, name, expect=1) == 1
    await pool.putconn(held)
    await closing
    assert await eventually(backends, name, expect=0) == 0
