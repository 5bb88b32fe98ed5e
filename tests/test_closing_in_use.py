"""Closing connections that are in use: close() / closeall() never pull a socket from under a
query in progress (aiopgpool.teardown).

A borrowed connection running a query when its pool closes is shut down, so its query fails
at once, and its descriptor is closed only once that query has let go. The query is also
cancelled on the server, which would otherwise run it to its end. Closed under the query,
uvloop aborted the process (libuv's epoll flush calls abort() when a staged registration meets
a closed descriptor), and asyncio or a thread would watch whatever socket next got its number.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import psycopg
import psycopg.waiting
import psycopg2
import pytest
from helpers import LONG_SLEEP, eventually, eventually_blocking, running_long_sleep, unique_name
from psycopg.conninfo import make_conninfo

import aiopgpool.psycopg2
import aiopgpool.teardown
from aiopgpool import AsyncConnectionPool, ConnectionPool
from aiopgpool.psycopg2 import ThreadedConnectionPool
from aiopgpool.testing import PostgresServer, terminate_backends
from aiopgpool.testing.proxy import TcpProxy

SLEEP = "SELECT pg_sleep(5)"
# Each test's queries would take 5 s: ending well within that shows the close woke them.
WOKEN_WITHIN = 4.0


def descriptor_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def finished(conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> bool:
    """True once libpq's connection is freed and its descriptor closed."""
    return conn.pgconn.pgconn_ptr is None


def run_now(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends to its end, synchronously."""
    with pytest.raises(StopIteration):
        coro.send(None)


@pytest.fixture
def cancel_conn() -> None:
    """libpq >= 17's cancel connection, which the close's cancel request needs."""
    if not psycopg.capabilities.has_cancel_safe():
        pytest.skip("this libpq has no cancel connection (libpq < 17): no cancel request")


async def busy(
    dsn: str, pool: AsyncConnectionPool, n: int
) -> tuple[list[Any], list[asyncio.Task[Any]]]:
    """``n`` borrowed connections, each running :data:`LONG_SLEEP` on the server, in its own
    task."""
    conns = [await pool.getconn() for _ in range(n)]

    async def query(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(LONG_SLEEP)

    tasks = [asyncio.create_task(query(conn)) for conn in conns]
    # Every query running on the server, every task waiting on its socket:
    assert await eventually(running_long_sleep, dsn, pool.name, expect=n) == n
    return conns, tasks


@pytest.mark.parametrize("how", ["close", "closeall"])
async def test_closing_a_pool_shuts_down_and_cancels_queries_in_progress(
    dsn: str, backends: Any, how: str, cancel_conn: None
) -> None:
    """Shut down, the client is gone, but a server running a query reads nothing until the
    query ends: without a cancel request these backends would sleep on for two minutes."""
    name = unique_name(f"in-use-{how}")
    pool = AsyncConnectionPool(dsn, name=name, min_size=0, max_size=3, timeout=5)
    await pool.open()
    conns, tasks = await busy(dsn, pool, 3)
    fds = [conn.pgconn.socket for conn in conns]
    if how == "close":
        await pool.close(timeout=0.1)
    else:
        await pool.closeall()
    assert pool.closed
    # Shut down, not closed: the queries' waits still hold these descriptors.
    assert all(descriptor_open(fd) for fd in fds)
    assert not any(finished(conn) for conn in conns)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WOKEN_WITHIN)
    assert all(isinstance(r, psycopg.OperationalError) for r in results), results
    # Closed once each query let go; cancelled on the server.
    assert await eventually(lambda: all(finished(c) for c in conns), expect=True) is True
    assert await eventually(backends, name, expect=0, timeout=30) == 0


async def test_a_close_between_a_wait_and_the_next_poll_does_not_abort(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash, replayed deterministically: psycopg's wait re-registers its socket every
    0.1 s; the pool closes in the same pass of the loop, before the loop polls. On uvloop the
    staged registration of a closed descriptor aborted the process."""
    pool = AsyncConnectionPool(dsn, name=unique_name("in-use-pass"), min_size=0, max_size=1)
    await pool.open()
    conn = await pool.getconn()
    fd = conn.pgconn.socket
    armed = asyncio.Event()
    fired: list[int] = []
    real = psycopg.waiting.get_running_loop

    class Hooked:
        """The running loop, with ``add_reader`` closing the pool right after it."""

        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self._loop = loop

        def add_reader(self, fileno: int, callback: Callable[..., Any], *args: Any) -> None:
            self._loop.add_reader(fileno, callback, *args)
            if armed.is_set() and fileno == fd and not fired:
                fired.append(fileno)
                run_now(pool.closeall())  # no suspension point: same pass, before the poll

        def __getattr__(self, attr: str) -> Any:
            return getattr(self._loop, attr)

    monkeypatch.setattr(psycopg.waiting, "get_running_loop", lambda: Hooked(real()))
    task = asyncio.create_task(conn.execute(SLEEP))
    await asyncio.sleep(0.05)
    armed.set()  # the next re-registration (within 0.1 s) closes the pool
    with pytest.raises(psycopg.OperationalError):
        await asyncio.wait_for(task, WOKEN_WITHIN)
    assert fired == [fd]
    assert pool.closed
    assert await eventually(lambda: finished(conn), expect=True) is True


def test_closing_the_sync_pool_shuts_down_and_cancels_a_query_in_another_thread(
    dsn: str, backends: Any, cancel_conn: None
) -> None:
    name = unique_name("in-use-sync")
    pool = ConnectionPool(dsn, name=name, min_size=0, max_size=1, timeout=5)
    pool.open()
    conn = pool.getconn()
    errors: list[BaseException] = []

    def query() -> None:
        try:
            conn.execute(LONG_SLEEP)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=query)
    thread.start()
    assert eventually_blocking(lambda: running_long_sleep(dsn, name), 1) == 1
    pool.close(timeout=0.1)
    thread.join(WOKEN_WITHIN)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], psycopg.OperationalError), errors
    assert eventually_blocking(lambda: finished(conn), True) is True
    assert eventually_blocking(lambda: backends(name), 0, timeout=30) == 0


def test_the_sync_pool_closes_a_connection_only_once_its_call_lets_go(dsn: str) -> None:
    """psycopg holds ``conn.lock`` through every call: held here, as a call in another thread
    would, the connection is shut down by close() but its descriptor stays open until the lock
    is let go."""
    pool = ConnectionPool(dsn, name=unique_name("in-use-lock"), min_size=0, max_size=1)
    pool.open()
    conn = pool.getconn()
    fd = conn.pgconn.socket
    locked, release = threading.Event(), threading.Event()

    def call_in_progress() -> None:
        with conn.lock:
            locked.set()
            release.wait()

    thread = threading.Thread(target=call_in_progress)
    thread.start()
    locked.wait()
    pool.close(timeout=0.1)
    assert descriptor_open(fd) and not finished(conn)
    release.set()
    thread.join()
    assert eventually_blocking(lambda: finished(conn), True) is True


def test_psycopg2_closeall_does_not_wait_for_a_query_in_another_thread(dsn: str) -> None:
    """psycopg2's close() takes the connection's mutex: closeall() used to hold the pool's loop
    thread until another thread's query ended."""
    pool = ThreadedConnectionPool(0, 2, dsn, application_name=unique_name("in-use-pg2"))
    conn = pool.getconn()
    errors: list[BaseException] = []

    def query() -> None:
        try:
            with conn.cursor() as cur:
                cur.execute(SLEEP)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=query)
    thread.start()
    eventually_blocking(
        lambda: conn.info.transaction_status, psycopg2.extensions.TRANSACTION_STATUS_ACTIVE
    )
    closer = threading.Thread(target=pool.closeall)
    closer.start()
    closer.join(WOKEN_WITHIN)
    thread.join(WOKEN_WITHIN)
    assert not closer.is_alive() and not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], psycopg2.Error), errors
    assert conn.closed


@pytest.mark.parametrize("in_transaction", [False, True])
def test_psycopg2_shuts_down_a_connection_closed_outside_idle(
    dsn: str, monkeypatch: pytest.MonkeyPatch, in_transaction: bool
) -> None:
    """Not only mid-query: psycopg2 sends BEGIN and then the query under one hold of the
    connection's mutex, and in between the status is INTRANS (a CI run under load
    closed in that window, and close() waited for the 5 s query)."""
    shut: list[int] = []
    monkeypatch.setattr(aiopgpool.psycopg2, "shut_down", lambda fileno: shut.append(fileno))
    pool = ThreadedConnectionPool(0, 1, dsn, application_name=unique_name("in-use-pg2-tx"))
    conn = pool.getconn()
    fileno = conn.fileno()
    if in_transaction:
        conn.cursor().execute("SELECT 1")  # not autocommit: the transaction stays open
    pool.closeall()
    assert conn.closed
    assert shut == ([fileno] if in_transaction else [])


async def test_no_cancel_request_for_a_connection_in_use_but_not_in_a_query(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Busy (its lock held) but idle on the server: the shut-down socket ends its backend."""
    sent: list[object] = []
    monkeypatch.setattr(aiopgpool.teardown, "_send_cancel", sent.append)
    pool = AsyncConnectionPool(dsn, name=unique_name("cancel-idle"), min_size=0, max_size=1)
    await pool.open()
    conn = await pool.getconn()
    async with conn.lock:
        await pool.closeall()
        assert not finished(conn)
    assert await eventually(lambda: finished(conn), expect=True) is True
    assert sent == []


@pytest.fixture
def gil_holding_cancel(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """psycopg's C implementation on libpq < 17, whose only cancel (``PQcancel``) holds the
    GIL for as long as an unreachable server takes; returns the cancels tried (none, it is
    hoped), by the close or by the pool's return."""
    monkeypatch.setattr(psycopg.capabilities, "has_cancel_safe", lambda: False)
    monkeypatch.setattr(psycopg.pq, "__impl__", "c")
    tried: list[object] = []
    monkeypatch.setattr(aiopgpool.teardown, "_send_cancel", tried.append)
    monkeypatch.setattr(aiopgpool.teardown, "_send_old_cancel", tried.append)
    return tried


@pytest.mark.parametrize("how", ["closeall", "putconn"])
async def test_no_cancel_where_it_could_stop_the_process(
    dsn: str, gil_holding_cancel: list[object], how: str
) -> None:
    """Closed, or handed back, mid-query: no cancel where only a GIL-holding one exists. The
    socket is shut down under the query, whose caller fails at once; the server runs the
    query on."""
    pool = AsyncConnectionPool(dsn, name=unique_name(f"cancel-old-{how}"), min_size=0, max_size=1)
    await pool.open()
    try:
        conns, tasks = await busy(dsn, pool, 1)
        if how == "closeall":
            await pool.closeall()
        else:
            await pool.putconn(conns[0])
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), WOKEN_WITHIN
        )
        assert isinstance(results[0], psycopg.OperationalError), results
        assert gil_holding_cancel == []
        assert running_long_sleep(dsn, pool.name) == 1  # on the server, the query runs on
    finally:
        terminate_backends(dsn, pool.name)
        await pool.close()


def test_no_cancel_where_it_could_stop_the_process_sync(
    dsn: str, gil_holding_cancel: list[object]
) -> None:
    """The sync pool, handed back a connection mid-query (in another thread): no cancel
    where only a GIL-holding one exists; that thread's query fails at once."""
    name = unique_name("cancel-old-sync")
    errors: list[BaseException] = []
    with ConnectionPool(dsn, name=name, min_size=0, max_size=1) as pool:
        try:
            conn = pool.getconn()

            def query() -> None:
                try:
                    conn.execute(LONG_SLEEP)
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=query, daemon=True)
            thread.start()
            assert eventually_blocking(lambda: running_long_sleep(dsn, name), 1) == 1
            pool.putconn(conn)
            thread.join(WOKEN_WITHIN)
            assert not thread.is_alive()
            assert len(errors) == 1 and isinstance(errors[0], psycopg.OperationalError), errors
            assert gil_holding_cancel == []
            assert running_long_sleep(dsn, name) == 1
        finally:
            terminate_backends(dsn, name)


def old_libpq_run(dsn: str, tmp_path: Path, family: str, how: str) -> None:
    """Run ``cancel_on_old_libpq.py`` with psycopg's Python implementation; skip where it has no
    libpq < 17. In a process of its own: the implementation is chosen at import."""
    script = Path(__file__).with_name("cancel_on_old_libpq.py")
    env = {**os.environ, "PSYCOPG_IMPL": "python"}
    done = subprocess.run(
        [sys.executable, str(script), dsn, family, how],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode == 2:
        pytest.skip("no libpq older than 17 for psycopg's Python implementation here")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("how", ["close", "return"])
@pytest.mark.parametrize("family", ["async", "sync"])
def test_the_python_implementation_cancels_on_libpq_older_than_17(
    dsn: str, tmp_path: Path, family: str, how: str
) -> None:
    """psycopg's Python implementation calls PQcancel through ctypes, which lets the GIL go:
    on libpq < 17 (the system's, where it is older) a query on a connection closed or handed
    back in use is still cancelled."""
    old_libpq_run(dsn, tmp_path, family, how)


@pytest.mark.parametrize("family", ["async", "sync"])
def test_a_return_does_not_wait_for_pqcancel_on_a_cut_network(
    own_server: PostgresServer, tmp_path: Path, family: str
) -> None:
    """libpq < 17's PQcancel has no timeout: with the network to the server cut, a connection
    handed back mid-query is cancelled from a thread of its own, and the return gives up
    waiting for the query after CANCEL_TIMEOUT (the async pool's loop turning meanwhile). A
    server of its own, on loopback, behind a proxy that cuts it off."""
    old_libpq_run(own_server.dsn, tmp_path, family, "return-cut")


async def test_a_cancel_request_to_an_unreachable_server_gives_up_and_stops_nothing(
    own_server: PostgresServer,
    cancel_conn: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The network to the server is cut while a query runs: the close's cancel request gets
    no answer. It gives up after CANCEL_TIMEOUT and says so at DEBUG; meanwhile the rest of
    the process runs on (psycopg's blocking cancel would hold the GIL all along). A server of
    its own, on loopback, behind a proxy that cuts it off."""
    monkeypatch.setattr(aiopgpool.teardown, "CANCEL_TIMEOUT", 1.0)
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    with TcpProxy(own_server.host, own_server.port) as cut:
        # connect_timeout: a cancel request that blocks gives up too (after freezing the loop).
        conninfo = make_conninfo(
            own_server.dsn, host="127.0.0.1", port=str(cut.port), connect_timeout="3"
        )
        pool = AsyncConnectionPool(conninfo, name=unique_name("cancel-cut"), min_size=0, max_size=1)
        await pool.open()
        conn = await pool.getconn()
        task = asyncio.create_task(conn.execute(LONG_SLEEP))
        assert await eventually(running_long_sleep, own_server.dsn, pool.name, expect=1) == 1
        cut.blackhole()
        await pool.closeall()
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(task, WOKEN_WITHIN)
        ticks = 0
        while "could not cancel the query" not in caplog.text and ticks < 200:
            await asyncio.sleep(0.05)  # the loop turns while the request waits
            ticks += 1
        assert "could not cancel the query" in caplog.text
        assert ticks >= 10, "the loop stood still while the cancel request waited"
        cut.forward()
