"""Role tracking (``target_session_attrs=read-write`` / ``primary``): what counts as a role
change, and what does not.

- a borrower's session-level read-only setting is its session's, not the server's: only
  that connection goes, quietly, never the whole pool;
- ``primary`` follows recovery only, as libpq's ``primary`` does: a server made read-only
  in place, or sessions read-only by design, change nothing;
- a state a connection had from the start (its startup options, ``configure``) is no change;
- the pool's own round trips at checkout (``ping_after_idle``, ``check=``) that bring the
  news keep the connection from being handed out.

Tests that only read use the shared server; those that make a server read-only use a
replicated cluster of the module's own, made writable again after each test.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from helpers import primary_and_standby, unique_name
from psycopg.conninfo import make_conninfo

from aiopgpool import AsyncConnectionPool, ConnectionPool, PoolTimeout
from aiopgpool.testing import ReplicatedCluster

LOST = "no longer a writable primary"
SESSION_READ_ONLY = [
    "SET default_transaction_read_only = on",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def rc() -> Iterator[ReplicatedCluster]:
    """A primary and one standby, with a table to write to."""
    with primary_and_standby("notes (n int)") as cluster:
        yield cluster


# -- a borrower's session-level read-only: that connection only ------------------------------


async def _pids(pool: AsyncConnectionPool, n: int) -> set[int]:
    conns = [await pool.getconn(5.0) for _ in range(n)]
    pids = {conn.info.backend_pid for conn in conns}
    for conn in conns:
        await pool.putconn(conn)
    return pids


@pytest.mark.parametrize("statement", SESSION_READ_ONLY)
@pytest.mark.parametrize("fail_a_write", [False, True], ids=["select", "refused-write"])
async def test_a_session_made_read_only_is_discarded_alone(
    dsn: str, statement: str, fail_a_write: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The server reports the session's new default_transaction_read_only, as it would a
    reload's: the pool asks which it is, and replaces that connection only (a read-write
    pool must not lend a read-only session), without the WARNING of a role change. With a
    write refused (25006) in the transaction, the question after a failed transaction gets
    the same answer."""
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    name = unique_name("roles-session")
    conninfo = make_conninfo(dsn, target_session_attrs="read-write")
    async with AsyncConnectionPool(conninfo, name=name, min_size=4, max_size=4) as pool:
        await pool.wait(10.0)
        before = await _pids(pool, 4)
        held = await pool.getconn()  # another borrower's connection: untouched
        conn = await pool.getconn()
        changed = conn.info.backend_pid
        await conn.execute(statement)
        await conn.commit()
        if fail_a_write:  # given back in the failed transaction
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                await conn.execute("CREATE TEMP TABLE refused (x int)")
        else:
            await conn.execute("SELECT 1")
            await conn.commit()
        await pool.putconn(conn)
        await pool.putconn(held)
        after = await _pids(pool, 4)
        assert before - after == {changed}
        assert pool.stats().connections_created == 5
        # No connection the pool lends now is read-only.
        conns = [await pool.getconn(5.0) for _ in range(4)]
        for conn in conns:
            assert conn.info.parameter_status("default_transaction_read_only") == "off"
            await pool.putconn(conn)
    assert not [m for m in _warnings(caplog) if LOST in m], caplog.text
    assert "its session was made read-only" in caplog.text


@pytest.mark.parametrize("statement", SESSION_READ_ONLY)
def test_the_sync_pool_discards_a_read_only_session_alone(
    dsn: str, statement: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    name = unique_name("roles-session-sync")
    conninfo = make_conninfo(dsn, target_session_attrs="read-write")
    with ConnectionPool(conninfo, name=name, min_size=3, max_size=3) as pool:
        pool.wait(10.0)
        conns = [pool.getconn(5.0) for _ in range(3)]
        before = {conn.info.backend_pid for conn in conns}
        changed = conns[0].info.backend_pid
        conns[0].execute(statement)
        conns[0].commit()
        for conn in conns:
            pool.putconn(conn)
        conns = [pool.getconn(5.0) for _ in range(3)]
        after = {conn.info.backend_pid for conn in conns}
        assert all(
            conn.info.parameter_status("default_transaction_read_only") == "off" for conn in conns
        )
        for conn in conns:
            pool.putconn(conn)
        assert before - after == {changed}
        assert pool.stats().connections_created == 4
    assert not [m for m in _warnings(caplog) if LOST in m], caplog.text
    assert "session was made read-only" in caplog.text


# -- what a connection had from the start is no change ----------------------------------------


async def test_primary_pool_with_read_only_sessions_by_design_keeps_its_connections(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """libpq's ``primary`` accepts a primary whose sessions are read-only (startup
    options): so does the pool, return after return (ping_after_idle puts every return on
    the slow path, where the role is looked at)."""
    caplog.set_level(logging.WARNING, logger="aiopgpool")
    conninfo = make_conninfo(
        dsn, target_session_attrs="primary", options="-c default_transaction_read_only=on"
    )
    name = unique_name("roles-primary-ro-options")
    async with AsyncConnectionPool(
        conninfo, name=name, min_size=2, max_size=2, ping_after_idle=60.0
    ) as pool:
        await pool.wait(10.0)
        for _ in range(10):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        assert pool.stats().connections_created == 2
    assert not [m for m in _warnings(caplog) if LOST in m], caplog.text


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_read_only_session_set_by_configure_is_its_baseline(
    dsn: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-write pool whose ``configure`` makes sessions read-only: the state the
    connection had when lent first is not a change, and nothing is replaced."""
    caplog.set_level(logging.WARNING, logger="aiopgpool")
    conninfo = make_conninfo(dsn, target_session_attrs="read-write")
    name = unique_name(f"roles-configure-{kind}")
    if kind == "async":

        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("SET default_transaction_read_only = on")
            await conn.commit()

        async with AsyncConnectionPool(
            conninfo, name=name, min_size=2, max_size=2, configure=configure, ping_after_idle=60.0
        ) as pool:
            await pool.wait(10.0)
            for _ in range(6):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
            created = pool.stats().connections_created
    else:

        def configure_sync(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SET default_transaction_read_only = on")
            conn.commit()

        def run() -> int:
            with ConnectionPool(
                conninfo,
                name=name,
                min_size=2,
                max_size=2,
                configure=configure_sync,
                ping_after_idle=60.0,
            ) as pool:
                pool.wait(10.0)
                for _ in range(6):
                    with pool.connection() as conn:
                        conn.execute("SELECT 1")
                return pool.stats().connections_created

        created = await asyncio.to_thread(run)
    assert created == 2
    assert not [m for m in _warnings(caplog) if LOST in m], caplog.text


# -- primary: recovery only --------------------------------------------------------------------


async def test_a_primary_pool_stays_on_a_primary_made_read_only_in_place(
    rc: ReplicatedCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """libpq's ``primary`` takes a read-only primary: were the pool to drop it, each new
    connection would reach the same server again (a reconnect storm). It keeps them."""
    caplog.set_level(logging.WARNING, logger="aiopgpool")
    conninfo = rc.conninfo(target_session_attrs="primary", connect_timeout="5")
    name = unique_name("roles-primary-ro-in-place")
    pool = AsyncConnectionPool(conninfo, name=name, min_size=2, max_size=2, ping_after_idle=0.0)
    await pool.open(wait=True, timeout=10.0)
    try:
        await asyncio.to_thread(rc.make_read_only, rc.primary)
        for _ in range(10):
            async with pool.connection(timeout=5.0) as conn:
                await conn.execute("SELECT 1")
                assert conn.info.parameter_status("default_transaction_read_only") == "on"
        assert pool.stats().connections_created == 2
        assert not [m for m in _warnings(caplog) if LOST in m], caplog.text
    finally:
        await pool.close(timeout=2.0)
        await asyncio.to_thread(rc.make_writable, rc.primary)


# -- the pool's own round trips at checkout -----------------------------------------------------


@pytest.mark.parametrize("how", ["ping", "check"])
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_checkout_round_trip_that_shows_read_only_does_not_hand_it_out(
    rc: ReplicatedCluster, kind: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The ping of ``ping_after_idle`` (or the ``check``) brings the server's
    default_transaction_read_only=on: the connection is not lent, every connection to the
    server goes, and with no writable server left the checkout times out rather than lend
    a connection on which every write fails."""
    caplog.set_level(logging.WARNING, logger="aiopgpool")
    conninfo = rc.conninfo([rc.primary], target_session_attrs="read-write", connect_timeout="5")
    name = unique_name(f"roles-checkout-{kind}-{how}")
    options: dict[str, Any] = {"name": name, "min_size": 2, "max_size": 2}
    if how == "ping":
        options["ping_after_idle"] = 0.0
    if kind == "async":
        if how == "check":
            options["check"] = AsyncConnectionPool.check_connection
        pool = AsyncConnectionPool(conninfo, **options)
        await pool.open(wait=True, timeout=10.0)
        try:
            await asyncio.to_thread(rc.make_read_only, rc.primary)
            with pytest.raises(PoolTimeout):
                async with pool.connection(timeout=1.0) as conn:
                    await conn.execute("INSERT INTO notes VALUES (1)")
            assert pool.stats().idle == 0
        finally:
            await asyncio.to_thread(rc.make_writable, rc.primary)
        try:
            async with pool.connection(timeout=10.0) as conn:
                await conn.execute("INSERT INTO notes VALUES (1)")
        finally:
            await pool.close(timeout=2.0)
    else:
        if how == "check":
            options["check"] = ConnectionPool.check_connection

        def run() -> None:
            sync_pool = ConnectionPool(conninfo, **options)
            sync_pool.open(wait=True, timeout=10.0)
            try:
                try:
                    rc.make_read_only(rc.primary)
                    with pytest.raises(PoolTimeout), sync_pool.connection(timeout=1.0) as conn:
                        conn.execute("INSERT INTO notes VALUES (1)")
                    assert sync_pool.stats().idle == 0
                finally:
                    rc.make_writable(rc.primary)
                with sync_pool.connection(timeout=10.0) as conn:
                    conn.execute("INSERT INTO notes VALUES (1)")
            finally:
                sync_pool.close(timeout=2.0)

        await asyncio.to_thread(run)
    said = [m for m in _warnings(caplog) if LOST in m]
    assert said and f"127.0.0.1:{rc.primary.port}" in said[0], caplog.text
    assert "default_transaction_read_only=on" in said[0]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_pool_check_replaces_the_connections_to_a_server_made_read_only(
    rc: ReplicatedCluster, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``pool.check()``'s round trips bring the news too: every idle connection to the
    server goes (one WARNING), none is left to be lent."""
    caplog.set_level(logging.WARNING, logger="aiopgpool")
    conninfo = rc.conninfo([rc.primary], target_session_attrs="read-write", connect_timeout="5")
    name = unique_name(f"roles-poolcheck-{kind}")
    if kind == "async":
        pool = AsyncConnectionPool(conninfo, name=name, min_size=3, max_size=3)
        await pool.open(wait=True, timeout=10.0)
        try:
            await asyncio.to_thread(rc.make_read_only, rc.primary)
            await pool.check()
            idle = pool.stats().idle
        finally:
            await pool.close(timeout=2.0)
            await asyncio.to_thread(rc.make_writable, rc.primary)
    else:

        def run() -> int:
            sync_pool = ConnectionPool(conninfo, name=name, min_size=3, max_size=3)
            sync_pool.open(wait=True, timeout=10.0)
            try:
                rc.make_read_only(rc.primary)
                sync_pool.check()
                return sync_pool.stats().idle
            finally:
                sync_pool.close(timeout=2.0)
                rc.make_writable(rc.primary)

        idle = await asyncio.to_thread(run)
    assert idle == 0
    said = [m for m in _warnings(caplog) if LOST in m]
    assert len(said) == 1 and f"127.0.0.1:{rc.primary.port}" in said[0], caplog.text
