"""Multi-host conninfo, TCP keepalive defaults and ``ping_after_idle`` (issue #14),
on a real replicated cluster shared by the module: no test here moves a role for good
(the one that makes the primary read-only makes it writable again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import primary_and_standby, unique_name
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aiopgpool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    NullConnectionPool,
    PersistentConnectionPool,
    SimpleConnectionPool,
    ThreadedConnectionPool,
)
from aiopgpool.conninfo import KEEPALIVE_DEFAULTS
from aiopgpool.testing import LocalCluster, ReplicatedCluster, count_backends
from aiopgpool.testing.proxy import TcpProxy

PASSWORD = "s3cret-Pa55word"  # trust authentication: never sent, and never shown


@pytest.fixture(scope="module")
def rc() -> Iterator[ReplicatedCluster]:
    """A primary and one standby, with a table to write to."""
    with primary_and_standby("notes (pool text, port int)") as cluster:
        yield cluster


def _rw(rc: ReplicatedCluster, **params: str) -> str:
    return rc.conninfo(target_session_attrs="read-write", connect_timeout="5", **params)


def _eventually_zero(node: LocalCluster, name: str, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := count_backends(node.dsn, name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


# -- every pool class on a multi-host conninfo --------------------------------------------

WRITE = "INSERT INTO notes VALUES (current_setting('application_name'), inet_server_port())"
WHO = (
    "SELECT inet_server_port(), current_setting('application_name'),"
    " (SELECT count(*) FROM pg_stat_activity"
    "  WHERE application_name = current_setting('application_name'))"
)


async def _use_async(pool: Any) -> tuple[Any, ...]:
    async with pool, pool.connection(timeout=10.0) as conn:
        await conn.execute(WRITE)
        cur = await conn.execute(WHO)
        row = await cur.fetchone()
    assert row is not None
    return tuple(row)


def _use_sync(pool: Any) -> tuple[Any, ...]:
    with pool, pool.connection(timeout=10.0) as conn:
        conn.execute(WRITE)
        row = conn.execute(WHO).fetchone()
    assert row is not None
    return tuple(row)


def _use_dropin(pool: Any) -> tuple[Any, ...]:
    try:
        conn = pool.getconn()
        try:
            conn.execute(WRITE)
            row = conn.execute(WHO).fetchone()
            conn.commit()
        finally:
            pool.putconn(conn)
    finally:
        pool.closeall()
    assert row is not None
    return tuple(row)


KINDS: dict[str, Callable[[str, str], tuple[Any, Callable[[Any], Any]]]] = {
    "AsyncConnectionPool": lambda ci, name: (AsyncConnectionPool(ci, name=name), _use_async),
    "AsyncNullConnectionPool": lambda ci, name: (
        AsyncNullConnectionPool(ci, name=name),
        _use_async,
    ),
    "ConnectionPool": lambda ci, name: (ConnectionPool(ci, name=name), _use_sync),
    "NullConnectionPool": lambda ci, name: (NullConnectionPool(ci, name=name), _use_sync),
    "SimpleConnectionPool": lambda ci, name: (
        SimpleConnectionPool(1, 2, ci, name=name),
        _use_dropin,
    ),
    "ThreadedConnectionPool": lambda ci, name: (
        ThreadedConnectionPool(1, 2, ci, name=name),
        _use_dropin,
    ),
    "PersistentConnectionPool": lambda ci, name: (
        PersistentConnectionPool(1, 2, ci, name=name),
        _use_dropin,
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_every_pool_class_reaches_the_primary_and_hides_the_password(
    rc: ReplicatedCluster, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    name = unique_name(f"multihost-{kind}")
    conninfo = _rw(rc, password=PASSWORD)
    # The drop-ins connect in their constructor: off the event loop.
    pool, use = await asyncio.to_thread(KINDS[kind], conninfo, name)
    shown = repr(pool)
    ports = ",".join(str(node.port) for node in rc.nodes)
    assert "host=127.0.0.1,127.0.0.1" in shown and f"port={ports}" in shown, shown
    assert "target_session_attrs=read-write" in shown
    result = await use(pool) if use is _use_async else await asyncio.to_thread(use, pool)
    port, application_name, backends = result
    assert port == rc.primary.port
    assert application_name == name
    assert backends >= 1  # the pool's backends carry its name
    assert PASSWORD not in shown and PASSWORD not in caplog.text
    assert PASSWORD not in repr(pool)
    assert "127.0.0.1" in caplog.text  # the log names the hosts
    # Nothing of this pool stays on any node (the standby was only probed by libpq).
    for node in rc.nodes:
        assert await asyncio.to_thread(_eventually_zero, node, name) == 0


async def test_the_standby_serves_a_pool_that_asks_for_one(rc: ReplicatedCluster) -> None:
    """target_session_attrs=standby: the same conninfo reaches the standby, whose backends
    carry the pool's name too; no role tracking (no writes expected there)."""
    name = unique_name("multihost-standby")
    conninfo = rc.conninfo(target_session_attrs="standby", connect_timeout="5")
    async with AsyncConnectionPool(conninfo, name=name, min_size=2) as pool:
        await pool.wait(10.0)
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT inet_server_port(), pg_is_in_recovery()")
            assert await cur.fetchone() == (rc.standbys[0].port, True)
        assert count_backends(rc.standbys[0].dsn, name) == 2
        assert count_backends(rc.primary.dsn, name) == 0


async def test_load_balance_hosts_random_spreads_connections(rc: ReplicatedCluster) -> None:
    # A libpq feature (the servers' version does not matter): psycopg-binary ships libpq 17+.
    if psycopg.pq.version() < 160000:
        pytest.skip(f"load_balance_hosts needs libpq >= 16 (this is {psycopg.pq.version()})")
    name = unique_name("multihost-balance")
    conninfo = rc.conninfo(load_balance_hosts="random", connect_timeout="5")
    async with AsyncConnectionPool(conninfo, name=name, min_size=12, max_size=12) as pool:
        await pool.wait(20.0)
        per_node = [count_backends(node.dsn, name) for node in rc.nodes]
    assert sum(per_node) == 12
    assert all(n >= 1 for n in per_node), per_node  # chance of failing: 2 x 2**-12


# -- role tracking: a return that saw default_transaction_read_only=on ----------------------


async def test_a_read_only_report_is_logged_and_replaces_the_idle_connections_at_once(
    rc: ReplicatedCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiopgpool")
    primary = rc.primary
    name = unique_name("multihost-ro")
    pool = AsyncConnectionPool(_rw(rc), name=name, min_size=3, max_size=3, reconnect_timeout=60)
    await pool.open(wait=True, timeout=10.0)
    try:
        assert count_backends(primary.dsn, name) == 3
        await asyncio.to_thread(rc.make_read_only, primary)
        seen = None
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            async with pool.connection() as conn:
                try:
                    await conn.execute(WRITE)
                finally:
                    seen = conn.info.parameter_status("default_transaction_read_only")
        assert seen == "on"
        # At once: the return replaced the two idle ones too (no writable server to refill).
        assert pool.stats().idle == 0
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        said = [m for m in warnings if "no longer a writable primary" in m]
        assert said, warnings
        assert f"127.0.0.1:{primary.port}" in said[0] and name in said[0]
        assert "default_transaction_read_only=on" in said[0]
        assert await asyncio.to_thread(_eventually_zero, primary, name) == 0
    finally:
        await asyncio.to_thread(rc.make_writable, primary)
    try:
        # Writable again: the pool refills by itself (reconnect backoff, 1 s at most apart).
        async with pool.connection(timeout=10.0) as conn:
            await conn.execute(WRITE)
    finally:
        await pool.close(timeout=2.0)


def test_the_sync_pool_replaces_them_too(
    rc: ReplicatedCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The same through ConnectionPool, whose putconn does the work in the caller's thread."""
    caplog.set_level(logging.WARNING, logger="aiopgpool")
    primary = rc.primary
    name = unique_name("multihost-ro-sync")
    pool = ConnectionPool(_rw(rc), name=name, min_size=3, max_size=3, reconnect_timeout=60)
    pool.open(wait=True, timeout=10.0)
    try:
        rc.make_read_only(primary)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), pool.connection() as conn:
            conn.execute(WRITE)
        assert pool.stats().idle == 0
        said = [r.getMessage() for r in caplog.records if "no longer a writable" in r.getMessage()]
        assert said and f"127.0.0.1:{primary.port}" in said[0], caplog.text
        assert _eventually_zero(primary, name) == 0
    finally:
        rc.make_writable(primary)
    try:
        with pool.connection(timeout=10.0) as conn:
            conn.execute(WRITE)
    finally:
        pool.close(timeout=2.0)


# -- TCP keepalives -------------------------------------------------------------------------


def _dsn_params(conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> dict[str, Any]:
    return conninfo_to_dict(conn.info.dsn)


async def test_keepalives_are_on_by_default(rc: ReplicatedCluster) -> None:
    pool = AsyncConnectionPool(_rw(rc), name=unique_name("keepalive"))
    async with pool, pool.connection(timeout=10.0) as conn:
        params = _dsn_params(conn)
    assert {key: params.get(key) for key in KEEPALIVE_DEFAULTS} == KEEPALIVE_DEFAULTS
    assert KEEPALIVE_DEFAULTS["keepalives"] == "1"


def test_keepalives_of_the_conninfo_are_left_as_they_are(rc: ReplicatedCluster) -> None:
    conninfo = _rw(rc, keepalives_idle="60")
    pool = ConnectionPool(conninfo, name=unique_name("keepalive-own"))
    with pool, pool.connection(timeout=10.0) as conn:
        params = _dsn_params(conn)
    assert params["keepalives_idle"] == "60"
    for key in ("keepalives_interval", "keepalives_count"):
        assert key not in params  # libpq's (the system's) defaults, not the pool's
    with (
        ConnectionPool(
            _rw(rc), kwargs={"keepalives": 0}, name=unique_name("keepalive-off")
        ) as pool,
        pool.connection(timeout=10.0) as conn,
    ):
        params = _dsn_params(conn)
    assert params["keepalives"] == "0" and "keepalives_idle" not in params


def test_a_service_definition_and_pgappname_are_left_as_they_are(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq reads a service's definition (pg_service.conf) after the keywords given to
    connect: the pool's defaults, given as keywords, overrode its keepalives and its
    application_name. They are now left out when the service sets them, and the pool's
    application_name when PGAPPNAME is set."""
    params = {k: v for k, v in conninfo_to_dict(dsn).items() if k != "password"}
    lines = ["[ka]", *(f"{k}={v}" for k, v in params.items())]
    lines += ["keepalives_idle=120", "application_name=from-service"]
    (tmp_path / "pg_service.conf").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "pg_service.conf"))
    password = conninfo_to_dict(dsn).get("password")
    conninfo = "service=ka" + (f" password={password}" if password else "")
    pool = ConnectionPool(conninfo, name=unique_name("service"))
    with pool, pool.connection(timeout=10.0) as conn:
        given = _dsn_params(conn)
        name = conn.execute("SHOW application_name").fetchone()
    assert given["keepalives_idle"] == "120" and "keepalives_count" not in given
    assert name == ("from-service",)
    monkeypatch.setenv("PGAPPNAME", "from-env")
    pool = ConnectionPool(dsn, name=unique_name("pgappname"))
    with pool, pool.connection(timeout=10.0) as conn:
        assert conn.execute("SHOW application_name").fetchone() == ("from-env",)
        assert _dsn_params(conn)["keepalives_idle"] == KEEPALIVE_DEFAULTS["keepalives_idle"]


# -- ping_after_idle --------------------------------------------------------------------------


async def test_ping_after_idle_finds_a_connection_cut_off_silently(rc: ReplicatedCluster) -> None:
    """A network partition (the proxy drops every byte, the socket stays open) is invisible
    to the socket test; with ping_after_idle the checkout makes a round trip, which gets
    no answer: the connection is replaced (through the second host), within the request's
    timeout, instead of being handed out dead."""
    params = conninfo_to_dict(rc.primary.dsn)
    with (
        TcpProxy(rc.primary.host, rc.primary.port) as cut,
        TcpProxy(rc.primary.host, rc.primary.port) as spare,
    ):
        params.update(host="127.0.0.1,127.0.0.1", port=f"{cut.port},{spare.port}")
        conninfo = make_conninfo("", connect_timeout="2", **params)
        name = unique_name("ping-after-idle")
        async with AsyncConnectionPool(
            conninfo, name=name, min_size=1, max_size=1, ping_after_idle=0.05, timeout=10.0
        ) as pool:
            await pool.wait(10.0)
            async with pool.connection() as conn:
                assert conn.info.port == cut.port
            await asyncio.sleep(0.1)
            cut.blackhole()
            started = time.monotonic()
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
                assert conn.info.port == spare.port
            took = time.monotonic() - started
            stats = pool.stats()
            assert stats.connections_lost == 1 and stats.timeouts == 0, stats
            assert took < 9.0  # the probe's 5 s, then the cut host's connect_timeout
            cut.forward()


def test_ping_after_idle_in_the_sync_pool(rc: ReplicatedCluster) -> None:
    """The same through ConnectionPool, whose ping runs in a worker thread."""
    params = conninfo_to_dict(rc.primary.dsn)
    with (
        TcpProxy(rc.primary.host, rc.primary.port) as cut,
        TcpProxy(rc.primary.host, rc.primary.port) as spare,
    ):
        params.update(host="127.0.0.1,127.0.0.1", port=f"{cut.port},{spare.port}")
        conninfo = make_conninfo("", connect_timeout="2", **params)
        pool = ConnectionPool(
            conninfo,
            name=unique_name("ping-after-idle-sync"),
            min_size=1,
            max_size=1,
            ping_after_idle=0.05,
            timeout=10.0,
        )
        with pool:
            pool.wait(10.0)
            with pool.connection() as conn:
                assert conn.info.port == cut.port
            time.sleep(0.1)
            cut.blackhole()
            started = time.monotonic()
            with pool.connection() as conn:
                conn.execute("SELECT 1")
                assert conn.info.port == spare.port
            assert time.monotonic() - started < 9.0
            stats = pool.stats()
            assert stats.connections_lost == 1 and stats.timeouts == 0, stats
            cut.forward()
