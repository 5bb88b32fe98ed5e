"""pg_simple-style configuration: one process-wide default pool.

``config_pool()`` builds a pool, makes it the process default and returns
it; ``get_pool()`` returns that default. As in pg_simple, ``expiration``
closes connections idle longer than that many seconds, and
``disable_pooling=True`` gives a pool that connects for each checkout and
closes on each return. The pool opens one connection at once but spares
none from expiration, so that no connection stays idle longer than
``expiration``. Connection keywords combine
with a DSN from the environment.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from .dropins import DropInBase, SimpleConnectionPool, check_flag
from .errors import PoolError
from .options import check_count

__all__ = ["config_pool", "get_pool"]

_default: DropInBase[Any] | None = None
_lock = threading.Lock()


def config_pool(
    max_conn: int = 5,
    expiration: float = 60,
    disable_pooling: bool = False,
    pool_manager: type[DropInBase[Any]] = SimpleConnectionPool,
    dsn: str | None = None,
    db_url: str | None = None,
    **connect_kwargs: Any,
) -> DropInBase[Any]:
    """Build the process's default pool and return it (replacing and closing any previous one).

    The connection comes from ``dsn``, else ``db_url``, else keyword
    parameters (``host=``, ``database=``, ...), else the environment's
    ``DATABASE_DSN`` or ``DATABASE_URL``. Exhaustion raises :class:`PoolError`
    at once, as with pg_simple. ``disable_pooling`` takes a bool, or 0 / 1.

    In a child of ``os.fork()``, a previous pool inherited from the parent is
    replaced but not closed: its connections are the parent's.
    """
    global _default
    # Named as the caller named them (the pool would say maxconn, or nothing).
    disable_pooling = check_flag("disable_pooling", disable_pooling)
    check_count("max_conn", max_conn, least=0 if disable_pooling else 1)
    if dsn is not None and db_url is not None:
        raise ValueError("give either dsn or db_url, not both")
    target = dsn if dsn is not None else db_url
    if target is None:
        target = os.environ.get("DATABASE_DSN") or os.environ.get("DATABASE_URL")
        if target is None and not connect_kwargs:
            raise ValueError(
                "no database given: pass dsn=, db_url= or connection keywords, "
                "or set DATABASE_DSN or DATABASE_URL"
            )
    if not (isinstance(pool_manager, type) and issubclass(pool_manager, DropInBase)):
        raise ValueError("pool_manager must be one of aiopgpool's psycopg2.pool-style classes")
    # One connection at once, as pg_simple; none spared: ``expiration``
    # closes *any* connection idle longer than that.
    pool = pool_manager(
        0 if disable_pooling else 1,
        max_conn,
        target or "",
        expiration=expiration,
        disable_pooling=disable_pooling,
        min_kept=0,
        **connect_kwargs,
    )
    with _lock:
        previous, _default = _default, pool
    # A pool inherited through fork() is the parent's: its sockets are shared
    # with the parent, so the child leaves it alone (it refuses any use here).
    if previous is not None and not previous.closed and not previous._inherited:
        previous.closeall()
    return pool


def get_pool() -> DropInBase[Any]:
    """The pool made by :func:`config_pool`; PoolError if there is none yet."""
    pool = _default
    if pool is None:
        raise PoolError("no pool configured: call aiopgpool.config_pool() first")
    return pool
