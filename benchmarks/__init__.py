"""aiopgpool's benchmark suite: ``python -m benchmarks [throughput | reliability | cycles]``.

``throughput`` (the default) measures aiopgpool against psycopg_pool, asyncpg and
psycopg2.pool, and against a "floor" (a minimal fair queue of connections with no
pool logic), on a throwaway local PostgreSQL cluster or on ``--dsn``;
``reliability`` injects server restarts and network cuts; ``cycles`` counts
instructions per checkout with callgrind. See ``python -m benchmarks --help``.
"""
