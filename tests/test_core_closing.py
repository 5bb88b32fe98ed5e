"""Opening, closing, argument checks, secrecy of passwords, resize / wait / purge_expired."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import psycopg
import pytest
from helpers import (
    call,
    chain_texts,
    closed_port,
    eventually,
    finish,
    log_texts,
    monitor,
    opened,
    unique_name,
)

from aiopgpool import AsyncConnectionPool, AsyncReplicatedPool, PoolClosed, PoolError, PoolTimeout

# -- closeall() ---------------------------------------------------------------------------


async def test_closeall_closes_borrowed_connections_too(dsn: str, backends: Any) -> None:
    """closeall() closes idle and borrowed connections; afterwards every use is PoolClosed."""
    name = unique_name("closeall")
    pool = AsyncConnectionPool(dsn, name=name, min_size=3, max_size=3, timeout=5)
    await pool.open(wait=True, timeout=5)
    borrowed = [await pool.getconn(), await pool.getconn()]
    assert await call(backends, name) == 3
    await pool.closeall()
    assert pool.closed
    assert all(conn.closed for conn in borrowed)
    assert await eventually(backends, name, expect=0) == 0
    with pytest.raises(PoolClosed):
        await pool.getconn()
    with pytest.raises(PoolClosed):
        await pool.getconn(key="k")
    with pytest.raises(PoolClosed):
        await pool.putconn(borrowed[0])
    with pytest.raises(PoolClosed) as info:
        await pool.closeall()
    assert isinstance(info.value, PoolError)
    stats = pool.stats()
    assert (stats.size, stats.idle, stats.in_use) == (0, 0, 0)


async def test_closeall_during_checkout_leaves_no_connection_open(dsn: str, backends: Any) -> None:
    """A getconn still checking an idle connection when closeall() runs gets PoolClosed or a
    closed connection: no backend of the pool survives closeall()."""
    name = unique_name("closeall-mid-checkout")
    channel = name.replace("-", "_")
    pool = AsyncConnectionPool(dsn, name=name, min_size=1, max_size=1, timeout=5)
    await pool.open(wait=True, timeout=5)
    conn = await pool.getconn()
    await conn.execute(f"LISTEN {channel}")
    await conn.commit()
    await pool.putconn(conn)
    async with await monitor(dsn) as mon:
        await mon.execute(f"NOTIFY {channel}")
    await asyncio.sleep(0.1)  # a notification waits on the idle connection's socket ...
    task = asyncio.create_task(pool.getconn())
    await asyncio.sleep(0)  # ... so getconn makes a round trip to check the connection
    await pool.closeall()
    await finish(task)
    if task.exception() is None:
        got = task.result()
        left_open = not got.closed
        await got.close()
        assert not left_open, "getconn handed out an open connection after closeall()"
    else:
        assert isinstance(task.exception(), PoolClosed)
    assert await eventually(backends, name, expect=0, timeout=2) == 0


async def test_closeall_releases_keyed_connection(dsn: str) -> None:
    """A keyed connection is closed by closeall() and its key is no longer served."""
    name = unique_name("closeall-keyed")
    pool = AsyncConnectionPool(dsn, name=name, min_size=1, max_size=1, timeout=5)
    await pool.open(wait=True, timeout=5)
    conn = await pool.getconn(key="k")
    await pool.closeall()
    assert conn.closed
    with pytest.raises(PoolClosed):
        await pool.getconn(key="k")


# -- close(timeout) -----------------------------------------------------------------------


async def test_close_is_graceful(dsn: str, backends: Any) -> None:
    """close(timeout): new requests get PoolClosed, a borrowed connection can come back,
    then everything is closed without waiting out the timeout."""
    name = unique_name("close-graceful")
    pool = AsyncConnectionPool(dsn, name=name, min_size=2, max_size=2, timeout=5)
    await pool.open(wait=True, timeout=5)
    conn = await pool.getconn()
    loop = asyncio.get_running_loop()
    start = loop.time()
    closing = asyncio.create_task(pool.close(timeout=3))
    await asyncio.sleep(0.1)
    assert pool.closed
    assert not closing.done()
    with pytest.raises(PoolClosed):
        await pool.getconn(timeout=1)
    assert not conn.closed
    cur = await conn.execute("SELECT 1")  # still usable by its borrower
    assert await cur.fetchone() == (1,)
    await pool.putconn(conn)
    await asyncio.wait_for(closing, 2)
    assert loop.time() - start < 1.5
    assert conn.closed
    assert await eventually(backends, name, expect=0) == 0
    with pytest.raises(PoolClosed):
        await pool.getconn()


async def test_close_timeout_closes_kept_connections(dsn: str, backends: Any) -> None:
    """close(timeout) closes a connection still borrowed when the timeout runs out."""
    name = unique_name("close-timeout")
    pool = AsyncConnectionPool(dsn, name=name, min_size=1, max_size=1, timeout=5)
    await pool.open(wait=True, timeout=5)
    conn = await pool.getconn()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(pool.close(timeout=0.2), 3)
    assert 0.15 <= loop.time() - start < 1.5
    assert conn.closed
    assert await eventually(backends, name, expect=0) == 0
    with pytest.raises(PoolClosed):
        await pool.putconn(conn)


async def test_a_close_during_a_close_returns_with_the_pool_closed(dsn: str, backends: Any) -> None:
    """A second close() while a first one waits for a borrowed connection waits with it,
    up to its own timeout, then closes: when it returns, the pool is closed; the first
    close() then returns too."""
    name = unique_name("close-during-close")
    pool = AsyncConnectionPool(dsn, name=name, min_size=1, max_size=1, timeout=5)
    await pool.open(wait=True, timeout=5)
    conn = await pool.getconn()
    first = asyncio.create_task(pool.close(timeout=30))
    await asyncio.sleep(0.05)
    assert not first.done(), "the first close() waits for the borrowed connection"
    await asyncio.wait_for(pool.close(timeout=0.2), 5)
    assert conn.closed
    stats = pool.stats()
    assert (stats.size, stats.in_use) == (0, 0)
    assert await eventually(backends, name, expect=0) == 0
    await finish(first)
    assert first.exception() is None


async def test_a_pool_dropped_without_close_closes_its_idle_connections(
    dsn: str, backends: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An open pool nobody references any more is collected, and its idle connections
    close (its maintenance timer does not keep it alive); a connection still borrowed
    stays open and usable by its borrower."""
    name = unique_name("dropped-async")
    pool = AsyncConnectionPool(dsn, name=name, min_size=2, max_size=2, timeout=5)
    await pool.open(wait=True, timeout=5)
    conn = await pool.getconn()
    assert await call(backends, name) == 2
    del pool
    gc.collect()
    assert await eventually(backends, name, expect=1) == 1
    assert any("dropped without close()" in r.getMessage() for r in caplog.records)
    cur = await conn.execute("SELECT 1")
    assert await cur.fetchone() == (1,)
    await conn.close()


async def test_waiters_get_pool_closed_when_close_starts(dsn: str) -> None:
    """Requests waiting when close() starts fail with PoolClosed at once, not at their timeout."""
    name = unique_name("close-waiters")
    pool = AsyncConnectionPool(dsn, name=name, min_size=1, max_size=1, timeout=10)
    await pool.open(wait=True, timeout=5)
    conn = await pool.getconn()
    waiters = [asyncio.create_task(pool.getconn()) for _ in range(3)]
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(pool.close(timeout=2))
    for task in waiters:
        await finish(task, timeout=1)
        assert isinstance(task.exception(), PoolClosed)
    await pool.putconn(conn)
    await asyncio.wait_for(closing, 2)


async def test_waiters_get_pool_closed_on_closeall(dsn: str) -> None:
    """Requests waiting when closeall() runs fail with PoolClosed."""
    name = unique_name("closeall-waiters")
    pool = AsyncConnectionPool(dsn, name=name, min_size=1, max_size=1, timeout=10)
    await pool.open(wait=True, timeout=5)
    conn = await pool.getconn()
    waiter = asyncio.create_task(pool.getconn())
    await asyncio.sleep(0.05)
    await pool.closeall()
    await finish(waiter, timeout=1)
    assert isinstance(waiter.exception(), PoolClosed)
    assert conn.closed


# -- opening ----------------------------------------------------------------------------


async def test_open_wait_until_min_size(dsn: str, backends: Any) -> None:
    """open(wait=True) returns once min_size connections exist."""
    name = unique_name("open-wait")
    pool = AsyncConnectionPool(dsn, name=name, min_size=3, max_size=4, timeout=5)
    try:
        await pool.open(wait=True, timeout=5)
        assert pool.stats().size == 3
        assert await call(backends, name) == 3
    finally:
        await pool.closeall()


async def test_wait_until_min_size(dsn: str) -> None:
    """wait() returns once min_size connections exist, after a non-waiting open()."""
    name = unique_name("wait")
    pool = AsyncConnectionPool(dsn, name=name, min_size=2, max_size=2, timeout=5)
    try:
        await pool.open()
        await pool.wait(5)
        assert pool.stats().size == 2
    finally:
        await pool.closeall()


async def test_open_closed_pool_raises(dsn: str) -> None:
    """open() on a closed pool raises PoolClosed."""
    pool = AsyncConnectionPool(dsn, name=unique_name("reopen"), min_size=0, max_size=1)
    await pool.open()
    await pool.close()
    with pytest.raises(PoolClosed):
        await pool.open()
    with pytest.raises(PoolClosed):
        await pool.wait(1)


async def test_getconn_on_never_opened_pool_raises(dsn: str) -> None:
    """getconn() (keyed or not) on a pool never opened raises PoolClosed."""
    pool = AsyncConnectionPool(dsn, name=unique_name("never-opened"), min_size=0, max_size=1)
    with pytest.raises(PoolClosed):
        await pool.getconn()
    with pytest.raises(PoolClosed):
        await pool.getconn(key="k")
    await pool.close()


# -- argument checks -----------------------------------------------------------------------

BAD_ARGUMENTS = [
    ({"min_size": 3, "max_size": 2}, "min_size"),
    ({"min_size": -1}, "min_size"),
    ({"max_size": -1}, "max_size"),
    ({"max_size": 0, "min_size": 0}, "max_size"),
    ({"timeout": -1}, "timeout"),
    ({"max_waiting": -1}, "max_waiting"),
    ({"max_idle": -1}, "max_idle"),
    ({"max_lifetime": -1}, "max_lifetime"),
    ({"reconnect_timeout": -1}, "reconnect_timeout"),
    ({"leak_timeout": -1}, "leak_timeout"),
]


@pytest.mark.parametrize(("options", "word"), BAD_ARGUMENTS, ids=[w for _, w in BAD_ARGUMENTS])
def test_bad_arguments_raise_value_error(options: dict[str, Any], word: str) -> None:
    """Invalid sizes and durations raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=word):
        AsyncConnectionPool("dbname=x", **options)


def test_bad_conninfo_raises_value_error_without_password() -> None:
    """An unparsable conninfo raises ValueError naming conninfo, without the password."""
    with pytest.raises(ValueError, match="conninfo") as info:
        AsyncConnectionPool("host=localhost password=sekrit-bad-conninfo bogus")
    for text in chain_texts(info.value):
        assert "sekrit" not in text
    # Not even as the suppressed context, which code can still reach.
    assert info.value.__cause__ is None and info.value.__context__ is None


async def test_resize_rejects_bad_sizes(dsn: str) -> None:
    """resize() with min > max raises ValueError and leaves the sizes unchanged."""
    async with opened(dsn, unique_name("resize-bad"), min_size=1, max_size=2) as pool:
        with pytest.raises(ValueError, match="min_size"):
            await pool.resize(3, 2)
        assert (pool.min_size, pool.max_size) == (1, 2)


# -- passwords stay secret ---------------------------------------------------------------


SECRET = "sekrit-core-closing-7f3a"


def _secret_conninfos(port: int) -> dict[str, tuple[str, dict[str, Any] | None]]:
    return {
        "keywords": (
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres password={SECRET}",
            None,
        ),
        "url": (f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/postgres", None),
        "kwargs": (f"host=127.0.0.1 port={port} user=postgres", {"password": SECRET}),
        # A dbname that is itself a connection string (libpq's "expanded" dbname).
        "dbname-url": (
            f"dbname='postgresql://postgres:{SECRET}@127.0.0.1:{port}/postgres'",
            None,
        ),
        "dbname-kwargs": (
            f"host=127.0.0.1 port={port}",
            {"dbname": f"host=127.0.0.1 user=postgres password={SECRET}"},
        ),
    }


@pytest.mark.parametrize("form", ["dbname-url", "dbname-kwargs"])
def test_a_dbname_that_is_a_connection_string_with_a_password_is_refused(form: str) -> None:
    """psycopg does not expand such a dbname: the server would get it as a database name
    and quote it, password included, in its error. Refused at construction, naming the
    problem and nothing of the string."""
    conninfo, kwargs = _secret_conninfos(closed_port())[form]
    with pytest.raises(ValueError, match="dbname is itself a connection string") as info:
        AsyncConnectionPool(conninfo, kwargs=kwargs, name=unique_name("dbname-conninfo"))
    assert SECRET not in "".join(chain_texts(info.value))
    assert info.value.__cause__ is None and info.value.__context__ is None
    with pytest.raises(ValueError, match=r"(primary|replica 1): conninfo: the dbname") as info:
        AsyncReplicatedPool(f"host=127.0.0.1 port={closed_port()}", [conninfo], kwargs=kwargs)
    assert SECRET not in "".join(chain_texts(info.value))


@pytest.mark.parametrize("form", ["keywords", "url", "kwargs"])
async def test_password_never_shown(form: str, caplog: pytest.LogCaptureFixture) -> None:
    """A password in the conninfo never appears in repr/str, errors (and their causes) or logs."""
    conninfo, kwargs = _secret_conninfos(closed_port())[form]
    name = unique_name(f"secret-{form}")
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    pool = AsyncConnectionPool(conninfo, kwargs=kwargs, name=name, min_size=1, max_size=1)
    texts = [repr(pool), str(pool)]
    try:
        with pytest.raises(PoolTimeout) as info:
            await asyncio.wait_for(pool.open(wait=True, timeout=0.3), 5)
        assert info.value.__cause__ is not None, "the connection error is chained"
        texts += chain_texts(info.value)
        with pytest.raises(PoolTimeout) as info:
            await asyncio.wait_for(pool.getconn(timeout=0.3), 5)
        texts += chain_texts(info.value)
        texts += [repr(pool), str(pool)]
    finally:
        await pool.close()
    texts += [repr(pool), str(pool)]
    assert caplog.records, "the failed connections were logged"
    texts += log_texts(caplog.records)
    leaks = [text for text in texts if SECRET in text]
    assert leaks == []


@pytest.mark.parametrize("via", ["open", "wait"])
async def test_fail_fast_raises_the_first_connection_error(via: str) -> None:
    """open(wait=True, fail_fast=True) and wait(fail_fast=True) raise the driver's own
    error as soon as an attempt fails (no PoolTimeout, no password); the pool is then
    as usual: still open, still retrying, closable."""
    conninfo, kwargs = _secret_conninfos(closed_port())["keywords"]
    pool = AsyncConnectionPool(conninfo, kwargs=kwargs, name=unique_name("fail-fast"), min_size=1)
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            if via == "open":
                await asyncio.wait_for(pool.open(wait=True, timeout=30, fail_fast=True), 10)
            else:
                await pool.open()
                await asyncio.wait_for(pool.wait(30, fail_fast=True), 10)
        assert not isinstance(info.value, PoolTimeout)
        assert all(SECRET not in text for text in chain_texts(info.value))
        assert not pool.closed
        assert pool.stats().connections_failed >= 1
    finally:
        await pool.close()


# -- resize / purge_expired ---------------------------------------------------------------


async def test_resize_grows(dsn: str, backends: Any) -> None:
    """resize() to larger sizes opens up to the new min_size and allows max_size borrowers."""
    name = unique_name("resize-grow")
    async with opened(dsn, name, min_size=1, max_size=2) as pool:
        await pool.resize(3, 4)
        assert (pool.min_size, pool.max_size) == (3, 4)
        await pool.wait(5)
        assert await eventually(backends, name, expect=3) == 3
        conns = [await pool.getconn(timeout=2) for _ in range(4)]
        assert len({id(c) for c in conns}) == 4
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0)
        assert await call(backends, name) == 4
        for conn in conns:
            await pool.putconn(conn)
        assert pool.stats().max_size == 4


async def test_resize_growing_serves_a_waiter(dsn: str) -> None:
    """A request waiting on a full pool is served by the slot a growing resize() adds."""
    name = unique_name("resize-waiter")
    async with opened(dsn, name, min_size=1, max_size=1) as pool:
        held = await pool.getconn()
        waiter = asyncio.create_task(pool.getconn())
        await asyncio.sleep(0.05)
        assert pool.stats().waiting == 1
        await pool.resize(1, 2)
        got = await asyncio.wait_for(waiter, 2)
        assert got is not held
        await pool.putconn(got)
        await pool.putconn(held)


async def test_max_idle_closes_surplus_idle_connections(dsn: str, backends: Any) -> None:
    """Idle connections above min_size close by themselves after max_idle."""
    name = unique_name("max-idle")
    async with opened(dsn, name, min_size=1, max_size=3, max_idle=0.2) as pool:
        conns = [await pool.getconn() for _ in range(3)]
        for conn in conns:
            await pool.putconn(conn)
        assert await call(backends, name) == 3
        assert await eventually(backends, name, expect=1, timeout=3) == 1
        assert pool.stats().size == 1


async def test_resize_shrinks_idle(dsn: str, backends: Any) -> None:
    """resize() to smaller sizes closes surplus idle connections and lowers the bound."""
    name = unique_name("resize-shrink")
    async with opened(dsn, name, min_size=3, max_size=3) as pool:
        await pool.resize(1, 1)
        assert (pool.min_size, pool.max_size) == (1, 1)
        assert await eventually(backends, name, expect=1) == 1
        conn = await pool.getconn(timeout=1)
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0)
        await pool.putconn(conn)
        assert pool.stats().size == 1


async def test_resize_shrinks_borrowed_on_return(dsn: str, backends: Any) -> None:
    """Borrowed connections beyond a smaller max_size are closed as they come back."""
    name = unique_name("resize-borrowed")
    async with opened(dsn, name, min_size=2, max_size=2) as pool:
        a = await pool.getconn()
        b = await pool.getconn()
        await pool.resize(1, 1)
        await pool.putconn(a)
        await pool.putconn(b)
        assert await eventually(backends, name, expect=1) == 1
        stats = pool.stats()
        assert (stats.size, stats.in_use, stats.max_size) == (1, 0, 1)
        conn = await pool.getconn(timeout=1)
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0)
        await pool.putconn(conn)


async def test_purge_expired_closes_idle_connections(dsn: str, backends: Any) -> None:
    """purge_expired() closes connections idle longer than max_idle (then min_size refills)."""
    name = unique_name("purge")
    async with opened(dsn, name, min_size=2, max_size=2, max_idle=0.2) as pool:
        conns = [await pool.getconn(), await pool.getconn()]
        old_pids = {c.info.backend_pid for c in conns}
        for conn in conns:
            await pool.putconn(conn)
        await asyncio.sleep(0.4)
        assert await pool.purge_expired() == 2
        await pool.wait(5)
        assert await eventually(backends, name, expect=2) == 2
        conns = [await pool.getconn(), await pool.getconn()]
        assert not {c.info.backend_pid for c in conns} & old_pids
        for conn in conns:
            await pool.putconn(conn)


async def test_purge_expired_keeps_recent_connections(dsn: str) -> None:
    """purge_expired() leaves connections idle for less than max_idle alone."""
    name = unique_name("purge-recent")
    async with opened(dsn, name, min_size=1, max_size=1, max_idle=30) as pool:
        assert await pool.purge_expired() == 0
        assert pool.stats().size == 1


async def test_close_waits_for_nothing_when_idle(dsn: str) -> None:
    """close() of a pool with nothing borrowed returns at once."""
    name = unique_name("close-idle")
    pool = AsyncConnectionPool(dsn, name=name, min_size=2, max_size=2, timeout=5)
    await pool.open(wait=True, timeout=5)
    closing = asyncio.create_task(pool.close(timeout=5))
    await finish(closing, timeout=1)
    assert closing.exception() is None
    assert pool.closed
