"""psycopg_pool parity (issue #13): the reported defects and the parity points of API.md.

Every test runs against the real test server, for the asyncio pool and the
sync facade (and their null twins where it applies). Where psycopg_pool 3.3
behaves the same, some tests run it too; where we differ on purpose, a test
shows our behaviour (the README's "Migrating from psycopg_pool" lists why).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest
from helpers import closed_port, eventually, eventually_blocking, unique_name
from psycopg.pq import TransactionStatus

import aiopgpool
from aiopgpool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    NullConnectionPool,
    PoolError,
    PoolTimeout,
    discard_session,
)
from aiopgpool.sync_lifecycle import discard_session_blocking

SECRET = "parity-s3cret-pw"

ASYNC_CLASSES = [AsyncConnectionPool, AsyncNullConnectionPool]
SYNC_CLASSES = [ConnectionPool, NullConnectionPool]
ALL_CLASSES = ASYNC_CLASSES + SYNC_CLASSES


def uname(label: str) -> str:
    return unique_name(f"par-{label[:34]}")


def is_null(cls: type) -> bool:
    return cls in (AsyncNullConnectionPool, NullConnectionPool)


def down_dsn() -> str:
    """A conninfo nobody answers (connections are refused at once)."""
    return f"host=127.0.0.1 port={closed_port()} user=postgres dbname=postgres connect_timeout=2"


@contextmanager
def sync_pool(cls: type, dsn: str, label: str, **options: Any) -> Iterator[Any]:
    options.setdefault("timeout", 5.0)
    pool = cls(dsn, name=uname(label), **options)
    pool.open(wait=not is_null(cls), timeout=10.0)
    try:
        yield pool
    finally:
        if not pool.closed:
            pool.closeall()


class async_pool:
    """``async with async_pool(cls, dsn, label, **options) as pool``: opened, closed at the end."""

    def __init__(self, cls: type, dsn: str, label: str, **options: Any) -> None:
        options.setdefault("timeout", 5.0)
        self.pool = cls(dsn, name=uname(label), **options)

    async def __aenter__(self) -> Any:
        await self.pool.open(wait=not is_null(type(self.pool)), timeout=10.0)
        return self.pool

    async def __aexit__(self, *exc: object) -> None:
        if not self.pool.closed:
            await self.pool.closeall()


def in_thread(func: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Run ``func`` in a fresh thread; its result, or its exception raised here."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = func()
        except BaseException as exc:
            box["exc"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"no result within {timeout} s"
    if "exc" in box:
        raise box["exc"]
    return box.get("result")


def always_fails(conn: Any) -> None:
    raise RuntimeError("check says no")


async def always_fails_async(conn: Any) -> None:
    raise RuntimeError("check says no")


def primary_only(conn: psycopg.Connection[Any]) -> None:
    """A role check: the server must be a primary."""
    if conn.execute("SELECT pg_is_in_recovery()").fetchone() != (False,):
        raise RuntimeError("not a primary")


async def primary_only_async(conn: psycopg.AsyncConnection[Any]) -> None:
    cur = await conn.execute("SELECT pg_is_in_recovery()")
    if await cur.fetchone() != (False,):
        raise RuntimeError("not a primary")


# == defects of issue #13 ============================================================

# -- check= runs on a freshly opened connection ---------------------------------------


@pytest.mark.parametrize("cls", ASYNC_CLASSES)
async def test_check_runs_on_a_new_connection_async(dsn: str, cls: type) -> None:
    """A check that always raises, with no idle connection to test: PoolTimeout."""
    async with async_pool(
        cls, dsn, "chk-new", min_size=0, max_size=2, timeout=0.5, check=always_fails_async
    ) as pool:
        with pytest.raises(PoolTimeout):
            await pool.getconn()
        assert pool.stats().in_use == 0
        assert pool.stats().connections_lost >= 1  # each new one was checked, and failed
    calls: list[int] = []

    async def counted(conn: Any) -> None:
        calls.append(1)
        await primary_only_async(conn)

    async with async_pool(cls, dsn, "chk-role", min_size=0, max_size=2, check=counted) as pool:
        async with pool.connection() as conn:
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
        assert calls == [1]


@pytest.mark.parametrize("cls", SYNC_CLASSES)
def test_check_runs_on_a_new_connection_sync(dsn: str, cls: type) -> None:
    with sync_pool(cls, dsn, "chk-new-s", min_size=0, check=always_fails, timeout=0.5) as pool:
        with pytest.raises(PoolTimeout):
            pool.getconn()
        assert pool.stats().in_use == 0
        assert pool.stats().connections_lost >= 1
    calls: list[int] = []

    def counted(conn: Any) -> None:
        calls.append(1)
        primary_only(conn)

    with (
        sync_pool(cls, dsn, "chk-role-s", min_size=0, check=counted) as pool,
        pool.connection() as conn,
    ):
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert calls == [1]


@pytest.mark.parametrize(
    "cls", [psycopg_pool.AsyncConnectionPool, psycopg_pool.AsyncNullConnectionPool]
)
async def test_psycopg_pool_also_times_out_when_check_always_fails(dsn: str, cls: type) -> None:
    """The reference: psycopg_pool 3.3 raises PoolTimeout here too."""
    async with cls(
        dsn, min_size=0, max_size=2, check=always_fails_async, timeout=0.5, open=False
    ) as pool:
        with pytest.raises(psycopg_pool.PoolTimeout):
            await pool.getconn()


# -- a null pool's wait() -------------------------------------------------------------


async def test_null_pool_wait_async(dsn: str) -> None:
    pool = AsyncNullConnectionPool(down_dsn(), name=uname("nw-down"))
    await pool.open()
    try:
        with pytest.raises(PoolTimeout):
            await pool.wait(timeout=0.5)
        assert pool.stats().connections_failed >= 1
    finally:
        await pool.close()
    async with async_pool(AsyncNullConnectionPool, dsn, "nw-up") as pool:
        await pool.wait(timeout=5.0)
        stats = pool.stats()
        assert stats.connections_created == 1  # a real connection was made...
        assert stats.size == stats.idle == 0  # ... and not kept


def test_null_pool_wait_sync(dsn: str, backends: Any) -> None:
    pool = NullConnectionPool(down_dsn(), name=uname("nw-down-s"))
    pool.open()
    try:
        with pytest.raises(PoolTimeout):
            pool.wait(timeout=0.5)
    finally:
        pool.close()
    with sync_pool(NullConnectionPool, dsn, "nw-up-s") as pool:
        pool.wait(timeout=5.0)
        assert pool.stats().connections_created == 1
        assert eventually_blocking(lambda: backends(pool.name), 0) == 0


# -- resize ---------------------------------------------------------------------------


async def test_resize_with_max_none_means_max_is_min_async(dsn: str, backends: Any) -> None:
    async with async_pool(AsyncConnectionPool, dsn, "rs", min_size=4, max_size=4) as pool:
        await pool.resize(2)
        assert (pool.min_size, pool.max_size) == (2, 2)
        assert pool.get_stats()["pool_max"] == 2
        assert pool.stats().size == 2
        assert await eventually(backends, pool.name, expect=2) == 2


def test_resize_with_max_none_means_max_is_min_sync(dsn: str, backends: Any) -> None:
    with sync_pool(ConnectionPool, dsn, "rs-s", min_size=4, max_size=4) as pool:
        pool.resize(2)
        assert (pool.min_size, pool.max_size) == (2, 2)
        assert pool.stats().size == 2
        assert eventually_blocking(lambda: backends(pool.name), 2) == 2


async def test_null_pool_resize_to_a_min_size_raises_async(dsn: str) -> None:
    async with async_pool(AsyncNullConnectionPool, dsn, "rs-null") as pool:
        with pytest.raises(ValueError, match="min_size"):
            await pool.resize(1)
        await asyncio.sleep(0.1)
        assert pool.stats().size == pool.stats().idle == 0
        assert pool.min_size == 0


def test_null_pool_resize_to_a_min_size_raises_sync(dsn: str) -> None:
    with sync_pool(NullConnectionPool, dsn, "rs-null-s") as pool:
        with pytest.raises(ValueError, match="min_size"):
            pool.resize(1)
        time.sleep(0.1)
        assert pool.stats().size == pool.stats().idle == 0


# -- closed ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ASYNC_CLASSES)
async def test_closed_until_open_async(dsn: str, cls: type) -> None:
    pool = cls(dsn, name=uname("closed"))
    assert pool.closed is True
    await pool.open()
    assert pool.closed is False
    await pool.close()
    assert pool.closed is True


@pytest.mark.parametrize("cls", SYNC_CLASSES)
def test_closed_until_open_sync(dsn: str, cls: type) -> None:
    pool = cls(dsn, name=uname("closed-s"))
    assert pool.closed is True
    pool.open()
    assert pool.closed is False
    pool.close()
    assert pool.closed is True


# -- the sync null pool closes on return ----------------------------------------------


def test_sync_null_pool_closes_before_putconn_returns(dsn: str, backends: Any) -> None:
    with sync_pool(NullConnectionPool, dsn, "null-close") as pool:
        with pool.connection() as conn:
            assert backends(pool.name) == 1
        assert conn.closed
        assert eventually_blocking(lambda: backends(pool.name), 0, timeout=2.0) == 0
        conn = pool.getconn()
        pool.putconn(conn)
        assert conn.closed
        assert eventually_blocking(lambda: pool.stats().size, 0) == 0


async def test_async_null_pool_closes_before_putconn_returns(dsn: str, backends: Any) -> None:
    async with async_pool(AsyncNullConnectionPool, dsn, "null-close-a") as pool:
        async with pool.connection() as conn:
            pass
        assert conn.closed
        assert await eventually(backends, pool.name, expect=0, timeout=2.0) == 0


# -- keys and timeouts are validated on every path ------------------------------------


@pytest.mark.parametrize("cls", ASYNC_CLASSES)
async def test_unhashable_key_costs_no_slot_async(dsn: str, cls: type) -> None:
    async with async_pool(cls, dsn, "key", max_size=2, timeout=1.0) as pool:
        for _ in range(3):
            with pytest.raises(TypeError):
                await pool.getconn(key=[1])
        conns = [await pool.getconn(), await pool.getconn()]
        assert pool.stats().in_use == 2
        for conn in conns:
            await pool.putconn(conn)
        start = time.monotonic()
        await pool.close()
        assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("cls", SYNC_CLASSES)
def test_unhashable_key_costs_no_slot_sync(dsn: str, cls: type) -> None:
    with sync_pool(cls, dsn, "key-s", max_size=2, timeout=1.0) as pool:
        for _ in range(3):
            with pytest.raises(TypeError):
                pool.getconn(key=[1])
        conns = [pool.getconn(), pool.getconn()]
        for conn in conns:
            pool.putconn(conn)
        start = time.monotonic()
        pool.close()
        assert time.monotonic() - start < 1.0


BAD_TIMEOUTS = [-1, "1", float("nan")]


@pytest.mark.parametrize("cls", ASYNC_CLASSES)
async def test_bad_getconn_timeout_raises_whether_or_not_idle_async(dsn: str, cls: type) -> None:
    async with async_pool(cls, dsn, "to", min_size=0, max_size=2) as pool:
        for bad in BAD_TIMEOUTS:
            with pytest.raises(ValueError):
                await pool.getconn(timeout=bad)  # nothing idle
        async with pool.connection():
            pass  # one idle now (not for the null pool)
        for bad in BAD_TIMEOUTS:
            with pytest.raises(ValueError):
                await pool.getconn(bad)
            with pytest.raises(ValueError):
                async with pool.connection(timeout=bad):
                    pass
        assert pool.stats().in_use == 0


@pytest.mark.parametrize("cls", SYNC_CLASSES)
def test_bad_getconn_timeout_raises_whether_or_not_idle_sync(dsn: str, cls: type) -> None:
    with sync_pool(cls, dsn, "to-s", min_size=0, max_size=2) as pool:
        for bad in BAD_TIMEOUTS:
            with pytest.raises(ValueError):
                pool.getconn(timeout=bad)
        with pool.connection():
            pass
        for bad in BAD_TIMEOUTS:
            with pytest.raises(ValueError):
                pool.getconn(bad)
            with pytest.raises(ValueError), pool.connection(timeout=bad):
                pass
        assert pool.stats().in_use == 0


# -- a huge max_size costs nothing until used -----------------------------------------


def _peak_bytes(func: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        func()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_huge_max_size_is_cheap_async(dsn: str) -> None:
    pools: list[Any] = []

    def make() -> None:
        pools.append(AsyncConnectionPool(dsn, max_size=1_000_000, name=uname("huge")))

    assert _peak_bytes(make) < 200_000
    pool = pools[0]
    tracemalloc.start()
    try:
        await pool.open(wait=True, timeout=10.0)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        await pool.resize(1, 1_000_000_000)
        await pool.resize(1, 10)
        await pool.resize(2, 2_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await pool.close()
    assert peak < 2_000_000


def test_huge_max_size_is_cheap_sync(dsn: str) -> None:
    pools: list[Any] = []

    def make() -> None:
        pools.append(ConnectionPool(dsn, max_size=1_000_000, name=uname("huge-s")))

    assert _peak_bytes(make) < 200_000
    with pools[0] as pool:
        pool.resize(1, 1_000_000_000)
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        assert pool.max_size == 1_000_000_000


# -- the pool refills promptly once the server is back ---------------------------------


async def test_refills_promptly_after_reconnect_timeout_ran_out_async(own_server: Any) -> None:
    failed = asyncio.Event()
    await asyncio.to_thread(own_server.stop)
    pool = AsyncConnectionPool(
        own_server.dsn,
        min_size=3,
        max_size=4,
        timeout=5.0,
        reconnect_timeout=0.3,
        reconnect_failed=lambda pool: failed.set(),
        name=uname("refill"),
    )
    await pool.open()
    try:
        await asyncio.wait_for(failed.wait(), 10.0)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_server.start)
        async with pool.connection() as conn:  # one request succeeds...
            await conn.execute("SELECT 1")
        start = time.monotonic()
        # ... and min_size is back within a couple of seconds, not at the next maintenance.
        size = await eventually(lambda: pool.stats().size, expect=3, timeout=3.0)
        assert size == 3, f"size {size} after {time.monotonic() - start:.1f} s"
    finally:
        await pool.close()


def test_refills_promptly_after_reconnect_timeout_ran_out_sync(own_server: Any) -> None:
    failed = threading.Event()
    own_server.stop()
    pool = ConnectionPool(
        own_server.dsn,
        min_size=3,
        max_size=4,
        timeout=5.0,
        reconnect_timeout=0.3,
        reconnect_failed=lambda pool: failed.set(),
        name=uname("refill-s"),
    )
    pool.open()
    try:
        assert failed.wait(10.0)
        time.sleep(0.3)
        own_server.start()
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        size = eventually_blocking(lambda: pool.stats().size, 3, timeout=3.0)
        assert size == 3
    finally:
        pool.close()


# -- an async reconnect_failed is awaited ---------------------------------------------


async def test_async_reconnect_failed_is_awaited() -> None:
    done = asyncio.Event()
    seen: list[Any] = []

    async def on_failed(pool: Any) -> None:
        await asyncio.sleep(0)
        seen.append(pool)
        done.set()

    pool = AsyncConnectionPool(
        down_dsn(), reconnect_timeout=0.2, reconnect_failed=on_failed, name=uname("rf-async")
    )
    await pool.open()
    try:
        await asyncio.wait_for(done.wait(), 10.0)
        assert seen == [pool]
    finally:
        await pool.close()


def test_async_reconnect_failed_is_awaited_by_the_sync_pool() -> None:
    done = threading.Event()

    async def on_failed(pool: Any) -> None:
        await asyncio.sleep(0)
        done.set()

    pool = ConnectionPool(
        down_dsn(), reconnect_timeout=0.2, reconnect_failed=on_failed, name=uname("rf-sync")
    )
    pool.open()
    try:
        assert done.wait(10.0)
    finally:
        pool.close()


# -- a pool used from another event loop ----------------------------------------------


def _in_other_loop(coro_fn: Callable[[], Any]) -> tuple[BaseException | None, str]:
    """Run ``coro_fn()`` with asyncio.run in another thread: (its exception, that loop's repr)."""
    box: dict[str, Any] = {}

    async def main() -> None:
        box["loop"] = repr(asyncio.get_running_loop())
        try:
            await coro_fn()
        except BaseException as exc:
            box["exc"] = exc

    in_thread(lambda: asyncio.run(main()))
    return box.get("exc"), box["loop"]


async def test_foreign_event_loop_raises_pool_error(dsn: str) -> None:
    async with async_pool(AsyncConnectionPool, dsn, "loops", max_size=1, timeout=2.0) as pool:
        here = repr(asyncio.get_running_loop())
        conn = await pool.getconn()
        # Where it would wait: the pool is exhausted.
        exc, there = await asyncio.to_thread(_in_other_loop, lambda: pool.getconn(timeout=1.0))
        assert isinstance(exc, PoolError), exc
        assert here in str(exc) and there in str(exc)
        assert pool.stats().waiting == 0
        # Where it would hand the connection to a waiter of this loop.
        waiter = asyncio.create_task(pool.getconn())
        await eventually(lambda: pool.stats().waiting, expect=1)
        exc, there = await asyncio.to_thread(_in_other_loop, lambda: pool.putconn(conn))
        assert isinstance(exc, PoolError), exc
        assert here in str(exc) and there in str(exc)
        # Nothing was lost: the connection is still ours to return.
        await pool.putconn(conn)
        assert await asyncio.wait_for(waiter, 2.0) is conn
        await pool.putconn(conn)
        assert pool.stats().in_use == 0


def test_another_loop_of_the_pools_thread_raises_pool_error_where_it_would_wait(
    dsn: str,
) -> None:
    """The same in one thread: the wait compares threads, and learns of the other loop
    when that loop's task refuses the pool loop's future."""
    loop = asyncio.new_event_loop()
    manager = async_pool(AsyncConnectionPool, dsn, "loops-one-thread", max_size=1, timeout=2.0)
    try:
        pool = loop.run_until_complete(manager.__aenter__())
        conn = loop.run_until_complete(pool.getconn())
        other = asyncio.new_event_loop()
        try:
            with pytest.raises(PoolError, match="was opened on event loop"):
                other.run_until_complete(pool.getconn(timeout=1.0))
        finally:
            other.close()
        assert pool.stats().waiting == 0
        # Nothing was lost: the connection goes back and out again on the pool's loop.
        loop.run_until_complete(pool.putconn(conn))
        again = loop.run_until_complete(pool.getconn())
        assert again is conn and not again.closed
        loop.run_until_complete(pool.putconn(again))
        assert pool.stats().in_use == 0
    finally:
        loop.run_until_complete(manager.__aexit__(None, None, None))
        loop.close()


# -- wait() and putconn() arguments ---------------------------------------------------


async def test_wait_negative_timeout_and_putconn_wrong_key_async(dsn: str) -> None:
    async with async_pool(AsyncConnectionPool, dsn, "wk", max_size=2) as pool:
        with pytest.raises(ValueError):
            await pool.wait(timeout=-1)
        conn = await pool.getconn(key="k")
        with pytest.raises(PoolError, match="under key 'k'"):
            await pool.putconn(conn, key="other")
        assert await pool.getconn(key="k") is conn
        assert pool.stats().in_use == 1
        await pool.putconn(conn, key="k")
        assert pool.stats().in_use == 0
        other = await pool.getconn(key="k")
        await pool.putconn(other, key="k")


def test_wait_negative_timeout_and_putconn_wrong_key_sync(dsn: str) -> None:
    with sync_pool(ConnectionPool, dsn, "wk-s", max_size=2) as pool:
        with pytest.raises(ValueError):
            pool.wait(timeout=-1)
        conn = pool.getconn(key="k")
        with pytest.raises(PoolError, match="under key 'k'"):
            pool.putconn(conn, key="other")
        assert pool.getconn(key="k") is conn
        pool.putconn(conn, key="k")
        assert pool.stats().in_use == 0


# == parity ===========================================================================

# -- getconn(timeout, *, key) -----------------------------------------------------------


async def test_getconn_timeout_is_positional_async(dsn: str) -> None:
    async with async_pool(AsyncConnectionPool, dsn, "pos", max_size=1, timeout=0.1) as pool:
        held = await pool.getconn()
        start = time.monotonic()
        with pytest.raises(PoolTimeout):
            await pool.getconn(2.0)
        assert 1.9 <= time.monotonic() - start < 4.0
        with pytest.raises(TypeError):
            await pool.getconn(1.0, "k")  # type: ignore[misc]
        await pool.putconn(held)


def test_getconn_timeout_is_positional_sync(dsn: str) -> None:
    with sync_pool(ConnectionPool, dsn, "pos-s", max_size=1, timeout=0.1) as pool:
        held = pool.getconn()
        start = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.getconn(2.0)
        assert 1.9 <= time.monotonic() - start < 4.0
        with pytest.raises(TypeError):
            pool.getconn(1.0, "k")  # type: ignore[misc]
        pool.putconn(held)


def test_key_is_keyword_only_except_on_the_psycopg2_dropins() -> None:
    for cls in ALL_CLASSES:
        params = inspect.signature(cls.getconn).parameters
        assert list(params)[1] == "timeout", cls
        assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY, cls
    for cls in (
        aiopgpool.SimpleConnectionPool,
        aiopgpool.ThreadedConnectionPool,
        aiopgpool.PersistentConnectionPool,
    ):
        params = inspect.signature(cls.getconn).parameters
        assert list(params)[1] == "key", cls
        assert params["key"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, cls


def test_psycopg2_dropin_getconn_key_is_positional(dsn: str) -> None:
    pool = aiopgpool.ThreadedConnectionPool(1, 2, dsn)
    try:
        conn = pool.getconn("k")
        assert pool.getconn("k") is conn
        pool.putconn(conn, "k")
    finally:
        pool.closeall()


# -- callable conninfo and kwargs -------------------------------------------------------


def _app_name_of(conn: psycopg.Connection[Any]) -> str:
    return str(conn.execute("SHOW application_name").fetchone()[0])  # type: ignore[index]


def test_callable_conninfo_and_kwargs_sync(dsn: str) -> None:
    n = iter(range(1000))
    calls: list[str] = []

    def conninfo() -> str:
        calls.append("conninfo")
        return f"{dsn} application_name=rot-{next(n)}"

    def kwargs() -> dict[str, Any]:
        calls.append("kwargs")
        return {"password": SECRET}  # trust auth: accepted and unused

    with sync_pool(ConnectionPool, conninfo, "callable-s", min_size=0, kwargs=kwargs) as pool:
        names = []
        for _ in range(3):
            conn = pool.getconn()
            names.append(_app_name_of(conn))
            pool.putconn(conn, close=True)
        assert names == ["rot-0", "rot-1", "rot-2"]
        assert calls.count("conninfo") == calls.count("kwargs") == 3
        assert SECRET not in repr(pool)


async def test_callable_conninfo_and_kwargs_async(dsn: str) -> None:
    n = iter(range(1000))

    async def conninfo() -> str:
        await asyncio.sleep(0)
        return f"{dsn} application_name=arot-{next(n)}"

    async def kwargs() -> dict[str, Any]:
        return {"password": SECRET}

    def sync_conninfo() -> str:
        return f"{dsn} application_name=srot-{next(n)}"

    for info, kw, prefix in ((conninfo, kwargs, "arot"), (sync_conninfo, lambda: {}, "srot")):
        async with async_pool(
            AsyncNullConnectionPool, info, "callable-a", kwargs=kw, max_size=2
        ) as pool:
            names = []
            for _ in range(2):
                async with pool.connection() as conn:
                    cur = await conn.execute("SHOW application_name")
                    names.append((await cur.fetchone())[0])  # type: ignore[index]
            assert len(set(names)) == 2 and all(x.startswith(prefix) for x in names)


@pytest.mark.parametrize("cls", [AsyncConnectionPool, ConnectionPool])
async def test_a_failing_conninfo_callable_is_a_failed_attempt(
    dsn: str, cls: type, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    vault = {"up": False}

    def kwargs() -> dict[str, Any]:
        if not vault["up"]:
            raise RuntimeError("vault unreachable")
        return {}

    pool = cls(
        f"{dsn} password={SECRET}", kwargs=kwargs, min_size=0, timeout=0.5, name=uname("vault")
    )
    if cls is AsyncConnectionPool:
        await pool.open()
    else:
        pool.open()

    async def getconn() -> Any:
        if cls is AsyncConnectionPool:
            return await pool.getconn()
        return await asyncio.to_thread(pool.getconn)

    async def putconn(conn: Any) -> None:
        if cls is AsyncConnectionPool:
            await pool.putconn(conn)
        else:
            pool.putconn(conn)

    try:
        with pytest.raises(PoolTimeout) as info:
            await getconn()
        assert pool.stats().connections_failed >= 1
        assert pool.get_stats()["connections_errors"] >= 1
        text = f"{info.value!r} {info.value.__cause__!r} {caplog.text} {pool!r}"
        assert SECRET not in text
        assert "vault unreachable" in caplog.text
        vault["up"] = True  # the source recovers: the pool connects
        await putconn(await getconn())
    finally:
        if cls is AsyncConnectionPool:
            await pool.close()
        else:
            pool.close()


# -- open=True --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", SYNC_CLASSES)
def test_open_true_sync(dsn: str, cls: type) -> None:
    pool = cls(dsn, open=True, name=uname("open-s"))
    try:
        assert not pool.closed
        pool.wait(timeout=5.0)
        assert pool.stats().size == pool.min_size
        with pool.connection() as conn:
            conn.execute("SELECT 1")
    finally:
        pool.close()


@pytest.mark.parametrize("cls", [ConnectionPool, NullConnectionPool, psycopg_pool.ConnectionPool])
def test_open_true_sync_does_not_wait_for_connections(cls: type) -> None:
    """As psycopg_pool: open=True starts the pool; connections come in the background.

    Before, ours waited for min_size connections (open(wait=True)), so against a
    server that was down the constructor raised PoolTimeout after 30 s.
    """
    start = time.monotonic()
    pool = cls(down_dsn(), open=True, timeout=1.0)
    try:
        assert time.monotonic() - start < 2.0
        assert not pool.closed
        with pytest.raises(PoolTimeout if cls is not psycopg_pool.ConnectionPool else Exception):
            pool.getconn()
    finally:
        pool.close(timeout=0)


@pytest.mark.parametrize("cls", ASYNC_CLASSES)
async def test_open_true_async(dsn: str, cls: type) -> None:
    pool = cls(dsn, open=True, name=uname("open-a"))
    try:
        assert not pool.closed
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
    finally:
        await pool.close()


@pytest.mark.parametrize("cls", ASYNC_CLASSES)
def test_open_true_async_without_a_running_loop(dsn: str, cls: type) -> None:
    with pytest.raises(PoolError, match="running event loop"):
        cls(dsn, open=True, name=uname("open-noloop"))


# -- close_returns -------------------------------------------------------------------


def test_close_returns_sync(dsn: str) -> None:
    with sync_pool(ConnectionPool, dsn, "cr-s", max_size=1, close_returns=True) as pool:
        conn = pool.getconn()
        conn.close()
        assert not conn.closed
        assert pool.stats().in_use == 0
        assert pool.getconn() is conn  # reused
        conn.close()
    with sync_pool(ConnectionPool, dsn, "cr-s-off", max_size=1) as pool:
        with pool.connection() as conn:
            conn.close()  # closes it for real
            assert conn.closed
        with pool.connection() as other:
            assert other is not conn
            assert other.execute("SELECT 1").fetchone() == (1,)
            with other:  # psycopg: 'with conn' on a pooled connection leaves it open
                other.execute("SELECT 1")
            assert not other.closed
        with pool.connection() as again:
            assert again is other


async def test_close_returns_async(dsn: str) -> None:
    async with async_pool(AsyncConnectionPool, dsn, "cr-a", max_size=1, close_returns=True) as pool:
        conn = await pool.getconn()
        await conn.close()
        assert not conn.closed
        assert pool.stats().in_use == 0
        assert await pool.getconn() is conn
        await conn.close()
    async with async_pool(AsyncConnectionPool, dsn, "cr-a-off", max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.close()
            assert conn.closed
        async with pool.connection() as other:
            assert other is not conn
            async with other:
                await other.execute("SELECT 1")
            assert not other.closed
        async with pool.connection() as again:
            assert again is other


# -- get_stats() / pop_stats() ---------------------------------------------------------


def _psycopg_pool_keys() -> set[str]:
    """Every key psycopg_pool's get_stats() may return (its measures and its counters)."""
    base = psycopg_pool.base.BasePool
    return {
        value
        for name, value in vars(base).items()
        if name.startswith("_") and name[1:2].isupper() and isinstance(value, str)
    }


async def test_get_stats_keys_match_psycopg_pool(dsn: str) -> None:
    keys = _psycopg_pool_keys()
    assert {"pool_min", "requests_num", "connections_lost", "usage_ms"} <= keys
    async with psycopg_pool.AsyncConnectionPool(dsn, min_size=1, open=False) as ref:
        async with ref.connection():
            pass
        ref_keys = set(ref.get_stats())
    assert ref_keys <= keys
    assert "connections_lost" not in ref_keys  # psycopg_pool leaves out counters still at 0
    async with async_pool(AsyncConnectionPool, dsn, "stats") as pool:
        assert set(pool.get_stats()) == keys  # every key, always (zeros included)
        for _ in range(3):
            async with pool.connection():
                pass
        stats = pool.pop_stats()
        assert set(stats) == keys
        assert stats["requests_num"] == 3 and stats["pool_size"] == 1
        after = pool.get_stats()
        assert after["requests_num"] == 0 and after["connections_num"] == 0
        assert after["pool_size"] == 1 and after["pool_min"] == 1  # measures stay


def test_get_stats_keys_match_psycopg_pool_sync(dsn: str) -> None:
    keys = _psycopg_pool_keys()
    with sync_pool(NullConnectionPool, dsn, "stats-s") as pool:
        for _ in range(2):
            with pool.connection():
                pass
        stats = pool.pop_stats()
        assert set(stats) == keys
        assert stats["requests_num"] == 2 and stats["connections_num"] == 2
        assert pool.get_stats()["requests_num"] == 0


async def test_pop_stats_while_requests_wait_keeps_their_outcome(dsn: str) -> None:
    """Requests waiting when pop_stats() runs count their timeout or their wait in the
    new period, as psycopg_pool does (they were written to the discarded counters)."""
    async with async_pool(AsyncConnectionPool, dsn, "pop-waiting", max_size=1) as pool:
        held = await pool.getconn()
        late = [asyncio.create_task(pool.getconn(timeout=0.3)) for _ in range(3)]
        served = [asyncio.create_task(pool.getconn(timeout=10)) for _ in range(2)]
        await asyncio.sleep(0.1)
        popped = pool.pop_stats()
        assert popped["requests_queued"] == 5 and popped["requests_errors"] == 0
        for task in late:
            with pytest.raises(PoolTimeout):
                await task
        await pool.putconn(held)
        for task in served:
            await pool.putconn(await task)
        after, stats = pool.get_stats(), pool.stats()
        assert after["requests_errors"] == stats.timeouts == 3
        assert stats.wait_time_total >= 5 * 0.2
        assert stats.wait_time_total == pytest.approx(stats.wait_time_histogram.sum)
        assert stats.wait_time_histogram.count == 5


async def test_a_request_that_opens_its_connection_counts_as_waiting(dsn: str) -> None:
    """A checkout that has to open a connection waits for it, as psycopg_pool counts it:
    pending in requests_waiting meanwhile, then in requests_queued and requests_wait_ms
    (it used to count as served at once, so an outage or a cold start showed no wait)."""

    async def slow_configure(conn: Any) -> None:
        await asyncio.sleep(0.2)

    async with async_pool(
        AsyncConnectionPool, dsn, "connect-wait", min_size=0, max_size=4,
        configure=slow_configure,
    ) as pool:  # fmt: skip
        tasks = [asyncio.create_task(pool.getconn()) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert pool.stats().waiting == 3
        assert pool.get_stats()["requests_waiting"] == 3
        for conn in await asyncio.gather(*tasks):
            await pool.putconn(conn)
        stats = pool.get_stats()
        assert stats["requests_waiting"] == 0
        assert stats["requests_queued"] == 3
        assert stats["requests_wait_ms"] >= 3 * 180
        histogram = pool.stats().wait_time_histogram
        assert histogram.count == 3 and histogram.counts[0] == 0  # no wait of 0

    unreachable = f"host=127.0.0.1 port={closed_port()} dbname=x user=x"

    def refused() -> tuple[int, int, int]:
        with ConnectionPool(unreachable, name=uname("connect-wait-s"), min_size=0) as pool:
            with pytest.raises(PoolTimeout):
                pool.getconn(timeout=0.3)
            stats = pool.get_stats()
            return stats["requests_queued"], stats["requests_errors"], stats["requests_wait_ms"]

    queued, errors, wait_ms = await asyncio.to_thread(refused)
    assert (queued, errors) == (1, 1) and wait_ms >= 250


# -- generic pool classes, as mypy sees them ----------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _mypy(path: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",  # judge the file, not the package (nox -s typecheck)
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(cache),
            str(path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


MISUSE = """
from aiopgpool import ConnectionPool

pool = ConnectionPool("dbname=app")
pool.getconn(1.0, "k")
number: int = pool.getconn()
"""


def test_pools_are_generic_for_mypy(tmp_path: Path) -> None:
    """tests/typing_generic_check.py passes mypy --strict; misuse is reported."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed here (it is in the 'test' extra)")
    proc = _mypy(ROOT / "tests" / "typing_generic_check.py", tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'Revealed type is "typing_generic_check.MyConn"' in proc.stdout
    assert 'Revealed type is "typing_generic_check.MyAsyncConn"' in proc.stdout
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSE)
    proc = _mypy(misuse, tmp_path / "cache")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'misuse.py:5: error: Too many positional arguments for "getconn"' in proc.stdout
    assert "misuse.py:6: error: Incompatible types in assignment" in proc.stdout


# -- check_connection -----------------------------------------------------------------


async def test_check_connection_is_a_static_method(dsn: str) -> None:
    for cls in [*ALL_CLASSES, psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool]:
        assert isinstance(inspect.getattr_static(cls, "check_connection"), staticmethod), cls
    async with await psycopg.AsyncConnection.connect(dsn) as aconn:
        await AsyncConnectionPool.check_connection(aconn)
        await AsyncNullConnectionPool.check_connection(aconn)
    with psycopg.connect(dsn) as conn:
        ConnectionPool.check_connection(conn)
        NullConnectionPool.check_connection(conn)
        conn.close()
        with pytest.raises(psycopg.OperationalError):
            ConnectionPool.check_connection(conn)
    async with (
        async_pool(
            AsyncConnectionPool, dsn, "cc", check=AsyncConnectionPool.check_connection
        ) as pool,
        pool.connection() as c,
    ):
        await c.execute("SELECT 1")


# -- WARNING logs for bad returns -------------------------------------------------------


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_bad_returns_are_logged_async(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiopgpool")
    async with async_pool(
        AsyncConnectionPool, f"{dsn} password={SECRET}", "warn-a", max_size=2
    ) as pool:
        conn = await pool.getconn()
        await conn.execute("SELECT 1")
        await pool.putconn(conn)
        conn = await pool.getconn()
        with suppress(psycopg.Error):
            await conn.execute("SELECT 1/0")
        await pool.putconn(conn)
        conn = await pool.getconn()
        query = asyncio.create_task(conn.execute("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.2)
        await pool.putconn(conn)
        with suppress(psycopg.Error):
            await asyncio.wait_for(query, 5.0)
        messages = _warnings(caplog)
        for words in ("in a transaction", "in a failed transaction", "query still running"):
            assert any(pool.name in m and words in m for m in messages), (words, messages)
        assert pool.stats().returns_bad == 3
    assert SECRET not in caplog.text


async def test_failed_reset_is_logged_async(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiopgpool")

    async def failing_reset(conn: Any) -> None:
        raise RuntimeError("boom")

    async with async_pool(
        AsyncConnectionPool, f"{dsn} password={SECRET}", "warn-ar", reset=failing_reset
    ) as pool:
        async with pool.connection():
            pass
        messages = _warnings(caplog)
        assert any(pool.name in m and "reset" in m for m in messages), messages
    assert SECRET not in caplog.text


def test_bad_returns_are_logged_sync(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiopgpool")

    def failing_reset(conn: Any) -> None:
        raise RuntimeError("boom")

    with sync_pool(ConnectionPool, f"{dsn} password={SECRET}", "warn-s", max_size=2) as pool:
        conn = pool.getconn()
        conn.execute("SELECT 1")
        pool.putconn(conn)
        conn = pool.getconn()
        with suppress(psycopg.Error):
            conn.execute("SELECT 1/0")
        pool.putconn(conn)
        conn = pool.getconn()
        query = threading.Thread(
            target=_quietly, args=(conn.execute, "SELECT pg_sleep(5)"), daemon=True
        )
        query.start()
        time.sleep(0.3)
        pool.putconn(conn)
        query.join(10)
        messages = _warnings(caplog)
        for words in ("in a transaction", "in a failed transaction", "query still running"):
            assert any(pool.name in m and words in m for m in messages), (words, messages)
    caplog.clear()
    with sync_pool(
        ConnectionPool, f"{dsn} password={SECRET}", "warn-sr", reset=failing_reset
    ) as pool:
        with pool.connection():
            pass
        messages = _warnings(caplog)
        assert any(pool.name in m and "reset" in m for m in messages), messages
    assert SECRET not in caplog.text


def _quietly(func: Callable[..., Any], *args: Any) -> None:
    with suppress(Exception):
        func(*args)


# -- a connection returned while another thread or task runs a query on it ---------


def _until_active(conn: psycopg.Connection[Any]) -> None:
    """Wait (bounded) until a query runs on ``conn``."""
    deadline = time.monotonic() + 5.0
    while conn.pgconn.transaction_status != TransactionStatus.ACTIVE:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_returned_mid_query_the_query_thread_is_not_left_hanging(dsn: str) -> None:
    """The query is cancelled, and the connection closed only once its thread let go.

    Before: putconn could close the connection under the thread still in
    execute(), which then waited on a dead socket forever, whenever it closed it
    before that thread read the cancellation (psycopg_pool does the same).
    """
    # autocommit: no BEGIN, so ACTIVE means the pg_sleep runs (a borrower that
    # returns during BEGIN has its query waited for and rolled back instead).
    auto = {"autocommit": True}
    with sync_pool(ConnectionPool, dsn, "midq-s", max_size=2, kwargs=auto) as pool:
        # The race was lost about once in 25 returns: 150 make a miss unlikely.
        for i in range(150):
            pause = (0.0, 0.01, 0.03)[i % 3]
            conn = pool.getconn()
            errors: list[BaseException] = []

            def run(conn: Any = conn, errors: list[BaseException] = errors) -> None:
                try:
                    conn.execute("SELECT pg_sleep(3)")
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            _until_active(conn)
            time.sleep(pause)
            pool.putconn(conn)
            thread.join(5.0)
            assert not thread.is_alive(), "the query's thread hangs on a closed connection"
            assert conn.closed
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_returned_mid_query_the_query_task_is_not_left_hanging(dsn: str) -> None:
    auto = {"autocommit": True}
    async with async_pool(AsyncConnectionPool, dsn, "midq-a", max_size=2, kwargs=auto) as pool:
        # The race was lost about once in 5 returns: 30 make a miss unlikely.
        for _ in range(30):
            conn = await pool.getconn()
            query = asyncio.create_task(conn.execute("SELECT pg_sleep(3)"))
            while conn.pgconn.transaction_status != TransactionStatus.ACTIVE:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.02)
            await pool.putconn(conn)
            done, _ = await asyncio.wait({query}, timeout=5.0)
            query.cancel()
            with suppress(BaseException):
                await query
            assert done, "the query's task hangs on a closed connection"
            assert conn.closed
        assert pool.stats().returns_bad == 30


# -- option attributes ---------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_option_attributes(dsn: str, cls: type) -> None:
    options = {
        "timeout": 7.0,
        "max_waiting": 3,
        "max_idle": 11.0,
        "max_lifetime": 13.0,
        "reconnect_timeout": 17.0,
        "max_size": 5,
    }
    pool = cls(dsn, name=uname("attrs"), **options)
    for name, value in options.items():
        assert getattr(pool, name) == value, name
    assert pool.min_size == (0 if is_null(cls) else 1)
    assert pool.name.startswith("par-attrs")
    assert pool.closed


# -- max_size=0 on the null pools ----------------------------------------------------


async def test_null_pool_max_size_zero_is_unbounded_async(dsn: str, backends: Any) -> None:
    async with async_pool(AsyncNullConnectionPool, dsn, "n0", max_size=0, timeout=10.0) as pool:
        holding = 0
        all_hold = asyncio.Event()  # asyncio.Barrier is Python >= 3.11

        async def borrow() -> int:
            nonlocal holding
            async with pool.connection() as conn:
                holding += 1
                if holding == 20:
                    all_hold.set()
                await all_hold.wait()
                return conn.info.backend_pid

        pids = await asyncio.wait_for(asyncio.gather(*(borrow() for _ in range(20))), 30)
        assert len(set(pids)) == 20
        assert pool.max_size == 0


def test_null_pool_max_size_zero_is_unbounded_sync(dsn: str) -> None:
    with sync_pool(NullConnectionPool, dsn, "n0-s", max_size=0, timeout=10.0) as pool:
        barrier = threading.Barrier(20, timeout=30)
        pids: list[int] = []

        def borrow() -> None:
            with pool.connection() as conn:
                barrier.wait()
                pids.append(conn.info.backend_pid)

        threads = [threading.Thread(target=borrow) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
        assert len(set(pids)) == 20


# -- discard_session -----------------------------------------------------------------

SESSION_STATE = """
SELECT current_setting('search_path'),
       current_user = session_user,
       (SELECT count(*) FROM pg_listening_channels()),
       (SELECT count(*) FROM pg_prepared_statements WHERE name = 'parity_p'),
       to_regclass('parity_tmp') IS NOT NULL,
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())
"""
CLEAN = ('"$user", public', True, 0, 0, False, 0)


@pytest.fixture
def role(dsn: str) -> Iterator[str]:
    name = f"parity_role_{unique_name('r').replace('-', '_')}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {name}")


def _dirty(conn: psycopg.Connection[Any], role: str) -> None:
    conn.execute("SET search_path TO pg_catalog")
    conn.execute("LISTEN parity_x")
    conn.execute("PREPARE parity_p AS SELECT 1")
    conn.execute("CREATE TEMP TABLE parity_tmp (x int)")
    conn.execute("SELECT pg_advisory_lock(4242)")
    conn.execute(f"SET ROLE {role}")


async def _dirty_async(conn: psycopg.AsyncConnection[Any], role: str) -> None:
    for sql in (
        "SET search_path TO pg_catalog",
        "LISTEN parity_x",
        "PREPARE parity_p AS SELECT 1",
        "CREATE TEMP TABLE parity_tmp (x int)",
        "SELECT pg_advisory_lock(4242)",
        f"SET ROLE {role}",
    ):
        await conn.execute(sql)


def _prepared_queries(conn: psycopg.Connection[Any]) -> None:
    for i in range(10):  # prepare_threshold 5: psycopg prepares it on the server
        assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)


async def _prepared_queries_async(conn: psycopg.AsyncConnection[Any]) -> None:
    for i in range(10):
        cur = await conn.execute("SELECT %s::int + 1", (i,))
        assert await cur.fetchone() == (i + 1,)


@pytest.mark.parametrize("autocommit", [False, True])
def test_discard_session_blocking(dsn: str, role: str, autocommit: bool) -> None:
    with sync_pool(
        ConnectionPool,
        dsn,
        "discard-s",
        max_size=1,
        reset=discard_session_blocking,
        kwargs={"autocommit": autocommit},
    ) as pool:
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            _prepared_queries(conn)
            _dirty(conn, role)
            assert conn.execute(SESSION_STATE).fetchone() != CLEAN
        with pool.connection() as conn:
            assert conn.info.backend_pid == pid  # the same backend
            assert conn.execute(SESSION_STATE).fetchone() == CLEAN
            _prepared_queries(conn)
            assert conn.autocommit is autocommit
        for i in range(12):  # one query a checkout: prepared at its 5th, across DISCARD ALLs
            with pool.connection() as conn:
                assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)


@pytest.mark.parametrize("autocommit", [False, True])
async def test_discard_session_async(dsn: str, role: str, autocommit: bool) -> None:
    async with async_pool(
        AsyncConnectionPool,
        dsn,
        "discard-a",
        max_size=1,
        reset=discard_session,
        kwargs={"autocommit": autocommit},
    ) as pool:
        async with pool.connection() as conn:
            pid = conn.info.backend_pid
            await _prepared_queries_async(conn)
            await _dirty_async(conn, role)
        async with pool.connection() as conn:
            assert conn.info.backend_pid == pid
            cur = await conn.execute(SESSION_STATE)
            assert await cur.fetchone() == CLEAN
            await _prepared_queries_async(conn)
            assert conn.autocommit is autocommit
        for i in range(12):  # one query a checkout: prepared at its 5th, across DISCARD ALLs
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT %s::int * 2", (i,))
                assert await cur.fetchone() == (i * 2,)


def test_without_reset_session_state_leaks(dsn: str, role: str) -> None:
    """Documented, as in psycopg_pool: without reset= the next borrower sees it all."""
    with sync_pool(ConnectionPool, dsn, "leak", max_size=1) as pool:
        with pool.connection() as conn:
            _dirty(conn, role)
        with pool.connection() as conn:
            assert conn.execute(SESSION_STATE).fetchone() == ("pg_catalog", False, 1, 1, True, 1)
            conn.execute("RESET ROLE")
            conn.execute("SELECT pg_advisory_unlock_all()")


def test_psycopg_pool_leaks_session_state_too(dsn: str, role: str) -> None:
    with psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=1, open=True) as pool:
        with pool.connection() as conn:
            _dirty(conn, role)
        with pool.connection() as conn:
            assert conn.execute(SESSION_STATE).fetchone() == ("pg_catalog", False, 1, 1, True, 1)
            conn.execute("RESET ROLE")


# == where we differ from psycopg_pool on purpose (README: Migrating from psycopg_pool) ==


def test_min_size_default_is_1_not_4(dsn: str) -> None:
    assert ConnectionPool(dsn).min_size == AsyncConnectionPool(dsn).min_size == 1
    assert psycopg_pool.ConnectionPool(dsn, open=False).min_size == 4
    assert ConnectionPool(dsn).max_size == 10  # psycopg_pool: max_size defaults to min_size
    assert psycopg_pool.ConnectionPool(dsn, open=False).max_size == 4


def test_idle_connections_are_handed_out_most_recent_first(dsn: str) -> None:
    """LIFO: the connection returned last is lent first (psycopg_pool: oldest first)."""
    with sync_pool(ConnectionPool, dsn, "lifo", min_size=3, max_size=3) as pool:
        a, b, c = pool.getconn(), pool.getconn(), pool.getconn()
        for conn in (a, b, c):
            pool.putconn(conn)
        assert pool.getconn() is c
    with psycopg_pool.ConnectionPool(dsn, min_size=3, max_size=3, open=True) as ref:
        ref.wait()
        a, b, c = ref.getconn(), ref.getconn(), ref.getconn()
        for conn in (a, b, c):
            ref.putconn(conn)
        assert ref.getconn() is a


def test_a_connection_killed_while_idle_is_not_handed_out(dsn: str, terminate: Any) -> None:
    """Our socket test at checkout replaces it; psycopg_pool needs check= for that."""
    with sync_pool(ConnectionPool, dsn, "idle-kill", min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        assert terminate(pool.name) == 1
        time.sleep(0.1)
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool.stats().connections_lost == 1


def test_close_waits_for_borrowed_connections_up_to_its_timeout(dsn: str) -> None:
    """close(timeout) waits that long for borrowed connections, then closes them all."""
    with sync_pool(ConnectionPool, dsn, "close-to", max_size=2) as pool:
        held = pool.getconn()
        threading.Timer(0.3, pool.putconn, (held,)).start()
        start = time.monotonic()
        pool.close(timeout=5.0)
        assert 0.2 < time.monotonic() - start < 3.0  # returned at 0.3 s: closed then
        assert held.closed
    with sync_pool(ConnectionPool, dsn, "close-to2", max_size=2) as pool:
        held = pool.getconn()
        start = time.monotonic()
        pool.close(timeout=0.3)
        assert 0.2 < time.monotonic() - start < 3.0
        assert held.closed  # closed under its borrower once the timeout ran out


def test_psycopg_pool_close_leaves_borrowed_connections_open(dsn: str) -> None:
    """The reference for the test above: its close() timeout is not for borrowers."""
    ref = psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=2, open=True)
    held = ref.getconn()
    ref.close(timeout=0.3)
    assert not held.closed
    held.close()


def test_our_exceptions_are_not_psycopg_pools() -> None:
    for ours, theirs in (
        (aiopgpool.PoolTimeout, psycopg_pool.PoolTimeout),
        (aiopgpool.PoolClosed, psycopg_pool.PoolClosed),
        (aiopgpool.TooManyRequests, psycopg_pool.TooManyRequests),
    ):
        assert not issubclass(ours, theirs)
        assert issubclass(ours, psycopg.OperationalError)  # as theirs are
        assert issubclass(theirs, psycopg.OperationalError)


def test_a_pool_must_be_opened(dsn: str) -> None:
    """open defaults to False: getconn() on a pool never opened raises PoolClosed."""
    pool = ConnectionPool(dsn, name=uname("not-open"))
    with pytest.raises(aiopgpool.PoolClosed, match="not open yet"):
        pool.getconn()
    with pytest.warns(DeprecationWarning):  # psycopg_pool still opens implicitly, warning
        ref = psycopg_pool.ConnectionPool(dsn, min_size=1)
        try:
            ref.putconn(ref.getconn())
        finally:
            ref.close()


def test_constructor_arguments_psycopg_pool_has_and_we_do_not(dsn: str) -> None:
    with pytest.raises(TypeError, match="num_workers"):
        ConnectionPool(dsn, num_workers=3)  # type: ignore[call-arg]


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_max_size_none_means_min_size(dsn: str, cls: type) -> None:
    """As psycopg_pool (before: ValueError 'max_size must be an integer, got None')."""
    if is_null(cls):
        with pytest.raises(ValueError, match="max_size"):
            cls(dsn, max_size=None)  # psycopg_pool's null pools refuse it too
        return
    pool = cls(dsn, min_size=3, max_size=None)
    assert (pool.min_size, pool.max_size) == (3, 3)
    assert psycopg_pool.ConnectionPool(dsn, min_size=3, max_size=None, open=False).max_size == 3


@pytest.mark.parametrize("cls", [AsyncConnectionPool, ConnectionPool])
async def test_wait_that_times_out_leaves_the_pool_open(cls: type) -> None:
    pool = cls(down_dsn(), name=uname("wait-open"))
    if cls is AsyncConnectionPool:
        await pool.open()
        with pytest.raises(PoolTimeout):
            await pool.wait(timeout=0.3)
        assert not pool.closed  # still trying: psycopg_pool closes the pool here
        await pool.close()
    else:
        pool.open()
        with pytest.raises(PoolTimeout):
            await asyncio.to_thread(pool.wait, 0.3)
        assert not pool.closed
        pool.close()
    ref = psycopg_pool.AsyncConnectionPool(down_dsn(), min_size=1, open=False)
    await ref.open()
    with pytest.raises(psycopg_pool.PoolTimeout):
        await ref.wait(timeout=0.3)
    assert ref.closed
