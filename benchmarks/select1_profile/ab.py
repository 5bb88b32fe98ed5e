"""Client CPU per SELECT 1 op, subjects side by side in one process (REPORT.md sections 8, 9).

``python -m benchmarks.select1_profile.ab --dsn DSN [--tasks 10] [--rounds 28]
[--duration 0.4] [--skip 2] [--subjects aiopgpool,floor] [--out FILE]``

Every subject is opened on one event loop (10 connections, min = max). Each round
runs the benchmark's select1 case (:func:`benchmarks.cases.run_async_fixed`) for
``--duration`` seconds on each subject in turn, in a new random order, with
``getrusage`` around each for the split of CPU per op into user and system time.
It prints the medians over the rounds after the first ``--skip``: user, system and
CPU per op (the run's own figure, as in the benchmark), ops/s, and each subject's
by-CPU ratio (the floor's CPU per op / the subject's, the benchmark's "by CPU").

The aiopgpool measured is whatever ``import aiopgpool`` finds: to compare two
builds, run this alternately with ``PYTHONPATH`` set to each tree, one process at a
time (a single run moves by about ±1.5 %).

Subjects: ``aiopgpool`` and ``floor`` (the benchmark's adapters), and the
experiments of REPORT section 9:

* ``floor-held``: the floor handing out connections opened by an aiopgpool pool;
* ``floor-awaited``: the floor returning through a coroutine (``aputconn``), as
  aiopgpool's ``putconn`` is one (``child.ablate``'s ``floor-aput``);
* ``aiopgpool-direct``: aiopgpool returning through its core's ``give_back``,
  without awaiting ``putconn``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.adapters_async import PSYCOPG_KWARGS, AiopgpoolAsync, AsyncAdapter, AsyncFloor
from benchmarks.cases import run_async_fixed
from benchmarks.floors import AsyncFloorPool
from benchmarks.plan import Case
from benchmarks.select1_profile.child import ablate

POOL_SIZE = 10


class FloorHeld(AsyncFloor):
    """The floor, handing out the connections of an aiopgpool pool (checked out of it)."""

    def __init__(self) -> None:
        super().__init__()
        self._source = AiopgpoolAsync()
        self._held: list[Any] = []

    async def open(
        self, dsn: str, min_size: int, max_size: int, *, timeout: float | None = None
    ) -> None:
        """Open an aiopgpool pool and lend all its connections to a floor of that size."""
        await self._source.open(dsn, max_size, max_size)
        self._held = [await self._source.acquire() for _ in range(max_size)]
        pool = self._pool = AsyncFloorPool(dsn, max_size, dict(PSYCOPG_KWARGS))
        pool._size = max_size
        pool._idle.extend(self._held)

    async def close(self) -> None:
        """Give the connections back to the aiopgpool pool, then close it."""
        if self._pool is not None:
            self._pool._idle.clear()
        for conn in self._held:
            await self._source.release(conn)
        await self._source.close()


class AiopgpoolDirect(AiopgpoolAsync):
    """aiopgpool, returning through the core's ``give_back`` (awaiting only a slow return)."""

    async def release(self, conn: Any) -> None:
        """``core.give_back()``; ``validation.restore()`` when that returns a slot."""
        core = self._pool._core
        slot = core.give_back(conn, None, False)
        if slot is not None:
            await core.validation.restore(slot, False)


#: name -> (the adapter, the :func:`~benchmarks.select1_profile.child.ablate` items
#: applied once it is open).
SUBJECTS: dict[str, tuple[Callable[[], AsyncAdapter], str]] = {
    "aiopgpool": (AiopgpoolAsync, ""),
    "floor": (AsyncFloor, ""),
    "floor-held": (FloorHeld, ""),
    "floor-awaited": (AsyncFloor, "floor-aput"),
    "aiopgpool-direct": (AiopgpoolDirect, ""),
}


async def unreachable(dsn: str) -> str | None:
    """Why one connection to ``dsn`` fails (libpq's message), or None when it opens."""
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=10)
    except psycopg.Error as exc:
        return str(exc).strip()
    await conn.close()
    return None


def _usage() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


async def measure(
    dsn: str, subjects: list[str], tasks: int, rounds: int, duration: float, skip: int
) -> dict[str, dict[str, float]]:
    """Per subject: medians of user, system and total CPU µs per op, ops/s, by-CPU ratio."""
    adapters: dict[str, AsyncAdapter] = {}
    try:
        for name in subjects:
            make, ablations = SUBJECTS[name]
            adapter = adapters[name] = make()  # closed even if open() fails
            await adapter.open(dsn, POOL_SIZE, POOL_SIZE)
            ablate(adapter, ablations)
        case = Case("async", "select1", tasks)
        samples: dict[str, list[tuple[float, float, float, float]]]
        samples = {name: [] for name in subjects}
        for round_no in range(rounds):
            order = list(subjects)
            random.shuffle(order)
            for name in order:
                user0, sys0 = _usage()
                m = await run_async_fixed(adapters[name], case, duration)
                user1, sys1 = _usage()
                ops = sum(m.per_worker)
                if round_no >= skip and ops:
                    per_op = 1e6 / ops
                    user, system = (user1 - user0) * per_op, (sys1 - sys0) * per_op
                    samples[name].append((user, system, m.cpu * per_op, ops / m.elapsed))
    finally:
        for adapter in adapters.values():
            await adapter.close()
    out: dict[str, dict[str, float]] = {}
    for name, rows in samples.items():
        out[name] = {
            "user_us": statistics.median(r[0] for r in rows),
            "sys_us": statistics.median(r[1] for r in rows),
            "cpu_us": statistics.median(r[2] for r in rows),
            "ops_per_s": statistics.median(r[3] for r in rows),
        }
    floor = out.get("floor")
    for row in out.values():
        row["by_cpu"] = floor["cpu_us"] / row["cpu_us"] if floor else float("nan")
    return out


def main(argv: list[str]) -> int:
    """Parse the arguments, measure, print the table (and write ``--out``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.select1_profile.ab")
    p.add_argument("--dsn", required=True, help="a libpq conninfo of a server to use")
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--rounds", type=int, default=28)
    p.add_argument("--duration", type=float, default=0.4, help="seconds per subject per round")
    p.add_argument("--skip", type=int, default=2, help="warm-up rounds left out")
    p.add_argument("--subjects", default="aiopgpool,floor", help=", ".join(SUBJECTS))
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    subjects = args.subjects.split(",")
    unknown = [s for s in subjects if s not in SUBJECTS]
    if unknown:
        p.error(f"unknown subject(s) {', '.join(unknown)}: choose from {', '.join(SUBJECTS)}")
    if len(set(subjects)) != len(subjects):
        p.error(f"--subjects names a subject twice: {args.subjects}")
    if args.tasks < 1 or args.duration <= 0 or not 0 <= args.skip < args.rounds:
        p.error("--tasks and --duration must be positive, and --skip below --rounds")
    problem = asyncio.run(unreachable(args.dsn))
    if problem is not None:
        p.exit(2, f"--dsn: cannot connect: {problem}\n")
    result = asyncio.run(
        measure(args.dsn, subjects, args.tasks, args.rounds, args.duration, args.skip)
    )
    for name, row in result.items():
        print(
            f"{name:17s} user {row['user_us']:6.2f}  sys {row['sys_us']:6.2f}"
            f"  cpu {row['cpu_us']:6.2f} µs/op  {row['ops_per_s']:8.0f} ops/s"
            f"  by CPU {row['by_cpu']:.3f}"
        )
    if args.out is not None:
        settings = {k: getattr(args, k) for k in ("tasks", "rounds", "duration", "skip")}
        args.out.write_text(json.dumps({"settings": settings, "subjects": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
