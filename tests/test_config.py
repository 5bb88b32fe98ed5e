"""pg_simple-style configuration: config_pool() and get_pool()."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import suppress
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
import psycopg2.extensions
import pytest
from helpers import eventually_blocking, query, run_python, unique_name
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import aiopgpool
import aiopgpool.psycopg2 as aio2
from aiopgpool import PoolError, config_pool, get_pool


def uname(label: str) -> str:
    return unique_name(f"cf-{label[:36]}")


def with_name(dsn: str, name: str) -> str:
    """The test server's conninfo with ``application_name`` set."""
    return make_conninfo(dsn, application_name=name)


def as_url(dsn: str, name: str) -> str:
    """The test server as a postgresql:// URL, with ``application_name`` set."""
    params = conninfo_to_dict(dsn)
    user = quote(str(params.pop("user", "")), safe="")
    password = params.pop("password", None)
    host = str(params.pop("host", ""))
    port = params.pop("port", None)
    dbname = quote(str(params.pop("dbname", "")), safe="")
    query_params = {k: str(v) for k, v in params.items()}
    query_params["application_name"] = name
    netloc = user
    if password is not None:
        netloc += ":" + quote(str(password), safe="")
    if netloc:
        netloc += "@"
    if host.startswith("/"):
        query_params["host"] = host
    else:
        netloc += host
        if port:
            netloc += f":{port}"
    if host.startswith("/") and port:
        query_params["port"] = str(port)
    return f"postgresql://{netloc}/{dbname}?{urlencode(query_params)}"


@pytest.fixture(scope="module")
def dbname(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        return str(row[0])


@pytest.fixture(autouse=True)
def close_default_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No environment leaks into a test; the default pool does not outlive it."""
    monkeypatch.delenv("DATABASE_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    yield
    with suppress(PoolError):
        pool = get_pool()
        if not pool.closed:
            pool.closeall()


def backend_pids(dsn: str, name: str) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))
        return {r[0] for r in cur.fetchall()}


# -- where the connection comes from ----------------------------------------------------


def test_from_dsn(dsn: str, backends: Any) -> None:
    name = uname("dsn")
    pool = config_pool(dsn=with_name(dsn, name))
    assert get_pool() is pool
    assert backends(name) == 1
    conn = pool.getconn()
    assert isinstance(conn, psycopg.Connection)
    assert query(conn, "SELECT current_setting('application_name')") == (name,)
    pool.putconn(conn)


def test_from_db_url(dsn: str, dbname: str, backends: Any) -> None:
    name = uname("url")
    pool = config_pool(db_url=as_url(dsn, name))
    assert get_pool() is pool
    assert backends(name) == 1
    with pool.connection() as conn:
        assert query(conn, "SELECT current_database()") == (dbname,)


def test_from_keyword_parameters(dsn: str, dbname: str, backends: Any) -> None:
    params = conninfo_to_dict(dsn)
    name = uname("kw")
    pool = config_pool(
        host=params.get("host"),
        port=params.get("port"),
        user=params.get("user"),
        database=dbname,
        application_name=name,
    )
    assert get_pool() is pool
    assert backends(name) == 1
    with pool.connection() as conn:
        assert query(conn, "SELECT current_database()") == (dbname,)
        assert query(conn, "SELECT current_setting('application_name')") == (name,)


def test_from_database_dsn_env(dsn: str, backends: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    name = uname("env-dsn")
    monkeypatch.setenv("DATABASE_DSN", with_name(dsn, name))
    pool = config_pool()
    assert get_pool() is pool
    assert backends(name) == 1
    with pool.connection() as conn:
        assert query(conn, "SELECT 1") == (1,)


def test_from_database_url_env(dsn: str, backends: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    name = uname("env-url")
    monkeypatch.setenv("DATABASE_URL", as_url(dsn, name))
    pool = config_pool(max_conn=2)
    assert backends(name) == 1
    with pool.connection() as conn:
        assert query(conn, "SELECT 1") == (1,)


def test_database_dsn_env_wins_over_database_url(
    dsn: str, backends: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name_dsn, name_url = uname("env-both-dsn"), uname("env-both-url")
    monkeypatch.setenv("DATABASE_DSN", with_name(dsn, name_dsn))
    monkeypatch.setenv("DATABASE_URL", as_url(dsn, name_url))
    config_pool()
    assert backends(name_dsn) == 1
    assert backends(name_url) == 0


def test_explicit_dsn_wins_over_the_environment(
    dsn: str, backends: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name_env, name_arg = uname("env-ignored"), uname("arg-wins")
    monkeypatch.setenv("DATABASE_DSN", with_name(dsn, name_env))
    monkeypatch.setenv("DATABASE_URL", as_url(dsn, name_env))
    config_pool(dsn=with_name(dsn, name_arg))
    assert backends(name_arg) == 1
    assert backends(name_env) == 0


def test_no_source_raises_value_error_naming_the_env_vars() -> None:
    with pytest.raises(ValueError) as info:
        config_pool()
    assert "DATABASE_DSN" in str(info.value)
    assert "DATABASE_URL" in str(info.value)
    with pytest.raises(ValueError):
        config_pool(max_conn=3, expiration=10, disable_pooling=True)


def test_dsn_and_db_url_together_raise(dsn: str) -> None:
    with pytest.raises(ValueError):
        config_pool(dsn=dsn, db_url=as_url(dsn, "x"))


def test_get_pool_before_config_raises_pool_error() -> None:
    script = (
        "import aiopgpool\n"
        "try:\n"
        "    aiopgpool.get_pool()\n"
        "except aiopgpool.PoolError as exc:\n"
        "    print('PoolError', exc)\n"
    )
    proc = run_python(script, timeout=20)
    assert proc.stdout.startswith("PoolError")


# -- the pool it builds ----------------------------------------------------------------


def test_config_pool_returns_the_default_and_replaces_the_previous(dsn: str, backends: Any) -> None:
    first_name, second_name = uname("first"), uname("second")
    first = config_pool(dsn=with_name(dsn, first_name))
    assert get_pool() is first
    borrowed = first.getconn()
    second = config_pool(dsn=with_name(dsn, second_name))
    assert second is not first
    assert get_pool() is second
    assert first.closed
    assert borrowed.closed
    assert eventually_blocking(lambda: backends(first_name), 0) == 0
    with pytest.raises(PoolError):
        first.getconn()
    assert backends(second_name) == 1
    with second.connection() as conn:
        assert query(conn, "SELECT 1") == (1,)


def test_exhaustion_raises_pool_error(dsn: str) -> None:
    pool = config_pool(max_conn=2, dsn=with_name(dsn, uname("exhaust")))
    held = [pool.getconn(), pool.getconn()]
    start = time.monotonic()
    with pytest.raises(PoolError, match="connection pool exhausted"):
        pool.getconn()
    assert time.monotonic() - start < 0.5
    for conn in held:
        pool.putconn(conn)


def test_pool_manager_is_used(dsn: str) -> None:
    pool = config_pool(
        pool_manager=aiopgpool.ThreadedConnectionPool, dsn=with_name(dsn, uname("threaded"))
    )
    assert isinstance(pool, aiopgpool.ThreadedConnectionPool)
    pool2 = config_pool(
        pool_manager=aio2.ThreadedConnectionPool, dsn=with_name(dsn, uname("psycopg2"))
    )
    assert isinstance(pool2, aio2.ThreadedConnectionPool)
    conn = pool2.getconn()
    assert type(conn) is psycopg2.extensions.connection
    pool2.putconn(conn)
    with pytest.raises(ValueError):
        config_pool(pool_manager=dict, dsn=dsn)  # type: ignore[arg-type]


def test_purge_expired_connections_closes_idle_connections(dsn: str, backends: Any) -> None:
    name = uname("purge")
    pool = config_pool(max_conn=3, expiration=0.3, dsn=with_name(dsn, name))
    held = [pool.getconn() for _ in range(3)]
    old = {query(c, "SELECT pg_backend_pid()")[0] for c in held}
    for conn in held:
        conn.rollback()
        pool.putconn(conn)
    assert backends(name) == 3
    time.sleep(0.5)
    pool.purge_expired_connections()
    assert all(c.closed for c in held)
    assert eventually_blocking(lambda: backend_pids(dsn, name) & old, set()) == set()
    assert eventually_blocking(lambda: backends(name) <= 1, True)


def test_expiration_without_purge_shrinks_in_the_background(dsn: str, backends: Any) -> None:
    name = uname("expire")
    pool = config_pool(max_conn=3, expiration=0.3, dsn=with_name(dsn, name))
    held = [pool.getconn() for _ in range(3)]
    for conn in held:
        pool.putconn(conn)
    assert backends(name) == 3
    assert eventually_blocking(lambda: backends(name) <= 1, True, timeout=5.0)
    with pool.connection() as conn:
        assert query(conn, "SELECT 1") == (1,)


def test_no_connection_stays_idle_longer_than_expiration(dsn: str) -> None:
    """'expiration closes any connection idle longer than that' -- the last one too."""
    name = uname("expire-all")
    pool = config_pool(max_conn=2, expiration=0.3, dsn=with_name(dsn, name))
    held = [pool.getconn() for _ in range(2)]
    old = {query(c, "SELECT pg_backend_pid()")[0] for c in held}
    for conn in held:
        conn.rollback()
        pool.putconn(conn)
    # Nobody uses the pool: within a few expirations, both have been closed.
    assert eventually_blocking(lambda: backend_pids(dsn, name) & old, set(), timeout=5.0) == set()


def test_disable_pooling_keeps_no_idle_connection(dsn: str, backends: Any) -> None:
    name = uname("nopool")
    pool = config_pool(max_conn=2, disable_pooling=True, dsn=with_name(dsn, name))
    assert backends(name) == 0
    conn = pool.getconn()
    assert query(conn, "SELECT 1") == (1,)
    assert backends(name) == 1
    pool.putconn(conn)
    assert eventually_blocking(lambda: conn.closed, True)
    assert eventually_blocking(lambda: backends(name), 0) == 0
    # max_conn still bounds concurrency.
    held = [pool.getconn(), pool.getconn()]
    with pytest.raises(PoolError, match="connection pool exhausted"):
        pool.getconn()
    assert backends(name) == 2
    for conn in held:
        pool.putconn(conn)
    assert eventually_blocking(lambda: backends(name), 0) == 0
    with pool.connection() as conn:
        assert query(conn, "SELECT 1") == (1,)
    assert eventually_blocking(lambda: backends(name), 0) == 0
    pool.purge_expired_connections()  # nothing to purge, no error
