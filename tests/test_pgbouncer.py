"""The pools behind PgBouncer (issue #14), in session and transaction mode, on loopback.

The pool finds a pooler by itself (``pg_backend_pid()`` differs from libpq's startup
key) and turns psycopg's automatic prepared statements off, which transaction mode
needs; a ``prepare_threshold`` of the caller's own is kept. Skipped without a pgbouncer
executable (FAILS under ``$CI``), see the ``pgbouncer`` fixture.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import psycopg
import pytest
from helpers import PoolerQuestionsAsync, unique_name

from aiopgpool import AsyncConnectionPool, ConnectionPool, pooler
from aiopgpool.testing import PgBouncer, PostgresServer

MakeBouncer = Callable[..., PgBouncer]  # the pgbouncer fixture (see conftest)

QUERY = "SELECT %s::int + 1"
POOLER_SEEN = "connected through a connection pooler"
MODES = ["session", "transaction"]


async def _two_server_connections(pool: AsyncConnectionPool) -> None:
    """Two transactions at once: the bouncer opens (at least) two server connections."""
    first, second = await pool.getconn(10.0), await pool.getconn(10.0)
    try:
        for conn in (first, second):
            await conn.execute("SELECT 1")  # each in a transaction: its own server connection
        for conn in (first, second):
            await conn.commit()
    finally:
        await pool.putconn(first)
        await pool.putconn(second)


@pytest.mark.parametrize("mode", MODES)
async def test_async_pool_through_pgbouncer_needs_no_prepared_statements(
    pgbouncer: MakeBouncer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiopgpool")
    # Round robin: consecutive transactions go to different server connections, so a
    # statement prepared in one is missing in the next (the failure this test rules out).
    bouncer = pgbouncer(mode, server_round_robin=1, default_pool_size=2)
    name = unique_name(f"bouncer-async-{mode}")
    async with AsyncConnectionPool(bouncer.dsn, name=name, min_size=2, max_size=2) as pool:
        await pool.wait(10.0)
        await _two_server_connections(pool)
        for n in range(10):
            async with pool.connection(timeout=10.0) as conn:
                assert conn.prepare_threshold is None
                cur = await conn.execute(QUERY, (n,))
                assert await cur.fetchone() == (n + 1,)
        stats = pool.stats()
        assert stats.connections_lost == 0 and stats.returns_bad == 0, stats
    assert POOLER_SEEN in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_sync_pool_through_pgbouncer_needs_no_prepared_statements(
    pgbouncer: MakeBouncer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiopgpool")
    bouncer = pgbouncer(mode, server_round_robin=1, default_pool_size=2)
    name = unique_name(f"bouncer-sync-{mode}")
    with ConnectionPool(bouncer.dsn, name=name, min_size=2, max_size=2) as pool:
        pool.wait(10.0)
        held = [pool.getconn(10.0) for _ in range(2)]
        for conn in held:
            conn.execute("SELECT 1")
        for conn in held:
            conn.commit()
            pool.putconn(conn)
        for n in range(10):
            with pool.connection(timeout=10.0) as conn:
                assert conn.prepare_threshold is None
                assert conn.execute(QUERY, (n,)).fetchone() == (n + 1,)
        assert pool.stats().connections_lost == 0
    assert POOLER_SEEN in caplog.text


async def test_a_prepare_threshold_of_ones_own_is_kept(pgbouncer: MakeBouncer) -> None:
    """kwargs={"prepare_threshold": 5} stays (for PgBouncer >= 1.21 with
    max_prepared_statements); Debian 12's 1.18 does not track them, so in transaction
    mode the sixth execution fails there: only the attribute is checked."""
    bouncer = pgbouncer("transaction")
    pool = AsyncConnectionPool(
        bouncer.dsn, name=unique_name("bouncer-own"), kwargs={"prepare_threshold": 5}
    )
    async with pool, pool.connection(timeout=10.0) as conn:
        assert conn.prepare_threshold == 5


async def test_without_the_pool_prepared_statements_break_in_transaction_mode(
    pgbouncer: MakeBouncer,
) -> None:
    """The control: what the pool avoids. psycopg preparing at once (prepare_threshold=0)
    behind a round-robin transaction-mode PgBouncer 1.18 loses its statement."""
    bouncer = pgbouncer("transaction", server_round_robin=1, default_pool_size=2)
    pool = AsyncConnectionPool(
        bouncer.dsn,
        name=unique_name("bouncer-prepared"),
        min_size=2,
        max_size=2,
        kwargs={"prepare_threshold": 0},
    )
    async with pool:
        await pool.wait(10.0)
        await _two_server_connections(pool)
        lost = (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement)
        with pytest.raises(lost):
            for n in range(10):
                async with pool.connection(timeout=10.0) as conn:
                    await conn.execute(QUERY, (n,))


async def test_the_socket_test_works_through_the_bouncer(
    pgbouncer: MakeBouncer, pg_server: PostgresServer
) -> None:
    """Session mode: the server connection behind an idle pool connection is terminated;
    PgBouncer closes the client connection, which the socket test sees at checkout."""
    bouncer = pgbouncer("session")
    name = unique_name("bouncer-socket")
    async with AsyncConnectionPool(bouncer.dsn, name=name, min_size=1, max_size=1) as pool:
        await pool.wait(10.0)
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
        assert row is not None
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", row)
        await asyncio.sleep(0.3)  # PgBouncer notices and closes its client side
        async with pool.connection(timeout=10.0) as conn:
            cur = await conn.execute("SELECT pg_backend_pid()")
            again = await cur.fetchone()
        assert again is not None and again != row
        stats = pool.stats()
        assert stats.connections_lost == 1 and stats.timeouts == 0, stats


@pytest.mark.parametrize("mode", MODES)
async def test_the_pool_recovers_from_a_server_restart_behind_the_bouncer(
    pgbouncer: MakeBouncer, own_server: PostgresServer, mode: str
) -> None:
    # After a failed server login PgBouncer waits server_login_retry (15 s by default)
    # before the next one, and its clients with it: keep that short (see README).
    bouncer = pgbouncer(mode, server=own_server, server_login_retry=1)
    name = unique_name(f"bouncer-restart-{mode}")
    async with AsyncConnectionPool(bouncer.dsn, name=name, min_size=2, max_size=4) as pool:
        await pool.wait(10.0)
        await asyncio.to_thread(own_server.restart)
        started = time.monotonic()
        errors: list[str] = []
        while True:
            try:
                async with pool.connection(timeout=2.0) as conn:
                    await conn.execute("SELECT 1")
                break
            except psycopg.Error as exc:
                errors.append(type(exc).__name__)
                assert time.monotonic() - started < 15.0, errors
                await asyncio.sleep(0.1)
        print(f"\n{mode} mode: recovered in {time.monotonic() - started:.2f} s after {errors}")
        # Recovered for good: every slot works.
        conns = await asyncio.gather(*(pool.getconn(5.0) for _ in range(4)))
        try:
            for conn in conns:
                await conn.execute("SELECT 1")
        finally:
            for conn in conns:
                await pool.putconn(conn)
        stats = pool.stats()
        assert (stats.in_use, stats.waiting) == (0, 0)


async def test_role_tracking_works_through_a_session_mode_bouncer(
    pgbouncer: MakeBouncer, own_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """PgBouncer (1.18 measured) passes on the server's ParameterStatus changes in
    session mode: a pool asking for read-write through it sees
    default_transaction_read_only=on and replaces its connections to the bouncer, as it
    would a server's. (In transaction mode the report comes with the failing transaction
    in some runs only, and sometimes not within three more: not tested, see README.)"""
    mode = "session"
    caplog.set_level(logging.WARNING, logger="aiopgpool")
    bouncer = pgbouncer(mode, server=own_server)
    conninfo = f"{bouncer.dsn} target_session_attrs=read-write connect_timeout=5"
    name = unique_name(f"bouncer-role-{mode}")
    pool = AsyncConnectionPool(conninfo, name=name, min_size=2, max_size=2)
    await pool.open(wait=True, timeout=10.0)
    # PgBouncer gives a client a server connection at its first query, and passes on the
    # server's reports from then on: one of the two has made none (it took the other's answer
    # to the pooler question).
    conns = [await pool.getconn(5.0) for _ in range(2)]
    for conn in conns:
        await conn.execute("SELECT 1")
        await pool.putconn(conn)
    admin = psycopg.connect(
        own_server.dsn, autocommit=True, options="-c default_transaction_read_only=off"
    )
    try:
        admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        admin.execute("SELECT pg_reload_conf()")
        await asyncio.sleep(0.5)  # the backends take the reload in
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            async with pool.connection(timeout=10.0) as conn:
                await conn.execute("CREATE TABLE refused (x int)")
        assert pool.stats().idle == 0
        assert f"127.0.0.1:{bouncer.port}" in caplog.text
        assert "default_transaction_read_only=on" in caplog.text
    finally:
        admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
        admin.execute("SELECT pg_reload_conf()")
        admin.close()
    await asyncio.sleep(0.5)  # the backends take the reset in (CI once raced it)
    try:
        async with pool.connection(timeout=10.0) as conn:
            await conn.execute("CREATE TABLE accepted (x int)")
    finally:
        await pool.close(timeout=2.0)


@pytest.mark.parametrize("through", ["bouncer", "direct"])
async def test_the_pooler_answer_serves_every_new_connection_to_the_same_endpoint(
    pgbouncer: MakeBouncer, dsn: str, through: str
) -> None:
    """One connection asks ``pg_backend_pid()``; later ones to the same endpoint, in any
    pool of the process, reuse its answer (prepared statements off behind a pooler, on
    otherwise) instead of a round trip each, until it is ANSWER_TTL old."""
    target = pgbouncer("transaction").dsn if through == "bouncer" else dsn
    pooler._answers.clear()
    PoolerQuestionsAsync.asked = 0
    first = AsyncConnectionPool(
        target, name=unique_name("pooler-first"), min_size=1, connection_class=PoolerQuestionsAsync
    )
    async with first:
        await first.wait(10.0)
    assert PoolerQuestionsAsync.asked == 1
    second = AsyncConnectionPool(
        target, name=unique_name("pooler-second"), min_size=3, connection_class=PoolerQuestionsAsync
    )
    async with second:
        await second.wait(10.0)
        conns = [await second.getconn(10.0) for _ in range(3)]
        expected = None if through == "bouncer" else 5  # psycopg's default
        assert [c.prepare_threshold for c in conns] == [expected] * 3
        for conn in conns:
            await second.putconn(conn)
    assert PoolerQuestionsAsync.asked == 1, "a connection to a known endpoint asked again"
    # An answer past its time is asked again.
    for key, (answer, _) in list(pooler._answers.items()):
        pooler._answers[key] = (answer, time.monotonic() - 1)
    async with AsyncConnectionPool(
        target, name=unique_name("pooler-third"), min_size=1, connection_class=PoolerQuestionsAsync
    ) as third:
        await third.wait(10.0)
    assert PoolerQuestionsAsync.asked == 2
