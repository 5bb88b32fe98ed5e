"""Read replicas: what AsyncReplicatedPool buys and what its routing costs.

``python -m benchmarks.replicas [--rounds 5] [--duration 2] [--tasks 16]`` starts a
throwaway primary with two streaming standbys (:class:`~aiopgpool.testing.ReplicatedCluster`)
and measures, in paired rounds in one run (the order of the pair alternates):

* read throughput: ``tasks`` tasks doing ``SELECT 1``, or a primary-key read of a
  10,000-row table, through ``AsyncReplicatedPool.getconn(read_only=True)`` (two
  replicas) against an ``AsyncConnectionPool`` on the primary alone, and, as a control,
  the same reads through the replicated pool's primary path (``read_only=False``);
* the routing's own cost: one task doing getconn/putconn and nothing else, through the
  replicated pool (reads, writes) against a plain pool, in ns per pair.

Ratios are per round, then the median over rounds is printed (and the spread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiopgpool import AsyncConnectionPool, AsyncReplicatedPool
from aiopgpool.testing import ReplicatedCluster

KWARGS: dict[str, Any] = {"autocommit": True}
ROWS = 10_000


async def _throughput(
    get: Callable[[], Awaitable[Any]],
    put: Callable[[Any], Awaitable[None]],
    query: str,
    tasks: int,
    duration: float,
) -> float:
    """Operations per second: ``tasks`` tasks repeat get, query and fetch, put."""
    done = [0] * tasks
    deadline = time.perf_counter() + duration
    rng = random.Random(1)

    async def worker(i: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            conn = await get()
            try:
                cur = await conn.execute(query, (rng.randint(1, ROWS),) if "%s" in query else None)
                await cur.fetchone()
            finally:
                await put(conn)
            n += 1
        done[i] = n

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(tasks)))
    return sum(done) / (time.perf_counter() - start)


async def _pairs(
    get: Callable[[], Awaitable[Any]], put: Callable[[Any], Awaitable[None]], n: int
) -> float:
    """ns per getconn/putconn pair, one task, nothing else."""
    start = time.perf_counter_ns()
    for _ in range(n):
        await put(await get())
    return (time.perf_counter_ns() - start) / n


async def run(rounds: int, duration: float, tasks: int, pairs: int) -> dict[str, Any]:
    with ReplicatedCluster(standbys=2) as rc:
        with __import__("psycopg").connect(rc.primary.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
            conn.execute(
                "INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, %s) g", (ROWS,)
            )
            conn.execute("VACUUM ANALYZE items")
        rc.wait_caught_up()
        plain: AsyncConnectionPool = AsyncConnectionPool(
            rc.primary.dsn, name="plain", min_size=tasks, max_size=tasks, kwargs=dict(KWARGS)
        )
        replicated = AsyncReplicatedPool(
            rc.primary.dsn,
            [n.dsn for n in rc.standbys],
            name="replicated",
            min_size=tasks,
            max_size=tasks,
            kwargs=dict(KWARGS),
        )
        await plain.open(wait=True)
        await replicated.open(wait=True)

        async def read() -> Any:
            return await replicated.getconn(read_only=True)

        queries = {"select1": "SELECT 1", "pk_read": "SELECT v FROM items WHERE id = %s"}
        results: dict[str, Any] = {"rounds": rounds, "duration_s": duration, "tasks": tasks}
        try:
            for label, query in queries.items():
                ratios, alone, spread, routed = [], [], [], []
                for r in range(rounds):
                    order = [
                        ("alone", plain.getconn, plain.putconn),
                        ("replicas", read, replicated.putconn),
                        ("routed", replicated.getconn, replicated.putconn),
                    ]
                    if r % 2:
                        order.reverse()
                    got = {}
                    for which, get, put in order:
                        got[which] = await _throughput(get, put, query, tasks, duration)
                    alone.append(got["alone"])
                    spread.append(got["replicas"])
                    ratios.append(got["replicas"] / got["alone"])
                    routed.append(got["routed"] / got["alone"])
                results[label] = _summary(alone, spread, ratios, "ops/s")
                # The same reads through the replicated pool's primary path: the routing's
                # share of the difference, without the replicas' servers.
                results[label]["via_primary_ratio_median"] = statistics.median(routed)
                results[label]["via_primary_ratio_min"] = min(routed)
                results[label]["via_primary_ratio_max"] = max(routed)
            costs: dict[str, list[float]] = {"plain": [], "read": [], "write": []}
            for _ in range(rounds):
                costs["plain"].append(await _pairs(plain.getconn, plain.putconn, pairs))
                costs["read"].append(await _pairs(read, replicated.putconn, pairs))
                costs["write"].append(await _pairs(replicated.getconn, replicated.putconn, pairs))
            results["checkout_ns"] = {
                k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                for k, v in costs.items()
            }
            results["checkout_ratio"] = {
                k: statistics.median([a / b for a, b in zip(costs[k], costs["plain"], strict=True)])
                for k in ("read", "write")
            }
            results["members"] = {name: s.requests for name, s in replicated.stats().items()}
        finally:
            await replicated.close()
            await plain.close()
    return results


def _summary(
    alone: list[float], replicas: list[float], ratios: list[float], unit: str
) -> dict[str, Any]:
    return {
        "alone_median": statistics.median(alone),
        "replicas_median": statistics.median(replicas),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "unit": unit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.rounds, args.duration, args.tasks, args.pairs))
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print(f"{args.rounds} paired rounds of {args.duration:g} s, {args.tasks} tasks")
    for label in ("select1", "pk_read"):
        s = results[label]
        print(
            f"{label:8} primary alone {s['alone_median']:8.0f} ops/s, 1 primary + 2 replicas "
            f"{s['replicas_median']:8.0f} ops/s: ratio {s['ratio_median']:.2f} "
            f"({s['ratio_min']:.2f}-{s['ratio_max']:.2f}); through the replicated pool to "
            f"the primary: ratio {s['via_primary_ratio_median']:.2f} "
            f"({s['via_primary_ratio_min']:.2f}-{s['via_primary_ratio_max']:.2f})"
        )
    c = results["checkout_ns"]
    print(
        f"getconn+putconn: plain {c['plain']['median']:.0f} ns, replicated read "
        f"{c['read']['median']:.0f} ns (x{results['checkout_ratio']['read']:.2f}), replicated "
        f"write {c['write']['median']:.0f} ns (x{results['checkout_ratio']['write']:.2f})"
    )
    print("requests per member:", results["members"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
