"""Checked by ``mypy --strict`` (``tests/test_psycopg_pool_parity.py``), never run.

The pool classes are generic in their connection class, as psycopg_pool's
are: ``AsyncConnectionPool[MyConn]``, or inferred from ``connection_class=``.
Each ``assert_type`` below fails the check if the pools lose that typing.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import TupleRow
from typing_extensions import assert_type, reveal_type

from aiopgpool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    NullConnectionPool,
)


class MyConn(psycopg.Connection[TupleRow]):
    """A connection class of the application's own."""

    def app_feature(self) -> int:
        return 42


class MyAsyncConn(psycopg.AsyncConnection[TupleRow]):
    async def app_feature(self) -> int:
        return 42


def sync_pools() -> None:
    pool = ConnectionPool("dbname=app", connection_class=MyConn)
    assert_type(pool, ConnectionPool[MyConn])
    conn = pool.getconn(2.0)
    assert_type(conn, MyConn)
    assert_type(conn.app_feature(), int)
    pool.putconn(conn)
    with pool.connection() as conn2:
        reveal_type(conn2)
        assert_type(conn2, MyConn)
    pool.close()

    plain = ConnectionPool("dbname=app")
    assert_type(plain.getconn(), psycopg.Connection[tuple[Any, ...]])

    null = NullConnectionPool("dbname=app", connection_class=MyConn, max_size=0)
    assert_type(null.getconn(timeout=1.0, key="k"), MyConn)

    annotated: ConnectionPool[MyConn] = ConnectionPool("dbname=app", connection_class=MyConn)
    mine: MyConn = annotated.getconn()
    base: psycopg.Connection[Any] = mine
    annotated.putconn(mine)
    del base

    stats: dict[str, int] = pool.get_stats()
    popped: dict[str, int] = pool.pop_stats()
    del stats, popped
    ConnectionPool.check_connection(mine)


async def async_pools() -> None:
    pool: AsyncConnectionPool[MyAsyncConn] = AsyncConnectionPool(
        "dbname=app", connection_class=MyAsyncConn
    )
    conn = await pool.getconn(2.0)
    reveal_type(conn)
    assert_type(conn, MyAsyncConn)
    assert_type(await conn.app_feature(), int)
    await pool.putconn(conn)
    async with pool.connection() as conn2:
        assert_type(conn2, MyAsyncConn)

    inferred = AsyncConnectionPool("dbname=app", connection_class=MyAsyncConn)
    assert_type(inferred, AsyncConnectionPool[MyAsyncConn])

    plain = AsyncConnectionPool("dbname=app")
    assert_type(await plain.getconn(), psycopg.AsyncConnection[tuple[Any, ...]])

    null = AsyncNullConnectionPool("dbname=app", connection_class=MyAsyncConn)
    assert_type(await null.getconn(key="k"), MyAsyncConn)
    await AsyncConnectionPool.check_connection(conn)

    async def rotate() -> str:
        return "dbname=app"

    rotating = AsyncConnectionPool(rotate, kwargs=lambda: {"password": "from-vault"})
    await rotating.close()
