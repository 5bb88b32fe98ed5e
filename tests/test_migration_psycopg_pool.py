"""The README's "Migrating from psycopg_pool" examples, run against the test server.

Each ``example_*`` function's body between its ``def`` line and its final
``return`` is the code block printed in the README, verbatim (a test below
compares them).
"""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest

import aiopgpool

# -- 1. before: psycopg_pool ---------------------------------------------------------


def example_before_psycopg_pool(DSN: str) -> Any:
    from psycopg_pool import ConnectionPool

    with ConnectionPool(DSN, min_size=2, max_size=10, timeout=5.0, open=False) as pool:
        with pool.connection() as conn:
            answer = conn.execute("SELECT %s + 1", (41,)).fetchone()[0]
        stats = pool.get_stats()
    return pool, conn, answer, stats


# -- 2. after: the import changes ------------------------------------------------------


def example_after_import_change(DSN: str) -> Any:
    from aiopgpool import ConnectionPool  # was: from psycopg_pool import ConnectionPool

    with ConnectionPool(DSN, min_size=2, max_size=10, timeout=5.0, open=False) as pool:
        with pool.connection() as conn:
            answer = conn.execute("SELECT %s + 1", (41,)).fetchone()[0]
        stats = pool.get_stats()
    return pool, conn, answer, stats


# -- 3. the asyncio pool -----------------------------------------------------------------


def example_async(DSN: str) -> Any:
    import asyncio

    from aiopgpool import AsyncConnectionPool  # was: from psycopg_pool import ...

    async def main() -> int:
        async with (
            AsyncConnectionPool(
                DSN, max_size=10, check=AsyncConnectionPool.check_connection, open=False
            ) as pool,
            pool.connection() as conn,
        ):
            cur = await conn.execute("SELECT %s + 1", (41,))
            row = await cur.fetchone()
            return row[0]

    answer = asyncio.run(main())
    return answer


# -- 4. rotating credentials, reset, close_returns, exceptions ---------------------------


def example_features(DSN: str) -> Any:
    import os

    from aiopgpool import ConnectionPool, PoolTimeout  # was: from psycopg_pool import ...
    from aiopgpool.sync_lifecycle import discard_session_blocking

    def credentials() -> dict[str, str]:
        # Called before every connection attempt: a fresh IAM token, a Vault lease...
        return {"password": os.environ.get("DB_TOKEN", "")}

    pool = ConnectionPool(
        DSN,
        kwargs=credentials,
        reset=discard_session_blocking,  # DISCARD ALL: no SET, LISTEN, temp table left behind
        close_returns=True,
        open=True,
    )
    conn = pool.getconn(2.0)  # the timeout comes first, as in psycopg_pool
    conn.execute("SET search_path TO pg_catalog")
    conn.close()  # back to the pool, its session reset
    try:
        with pool.connection(timeout=2.0) as conn:
            search_path = conn.execute("SHOW search_path").fetchone()[0]
    except PoolTimeout:  # was: except psycopg_pool.PoolTimeout
        search_path = None  # no connection within 2 s
    stats = pool.pop_stats()  # psycopg_pool's keys; the counters start again from 0
    pool.close()
    return pool, conn, search_path, stats


EXAMPLES = [
    example_before_psycopg_pool,
    example_after_import_change,
    example_async,
    example_features,
]

# -- the tests ---------------------------------------------------------------------------


def test_before_psycopg_pool(dsn: str) -> None:
    pool, conn, answer, stats = example_before_psycopg_pool(dsn)
    assert answer == 42
    assert isinstance(pool, psycopg_pool.ConnectionPool)
    assert pool.closed and conn.closed
    assert stats["requests_num"] == 1


def test_after_import_change(dsn: str) -> None:
    before = example_before_psycopg_pool(dsn)
    pool, conn, answer, stats = example_after_import_change(dsn)
    assert answer == before[2] == 42
    assert isinstance(pool, aiopgpool.ConnectionPool)
    assert isinstance(conn, psycopg.Connection)
    assert pool.closed and conn.closed
    assert set(before[3]) <= set(stats)  # the same keys (ours has them all, always)
    assert stats["requests_num"] == before[3]["requests_num"] == 1
    assert stats["pool_min"] == 2 and stats["pool_max"] == 10


def test_async(dsn: str) -> None:
    assert example_async(dsn) == 42


def test_features(dsn: str) -> None:
    pool, conn, search_path, stats = example_features(dsn)
    assert isinstance(pool, aiopgpool.ConnectionPool)
    assert search_path == '"$user", public'  # the borrower's SET did not leak
    assert stats["requests_num"] == 2 and stats["pool_size"] >= 1  # the filler may add one
    assert pool.closed and conn.closed


# -- the README prints these bodies --------------------------------------------------------


def _body(func: Any) -> str:
    """The function's body without its def line and its final return, dedented."""
    lines = inspect.getsource(func).splitlines()
    assert lines[-1].lstrip().startswith("return "), func.__name__
    body = "\n".join(lines[1:-1])
    return _one_blank_line(textwrap.dedent(body))


def _readme_blocks() -> list[str]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("## Migrating from psycopg_pool")
    end = readme.index("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", readme[start:end], re.S)
    return [_one_blank_line(block) for block in blocks]


def _one_blank_line(code: str) -> str:
    """Top-level code has two blank lines around a def, a function body one."""
    return re.sub(r"\n{3,}", "\n\n", code).strip()


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_prints_the_examples(index: int) -> None:
    blocks = _readme_blocks()
    assert len(blocks) == len(EXAMPLES)
    assert blocks[index] == _body(EXAMPLES[index])
