"""aiopgpool: an asyncio-native PostgreSQL connection pool on psycopg 3.

The asyncio core is :class:`AsyncConnectionPool` (and its null twin). See the
README for the sync facade, the psycopg2.pool drop-ins and pg_simple-style
configuration.
"""

from __future__ import annotations

# First: decides whether the compiled hot-path modules or their sources load.
from . import native as native
from .config import config_pool, get_pool
from .dropins import (
    AbstractConnectionPool,
    PersistentConnectionPool,
    SimpleConnectionPool,
    ThreadedConnectionPool,
)
from .errors import PoolClosed, PoolError, PoolTimeout, TooManyRequests
from .lifecycle import check_connection, discard_session
from .pool import AsyncConnectionPool, AsyncNullConnectionPool
from .replicated import AsyncReplicatedPool
from .stats import Histogram, PoolStats
from .sync_pool import ConnectionPool, NullConnectionPool
from .sync_replicated import ReplicatedPool

__all__ = [
    "AbstractConnectionPool",
    "AsyncConnectionPool",
    "AsyncNullConnectionPool",
    "AsyncReplicatedPool",
    "ConnectionPool",
    "Histogram",
    "NullConnectionPool",
    "PersistentConnectionPool",
    "PoolClosed",
    "PoolError",
    "PoolStats",
    "PoolTimeout",
    "ReplicatedPool",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
    "TooManyRequests",
    "check_connection",
    "config_pool",
    "discard_session",
    "get_pool",
]
__version__ = "0.1.0"
