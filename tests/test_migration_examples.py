"""The README's "Migrating from psycopg2.pool / pg_simple" examples, run against the test server.

Each ``example_*`` function's body between its ``def`` line and its final
``return`` is the code block printed in the README, verbatim.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import psycopg
import psycopg2.extensions
import psycopg2.pool
import pytest

import aiopgpool


@pytest.fixture(autouse=True)
def no_default_pool(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("DATABASE_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    yield
    with suppress(aiopgpool.PoolError):
        pool = aiopgpool.get_pool()
        if not pool.closed:
            pool.closeall()


# -- 1. before: psycopg2.pool ---------------------------------------------------------


def example_before_psycopg2_pool(DSN: str) -> Any:
    from psycopg2.pool import ThreadedConnectionPool

    pool = ThreadedConnectionPool(1, 10, DSN)
    conn = pool.getconn()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT %s + 1", (41,))
            answer = cur.fetchone()[0]
        conn.commit()
    finally:
        pool.putconn(conn)
    pool.closeall()
    return pool, conn, answer


# -- 2. after: the one-line change ------------------------------------------------------


def example_after_one_line_change(DSN: str) -> Any:
    from aiopgpool import ThreadedConnectionPool  # was: from psycopg2.pool import ...

    pool = ThreadedConnectionPool(1, 10, DSN)
    conn = pool.getconn()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT %s + 1", (41,))
            answer = cur.fetchone()[0]
        conn.commit()
    finally:
        pool.putconn(conn)
    pool.closeall()
    return pool, conn, answer


# -- 3. after: code that cannot leave psycopg2 -------------------------------------------


def example_after_keep_psycopg2(DSN: str) -> Any:
    import psycopg2.extras

    from aiopgpool.psycopg2 import ThreadedConnectionPool  # psycopg2 connections

    pool = ThreadedConnectionPool(1, 10, DSN)
    conn = pool.getconn()
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute("SELECT %s + 1 AS answer", (41,))
            answer = cur.fetchone()["answer"]
    finally:
        pool.putconn(conn)  # left in a transaction: rolled back for the next user
    pool.closeall()
    return pool, conn, answer


# -- 4. pg_simple-style configuration -----------------------------------------------------


def example_pg_simple_config(DSN: str) -> Any:
    from aiopgpool import ThreadedConnectionPool, config_pool, get_pool

    config_pool(max_conn=10, expiration=60, pool_manager=ThreadedConnectionPool, dsn=DSN)

    # ... anywhere else in the program:
    pool = get_pool()
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT %s + 1", (41,))
        answer = cur.fetchone()[0]
    pool.purge_expired_connections()  # optional: expiration also runs in the background
    return pool, conn, answer


def example_pg_simple_config_from_env(DSN: str) -> Any:
    import os

    from aiopgpool import config_pool, get_pool

    os.environ["DATABASE_DSN"] = DSN  # usually set by the deployment (or DATABASE_URL)
    config_pool(max_conn=5, expiration=60)
    with get_pool().connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT %s + 1", (41,))
        answer = cur.fetchone()[0]
    return get_pool(), conn, answer


# -- 5. moving on to ConnectionPool ------------------------------------------------------


def example_connection_pool(DSN: str) -> Any:
    from aiopgpool import ConnectionPool

    pool = ConnectionPool(DSN, min_size=1, max_size=10, timeout=5.0)
    pool.open()
    # Waits up to 5 s for a free connection instead of failing at once;
    # commits when the block succeeds, rolls back if it raises.
    with pool.connection() as conn:
        answer = conn.execute("SELECT %s + 1", (41,)).fetchone()[0]
    pool.close()
    return pool, conn, answer


# -- the tests ---------------------------------------------------------------------------


def test_before_psycopg2_pool(dsn: str) -> None:
    pool, conn, answer = example_before_psycopg2_pool(dsn)
    assert answer == 42
    assert isinstance(pool, psycopg2.pool.ThreadedConnectionPool)
    assert type(conn) is psycopg2.extensions.connection
    assert pool.closed and conn.closed


def test_after_one_line_change(dsn: str) -> None:
    before = example_before_psycopg2_pool(dsn)
    pool, conn, answer = example_after_one_line_change(dsn)
    assert answer == before[2] == 42
    assert isinstance(pool, aiopgpool.ThreadedConnectionPool)
    assert isinstance(conn, psycopg.Connection)  # psycopg 3 now
    assert pool.closed and conn.closed


def test_after_keep_psycopg2(dsn: str) -> None:
    pool, conn, answer = example_after_keep_psycopg2(dsn)
    assert answer == 42
    assert type(conn) is psycopg2.extensions.connection
    assert pool.closed and conn.closed


def test_pg_simple_config(dsn: str) -> None:
    pool, conn, answer = example_pg_simple_config(dsn)
    assert answer == 42
    assert isinstance(pool, aiopgpool.ThreadedConnectionPool)
    assert aiopgpool.get_pool() is pool
    assert not conn.closed  # back in the pool, idle
    assert pool.stats().in_use == 0


def test_pg_simple_config_from_env(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The example sets os.environ itself; let monkeypatch restore it afterwards.
    monkeypatch.setenv("DATABASE_DSN", "")
    pool, _conn, answer = example_pg_simple_config_from_env(dsn)
    assert answer == 42
    assert isinstance(pool, aiopgpool.SimpleConnectionPool)
    assert pool.stats().in_use == 0


def test_connection_pool(dsn: str) -> None:
    pool, conn, answer = example_connection_pool(dsn)
    assert answer == 42
    assert isinstance(pool, aiopgpool.ConnectionPool)
    assert isinstance(conn, psycopg.Connection)
    assert pool.closed and conn.closed
