"""Reliability benchmark: server restarts, network cuts, failovers and PgBouncer, pool by
pool, side by side.

``python -m benchmarks reliability`` (or ``python -m benchmarks.reliability``).

Each (scenario, pool) pair gets its own throwaway PostgreSQL cluster
(:func:`aiopgpool.testing.local_cluster`, loopback only) and a pool of
``--pool-size`` connections (min = max). ``--tasks`` asyncio tasks then make
requests back to back: acquire a connection with a ``--timeout`` deadline, run
``SELECT 1``, give it back (the throughput command's adapters). Meanwhile the
scenario injects faults (:mod:`benchmarks.reliability.scenarios`):

``restart``
    The server is stopped (every backend is terminated), stays down ``--down``
    seconds, is started again, then runs ``--up`` seconds; ``--restarts`` times.
``network-cut``
    The pool reaches the server through :class:`aiopgpool.testing.proxy.TcpProxy`.
    The proxy drops every byte for ``--blackhole`` seconds (a partition: nothing
    fails, everything hangs), forwards again for ``--up`` seconds, then resets
    every connection with a TCP RST and keeps resetting new ones for ``--reset``
    seconds, then forwards for ``--up`` seconds.

``failover``, ``read-only``, ``pgbouncer``
    Role changes on a primary + standby pair, and a transaction-mode PgBouncer, for
    aiopgpool, psycopg_pool and asyncpg: see :mod:`benchmarks.reliability.roles`
    (asyncpg takes part in these only). ``--runs N`` repeats every pair, interleaved,
    and their tables give the median (min - max) of the runs.

In ``restart`` and ``network-cut``, every request is classified once
(:mod:`benchmarks.reliability.recorder`):

* **ok**: it succeeded before its deadline + 0.5 s;
* **failed**: it raised a psycopg error (pool errors derive from
  ``psycopg.OperationalError`` in both pools) before its deadline + 0.5 s;
* **hang**: it had not finished 0.5 s after its deadline (whatever it did later;
  a request still unfinished ``--give-up`` seconds after its deadline is
  cancelled and abandoned, as an application-level timeout would do);
* **other**: any other exception, by type.

Also reported: *recovery*, the time from "server back" (``start()`` returned,
or the proxy forwards again) to the first request that completed successfully
after it (median and max over the events; "never" if none did before the next
fault or the end); *lateness*, how long after its deadline each request that
did not succeed ended (negative: it failed before its deadline; unfinished
requests count at their give-up time, so a max shown as ``≥`` is a lower
bound).

A request that fails is retried by its task after ``--error-pause`` seconds
(default 0.05), so that a pool that fails at once does not spin the CPU.

The table is printed as markdown (ready for the README) and everything,
timelines included, is written to ``benchmarks/results/reliability.json``.
"""
