"""Background upkeep at its edges: the refill with a short reconnect_timeout, max_idle=0,
a null pool's wait() within max_size, and returns under way when the pool closes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from helpers import (
    LONG_SLEEP,
    eventually,
    eventually_blocking,
    running_long_sleep,
    unique_name,
    until,
)

from aiopgpool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    PoolClosed,
    PoolTimeout,
)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never answers (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


# -- reconnect_timeout ----------------------------------------------------------------------


@pytest.mark.parametrize("reconnect_timeout", [0, 0.001])
async def test_a_short_reconnect_timeout_still_fills_min_size(
    dsn: str, backends: Any, reconnect_timeout: float
) -> None:
    """reconnect_timeout bounds the refill's retries, not its first attempt (as in
    psycopg_pool): 0, or less than one connect, used to stop the refill altogether."""
    name = unique_name("reconnect-short")
    pool = AsyncConnectionPool(
        dsn, name=name, min_size=3, max_size=4, reconnect_timeout=reconnect_timeout
    )
    await pool.open(wait=True, timeout=10)
    try:
        assert pool.stats().size == 3
        assert await eventually(backends, name, expect=3) == 3
    finally:
        await pool.close()


def test_a_short_reconnect_timeout_still_fills_min_size_sync(dsn: str) -> None:
    with ConnectionPool(dsn, name=unique_name("reconnect-short-s"), min_size=2,
                        reconnect_timeout=0) as pool:  # fmt: skip
        pool.wait(10)
        assert pool.stats().size == 2


async def test_a_hung_connect_cut_by_reconnect_timeout_is_a_failure(silent_port: int) -> None:
    """An attempt cut short (a server that never answers) counts as failed: logged,
    counted, and reconnect_failed is called. With the refill's deadline (0.3 s) before
    the attempt limit (the pool's timeout) nothing at all happened: the attempt was cut
    at the deadline uncounted. Now the first attempt runs to the attempt limit."""
    failed = asyncio.Event()
    pool = AsyncConnectionPool(
        f"host=127.0.0.1 port={silent_port} dbname=x user=x",
        name=unique_name("reconnect-hung"),
        min_size=1,
        timeout=0.5,
        reconnect_timeout=0.3,
        reconnect_failed=lambda pool: failed.set(),
    )
    await pool.open()
    try:
        await asyncio.wait_for(failed.wait(), 5)
        assert pool.stats().connections_failed >= 1
    finally:
        await pool.close()


# -- max_idle=0 -----------------------------------------------------------------------------


async def test_max_idle_zero_closes_idle_connections_above_min_size(
    dsn: str, backends: Any
) -> None:
    """max_idle=0: idle connections above min_size go at once (at the next maintenance run,
    within 50 ms), with or without max_lifetime; 0 used to mean never."""
    name = unique_name("max-idle-0")
    async with AsyncConnectionPool(
        dsn, name=name, min_size=1, max_size=4, max_idle=0, max_lifetime=None
    ) as pool:
        conns = [await pool.getconn() for _ in range(4)]
        for conn in conns:
            await pool.putconn(conn)
        await until(lambda: pool.stats().size == 1, timeout=3)
        assert await eventually(backends, name, expect=1) == 1


async def test_the_refill_restarts_without_max_idle_or_max_lifetime(dsn: str) -> None:
    """With neither period set, maintenance still runs (every 10 s at most), so a refill
    that gave up starts again; no timer at all used to leave the pool below min_size."""
    pool = AsyncConnectionPool(
        dsn, name=unique_name("no-periods"), min_size=1, max_idle=None, max_lifetime=None
    )
    await pool.open(wait=True)
    try:
        assert pool._core.maintenance._timer is not None
    finally:
        await pool.close()


# -- a null pool's wait() ---------------------------------------------------------------------


async def test_a_null_pool_wait_stays_within_max_size(dsn: str, backends: Any) -> None:
    """wait() on a null pool connects on one of its slots: with every slot lent, it waits
    in line for one (or times out), instead of opening a connection beyond max_size."""
    name = unique_name("null-wait")
    async with AsyncNullConnectionPool(dsn, name=name, max_size=1) as pool:
        held = await pool.getconn()
        with pytest.raises(PoolTimeout, match="no free slot"):
            await pool.wait(timeout=0.3)
        waiting = [asyncio.create_task(pool.wait(timeout=10)) for _ in range(5)]
        await asyncio.sleep(0.3)
        assert await eventually(backends, name, expect=1) == 1
        await pool.putconn(held)
        await asyncio.gather(*waiting)
        assert pool.stats().size == 0
        assert await eventually(backends, name, expect=0) == 0
        async with pool.connection() as conn:  # every slot came back
            await conn.execute("SELECT 1")


# -- returns under way when the pool closes ---------------------------------------------------


@pytest.mark.parametrize("how", ["close", "closeall"])
async def test_a_hung_reset_does_not_outlive_close(dsn: str, backends: Any, how: str) -> None:
    """A return still running its reset when the pool closes (close() at its timeout,
    closeall() at once) has its connection shut down: the reset fails at once and the
    backend goes, instead of living as long as the reset runs."""
    name = unique_name(f"hung-reset-{how}")

    async def hung_reset(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(LONG_SLEEP)

    pool = AsyncConnectionPool(dsn, name=name, min_size=0, max_size=1, reset=hung_reset)
    await pool.open()
    conn = await pool.getconn()
    returning = asyncio.create_task(pool.putconn(conn))
    await until(lambda: running_long_sleep(dsn, name) == 1, timeout=5)
    started = time.monotonic()
    if how == "close":
        await pool.close(timeout=0.2)
    else:
        await pool.closeall()
    await asyncio.wait_for(returning, 5)
    assert await eventually(backends, name, expect=0) == 0
    assert time.monotonic() - started < 10
    assert pool.stats().size == 0


def test_a_hung_reset_does_not_outlive_close_sync(dsn: str, backends: Any) -> None:
    """The same for the sync pool, whose reset runs in the returning thread."""
    name = unique_name("hung-reset-s")
    pool = ConnectionPool(
        dsn,
        name=name,
        min_size=0,
        max_size=1,
        reset=lambda conn: conn.execute(LONG_SLEEP) and None,
    )
    pool.open()
    conn = pool.getconn()
    returning = threading.Thread(target=pool.putconn, args=(conn,))
    returning.start()
    assert eventually_blocking(lambda: running_long_sleep(dsn, name), 1) == 1
    pool.close(timeout=0.2)
    returning.join(10)
    assert not returning.is_alive()
    assert eventually_blocking(lambda: backends(name), 0) == 0


@pytest.mark.parametrize("how", ["close", "closeall"])
async def test_a_hung_check_does_not_outlive_close(dsn: str, backends: Any, how: str) -> None:
    """A checkout whose ``check`` hangs when the pool closes: its connection is shut down
    under the check, which fails, and the checkout gets PoolClosed at once."""
    name = unique_name(f"hung-check-{how}")
    hang = asyncio.Event()

    async def check(conn: psycopg.AsyncConnection[Any]) -> None:
        if hang.is_set():
            await conn.execute(LONG_SLEEP)

    pool = AsyncConnectionPool(dsn, name=name, min_size=1, max_size=1, check=check)
    await pool.open(wait=True)
    hang.set()
    borrower = asyncio.create_task(pool.getconn())
    await until(lambda: running_long_sleep(dsn, name) == 1, timeout=5)
    if how == "close":
        await pool.close(timeout=0.2)
    else:
        await pool.closeall()
    with pytest.raises(PoolClosed):
        await asyncio.wait_for(borrower, 5)
    assert await eventually(backends, name, expect=0) == 0
    assert pool.stats().size == 0
