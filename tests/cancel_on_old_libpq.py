"""Run by test_closing_in_use in a process of its own, with ``PSYCOPG_IMPL=python`` on a
libpq older than 17: a query running on a connection that is closed (``close``) or handed
back (``return``) is cancelled on the server through ``PQcancel``.

Usage: ``python cancel_on_old_libpq.py DSN {async,sync} {close,return}``. Exits 0 once the
server no longer runs the query, 1 if it still does after a few seconds, 2 if this psycopg is
not the Python implementation on libpq < 17.
"""

from __future__ import annotations

import asyncio
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

from aiopgpool import AsyncConnectionPool, ConnectionPool

WITHIN = 4.0


def wait_for_count(dsn: str, name: str, expect: int) -> bool:
    """True once ``expect`` backends of the pool ``name`` run :data:`LONG_SLEEP`."""
    count = eventually_blocking(lambda: running_long_sleep(dsn, name), expect, timeout=WITHIN)
    return bool(count == expect)


async def run_async(dsn: str, name: str, how: str) -> bool:
    pool = AsyncConnectionPool(dsn, name=name, min_size=0, max_size=1)
    await pool.open()
    try:
        conn = await pool.getconn()
        query = asyncio.create_task(conn.execute(LONG_SLEEP))
        assert await asyncio.to_thread(wait_for_count, dsn, name, 1)
        if how == "close":
            await pool.closeall()
        else:
            await pool.putconn(conn)
        with suppress(psycopg.Error):
            await asyncio.wait_for(query, WITHIN)
        return await asyncio.to_thread(wait_for_count, dsn, name, 0)
    finally:
        await pool.close()


def run_sync(dsn: str, name: str, how: str) -> bool:
    with ConnectionPool(dsn, name=name, min_size=0, max_size=1) as pool:
        conn = pool.getconn()

        def query(conn: psycopg.Connection[Any]) -> None:
            with suppress(psycopg.Error):
                conn.execute(LONG_SLEEP)

        thread = threading.Thread(target=query, args=(conn,), daemon=True)
        thread.start()
        assert wait_for_count(dsn, name, 1)
        if how == "close":
            pool.closeall()
        else:
            pool.putconn(conn)
        thread.join(WITHIN)
        return wait_for_count(dsn, name, 0)


def main() -> int:
    dsn, family, how = sys.argv[1:4]
    if psycopg.pq.__impl__ != "python" or psycopg.capabilities.has_cancel_safe():
        return 2
    name = f"old-libpq-{family}-{how}-{uuid.uuid4().hex[:8]}"
    gone = asyncio.run(run_async(dsn, name, how)) if family == "async" else run_sync(dsn, name, how)
    return 0 if gone else 1


if __name__ == "__main__":
    sys.exit(main())
