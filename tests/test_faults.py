"""The fault suite: restarts, terminated backends and network cuts, on clusters of our own.

Every scenario is bounded in time and request count, and talks only to
loopback addresses. Faults that stop or cut off a server use ``own_server``
(never the shared one); ``pg_terminate_backend`` scenarios touch only the
pool's own backends on the shared server.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest
from helpers import activity, unique_name, until

from aiopgpool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    NullConnectionPool,
    PoolError,
    PoolTimeout,
)
from aiopgpool.testing.proxy import TcpProxy

# Waiters must fail at their deadline within this much (the issue's +-0.2 s).
DEADLINE_SLACK = 0.2


def _proxy_for(server: Any) -> TcpProxy:
    return TcpProxy(server.host, server.port)  # started by ``with``


async def _take_all(pool: AsyncConnectionPool, timeout: float = 5.0) -> None:
    """Check that every slot can still be had at once (no slot lost), then give them back."""
    conns = [await pool.getconn(timeout=timeout) for _ in range(pool.max_size)]
    for conn in conns:
        await conn.execute("SELECT 1")
    for conn in conns:
        await pool.putconn(conn)
    stats = pool.stats()
    assert stats.in_use == 0
    assert stats.waiting == 0


async def _serving_again(pool: AsyncConnectionPool, limit: float) -> float:
    """Seconds until a request succeeds; fails the test after ``limit`` seconds."""
    start = time.monotonic()
    while True:
        try:
            async with pool.connection(timeout=0.5) as conn:
                await conn.execute("SELECT 1")
            return time.monotonic() - start
        except (PoolError, psycopg.OperationalError):
            if time.monotonic() - start > limit:
                raise
            await asyncio.sleep(0.02)


# -- server restarts ----------------------------------------------------------------------


async def test_restarts_under_load(own_server: Any) -> None:
    """5 restarts under continuous load: requests succeed or fail with PoolError by their
    deadline; no dead connection is handed out; the pool serves within 2 s of the server."""
    timeout = 1.0
    pool = AsyncConnectionPool(
        own_server.dsn, min_size=2, max_size=5, timeout=timeout, name="faults-restart"
    )
    await pool.open(wait=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    late: list[float] = []
    wrong: list[BaseException] = []
    query_errors: list[float] = []
    down_windows: list[tuple[float, float]] = []
    served = 0

    async def worker() -> None:
        nonlocal served
        while not stop.is_set():
            started = loop.time()
            try:
                conn = await pool.getconn()
            except PoolError:
                if loop.time() - started > timeout + DEADLINE_SLACK:
                    late.append(loop.time() - started)
                await asyncio.sleep(0.01)
                continue
            except BaseException as exc:  # anything but a PoolError is a failure
                wrong.append(exc)
                return
            try:
                await conn.execute("SELECT 1")
                served += 1
            except psycopg.OperationalError:
                query_errors.append(loop.time())
            finally:
                await pool.putconn(conn)

    workers = [asyncio.create_task(worker()) for _ in range(20)]
    recoveries = []
    try:
        for _ in range(5):
            await asyncio.sleep(0.3)
            went_down = loop.time()
            await asyncio.to_thread(own_server.stop)
            await asyncio.sleep(0.8)
            await asyncio.to_thread(own_server.start)
            back = loop.time()
            down_windows.append((went_down, back))
            recoveries.append(await _serving_again(pool, limit=5.0))
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    assert not wrong, wrong[:3]
    assert not late, f"requests failed past their deadline: {late[:5]}"
    assert max(recoveries) < 2.0, recoveries
    assert served > 0
    # A query may fail only because the server went away while it ran, never
    # because a connection already dead was handed out after the server was back.
    for at in query_errors:
        assert any(start - 0.1 <= at <= end + 0.5 for start, end in down_windows), at
    await _take_all(pool)
    await pool.close()


def test_sync_pool_recovers_after_restart(own_server: Any) -> None:
    """The sync facade inherits the core's recovery: serves again after a restart."""
    with ConnectionPool(
        own_server.dsn, min_size=2, max_size=3, timeout=1.0, name="faults-sync-restart"
    ) as pool:
        pool.wait()
        own_server.restart()
        start = time.monotonic()
        while True:
            try:
                with pool.connection(timeout=0.5) as conn:
                    conn.execute("SELECT 1")
                break
            except (PoolError, psycopg.OperationalError):
                assert time.monotonic() - start < 2.0
                time.sleep(0.02)
        conns = [pool.getconn() for _ in range(3)]
        for conn in conns:
            conn.execute("SELECT 1")
            pool.putconn(conn)


async def test_waiters_time_out_while_server_is_down(own_server: Any) -> None:
    """With the server down, requests fail with PoolTimeout at their deadline, the last
    connection error chained; open(wait=True) does the same."""
    await asyncio.to_thread(own_server.stop)
    pool = AsyncConnectionPool(
        own_server.dsn, min_size=1, max_size=2, timeout=0.5, name="faults-down"
    )
    start = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        await pool.open(wait=True, timeout=0.5)
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert time.monotonic() - start < 0.5 + DEADLINE_SLACK
    results = await asyncio.gather(*(pool.getconn() for _ in range(6)), return_exceptions=True)
    elapsed = time.monotonic() - start
    assert all(isinstance(r, PoolTimeout) for r in results), results
    assert any(isinstance(r.__cause__, psycopg.OperationalError) for r in results)
    assert elapsed < 0.5 + 0.5 + DEADLINE_SLACK
    assert pool.stats().connections_failed > 0
    await asyncio.to_thread(own_server.start)
    assert await _serving_again(pool, limit=5.0) < 2.0
    await pool.close()


async def test_reconnect_failed_called_after_reconnect_timeout(own_server: Any) -> None:
    """After reconnect_timeout of failures, reconnect_failed(pool) is called once."""
    await asyncio.to_thread(own_server.stop)
    called: list[Any] = []
    pool = AsyncConnectionPool(
        own_server.dsn,
        min_size=1,
        max_size=2,
        reconnect_timeout=0.3,
        reconnect_failed=called.append,
        name="faults-reconnect-failed",
    )
    await pool.open()
    for _ in range(100):
        if called:
            break
        await asyncio.sleep(0.05)
    assert called == [pool]
    await asyncio.to_thread(own_server.start)
    # The pool was not recreated: requests bring it back, and min_size refills.
    assert await _serving_again(pool, limit=5.0) < 2.0
    await pool.wait(timeout=5.0)
    await pool.close()


# -- terminated backends --------------------------------------------------------------------


async def test_terminated_idle_backends_are_replaced(
    dsn: str, terminate: Callable[..., int]
) -> None:
    """pg_terminate_backend on idle backends: the next checkouts get live connections."""
    name = "faults-terminate-idle"
    async with AsyncConnectionPool(dsn, min_size=3, max_size=3, name=name) as pool:
        await pool.wait()
        assert terminate(name, "idle") == 3
        await asyncio.sleep(0.1)
        await _take_all(pool)
        assert pool.stats().connections_lost >= 3


async def test_terminated_busy_backend_is_discarded(
    dsn: str, terminate: Callable[..., int]
) -> None:
    """pg_terminate_backend on a busy backend: its query fails, the connection is
    discarded on return, and the slot is not lost."""
    name = "faults-terminate-busy"
    async with AsyncConnectionPool(dsn, min_size=1, max_size=2, name=name) as pool:
        await pool.wait()
        conn = await pool.getconn()
        query = asyncio.create_task(conn.execute("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.3)
        assert terminate(name, "active") == 1
        with pytest.raises(psycopg.OperationalError):
            await query
        await pool.putconn(conn)
        stats = pool.stats()
        assert stats.returns_bad == 1
        await _take_all(pool)


@pytest.mark.parametrize("null", [False, True], ids=["pool", "null"])
async def test_a_broken_return_counts_as_bad_in_every_pool(
    dsn: str, terminate: Callable[..., int], null: bool
) -> None:
    """A connection the server killed while borrowed counts in returns_bad, whether the
    pool keeps connections or not (psycopg_pool's null pools count it too)."""
    name = unique_name("faults-bad-return")
    cls = AsyncNullConnectionPool if null else AsyncConnectionPool
    async with cls(dsn, min_size=0, max_size=2, name=name) as pool:
        with pytest.raises(psycopg.OperationalError):
            async with pool.connection() as conn:
                assert terminate(name) == 1
                await conn.execute("SELECT 1")
        assert pool.stats().returns_bad == 1
        assert pool.get_stats()["returns_bad"] == 1

    def in_sync_pool() -> int:
        sync_cls = NullConnectionPool if null else ConnectionPool
        with sync_cls(dsn, min_size=0, max_size=2, name=name) as pool:
            with pytest.raises(psycopg.OperationalError), pool.connection() as conn:
                assert terminate(name) == 1
                conn.execute("SELECT 1")
            return int(pool.stats().returns_bad)

    assert await asyncio.to_thread(in_sync_pool) == 1


# -- network cuts -----------------------------------------------------------------------------


async def test_blackhole_waiters_fail_at_deadline(own_server: Any) -> None:
    """Bytes dropped both ways: every request fails at its deadline (+-0.2 s), whether it
    waits in line or is stuck connecting; after the cut the pool serves again."""
    with _proxy_for(own_server) as proxy:
        pool = AsyncConnectionPool(
            proxy.dsn(own_server.dsn), min_size=0, max_size=3, timeout=1.0, name="faults-blackhole"
        )
        await pool.open()
        proxy.blackhole()
        loop = asyncio.get_running_loop()

        async def request() -> float:
            start = loop.time()
            with pytest.raises(PoolTimeout):
                await pool.getconn()
            return loop.time() - start

        elapsed = await asyncio.gather(*(request() for _ in range(10)))
        assert all(abs(e - 1.0) <= DEADLINE_SLACK for e in elapsed), elapsed
        proxy.forward()
        assert await _serving_again(pool, limit=5.0) < 2.0
        await _take_all(pool)
        await pool.close()


async def test_connect_timeout_is_honoured(own_server: Any) -> None:
    """Under a blackhole, connect_timeout ends each attempt and the pool retries until the
    request's deadline (psycopg raises connect_timeout to at least 2 s)."""
    with _proxy_for(own_server) as proxy:
        proxy.blackhole()
        pool = AsyncConnectionPool(
            proxy.dsn(own_server.dsn) + " connect_timeout=2",
            min_size=0,
            max_size=1,
            timeout=5.0,
            name="faults-connect-timeout",
        )
        await pool.open()
        start = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            await pool.getconn()
        assert abs(time.monotonic() - start - 5.0) <= DEADLINE_SLACK
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
        assert pool.stats().connections_failed >= 2
        await pool.close()


async def test_wait_connects_again_after_reconnect_timeout_gave_up(own_server: Any) -> None:
    """Once the background fill gave up (``reconnect_timeout``), an explicit ``wait()``
    starts connecting again itself, rather than waiting for the next maintenance run."""
    with _proxy_for(own_server) as proxy:
        proxy.reset()
        pool = AsyncConnectionPool(
            proxy.dsn(own_server.dsn),
            min_size=2,
            max_size=2,
            reconnect_timeout=0.3,
            name=unique_name("faults-wait-refill"),
        )
        async with pool:
            await until(
                lambda: (
                    pool.stats().connections_failed > 0 and not pool._core.connector.stalled_fills()
                ),
                10,
                "every background connect gave up",
            )
            proxy.forward()
            await pool.wait(timeout=3)
            assert pool.stats().size == 2


async def test_reset_connections_are_replaced(own_server: Any) -> None:
    """Connections reset by the network are not handed out; new connects fail fast and the
    request fails at its deadline; once forwarding again, the pool serves."""
    with _proxy_for(own_server) as proxy:
        pool = AsyncConnectionPool(
            proxy.dsn(own_server.dsn), min_size=2, max_size=2, timeout=0.8, name="faults-reset"
        )
        await pool.open(wait=True)
        proxy.reset()
        await asyncio.sleep(0.1)
        start = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            await pool.getconn()
        assert abs(time.monotonic() - start - 0.8) <= DEADLINE_SLACK
        assert info.value.__cause__ is not None
        proxy.forward()
        assert await _serving_again(pool, limit=5.0) < 2.0
        await _take_all(pool)
        assert pool.stats().connections_lost >= 2
        await pool.close()


async def test_cancellation_storm_during_faults(own_server: Any) -> None:
    """Tasks cancelled at random while the network is cut, reset and restored keep every
    invariant: no slot lost, nothing in use or waiting at rest, at most max_size backends."""
    rng = random.Random(20261121)
    with _proxy_for(own_server) as proxy:
        pool = AsyncConnectionPool(
            proxy.dsn(own_server.dsn), min_size=1, max_size=4, timeout=0.5, name="faults-storm"
        )
        await pool.open(wait=True)
        holders: dict[int, int] = {}

        async def request(i: int) -> None:
            # A query in flight when bytes stop flowing never gets an answer:
            # like an application's statement deadline, give up after 1 s.
            with anyio.move_on_after(1.0):
                try:
                    async with pool.connection() as conn:
                        assert holders.setdefault(id(conn), i) == i
                        try:
                            await asyncio.sleep(rng.random() * 0.01)
                            await conn.execute("SELECT 1")
                        finally:
                            del holders[id(conn)]
                except (PoolError, psycopg.OperationalError):
                    pass

        async def storm(rounds: int) -> None:
            for r in range(rounds):
                tasks = [asyncio.create_task(request(r * 100 + i)) for i in range(40)]
                await asyncio.sleep(rng.random() * 0.05)
                for task in tasks:
                    if rng.random() < 0.4:
                        task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        for mode in (proxy.blackhole, proxy.reset, proxy.forward, proxy.blackhole, proxy.forward):
            mode()
            await storm(3)
        proxy.forward()
        await _serving_again(pool, limit=5.0)
        await _take_all(pool)
        assert proxy.connections <= pool.max_size
        await pool.close()


# -- lifetimes, leaks, configure and reset ---------------------------------------------------


async def _backend_pid(pool: AsyncConnectionPool) -> int:
    async with pool.connection() as conn:
        return conn.info.backend_pid


async def test_max_lifetime_replaces_idle_not_borrowed(dsn: str) -> None:
    """max_lifetime replaces a connection when next idle, never while it is borrowed."""
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=1, max_lifetime=0.3, name="faults-lifetime"
    ) as pool:
        conn = await pool.getconn()
        first = conn.info.backend_pid
        await asyncio.sleep(0.5)
        await conn.execute("SELECT 1")  # past its lifetime, still usable while borrowed
        assert conn.info.backend_pid == first
        await pool.putconn(conn)
        assert await _backend_pid(pool) != first


async def test_max_idle_shrinks_to_min_size(dsn: str) -> None:
    """Idle connections above min_size close after max_idle."""
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=4, max_idle=0.2, name="faults-max-idle"
    ) as pool:
        conns = [await pool.getconn() for _ in range(4)]
        for conn in conns:
            await pool.putconn(conn)
        assert pool.stats().size == 4
        for _ in range(40):
            if pool.stats().size == 1:
                break
            await asyncio.sleep(0.05)
        assert pool.stats().size == 1


async def test_drain_replaces_every_connection(dsn: str) -> None:
    """drain(): idle connections replaced now, the borrowed one when returned."""
    async with AsyncConnectionPool(dsn, min_size=2, max_size=2, name="faults-drain") as pool:
        await pool.wait()
        borrowed = await pool.getconn()
        old = {borrowed.info.backend_pid}
        idle = await pool.getconn()
        old.add(idle.info.backend_pid)
        await pool.putconn(idle)
        await pool.drain()
        await pool.putconn(borrowed)
        conns = [await pool.getconn() for _ in range(2)]
        assert not {c.info.backend_pid for c in conns} & old
        for conn in conns:
            await pool.putconn(conn)


async def test_drain_during_a_checkout_check_replaces_that_connection(dsn: str) -> None:
    """A connection being checked for a borrower when drain() runs is not handed out."""
    drained = False

    async def check(conn: psycopg.AsyncConnection[Any]) -> None:
        nonlocal drained
        if not drained:
            drained = True
            await pool.drain()

    pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, check=check, name="faults-drain-check")
    async with pool:
        await pool.wait()
        old = {row[0] for row in await activity(dsn, pool.name)}
        assert len(old) == 1
        conn = await pool.getconn(timeout=5.0)
        assert drained
        assert conn.info.backend_pid not in old
        await pool.putconn(conn)


async def test_configure_once_and_reset_on_return(dsn: str) -> None:
    """configure runs once per new connection; reset runs after each return, and a reset
    that leaves a transaction open discards the connection."""
    configured: list[int] = []
    resets: list[int] = []
    leave_open = False

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        configured.append(conn.info.backend_pid)
        await conn.execute("SET application_name = 'faults-configured'")
        await conn.commit()  # configure must leave the connection idle

    async def reset(conn: psycopg.AsyncConnection[Any]) -> None:
        resets.append(conn.info.backend_pid)
        if leave_open:
            await conn.execute("SELECT 1")  # opens a transaction (not autocommit)

    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=1, configure=configure, reset=reset, name="faults-configure"
    ) as pool:
        for _ in range(3):
            async with pool.connection() as conn:
                cur = await conn.execute("SHOW application_name")
                assert await cur.fetchone() == ("faults-configured",)
        assert len(configured) == 1
        assert len(resets) == 3
        leave_open = True
        first = await _backend_pid(pool)
        leave_open = False
        assert await _backend_pid(pool) != first
        assert len(configured) == 2


async def test_leak_timeout_warns_with_stack(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """A connection held past leak_timeout logs a WARNING with the borrower's stack."""
    caplog.set_level(logging.WARNING, logger="aiopgpool")
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=1, leak_timeout=0.1, name="faults-leak"
    ) as pool:
        conn = await pool.getconn()
        await asyncio.sleep(0.3)
        await pool.putconn(conn)
        async with pool.connection():
            pass  # returned in time: no second warning
        await asyncio.sleep(0.2)
        assert pool.stats().leaks == 1
    warnings = [r for r in caplog.records if "leak_timeout" in r.getMessage()]
    assert len(warnings) == 1
    assert "test_leak_timeout_warns_with_stack" in warnings[0].getMessage()


def test_sync_pool_terminated_idle_backends(dsn: str, terminate: Callable[..., int]) -> None:
    """The sync facade does not hand out connections the server killed while idle."""
    name = "faults-sync-terminate"
    with ConnectionPool(dsn, min_size=2, max_size=2, name=name) as pool:
        pool.wait()
        assert terminate(name, "idle") == 2
        time.sleep(0.1)
        results: list[Any] = []

        def use() -> None:
            with pool.connection() as conn:
                results.append(conn.execute("SELECT 1").fetchone())

        threads = [threading.Thread(target=use) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [(1,)] * 4
        assert pool.stats().connections_lost >= 2
