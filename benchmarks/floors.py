"""The floors: minimal fair queues of psycopg connections with no pool logic.

A floor hands idle connections out most-recently-returned first, serves waiters
first come, first served by direct hand-off (a returned connection goes straight
to the oldest waiter), and connects lazily up to ``max_size``. It checks nothing,
resets nothing and never times out: it is what a pool costs at the very least,
so every pool's throughput is reported as a ratio to it.

The sync floor can also hand out the least recently returned connection first
(``fifo=True``, psycopg_pool's order): the benchmark runs that variant beside
the others as ``sync/floor-fifo``, to show what the order alone does.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

import psycopg


class AsyncFloorPool:
    """The async floor: a deque of idle connections and a deque of waiter futures."""

    def __init__(self, conninfo: str, max_size: int, kwargs: dict[str, Any]) -> None:
        self._conninfo = conninfo
        self._kwargs = kwargs
        self._max_size = max_size
        self._size = 0
        self._idle: deque[psycopg.AsyncConnection[Any]] = deque()
        self._waiters: deque[asyncio.Future[psycopg.AsyncConnection[Any]]] = deque()

    async def fill(self, count: int) -> None:
        """Connect ``count`` connections (concurrently) and make them idle."""
        self._size += count
        try:
            conns = await asyncio.gather(*(self._connect() for _ in range(count)))
        except BaseException:
            self._size -= count
            raise
        self._idle.extend(conns)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)

    async def getconn(self) -> psycopg.AsyncConnection[Any]:
        """Return an idle connection, a new one (below max_size), or wait in line."""
        if self._idle:
            return self._idle.pop()
        if self._size < self._max_size:
            self._size += 1
            try:
                return await self._connect()
            except BaseException:
                self._size -= 1
                raise
        waiter: asyncio.Future[psycopg.AsyncConnection[Any]]
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.putconn(waiter.result())  # handed over just as we were cancelled
            raise

    def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Hand ``conn`` to the oldest live waiter, or make it the first idle one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    async def aputconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """:meth:`putconn`, awaited: the same call shape as the pools' ``putconn``."""
        self.putconn(conn)

    async def close(self) -> None:
        """Close the idle connections (the floor does not track borrowed ones)."""
        while self._idle:
            await self._idle.pop().close()


class _Waiter:
    """One blocked thread: ``ready`` is held until a connection is handed over."""

    __slots__ = ("conn", "ready")

    def __init__(self) -> None:
        self.conn: psycopg.Connection[Any] | None = None
        self.ready = threading.Lock()
        self.ready.acquire()


class SyncFloorPool:
    """The sync floor: a lock, a deque of idle connections, a deque of waiters."""

    def __init__(
        self, conninfo: str, max_size: int, kwargs: dict[str, Any], *, fifo: bool = False
    ) -> None:
        self._conninfo = conninfo
        self._kwargs = kwargs
        self._max_size = max_size
        self._size = 0
        # fifo: hand out the least recently returned idle connection (psycopg_pool's order).
        self._fifo = fifo
        self._lock = threading.Lock()
        self._idle: deque[psycopg.Connection[Any]] = deque()
        self._waiters: deque[_Waiter] = deque()

    def fill(self, count: int) -> None:
        """Connect ``count`` connections and make them idle."""
        for _ in range(count):
            conn = psycopg.Connection.connect(self._conninfo, **self._kwargs)
            with self._lock:
                self._size += 1
                self._idle.append(conn)

    def getconn(self) -> psycopg.Connection[Any]:
        """Return an idle connection, a new one (below max_size), or wait in line."""
        with self._lock:
            if self._idle:
                return self._idle.popleft() if self._fifo else self._idle.pop()
            if self._size < self._max_size:
                self._size += 1
                waiter = None
            else:
                waiter = _Waiter()
                self._waiters.append(waiter)
        if waiter is None:
            try:
                return psycopg.Connection.connect(self._conninfo, **self._kwargs)
            except BaseException:
                with self._lock:
                    self._size -= 1
                raise
        waiter.ready.acquire()
        assert waiter.conn is not None
        return waiter.conn

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        """Hand ``conn`` to the oldest waiter, or make it the first idle one."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.conn = conn
                waiter.ready.release()
                return
            self._idle.append(conn)

    def close(self) -> None:
        """Close the idle connections (the floor does not track borrowed ones)."""
        with self._lock:
            idle, self._idle = list(self._idle), deque()
        for conn in idle:
            conn.close()
