"""Run by test_closing_in_use in a process of its own, with ``PSYCOPG_IMPL=python`` on a
libpq older than 17: a query running on a connection that is closed (``close``) or handed
back (``return``) is cancelled on the server through ``PQcancel``; with the network to the
server cut (``return-cut``: through a proxy that drops every byte), the return does not wait
for ``PQcancel``, which has no timeout.

Usage: ``python cancel_on_old_libpq.py DSN {async,sync} {close,return,return-cut}``. Exits 0
when that held, 1 if not, 2 if this psycopg is not the Python implementation on libpq < 17.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from contextlib import suppress
from typing import Any

try:
    import psycopg
except ImportError:  # no libpq for psycopg's Python implementation
    sys.exit(2)

from helpers import LONG_SLEEP, eventually_blocking, running_long_sleep
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import aiopgpool.lifecycle
import aiopgpool.sync_lifecycle
from aiopgpool import AsyncConnectionPool, ConnectionPool
from aiopgpool.testing.proxy import TcpProxy

WITHIN = 4.0
#: How long a return waits for the cancelled query to let go, here.
CANCEL_TIMEOUT = 1.0


def wait_for_count(dsn: str, name: str, expect: int) -> bool:
    """True once ``expect`` backends of the pool ``name`` run :data:`LONG_SLEEP`."""
    count = eventually_blocking(lambda: running_long_sleep(dsn, name), expect, timeout=WITHIN)
    return bool(count == expect)


async def run_async(dsn: str, name: str, how: str, proxy: TcpProxy | None) -> bool:
    conninfo = dsn if proxy is None else through(proxy, dsn)
    pool = AsyncConnectionPool(conninfo, name=name, min_size=0, max_size=1)
    await pool.open()
    try:
        conn = await pool.getconn()
        query = asyncio.create_task(conn.execute(LONG_SLEEP))
        assert await asyncio.to_thread(wait_for_count, dsn, name, 1)
        if how == "close":
            await pool.closeall()
        elif proxy is None:
            await pool.putconn(conn)
        else:
            proxy.blackhole()
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.05)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            try:
                await asyncio.wait_for(pool.putconn(conn), CANCEL_TIMEOUT + WITHIN)
            except TimeoutError:
                return False
            finally:
                ticker.cancel()
            # The discard shut the socket down: the query fails. Left pending, it would
            # be cancelled by asyncio.run, and psycopg would then wait on PQcancel.
            await asyncio.wait({query}, timeout=WITHIN)
            if not query.done():
                os._exit(1)
            # The wait for the query to let go went on in the loop, which kept turning.
            return ticks >= 10 and isinstance(query.exception(), psycopg.OperationalError)
        with suppress(psycopg.Error):
            await asyncio.wait_for(query, WITHIN)
        return await asyncio.to_thread(wait_for_count, dsn, name, 0)
    finally:
        await pool.close()


def run_sync(dsn: str, name: str, how: str, proxy: TcpProxy | None) -> bool:
    conninfo = dsn if proxy is None else through(proxy, dsn)
    with ConnectionPool(conninfo, name=name, min_size=0, max_size=1) as pool:
        conn = pool.getconn()

        def query(conn: psycopg.Connection[Any]) -> None:
            with suppress(psycopg.Error):
                conn.execute(LONG_SLEEP)

        thread = threading.Thread(target=query, args=(conn,), daemon=True)
        thread.start()
        assert wait_for_count(dsn, name, 1)
        if how == "close":
            pool.closeall()
        elif proxy is None:
            pool.putconn(conn)
        else:
            proxy.blackhole()
            returning = threading.Thread(target=pool.putconn, args=(conn,), daemon=True)
            returning.start()
            returning.join(CANCEL_TIMEOUT + WITHIN)
            return not returning.is_alive()
        thread.join(WITHIN)
        return wait_for_count(dsn, name, 0)


def through(proxy: TcpProxy, dsn: str) -> str:
    """``dsn``, reached through ``proxy``."""
    return make_conninfo(dsn, host="127.0.0.1", port=str(proxy.port))


def main() -> int:
    dsn, family, how = sys.argv[1:4]
    if psycopg.pq.__impl__ != "python" or psycopg.capabilities.has_cancel_safe():
        return 2
    name = f"old-libpq-{family}-{how}-{uuid.uuid4().hex[:8]}"
    aiopgpool.lifecycle.CANCEL_TIMEOUT = CANCEL_TIMEOUT
    aiopgpool.sync_lifecycle.CANCEL_TIMEOUT = CANCEL_TIMEOUT
    proxy = None
    if how == "return-cut":
        params = conninfo_to_dict(dsn)
        proxy = TcpProxy(str(params.get("host", "127.0.0.1")), int(str(params.get("port", 5432))))
        proxy.start()
    try:
        if family == "async":
            held = asyncio.run(run_async(dsn, name, how, proxy))
        else:
            held = run_sync(dsn, name, how, proxy)
    finally:
        if proxy is not None:
            proxy.close()
    return 0 if held else 1


if __name__ == "__main__":
    sys.stdout.flush()
    # os._exit: a thread still in PQcancel (the cut network) must not hold up the exit.
    os._exit(main())
