"""The pool's exception classes (re-exported at the package top level).

Every pool error derives from :class:`psycopg.OperationalError`, so code that
already catches psycopg's operational errors (or psycopg2.pool users catching
``PoolError``) keeps working.
"""

from __future__ import annotations

import psycopg

__all__ = ["PoolClosed", "PoolError", "PoolTimeout", "TooManyRequests"]


class PoolError(psycopg.OperationalError):
    """Base of all pool errors.

    Also raised for misuse: returning a connection the pool does not own,
    returning one twice, or calling ``closeall()`` twice.
    """


class PoolTimeout(PoolError):
    """No connection could be had within the timeout.

    With ``timeout=0`` the message is "connection pool exhausted", as in
    psycopg2.pool. When connecting failed, the last connection error is
    chained as ``__cause__``.
    """


class PoolClosed(PoolError):
    """The pool is closed (or not open yet)."""


class TooManyRequests(PoolError):
    """More than ``max_waiting`` requests are already queued."""
