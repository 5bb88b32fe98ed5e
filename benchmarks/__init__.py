"""aiopgpool's benchmark suite: ``python -m benchmarks``.

Measures aiopgpool against psycopg_pool, asyncpg and psycopg2.pool, and against a
"floor" (a minimal fair queue of connections with no pool logic), on a throwaway
local PostgreSQL cluster or on ``--dsn``. See ``python -m benchmarks --help``.
"""
