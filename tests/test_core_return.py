"""Return guarantees of the asyncio core: putconn cleans, restores, discards and refuses;
``pool.connection()`` commits or rolls back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from helpers import eventually, monitor, opened, unique_name
from psycopg import IsolationLevel, sql
from psycopg.pq import TransactionStatus

from aiopgpool import AsyncConnectionPool, PoolError

IDLE = TransactionStatus.IDLE


@pytest.fixture
async def table(dsn: str) -> AsyncIterator[sql.Identifier]:
    """A fresh regular table ``(x int)``, dropped afterwards."""
    ident = sql.Identifier(unique_name("core_return_t").replace("-", "_"))
    async with await monitor(dsn) as mon:
        await mon.execute(sql.SQL("CREATE TABLE {} (x int)").format(ident))
        try:
            yield ident
        finally:
            await mon.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


async def count_rows(dsn: str, table: sql.Identifier) -> int:
    """Rows of ``table`` as seen from a connection outside the pool."""
    async with await monitor(dsn) as mon:
        cur = await mon.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


# -- dirty returns ----------------------------------------------------------------------


async def test_return_in_transaction_is_rolled_back(dsn: str, table: sql.Identifier) -> None:
    """A connection returned INTRANS is rolled back: its insert is gone, the next borrower
    finds it IDLE."""
    name = unique_name("intrans")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        conn = await pool.getconn()
        await conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        await pool.putconn(conn)
        assert await count_rows(dsn, table) == 0
        again = await pool.getconn()
        assert again is conn
        assert again.info.transaction_status == IDLE
        await again.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(table))
        await again.commit()
        await pool.putconn(again)
        assert await count_rows(dsn, table) == 1
        assert pool.stats().returns_bad == 1


async def test_return_in_error_is_rolled_back(dsn: str, table: sql.Identifier) -> None:
    """A connection returned INERROR is rolled back and usable by the next borrower."""
    name = unique_name("inerror")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        conn = await pool.getconn()
        await conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
        with pytest.raises(psycopg.errors.DivisionByZero):
            await conn.execute("SELECT 1 / 0")
        assert conn.info.transaction_status == TransactionStatus.INERROR
        await pool.putconn(conn)
        again = await pool.getconn()
        assert again.info.transaction_status == IDLE
        cur = await again.execute("SELECT 42")
        assert await cur.fetchone() == (42,)
        await again.rollback()
        await pool.putconn(again)
        assert await count_rows(dsn, table) == 0
        assert pool.stats().returns_bad == 1


async def test_closed_connection_is_discarded_and_replaced(dsn: str, backends: Any) -> None:
    """A connection closed by its borrower is discarded on return; a new one comes on demand."""
    name = unique_name("closed-return")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        conn = await pool.getconn()
        await conn.close()
        await pool.putconn(conn)
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use) == (0, 0, 0)  # discarded, not kept
        again = await pool.getconn(timeout=2)
        assert again is not conn
        assert not again.closed
        cur = await again.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        await pool.putconn(again)
        assert await eventually(backends, name, expect=1) == 1


async def test_putconn_close_true_discards(dsn: str, backends: Any) -> None:
    """putconn(conn, close=True) closes the connection instead of keeping it."""
    name = unique_name("close-true")
    async with opened(dsn, name, min_size=0, max_size=1) as pool:
        conn = await pool.getconn()
        pid = conn.info.backend_pid
        await pool.putconn(conn, close=True)
        assert conn.closed
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use) == (0, 0, 0)
        assert await eventually(backends, name, expect=0) == 0
        again = await pool.getconn(timeout=2)
        assert again.info.backend_pid != pid
        await pool.putconn(again)


# -- restored attributes ------------------------------------------------------------------


async def _set_autocommit(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.set_autocommit(not conn.autocommit)


async def _set_isolation(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.set_isolation_level(IsolationLevel.SERIALIZABLE)


async def _set_read_only(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.set_read_only(not conn.read_only)


async def _set_deferrable(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.set_deferrable(True)


async def _set_all(conn: psycopg.AsyncConnection[Any]) -> None:
    for change in (_set_autocommit, _set_isolation, _set_read_only, _set_deferrable):
        await change(conn)


def attributes(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
    """The psycopg attributes a borrower may change."""
    return (conn.autocommit, conn.isolation_level, conn.read_only, conn.deferrable)


async def _configure_read_only(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.set_read_only(True)


class SubclassedConnection(psycopg.AsyncConnection[Any]):
    """A connection class that keeps psycopg's properties (read the fast way)."""


class OverridingConnection(psycopg.AsyncConnection[Any]):
    """A connection class with its own ``read_only`` property (read through the properties)."""

    @property
    def read_only(self) -> bool | None:
        return super().read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        self._set_read_only(value)


CHANGES = [_set_autocommit, _set_isolation, _set_read_only, _set_deferrable, _set_all]
SETUPS: dict[str, dict[str, Any]] = {
    "default": {},
    "kwargs-autocommit": {"kwargs": {"autocommit": True}},
    "configure-read-only": {"configure": _configure_read_only},
    "subclass": {"connection_class": SubclassedConnection},
    "overriding-subclass": {"connection_class": OverridingConnection},
}


def test_state_reader_reads_private_attributes_only_behind_psycopg_properties() -> None:
    """The one-call state reader is used only where the properties are psycopg's own."""
    from aiopgpool.lifecycle import _read_state_public, state_reader

    assert state_reader(psycopg.AsyncConnection) is not _read_state_public
    assert state_reader(SubclassedConnection) is not _read_state_public
    assert state_reader(psycopg.Connection) is not _read_state_public
    assert state_reader(OverridingConnection) is _read_state_public


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("setup", list(SETUPS))
async def test_changed_attributes_are_restored(dsn: str, setup: str, change: Any) -> None:
    """autocommit, isolation_level, read_only, deferrable changed by a borrower are restored
    to the pool's configuration (defaults, kwargs or configure)."""
    name = unique_name(f"attrs-{setup}")
    async with opened(dsn, name, min_size=1, max_size=1, **SETUPS[setup]) as pool:
        conn = await pool.getconn()
        configured = attributes(conn)
        if setup == "kwargs-autocommit":
            assert conn.autocommit is True
        if setup == "configure-read-only":
            assert conn.read_only is True
        await change(conn)
        assert attributes(conn) != configured
        await pool.putconn(conn)
        again = await pool.getconn()
        assert again is conn
        assert attributes(again) == configured
        assert again.info.transaction_status == IDLE
        if not again.autocommit:
            # The server agrees: a new transaction uses the configured modes.
            cur = await again.execute(
                "SELECT current_setting('transaction_read_only'),"
                " current_setting('transaction_isolation')"
            )
            assert await cur.fetchone() == (
                "on" if configured[2] else "off",
                "read committed",
            )
            await again.rollback()
        await pool.putconn(again)


# -- refused returns ----------------------------------------------------------------------


async def test_putconn_foreign_connection_raises(dsn: str) -> None:
    """putconn of a connection the pool did not make raises PoolError."""
    name = unique_name("foreign")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        async with await psycopg.AsyncConnection.connect(dsn) as foreign:
            with pytest.raises(PoolError):
                await pool.putconn(foreign)
            assert not foreign.closed
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use) == (1, 1, 0)


@pytest.mark.parametrize("thing", [None, "conn", [1], {"a": 1}], ids=repr)
async def test_putconn_of_something_else_raises(dsn: str, thing: Any) -> None:
    """putconn of anything but a borrowed connection, hashable or not, raises PoolError."""
    name = unique_name("not-a-conn")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        with pytest.raises(PoolError, match="not borrowed"):
            await pool.putconn(thing)
        conn = await pool.getconn(timeout=2)
        await pool.putconn(conn)
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use) == (1, 1, 0)


async def test_putconn_twice_raises(dsn: str) -> None:
    """A second putconn of the same connection raises PoolError and changes nothing."""
    name = unique_name("twice")
    async with opened(dsn, name, min_size=1, max_size=2) as pool:
        conn = await pool.getconn()
        await pool.putconn(conn)
        with pytest.raises(PoolError):
            await pool.putconn(conn)
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use) == (1, 1, 0)
        # The slot accounting is intact: both slots can still be taken.
        a = await pool.getconn(timeout=2)
        b = await pool.getconn(timeout=2)
        assert a is not b
        with pytest.raises(PoolError):
            await pool.getconn(timeout=0)
        await pool.putconn(a)
        await pool.putconn(b)


# -- pool.connection() -------------------------------------------------------------------


async def test_connection_context_commits_on_success(dsn: str, table: sql.Identifier) -> None:
    """async with pool.connection() commits on success: the row is visible elsewhere."""
    name = unique_name("ctx-commit")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
        assert await count_rows(dsn, table) == 1
        assert conn.info.transaction_status == IDLE
        assert pool.stats().in_use == 0


async def test_connection_context_rolls_back_and_reraises(dsn: str, table: sql.Identifier) -> None:
    """async with pool.connection() rolls back on an exception and re-raises it."""
    name = unique_name("ctx-rollback")

    class Boom(Exception):
        pass

    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        with pytest.raises(Boom):
            async with pool.connection() as conn:
                await conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
                raise Boom
        assert await count_rows(dsn, table) == 0
        assert pool.stats().in_use == 0
        async with pool.connection(timeout=0) as again:
            assert again.info.transaction_status == IDLE


async def test_connection_context_returns_after_query_error(dsn: str) -> None:
    """A failed query inside pool.connection() re-raises; the connection comes back clean."""
    name = unique_name("ctx-error")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        with pytest.raises(psycopg.errors.UndefinedTable):
            async with pool.connection() as conn:
                await conn.execute("SELECT * FROM no_such_table_core_return")
        async with pool.connection(timeout=0) as again:
            assert again is conn
            assert again.info.transaction_status == IDLE
            await again.execute("SELECT 1")


async def test_connection_context_with_pool_from_constructor(dsn: str) -> None:
    """pool.connection() works with the pool opened as ``async with pool``."""
    name = unique_name("ctx-pool")
    pool = AsyncConnectionPool(dsn, name=name, min_size=1, max_size=1, timeout=5)
    async with pool, pool.connection() as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
    assert pool.closed
    assert conn.closed
