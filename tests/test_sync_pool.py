"""The thread-safe sync facade: ConnectionPool and NullConnectionPool.

Blocking calls serving sync psycopg connections, the same options and methods
as the asyncio pool; thread safety under stress; the loop thread, interpreter
exit and fork(); no password anywhere.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import itertools
import logging
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import pytest
from helpers import eventually_blocking, run_python, unique_name
from psycopg import IsolationLevel
from psycopg.pq import TransactionStatus

import aiopgpool
from aiopgpool import (
    AsyncConnectionPool,
    ConnectionPool,
    NullConnectionPool,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyRequests,
)

_seq = itertools.count(1)


def uname(label: str) -> str:
    """A pool name (so an application_name) unique in this run, under 64 bytes."""
    return unique_name(f"sp-{label[:36]}")


@contextmanager
def opened(
    dsn: str, label: str, cls: type[ConnectionPool] = ConnectionPool, **options: Any
) -> Iterator[ConnectionPool]:
    """An open pool with its ``min_size`` connections ready; closed at the end."""
    options.setdefault("timeout", 5.0)
    pool = cls(dsn, name=uname(label), **options)
    pool.open(wait=True, timeout=10.0)
    try:
        yield pool
    finally:
        if not pool.closed:
            pool.closeall()


@contextmanager
def table(dsn: str) -> Iterator[str]:
    """A fresh table (x int) on the test server, dropped at the end."""
    tname = f"sp_t_{os.getpid()}_{next(_seq)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {tname} (x int)")
    try:
        yield tname
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {tname}")


def rows(dsn: str, tname: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(f"SELECT x FROM {tname} ORDER BY x").fetchall()]


def in_thread(func: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Run ``func`` in a fresh thread; its result or exception; fail if it hangs."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = func()
        except BaseException as exc:
            box["exc"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the call did not return within {timeout} s (deadlock?)"
    if "exc" in box:
        raise box["exc"]
    return box.get("result")


# -- the same interface as the asyncio pool ------------------------------------------


def test_same_options_and_methods_as_the_async_pool() -> None:
    """Constructor options (names, defaults) and public methods match AsyncConnectionPool's."""

    def params(func: Callable[..., Any]) -> dict[str, Any]:
        sig = inspect.signature(func)
        return {n: p.default for n, p in sig.parameters.items() if n != "self"}

    sync_init, async_init = params(ConnectionPool.__init__), params(AsyncConnectionPool.__init__)
    assert sync_init.pop("connection_class") is psycopg.Connection
    assert async_init.pop("connection_class") is psycopg.AsyncConnection
    assert sync_init == async_init
    methods = [
        "open",
        "getconn",
        "putconn",
        "connection",
        "closeall",
        "close",
        "resize",
        "wait",
        "check",
        "drain",
        "purge_expired",
        "stats",
    ]
    for method in methods:
        sync_method = getattr(ConnectionPool, method)
        assert not inspect.iscoroutinefunction(sync_method), method
        assert params(sync_method) == params(getattr(AsyncConnectionPool, method)), method
    for attr in ("closed", "name", "min_size", "max_size"):
        assert hasattr(ConnectionPool, attr), attr


@pytest.mark.parametrize(
    "options",
    [
        {"min_size": 3, "max_size": 2},
        {"min_size": -1},
        {"max_size": 0},
        {"max_size": -2},
        {"timeout": -1},
        {"max_waiting": -1},
        {"max_idle": -5},
    ],
)
def test_invalid_arguments_raise_value_error(dsn: str, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ConnectionPool(dsn, name=uname("bad-args"), **options)


def test_serves_sync_psycopg_connections(dsn: str, backends: Any) -> None:
    """getconn gives a sync psycopg.Connection that works; putconn takes it back."""
    with opened(dsn, "serves", min_size=1, max_size=2) as pool:
        assert not pool.closed
        assert pool.min_size == 1 and pool.max_size == 2
        conn = pool.getconn()
        assert isinstance(conn, psycopg.Connection)
        assert not isinstance(conn, psycopg.AsyncConnection)
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        assert conn.execute("SHOW application_name").fetchone() == (pool.name,)
        assert pool.stats().in_use == 1
        pool.putconn(conn)
        assert pool.stats().in_use == 0
        assert backends(pool.name) == 1


def test_context_manager_opens_and_closes(dsn: str, backends: Any) -> None:
    name = uname("ctx")
    with ConnectionPool(dsn, name=name, min_size=2, max_size=2) as pool:
        pool.wait(10.0)
        assert backends(name) == 2
    assert pool.closed
    assert eventually_blocking(lambda: backends(name), 0) == 0


def test_connection_commits_on_success(dsn: str) -> None:
    with table(dsn) as t, opened(dsn, "commit") as pool:
        with pool.connection() as conn:
            conn.execute(f"INSERT INTO {t} VALUES (1)")
            assert conn.info.transaction_status == TransactionStatus.INTRANS
        assert rows(dsn, t) == [1]
        assert pool.stats().in_use == 0


def test_connection_rolls_back_on_exception(dsn: str) -> None:
    with table(dsn) as t, opened(dsn, "rollback", max_size=1) as pool:
        with pytest.raises(ZeroDivisionError), pool.connection() as conn:
            conn.execute(f"INSERT INTO {t} VALUES (1)")
            1 / 0  # noqa: B018
        assert rows(dsn, t) == []
        assert pool.stats().in_use == 0
        with pool.connection(timeout=1.0) as again:
            assert again is conn
            assert again.info.transaction_status == TransactionStatus.IDLE


def test_keyed_getconn_returns_the_same_connection(dsn: str) -> None:
    """The same key while held: the same connection, no second slot; putconn(key=) frees it."""
    with opened(dsn, "keyed", min_size=1, max_size=1) as pool:
        first = pool.getconn(key="k")
        second = pool.getconn(key="k", timeout=0)  # would be exhausted if it needed a slot
        assert second is first
        assert pool.stats().in_use == 1
        with pytest.raises(PoolTimeout):
            pool.getconn(key="other", timeout=0)
        pool.putconn(first, key="k")
        assert pool.stats().in_use == 0
        other = pool.getconn(key="other", timeout=0)
        assert other is first  # the only connection, free again
        pool.putconn(other, key="other")


def test_timeout_raises_pool_timeout(dsn: str) -> None:
    with opened(dsn, "timeout", min_size=1, max_size=1, timeout=0.3) as pool:
        held = pool.getconn()
        start = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.getconn()  # the pool's default timeout
        assert 0.25 <= time.monotonic() - start < 3.0
        start = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.6)
        assert 0.55 <= time.monotonic() - start < 3.0
        with pytest.raises(PoolTimeout), pool.connection(timeout=0.1):
            pass
        stats = pool.stats()
        assert stats.timeouts == 3
        assert stats.waiting == 0
        pool.putconn(held)
        pool.putconn(pool.getconn(timeout=0))


def test_timeout_zero_is_connection_pool_exhausted_at_once(dsn: str) -> None:
    with opened(dsn, "exhausted", min_size=1, max_size=1, timeout=30.0) as pool:
        held = pool.getconn()
        start = time.monotonic()
        with pytest.raises(PoolTimeout, match="connection pool exhausted"):
            pool.getconn(timeout=0)
        assert time.monotonic() - start < 0.5
        pool.putconn(held)


def test_max_waiting_raises_too_many_requests(dsn: str) -> None:
    with opened(dsn, "max-waiting", min_size=1, max_size=1, max_waiting=1) as pool:
        held = pool.getconn()
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(pool.getconn(timeout=10.0)))
        waiter.start()
        assert eventually_blocking(lambda: pool.stats().waiting, 1) == 1
        start = time.monotonic()
        with pytest.raises(TooManyRequests):
            pool.getconn(timeout=5.0)
        assert time.monotonic() - start < 1.0
        pool.putconn(held)
        waiter.join(10.0)
        assert got == [held]
        pool.putconn(got[0])
        assert pool.stats().waiting == 0


def test_waiters_are_served_first_come_first_served(dsn: str) -> None:
    with opened(dsn, "fifo", min_size=1, max_size=1) as pool:
        held = pool.getconn()
        order: list[int] = []

        def waiter(i: int) -> None:
            conn = pool.getconn(timeout=10.0)
            order.append(i)
            pool.putconn(conn)

        threads = []
        for i in range(5):
            thread = threading.Thread(target=waiter, args=(i,))
            thread.start()
            threads.append(thread)
            assert eventually_blocking(lambda i=i: pool.stats().waiting, i + 1) == i + 1
        pool.putconn(held)
        for thread in threads:
            thread.join(10.0)
        assert order == [0, 1, 2, 3, 4]


# -- what a borrower leaves behind ----------------------------------------------------


@pytest.mark.parametrize("state", ["intrans", "inerror"])
def test_returned_in_transaction_is_rolled_back(dsn: str, state: str) -> None:
    with table(dsn) as t, opened(dsn, f"dirty-{state}", min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        conn.execute(f"INSERT INTO {t} VALUES (1)")
        if state == "inerror":
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1 / 0")
            assert conn.info.transaction_status == TransactionStatus.INERROR
        else:
            assert conn.info.transaction_status == TransactionStatus.INTRANS
        pool.putconn(conn)
        again = pool.getconn(timeout=2.0)
        assert again is conn
        assert again.info.transaction_status == TransactionStatus.IDLE
        assert again.execute("SELECT 1").fetchone() == (1,)
        again.rollback()
        pool.putconn(again)
        assert rows(dsn, t) == []  # rolled back, not committed


def test_stats_count_bad_returns(dsn: str) -> None:
    """returns_bad counts connections returned in a transaction or in error."""
    with opened(dsn, "returns-bad", min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        conn.execute("SELECT 1")
        pool.putconn(conn)  # in a transaction
        conn = pool.getconn(timeout=2.0)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        pool.putconn(conn)  # in error
        conn = pool.getconn(timeout=2.0)
        pool.putconn(conn)  # clean
        assert pool.stats().returns_bad == 2


def test_changed_attributes_are_restored(dsn: str) -> None:
    with opened(dsn, "attrs", min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        assert (conn.autocommit, conn.isolation_level, conn.read_only, conn.deferrable) == (
            False,
            None,
            None,
            None,
        )
        conn.autocommit = True
        conn.isolation_level = IsolationLevel.SERIALIZABLE
        conn.read_only = True
        conn.deferrable = True
        pool.putconn(conn)
        again = pool.getconn(timeout=2.0)
        assert again is conn
        assert (again.autocommit, again.isolation_level, again.read_only, again.deferrable) == (
            False,
            None,
            None,
            None,
        )
        # ... and the server sees a default transaction again.
        assert again.execute("SHOW transaction_read_only").fetchone() == ("off",)
        assert again.execute("SHOW transaction_isolation").fetchone() == ("read committed",)
        again.rollback()
        pool.putconn(again)


def test_reset_is_called_in_putconn(dsn: str) -> None:
    calls: list[Any] = []

    def reset(conn: psycopg.Connection[Any]) -> None:
        calls.append(conn)
        conn.execute("RESET ALL")
        conn.commit()

    with opened(dsn, "reset", min_size=1, max_size=1, reset=reset) as pool:
        conn = pool.getconn()
        conn.execute("SET statement_timeout = 1234")
        conn.commit()
        assert calls == []
        pool.putconn(conn)
        assert eventually_blocking(lambda: len(calls), 1) == 1
        assert calls[0] is conn
        again = pool.getconn(timeout=2.0)
        assert again is conn  # reset left it idle: kept
        assert again.execute("SHOW statement_timeout").fetchone() == ("0",)
        again.rollback()
        pool.putconn(again)
        assert eventually_blocking(lambda: len(calls), 2) == 2


def test_reset_leaving_a_transaction_discards_the_connection(dsn: str, backends: Any) -> None:
    def reset(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT 1")  # opens a transaction and leaves it open

    with opened(dsn, "bad-reset", min_size=1, max_size=1, reset=reset) as pool:
        conn = pool.getconn()
        pid = conn.info.backend_pid
        pool.putconn(conn)
        assert eventually_blocking(lambda: conn.closed, True)
        again = pool.getconn(timeout=5.0)
        assert again is not conn
        assert again.info.backend_pid != pid
        assert again.info.transaction_status == TransactionStatus.IDLE
        pool.putconn(again)
        assert eventually_blocking(lambda: backends(pool.name), 1) == 1


def test_configure_is_called_once_per_connection(dsn: str) -> None:
    configured: list[int] = []

    def configure(conn: psycopg.Connection[Any]) -> None:
        configured.append(id(conn))
        conn.autocommit = True

    with opened(dsn, "configure", min_size=1, max_size=2, configure=configure) as pool:
        seen = set()
        for _ in range(10):
            a = pool.getconn()
            b = pool.getconn()
            seen |= {id(a), id(b)}
            assert a.autocommit and b.autocommit
            a.autocommit = False  # restored to what configure set
            pool.putconn(a)
            pool.putconn(b)
        assert len(seen) == 2
        assert sorted(configured) == sorted(seen)
        assert pool.stats().connections_created == 2
        with pool.connection() as conn:
            assert conn.autocommit


def test_configure_leaving_a_transaction_is_refused(dsn: str) -> None:
    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT 1")

    pool = ConnectionPool(dsn, name=uname("bad-conf"), min_size=0, max_size=1, configure=configure)
    pool.open()
    try:
        with pytest.raises(PoolError):
            pool.getconn(timeout=1.0)
    finally:
        pool.closeall()


def test_check_discards_a_failing_connection(dsn: str, backends: Any) -> None:
    bad: set[int] = set()
    checked: list[int] = []

    def check(conn: psycopg.Connection[Any]) -> None:
        checked.append(id(conn))
        if id(conn) in bad:
            raise RuntimeError("this one is bad")

    with opened(dsn, "check", min_size=1, max_size=1, check=check) as pool:
        first = pool.getconn()
        assert checked == [id(first)]
        pool.putconn(first)
        bad.add(id(first))
        second = pool.getconn(timeout=5.0)
        assert second is not first
        assert first.closed
        assert second.execute("SELECT 1").fetchone() == (1,)
        pool.putconn(second)
        assert pool.stats().connections_lost >= 1
        assert eventually_blocking(lambda: backends(pool.name), 1) == 1


def test_idle_connection_killed_by_the_server_is_not_handed_out(
    dsn: str, backends: Any, terminate: Any
) -> None:
    with opened(dsn, "killed", min_size=2, max_size=2) as pool:
        assert backends(pool.name) == 2
        terminate(pool.name)
        assert eventually_blocking(lambda: backends(pool.name), 0) == 0
        for _ in range(3):
            a = pool.getconn(timeout=5.0)
            b = pool.getconn(timeout=5.0)
            assert a.execute("SELECT 1").fetchone() == (1,)
            assert b.execute("SELECT 1").fetchone() == (1,)
            pool.putconn(a)
            pool.putconn(b)


# -- misuse ----------------------------------------------------------------------------


def test_putconn_of_a_foreign_connection_raises(dsn: str) -> None:
    with opened(dsn, "foreign-a") as pool, opened(dsn, "foreign-b") as other:
        stranger = psycopg.connect(dsn)
        try:
            with pytest.raises(PoolError):
                pool.putconn(stranger)
        finally:
            stranger.close()
        theirs = other.getconn()
        with pytest.raises(PoolError):
            pool.putconn(theirs)
        other.putconn(theirs)
        assert pool.stats().in_use == 0


def test_double_putconn_raises(dsn: str) -> None:
    with opened(dsn, "double-put", min_size=1, max_size=2) as pool:
        conn = pool.getconn()
        pool.putconn(conn)
        with pytest.raises(PoolError):
            pool.putconn(conn)
        dirty = pool.getconn()
        dirty.execute("SELECT 1")
        pool.putconn(dirty)  # the slow path this time
        with pytest.raises(PoolError):
            pool.putconn(dirty)
        with pytest.raises(PoolError):
            pool.putconn(dirty, close=True)
        stats = pool.stats()
        assert stats.in_use == 0
        assert stats.size <= 2


def test_double_putconn_raises_while_a_keyed_connection_is_held(dsn: str) -> None:
    with opened(dsn, "double-put-keyed", min_size=1, max_size=3) as pool:
        keyed = pool.getconn(key="session")
        for _ in range(200):
            conn = pool.getconn()
            pool.putconn(conn)
            with pytest.raises(PoolError):
                pool.putconn(conn)
        pool.putconn(keyed, key="session")
        assert pool.stats().in_use == 0


def test_putconn_without_key_frees_the_key_before_returning(dsn: str) -> None:
    """A keyed connection put back without its key: the key is free once putconn returns."""
    with opened(dsn, "unkeyed-put", min_size=2, max_size=2) as pool:
        for _ in range(50):
            first = pool.getconn(key="k")
            pool.putconn(first)
            again = pool.getconn(key="k", timeout=2.0)
            time.sleep(0.002)
            other = pool.getconn(timeout=2.0)
            try:
                assert other is not again, "one connection handed to two borrowers"
            finally:
                pool.putconn(other)
            pool.putconn(again, key="k")


def test_returned_after_the_borrower_closed_it(dsn: str) -> None:
    with opened(dsn, "user-closed", min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        conn.close()
        pool.putconn(conn)
        again = pool.getconn(timeout=5.0)
        assert again is not conn
        assert again.execute("SELECT 1").fetchone() == (1,)
        pool.putconn(again)


def sleeping_backends(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND state = 'active' AND query LIKE '%%pg_sleep%%'",
            (name,),
        ).fetchone()
        assert row is not None
        return int(row[0])


def test_returned_mid_query_is_discarded_and_its_query_stopped(dsn: str, backends: Any) -> None:
    """A connection given back with a query running: not handed out again, and no backend
    keeps running the query (the pool stays within max_size on the server)."""
    with opened(dsn, "mid-query", min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        pid = conn.info.backend_pid
        conn.pgconn.send_query(b"SELECT pg_sleep(10)")
        assert conn.info.transaction_status == TransactionStatus.ACTIVE
        assert eventually_blocking(lambda: sleeping_backends(dsn, pool.name), 1) == 1
        start = time.monotonic()
        pool.putconn(conn)
        again = pool.getconn(timeout=5.0)
        assert time.monotonic() - start < 5.0
        assert again.info.backend_pid != pid
        assert again.info.transaction_status == TransactionStatus.IDLE
        assert again.execute("SELECT 1").fetchone() == (1,)
        again.rollback()
        pool.putconn(again)
        assert eventually_blocking(lambda: sleeping_backends(dsn, pool.name), 0, timeout=3.0) == 0
        assert backends(pool.name) <= 1


def test_returned_after_the_server_killed_it(dsn: str, terminate: Any) -> None:
    with opened(dsn, "killed-borrowed", min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        assert terminate(pool.name) == 1
        time.sleep(0.1)
        pool.putconn(conn)
        again = pool.getconn(timeout=5.0)
        assert again.execute("SELECT 1").fetchone() == (1,)
        pool.putconn(again)


# -- closing ---------------------------------------------------------------------------


def test_closeall_closes_borrowed_connections_too(dsn: str, backends: Any) -> None:
    with opened(dsn, "closeall", min_size=2, max_size=3) as pool:
        borrowed = pool.getconn()
        assert backends(pool.name) == 2
        pool.closeall()
        assert pool.closed
        assert borrowed.closed
        assert eventually_blocking(lambda: backends(pool.name), 0) == 0
        with pytest.raises(PoolClosed):
            pool.getconn()
        with pytest.raises(PoolClosed), pool.connection():
            pass
        with pytest.raises(PoolClosed):
            pool.putconn(borrowed)
        with pytest.raises(PoolClosed):
            pool.resize(1, 2)
        with pytest.raises(PoolClosed):
            pool.open()
        with pytest.raises(PoolClosed):
            pool.closeall()
        assert pool.stats().size == 0


def test_closeall_wakes_waiting_threads(dsn: str) -> None:
    with opened(dsn, "closeall-waiters", min_size=1, max_size=1) as pool:
        held = pool.getconn()
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                pool.getconn(timeout=20.0)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=waiter) for _ in range(3)]
        for thread in threads:
            thread.start()
        assert eventually_blocking(lambda: pool.stats().waiting, 3) == 3
        start = time.monotonic()
        pool.closeall()
        for thread in threads:
            thread.join(5.0)
        assert time.monotonic() - start < 5.0
        assert len(errors) == 3
        assert all(isinstance(e, PoolClosed) for e in errors), errors
        assert held.closed


def test_close_waits_for_borrowed_connections(dsn: str, backends: Any) -> None:
    with opened(dsn, "graceful", min_size=1, max_size=2) as pool:
        conn = pool.getconn()
        result: dict[str, Any] = {}

        def closer() -> None:
            start = time.monotonic()
            pool.close(timeout=10.0)
            result["elapsed"] = time.monotonic() - start

        thread = threading.Thread(target=closer)
        thread.start()
        assert eventually_blocking(lambda: pool.closed, True)
        with pytest.raises(PoolClosed):
            pool.getconn(timeout=1.0)
        # The borrower can finish its work during the grace period.
        time.sleep(0.3)
        assert not conn.closed
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert "elapsed" not in result
        pool.putconn(conn)
        thread.join(5.0)
        assert not thread.is_alive()
        assert 0.25 <= result["elapsed"] < 5.0
        assert eventually_blocking(lambda: conn.closed, True)
        assert eventually_blocking(lambda: backends(pool.name), 0) == 0
        pool.close()  # closing again is a no-op


def test_close_timeout_closes_connections_still_borrowed(dsn: str, backends: Any) -> None:
    with opened(dsn, "graceful-timeout", min_size=1, max_size=2) as pool:
        conn = pool.getconn()
        start = time.monotonic()
        pool.close(timeout=0.3)
        assert 0.25 <= time.monotonic() - start < 3.0
        assert conn.closed
        assert eventually_blocking(lambda: backends(pool.name), 0) == 0
        with pytest.raises(PoolError):
            pool.putconn(conn)


# -- stats and maintenance -------------------------------------------------------------


def test_stats(dsn: str) -> None:
    with opened(dsn, "stats", min_size=2, max_size=3) as pool:
        stats = pool.stats()
        assert (stats.name, stats.size, stats.idle, stats.in_use, stats.waiting) == (
            pool.name,
            2,
            2,
            0,
            0,
        )
        assert (stats.min_size, stats.max_size) == (2, 3)
        conns = [pool.getconn() for _ in range(3)]
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use) == (3, 0, 3)
        assert stats.requests == 3
        assert stats.connections_created == 3
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0)
        assert pool.stats().timeouts == 1
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(pool.getconn(timeout=10.0)))
        waiter.start()
        assert eventually_blocking(lambda: pool.stats().waiting, 1) == 1
        time.sleep(0.1)
        pool.putconn(conns.pop())
        waiter.join(5.0)
        conns += got
        stats = pool.stats()
        assert stats.waiting == 0
        assert stats.requests_waited >= 1
        assert stats.wait_time_total >= 0.09
        conns[0].execute("SELECT 1")
        for conn in conns:
            pool.putconn(conn)
        stats = pool.stats()
        assert stats.in_use == 0
        as_dict = stats.as_dict()
        for key in (
            "size",
            "idle",
            "in_use",
            "waiting",
            "min_size",
            "max_size",
            "requests",
            "requests_waited",
            "wait_time_total",
            "timeouts",
            "connections_created",
            "connections_failed",
            "connections_lost",
            "returns_bad",
        ):
            assert as_dict[key] == getattr(stats, key), key


def test_resize_and_wait(dsn: str, backends: Any) -> None:
    with opened(dsn, "resize", min_size=1, max_size=2) as pool:
        pool.resize(3, 4)
        assert (pool.min_size, pool.max_size) == (3, 4)
        pool.wait(10.0)
        assert pool.stats().size >= 3
        assert eventually_blocking(lambda: backends(pool.name), 3) == 3
        conns = [pool.getconn(timeout=5.0) for _ in range(4)]
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0)
        for conn in conns:
            pool.putconn(conn)
        pool.resize(1, 1)
        assert (pool.min_size, pool.max_size) == (1, 1)
        assert eventually_blocking(lambda: backends(pool.name), 1) == 1
        held = pool.getconn()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0)
        pool.putconn(held)
        with pytest.raises(ValueError):
            pool.resize(3, 2)


def test_wait_raises_pool_timeout_when_the_server_is_unreachable() -> None:
    pool = ConnectionPool(
        "host=127.0.0.1 port=1 connect_timeout=2", name=uname("wait-fail"), min_size=1
    )
    pool.open()
    try:
        start = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            pool.wait(0.5)
        assert time.monotonic() - start < 3.0
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
    finally:
        pool.closeall()


def test_check_replaces_broken_idle_connections(dsn: str, backends: Any, terminate: Any) -> None:
    with opened(dsn, "check-method", min_size=2, max_size=2) as pool:
        terminate(pool.name)
        assert eventually_blocking(lambda: backends(pool.name), 0) == 0
        pool.check()
        assert pool.stats().connections_lost == 2
        pool.wait(10.0)
        assert eventually_blocking(lambda: backends(pool.name), 2) == 2
        a, b = pool.getconn(), pool.getconn()
        assert a.execute("SELECT 1").fetchone() == b.execute("SELECT 1").fetchone() == (1,)
        pool.putconn(a)
        pool.putconn(b)


def test_purge_expired_closes_connections_idle_too_long(dsn: str, backends: Any) -> None:
    # min_size == max_size: the background shrinking keeps them; purge_expired does not.
    with opened(dsn, "purge", min_size=3, max_size=3, max_idle=0.3) as pool:
        conns = [pool.getconn() for _ in range(3)]
        old = {c.info.backend_pid for c in conns}
        for conn in conns:
            pool.putconn(conn)
        assert pool.purge_expired() == 0  # not idle long enough yet
        time.sleep(0.5)
        assert pool.purge_expired() == 3
        assert all(c.closed for c in conns)
        pool.wait(10.0)  # refilled to min_size

        def pids() -> set[int]:
            held = [pool.getconn(timeout=5.0) for _ in range(3)]
            try:
                return {c.info.backend_pid for c in held}
            finally:
                for c in held:
                    pool.putconn(c)

        assert not (pids() & old)
        assert eventually_blocking(lambda: backends(pool.name), 3) == 3


def test_idle_connections_above_min_size_close_after_max_idle(dsn: str, backends: Any) -> None:
    with opened(dsn, "max-idle", min_size=1, max_size=3, max_idle=0.3) as pool:
        conns = [pool.getconn() for _ in range(3)]
        for conn in conns:
            pool.putconn(conn)
        assert backends(pool.name) == 3
        assert eventually_blocking(lambda: backends(pool.name), 1, timeout=5.0) == 1


def test_max_lifetime_replaces_old_connections(dsn: str) -> None:
    with opened(dsn, "lifetime", min_size=1, max_size=1, max_lifetime=0.3) as pool:
        conn = pool.getconn()
        pid = conn.info.backend_pid
        pool.putconn(conn)
        time.sleep(0.5)
        again = pool.getconn(timeout=5.0)
        assert again.info.backend_pid != pid
        assert again.execute("SELECT 1").fetchone() == (1,)
        pool.putconn(again)


def test_drain_replaces_idle_now_and_borrowed_on_return(dsn: str) -> None:
    with opened(dsn, "drain", min_size=2, max_size=2) as pool:
        a, b = pool.getconn(), pool.getconn()
        old = {a.info.backend_pid, b.info.backend_pid}
        pool.putconn(a)
        pool.drain()
        assert a.closed
        assert not b.closed
        pool.putconn(b)
        assert eventually_blocking(lambda: b.closed, True)
        pool.wait(10.0)
        c, d = pool.getconn(timeout=5.0), pool.getconn(timeout=5.0)
        assert not ({c.info.backend_pid, d.info.backend_pid} & old)
        pool.putconn(c)
        pool.putconn(d)


def test_leak_timeout_warns_with_the_borrower_stack(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiopgpool")
    with opened(dsn, "leak", min_size=1, max_size=1, leak_timeout=0.2) as pool:
        conn = pool.getconn()
        time.sleep(0.5)
        pool.putconn(conn)
        assert pool.stats().leaks == 1
        conn = pool.getconn()
        pool.putconn(conn)  # returned in time: no warning
        time.sleep(0.3)
        assert pool.stats().leaks == 1
    warnings = [r for r in caplog.records if "leak_timeout" in r.getMessage()]
    assert len(warnings) == 1
    assert "test_leak_timeout_warns_with_the_borrower_stack" in warnings[0].getMessage()


def test_kwargs_and_connection_class(dsn: str) -> None:
    class MyConnection(psycopg.Connection[Any]):
        pass

    with opened(
        dsn,
        "kwargs",
        min_size=1,
        max_size=1,
        kwargs={"autocommit": True},
        connection_class=MyConnection,
    ) as pool:
        conn = pool.getconn()
        assert type(conn) is MyConnection
        assert conn.autocommit
        conn.autocommit = False
        pool.putconn(conn)
        with pool.connection() as again:
            assert again is conn
            assert again.autocommit  # the configured value is the baseline


# -- the null pool ---------------------------------------------------------------------


def test_null_pool_closes_each_connection_on_return(dsn: str, backends: Any) -> None:
    with opened(dsn, "null", cls=NullConnectionPool, max_size=2) as pool:
        assert pool.min_size == 0
        assert backends(pool.name) == 0
        conn = pool.getconn()
        assert isinstance(conn, psycopg.Connection)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert backends(pool.name) == 1
        pool.putconn(conn)
        assert eventually_blocking(lambda: conn.closed, True)
        assert eventually_blocking(lambda: backends(pool.name), 0) == 0
        with pool.connection() as again:
            assert again is not conn
        assert eventually_blocking(lambda: backends(pool.name), 0) == 0
        assert pool.stats().size == 0


def test_a_connection_closed_on_return_is_counted_out_before_putconn_returns(dsn: str) -> None:
    """stats() right after putconn() agree with it: the null pool's size, close=True."""
    with opened(dsn, "null-size", cls=NullConnectionPool, max_size=2) as null:
        closed = null.stats().connections_closed  # opening tried one connection
        for n in range(1, 4):
            conn = null.getconn()
            assert null.stats().size == 1
            null.putconn(conn)
            stats = null.stats()
            assert (stats.size, stats.in_use, stats.connections_closed) == (0, 0, closed + n), stats
    with opened(dsn, "close-size", min_size=0, max_size=2) as pool:
        conn = pool.getconn()
        closed = pool.stats().connections_closed
        pool.putconn(conn, close=True)
        stats = pool.stats()
        assert (stats.size, stats.connections_closed) == (0, closed + 1), stats
        with pool.connection() as again:  # the slot is back: the pool connects anew
            assert again is not conn


def test_null_pool_bounds_concurrency_by_max_size(dsn: str, backends: Any) -> None:
    with opened(dsn, "null-bound", cls=NullConnectionPool, max_size=2, timeout=20.0) as pool:
        errors: list[BaseException] = []

        def borrower() -> None:
            try:
                with pool.connection() as conn:
                    conn.execute("SELECT pg_sleep(0.15)")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=borrower) for _ in range(6)]
        for thread in threads:
            thread.start()
        peak = 0
        peak_in_use = 0
        while any(t.is_alive() for t in threads):
            peak = max(peak, backends(pool.name))
            peak_in_use = max(peak_in_use, pool.stats().in_use)
            time.sleep(0.01)
        assert errors == []
        assert peak <= 2
        assert peak_in_use == 2
        assert eventually_blocking(lambda: backends(pool.name), 0) == 0


def test_null_pool_double_putconn_raises(dsn: str) -> None:
    with opened(dsn, "null-double", cls=NullConnectionPool, max_size=2) as pool:
        for _ in range(10):
            conn = pool.getconn()
            pool.putconn(conn)
            with pytest.raises(PoolError):
                pool.putconn(conn)


def test_null_pool_refuses_min_size(dsn: str) -> None:
    with pytest.raises(ValueError):
        NullConnectionPool(dsn, min_size=1, name=uname("null-min"))


# -- threads ---------------------------------------------------------------------------


def test_thread_stress(dsn: str, backends: Any) -> None:
    """16 threads x 1,000 checkouts on max_size=4: every checkout served, nothing shared."""
    threads_n, per_thread, max_size = 16, 1000, 4
    with opened(dsn, "stress", min_size=1, max_size=max_size, timeout=30.0) as pool:
        lock = threading.Lock()
        holders: dict[int, int] = {}
        overlaps: list[tuple[int, int]] = []
        dirty: list[Any] = []
        errors: list[BaseException] = []
        served = [0] * threads_n
        stop = threading.Event()
        samples: list[int] = []

        def sampler() -> None:
            while not stop.is_set():
                samples.append(backends(pool.name))
                samples.append(pool.stats().size)
                time.sleep(0.02)

        def worker(t: int) -> None:
            try:
                for i in range(per_thread):
                    conn = pool.getconn()
                    served[t] += 1
                    with lock:
                        if id(conn) in holders:
                            overlaps.append((t, holders[id(conn)]))
                        holders[id(conn)] = t
                    status = conn.info.transaction_status
                    if status != TransactionStatus.IDLE or conn.autocommit:
                        dirty.append(status)
                    close = False
                    op = (i + t) % 10
                    if op == 0:
                        conn.execute("SELECT 1")
                        conn.commit()
                    elif op == 1:
                        conn.execute("SELECT 1")  # returned in a transaction
                    elif op == 2:
                        conn.autocommit = True  # returned with a changed attribute
                    elif op == 3 and i % 250 == 3:
                        close = True
                    with lock:
                        del holders[id(conn)]
                    pool.putconn(conn, close=close)
            except BaseException as exc:
                errors.append(exc)

        side = threading.Thread(target=sampler, daemon=True)
        side.start()
        start = time.monotonic()
        workers = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(16)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(max(1.0, 60.0 - (time.monotonic() - start)))
        elapsed = time.monotonic() - start
        stop.set()
        side.join(5.0)
        assert not any(t.is_alive() for t in workers), "stress did not finish in 60 s"
        assert errors == []
        assert served == [per_thread] * threads_n
        assert overlaps == []
        assert dirty == []
        stats = pool.stats()
        assert stats.in_use == 0
        assert stats.waiting == 0
        assert stats.size <= max_size
        assert samples and max(samples) <= max_size
        assert backends(pool.name) <= max_size
        assert stats.requests_waited > 0, "no thread ever waited: the test is too easy"
        assert elapsed < 30.0, f"16,000 checkouts took {elapsed:.1f} s"


def test_usable_from_a_thread_running_its_own_event_loop(dsn: str) -> None:
    with opened(dsn, "in-asyncio", min_size=1, max_size=2) as pool:

        async def main() -> list[Any]:
            conn = pool.getconn()
            try:
                value = conn.execute("SELECT 42").fetchone()
            finally:
                pool.putconn(conn)
            with pool.connection() as again:
                again.execute("SELECT 1")
            a, b = pool.getconn(), pool.getconn()
            try:
                with pytest.raises(PoolTimeout):
                    pool.getconn(timeout=0.2)
            finally:
                pool.putconn(a)
                pool.putconn(b)
            await asyncio.sleep(0)
            return [value, pool.stats().in_use]

        results = [in_thread(lambda: asyncio.run(main())) for _ in range(2)]
        assert results == [[(42,), 0], [(42,), 0]]


def test_blocking_calls_from_the_loop_thread_raise_instead_of_deadlocking(dsn: str) -> None:
    pool = ConnectionPool(dsn, name=uname("loop-thread"), min_size=1, max_size=2, timeout=5.0)
    pool.open(wait=True, timeout=10.0)
    try:
        held = pool.getconn()
        calls: dict[str, Callable[[], Any]] = {
            "getconn": pool.getconn,
            "putconn": lambda: pool.putconn(held),
            "connection": lambda: pool.connection().__enter__(),
            "resize": lambda: pool.resize(1, 3),
            "wait": lambda: pool.wait(1.0),
            "check": pool.check,
            "purge_expired": pool.purge_expired,
            "close": pool.close,
            "closeall": pool.closeall,
        }
        outcomes: dict[str, BaseException | None] = {}

        async def on_loop() -> None:
            for label, call in calls.items():
                try:
                    call()
                except BaseException as exc:
                    outcomes[label] = exc
                else:
                    outcomes[label] = None

        in_thread(lambda: pool._bridge.call(on_loop), timeout=15.0)
        for label, exc in outcomes.items():
            assert isinstance(exc, RuntimeError), (label, exc)
            assert "loop thread" in str(exc), (label, exc)
        # Nothing happened to the pool.
        assert not pool.closed
        assert pool.stats().in_use == 1
        pool.putconn(held)
        with pool.connection(timeout=2.0) as conn:
            conn.execute("SELECT 1")
    finally:
        # Bounded: if the loop deadlocked, closing from here would hang too.
        in_thread(pool.closeall, timeout=10.0)


def test_reconnect_failed_is_called_when_reconnect_timeout_runs_out() -> None:
    """Nobody asks for a connection: the background filling still reports its failure."""
    called = threading.Event()
    pool = ConnectionPool(
        "host=127.0.0.1 port=1 connect_timeout=2",
        name=uname("reconnect-failed"),
        min_size=1,
        reconnect_timeout=0.3,
        reconnect_failed=lambda pool: called.set(),
    )
    pool.open()
    try:
        assert called.wait(5.0), "reconnect_failed was not called within 5 s"
    finally:
        in_thread(pool.closeall, timeout=10.0)


def test_reconnect_failed_calling_the_pool_raises_instead_of_deadlocking() -> None:
    outcome: list[BaseException | None] = []
    called = threading.Event()

    def reconnect_failed(pool: Any) -> None:
        try:
            pool.getconn(timeout=1.0)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)
        called.set()

    pool = ConnectionPool(
        "host=127.0.0.1 port=1 connect_timeout=2",
        name=uname("reconnect-failed-call"),
        min_size=0,
        reconnect_timeout=0.2,
        reconnect_failed=reconnect_failed,
    )
    pool.open()
    try:
        # A request retrying for longer than reconnect_timeout makes it run out.
        with pytest.raises(PoolTimeout):
            in_thread(lambda: pool.getconn(timeout=1.5), timeout=15.0)
        assert called.wait(5.0), "reconnect_failed was not called"
        assert len(outcome) == 1
        assert isinstance(outcome[0], RuntimeError)
        assert "loop thread" in str(outcome[0])
        assert not pool.closed
    finally:
        in_thread(pool.closeall, timeout=10.0)


# -- interpreter exit and fork ---------------------------------------------------------

EXIT_SCRIPT = """
import os, sys, threading
from aiopgpool import ConnectionPool, NullConnectionPool, ThreadedConnectionPool

dsn = os.environ["AIOPGPOOL_TEST_DSN"]
prefix = os.environ["AIOPGPOOL_TEST_PREFIX"]
pool = ConnectionPool(dsn, name=prefix + "-a", min_size=2, max_size=3)
pool.open(wait=True, timeout=10)
with pool.connection() as conn:
    conn.execute("SELECT 1")
held = pool.getconn()  # still borrowed at exit
held.execute("SELECT 1")  # and in a transaction

def blocked():
    pool.getconn(key="x")
    pool.getconn(timeout=None)  # waits forever: the pool is exhausted

threading.Thread(target=blocked, daemon=True).start()

null = NullConnectionPool(dsn, name=prefix + "-b", max_size=2)
null.open()
with null.connection() as conn:
    conn.execute("SELECT 1")

legacy = ThreadedConnectionPool(1, 3, dsn, application_name=prefix + "-c")
conn = legacy.getconn()
conn.execute("SELECT 1")
legacy.putconn(conn)
kept = legacy.getconn()

never_opened = ConnectionPool(dsn, name=prefix + "-d")
print("ok", flush=True)
"""


def test_process_exits_cleanly_without_close(dsn: str, backends: Any) -> None:
    prefix = uname("exit")
    start = time.monotonic()
    proc = run_python(EXIT_SCRIPT, timeout=20, AIOPGPOOL_TEST_DSN=dsn, AIOPGPOOL_TEST_PREFIX=prefix)
    elapsed = time.monotonic() - start
    assert proc.stdout.strip() == "ok"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert elapsed < 20
    for suffix in "abc":
        assert eventually_blocking(lambda s=suffix: backends(f"{prefix}-{s}"), 0) == 0


BUSY_AT_EXIT_SCRIPT = """
import os, threading, time
from aiopgpool import ConnectionPool, ThreadedConnectionPool

dsn = os.environ["AIOPGPOOL_TEST_DSN"]
prefix = os.environ["AIOPGPOOL_TEST_PREFIX"]
pool = ConnectionPool(dsn, name=prefix + "-a", min_size=1, max_size=2, timeout=0.5)
pool.open(wait=True, timeout=10)
legacy = ThreadedConnectionPool(1, 2, dsn, application_name=prefix + "-c")
served = [0]

def serve():  # a threaded server's worker: more of them than connections
    while True:
        with pool.connection() as conn:
            conn.execute("SELECT pg_sleep(0.01)")
        served[0] += 1

def legacy_serve():
    while True:
        try:
            conn = legacy.getconn()
        except Exception:  # exhausted: psycopg2's pools do not wait
            time.sleep(0.001)
            continue
        conn.execute("SELECT pg_sleep(0.01)")
        conn.rollback()
        legacy.putconn(conn)

for target in [serve] * 4 + [legacy_serve] * 3:
    threading.Thread(target=target, daemon=True).start()
while served[0] < 20:
    time.sleep(0.01)
print("ok", flush=True)
"""


def test_daemon_threads_using_the_pool_at_exit_print_nothing(dsn: str, backends: Any) -> None:
    """Daemon threads still using pools when the interpreter exits (a threaded server
    stopped by Ctrl-C) are stopped by the interpreter where they stand, as without a
    pool: the pools closing at exit raise nothing into them, so no traceback."""
    prefix = uname("busy-exit")
    for _ in range(3):
        proc = run_python(
            BUSY_AT_EXIT_SCRIPT, timeout=20, AIOPGPOOL_TEST_DSN=dsn, AIOPGPOOL_TEST_PREFIX=prefix
        )
        assert proc.stdout.strip() == "ok"
        assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr
        for suffix in "ac":
            assert eventually_blocking(lambda s=suffix: backends(f"{prefix}-{s}"), 0) == 0


WAITED_FOR_AT_EXIT_SCRIPT = """
import atexit, logging, os, threading, time

stop = threading.Event()
workers = []

def join_workers():  # registered before the pool's exit handler, so it runs after it
    stop.set()
    for worker in workers:
        worker.join()
    print("joined", flush=True)

atexit.register(join_workers)

from aiopgpool import ConnectionPool

pool = ConnectionPool(os.environ["AIOPGPOOL_TEST_DSN"], name=os.environ["AIOPGPOOL_TEST_PREFIX"],
                      min_size=1, max_size=2, open=True)

class ToTheDatabase(logging.Handler):  # its lock is held while it uses the pool
    def emit(self, record):
        with pool.connection() as conn:
            conn.execute("SELECT %s::text", (self.format(record),))

log = logging.getLogger("app")
log.addHandler(ToTheDatabase())
log.setLevel(logging.INFO)

def work():
    while not stop.is_set():
        log.info("working")

workers.extend(threading.Thread(target=work, daemon=True) for _ in range(3))
for thread in workers:
    thread.start()
time.sleep(0.3)
print("ok", flush=True)
"""


def test_daemon_threads_an_exit_handler_waits_for_do_not_hang_the_exit(dsn: str) -> None:
    """Daemon threads still using the pool at exit are neither failed nor held: an exit
    handler that stops and joins them gets them back at once, and logging.shutdown() the
    lock of a handler that writes through the pool, so the process ends, quietly."""
    start = time.monotonic()
    proc = run_python(
        WAITED_FOR_AT_EXIT_SCRIPT,
        timeout=60,
        AIOPGPOOL_TEST_DSN=dsn,
        AIOPGPOOL_TEST_PREFIX=uname("exit-waited"),
    )
    assert proc.stdout.split() == ["ok", "joined"]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert time.monotonic() - start < 30


def _read_with_deadline(fd: int, deadline: float) -> bytes:
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


def _reap(pid: int, deadline: float) -> int | None:
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
# Forking a process with threads is the point of the test (Python 3.12+ warns).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_child_gets_a_clear_error_and_the_parent_pool_still_works(dsn: str) -> None:
    with opened(dsn, "fork", min_size=2, max_size=2) as pool:
        conns = [pool.getconn(), pool.getconn()]
        before = {c.info.backend_pid for c in conns}
        pool.putconn(conns[0])
        borrowed = conns[1]  # borrowed across the fork
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                os.close(read_fd)
                report = []
                actions: dict[str, Callable[[], Any]] = {
                    "getconn": pool.getconn,
                    "connection": lambda: pool.connection().__enter__(),
                    "putconn": lambda: pool.putconn(borrowed),
                    "closeall": pool.closeall,
                    "close": pool.close,
                }
                ok = True
                for label, action in actions.items():
                    try:
                        action()
                    except PoolError as exc:
                        report.append(f"{label}: PoolError: {exc}")
                        ok = ok and "fork" in str(exc)
                    except BaseException as exc:
                        report.append(f"{label}: {type(exc).__name__}: {exc}")
                        ok = False
                    else:
                        report.append(f"{label}: no error")
                        ok = False
                os.write(write_fd, "\n".join(report).encode())
                code = 0 if ok else 1
            finally:
                os._exit(code)
        os.close(write_fd)
        try:
            deadline = time.monotonic() + 20.0
            report = _read_with_deadline(read_fd, deadline).decode()
            code = _reap(pid, deadline)
        finally:
            os.close(read_fd)
        assert code == 0, report
        # The parent's pool and connections were not disturbed.
        assert borrowed.execute("SELECT 1").fetchone() == (1,)
        borrowed.rollback()
        pool.putconn(borrowed)
        again = [pool.getconn(timeout=5.0) for _ in range(2)]
        for conn in again:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert {c.info.backend_pid for c in again} == before
        for conn in again:
            pool.putconn(conn)
        stats = pool.stats()
        assert stats.connections_created == 2
        assert stats.connections_lost == 0


FORK_SCRIPT = """
import gc, os, sys, time
from aiopgpool import ConnectionPool, PoolError

pool = ConnectionPool(os.environ["AIOPGPOOL_TEST_DSN"], name=os.environ["AIOPGPOOL_TEST_PREFIX"],
                      min_size=2, max_size=2)
pool.open(wait=True, timeout=10)
conns = [pool.getconn(), pool.getconn()]
before = {c.info.backend_pid for c in conns}
for c in conns:
    pool.putconn(c)
del conns, c
pid = os.fork()
if pid == 0:
    try:
        pool.getconn()
    except PoolError as exc:
        assert "fork" in str(exc), exc
    else:
        sys.exit(3)
    del pool
    gc.collect()
    sys.exit(0)  # a normal exit: atexit handlers and finalizers run
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
time.sleep(0.3)
conns = [pool.getconn(timeout=5), pool.getconn(timeout=5)]
for c in conns:
    c.execute("SELECT 1")
after = {c.info.backend_pid for c in conns}
assert after == before, (before, after)
assert pool.stats().connections_lost == 0, pool.stats()
for c in conns:
    pool.putconn(c)
pool.close()
print("ok", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_exiting_normally_leaves_the_parent_connections_alone(dsn: str) -> None:
    proc = run_python(
        FORK_SCRIPT, timeout=30, AIOPGPOOL_TEST_DSN=dsn, AIOPGPOOL_TEST_PREFIX=uname("fork-exit")
    )
    assert proc.stdout.strip() == "ok"


# -- no password anywhere --------------------------------------------------------------

SECRET = "s3cr3t-Pw-7391"


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc)


def test_no_password_in_repr_errors_or_logs(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    url = psycopg.conninfo.make_conninfo(dsn, password=SECRET)
    pools = [
        ConnectionPool(url, name=uname("pw-a"), min_size=1, max_size=1, timeout=0.2),
        NullConnectionPool(dsn, kwargs={"password": SECRET}, name=uname("pw-b"), max_size=1),
        ConnectionPool(
            f"postgresql://{params.get('user', 'postgres')}:{SECRET}@127.0.0.1:1/db",
            name=uname("pw-c"),
            min_size=1,
            timeout=0.3,
            reconnect_timeout=0.2,
        ),
    ]
    for pool in pools:
        seen += [repr(pool), str(pool)]
        pool.open()
        seen += [repr(pool), str(pool)]
    good, null, unreachable = pools
    try:
        held = good.getconn(timeout=5.0)
        with pytest.raises(PoolTimeout) as info:
            good.getconn()
        seen.append(_all_text(info.value))
        other = null.getconn(timeout=5.0)
        with pytest.raises(PoolTimeout) as info:
            null.getconn(timeout=0)
        seen.append(_all_text(info.value))
        with pytest.raises(PoolError) as info:
            good.putconn(other)
        seen.append(_all_text(info.value))
        null.putconn(other)
        good.putconn(held)
        with pytest.raises(PoolTimeout) as info:
            unreachable.wait(1.0)
        seen.append(_all_text(info.value))
        with pytest.raises(PoolTimeout) as info:
            unreachable.getconn(timeout=0.5)
        seen.append(_all_text(info.value))
        seen += [repr(p.stats()) for p in pools]
    finally:
        for pool in pools:
            pool.closeall()
    for pool in pools:
        with pytest.raises(PoolClosed) as info:
            pool.getconn()
        seen.append(_all_text(info.value))
        seen.append(repr(pool))
    with pytest.raises(ValueError) as bad:
        ConnectionPool(f"host=x password={SECRET} nonsense_key=1", name=uname("pw-d"))
    seen.append(_all_text(bad.value))
    seen += [r.getMessage() for r in caplog.records]
    seen.append(caplog.text)
    assert any("connection attempt failed" in s or "127.0.0.1" in s for s in seen)
    leaks = [s for s in seen if SECRET in s]
    assert leaks == []


class _Interrupted(Exception):
    pass


def test_interrupted_wait_leaves_the_line_and_loses_no_slot(dsn: str) -> None:
    """A getconn interrupted while waiting (a signal, as Ctrl-C would) raises that
    interrupt, leaves the line, and loses no slot."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted

    with ConnectionPool(dsn, min_size=1, max_size=1, name=uname("interrupted")) as pool:
        held = pool.getconn()
        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(_Interrupted):
                pool.getconn(timeout=5.0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        stats = pool.stats()
        assert stats.waiting == 0
        pool.putconn(held)
        again = pool.getconn(timeout=1.0)
        assert again.execute("SELECT 1").fetchone() == (1,)
        pool.putconn(again)
        assert pool.stats().in_use == 0


@pytest.mark.parametrize("kind", ["ConnectionPool", "ThreadedConnectionPool"])
def test_a_pool_dropped_without_close_ends_its_thread(dsn: str, backends: Any, kind: str) -> None:
    """A pool nobody references any more, never closed, is closed when collected: its loop
    thread ends and its idle connections close, while a connection still borrowed stays
    open and usable by its borrower."""
    name = unique_name("dropped")
    pool: Any
    if kind == "ConnectionPool":
        pool = ConnectionPool(dsn, name=name, min_size=2, max_size=2, timeout=5)
        pool.open(wait=True, timeout=5)
    else:
        pool = aiopgpool.ThreadedConnectionPool(2, 2, dsn, name=name)
    conn = pool.getconn()
    assert backends(name) == 2

    def loop_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name == f"aiopgpool-{name}"]

    assert loop_threads() == [f"aiopgpool-{name}"]
    del pool
    gc.collect()
    assert eventually_blocking(loop_threads, []) == []
    assert eventually_blocking(lambda: backends(name), 1) == 1
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()
