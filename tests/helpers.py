"""Helpers shared by the core tests: pool names, opened pools, bounded polling (no fixtures)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg

from aiopgpool import AsyncConnectionPool
from aiopgpool.pooler import BACKEND_PID_QUERY
from aiopgpool.testing import ReplicatedCluster

_seq = itertools.count(1)


def unique_name(label: str) -> str:
    """A pool name (so an application_name) unique in this run and under 64 bytes."""
    return f"{label[:40]}-{os.getpid()}-{next(_seq)}"


def run_python(script: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter with ``env`` added; assert it exited 0."""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


async def call(func: Callable[..., Any], *args: Any) -> Any:
    """Call a fixture helper that may be sync or async."""
    result = func(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def eventually(
    func: Callable[..., Any], *args: Any, expect: Any, timeout: float = 5.0
) -> Any:
    """Poll ``func(*args)`` until it returns ``expect`` or ``timeout`` passes; the last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await call(func, *args)
        if value == expect or loop.time() >= deadline:
            return value
        await asyncio.sleep(0.02)


def eventually_blocking(func: Callable[[], Any], expect: Any, timeout: float = 5.0) -> Any:
    """:func:`eventually` for sync code: poll ``func()`` until it returns ``expect``."""
    deadline = time.monotonic() + timeout
    while True:
        value = func()
        if value == expect or time.monotonic() >= deadline:
            return value
        time.sleep(0.02)


@contextlib.asynccontextmanager
async def opened(dsn: str, name: str, **options: Any) -> AsyncIterator[AsyncConnectionPool]:
    """An open pool with ``min_size`` connections ready; closed (not waited on) at the end."""
    options.setdefault("timeout", 5.0)
    pool = AsyncConnectionPool(dsn, name=name, **options)
    await pool.open(wait=True, timeout=5.0)
    try:
        yield pool
    finally:
        if not pool.closed:
            await pool.closeall()


async def monitor(dsn: str) -> psycopg.AsyncConnection[Any]:
    """A separate autocommit connection, outside any pool, to look at the server."""
    return await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, application_name="core-tests-monitor"
    )


async def activity(dsn: str, name: str) -> list[tuple[Any, ...]]:
    """(pid, state, query) of the backends whose application_name is ``name``."""
    async with await monitor(dsn) as mon:
        cur = await mon.execute(
            "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %s",
            (name,),
        )
        return await cur.fetchall()


def closed_port() -> int:
    """A local TCP port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def finish(task: asyncio.Task[Any], timeout: float = 5.0) -> None:
    """Wait (bounded) for a task to end, whatever its outcome."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    assert task in done, "task did not finish in time"


class PoolerQuestionsAsync(psycopg.AsyncConnection):  # type: ignore[type-arg]
    """Counts the pool's pooler question (``asked``), over every connection of this class."""

    asked = 0

    async def execute(self, query, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        if query == BACKEND_PID_QUERY:
            type(self).asked += 1
        return await super().execute(query, *args, **kwargs)


class PoolerQuestionsSync(psycopg.Connection):  # type: ignore[type-arg]
    """:class:`PoolerQuestionsAsync` for sync connections (counted from several threads)."""

    asked = 0
    _lock = threading.Lock()

    def execute(self, query, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        if query == BACKEND_PID_QUERY:
            with self._lock:
                type(self).asked += 1
        return super().execute(query, *args, **kwargs)


# A query the server would run long after the test, unless it is cancelled.
LONG_SLEEP = "SELECT pg_sleep(120)"


def running_long_sleep(dsn: str, application_name: str) -> int:
    """How many backends with ``application_name`` are running :data:`LONG_SLEEP` already.

    Closing before a backend has read its query would test nothing: a socket
    closed with the query unread ends that backend at once.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND state = 'active' AND query = %s",
            (application_name, LONG_SLEEP),
        ).fetchone()
    return int(row[0]) if row else 0


def query(conn: Any, sql: str, args: Any = None) -> Any:
    """One row, through the DB-API cursor both drivers share (psycopg 3 and psycopg2)."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> float:
    """Wait until ``predicate()`` is true; how long it took (AssertionError after ``timeout``)."""
    start = time.monotonic()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def chain_texts(exc: BaseException | None) -> list[str]:
    """str/repr/args of an exception and of every exception chained to it (cause or context)."""
    texts: list[str] = []
    seen: set[int] = set()
    todo = [exc]
    while todo:
        one = todo.pop()
        if one is None or id(one) in seen:
            continue
        seen.add(id(one))
        texts += [str(one), repr(one), *map(str, one.args)]
        todo += [one.__cause__, one.__context__]
    return texts


def log_texts(records: list[logging.LogRecord]) -> list[str]:
    """Every record as a handler would print it (message, traceback, stack)."""
    texts: list[str] = []
    for record in records:
        texts.append(record.getMessage())
        if record.exc_info:
            texts.append(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            texts.append(record.stack_info)
    return texts


@contextlib.contextmanager
def primary_and_standby(table: str) -> Iterator[ReplicatedCluster]:
    """A primary and one caught-up standby, with the table ``table`` (its definition:
    ``"name (columns)"``) created on the primary, for tests that write and move roles."""
    with ReplicatedCluster(standbys=1) as cluster:
        with psycopg.connect(cluster.primary.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table}")
        cluster.wait_caught_up()
        yield cluster
