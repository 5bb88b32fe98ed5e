"""aiopgpool: an asyncio-native PostgreSQL connection pool on psycopg 3.

The asyncio core is :class:`AsyncConnectionPool` (and its null twin). See the
README for the sync facade, the psycopg2.pool drop-ins and pg_simple-style
configuration.
"""

from __future__ import annotations

from .errors import PoolClosed, PoolError, PoolTimeout, TooManyRequests
from .lifecycle import check_connection
from .pool import AsyncConnectionPool, AsyncNullConnectionPool
from .stats import PoolStats

__all__ = [
    "AsyncConnectionPool",
    "AsyncNullConnectionPool",
    "PoolClosed",
    "PoolError",
    "PoolStats",
    "PoolTimeout",
    "TooManyRequests",
    "check_connection",
]
__version__ = "0.1.0"
