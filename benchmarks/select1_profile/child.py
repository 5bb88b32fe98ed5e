"""One subject's SELECT 1 op, segment by segment, for per-op profiles.

``python -m benchmarks.select1_profile.child SUBJECT DSN POOL TASKS K1,K2[,...] MODE
[SOCKET_TEST_INTERVAL]``

SUBJECT is ``aiopgpool`` or ``floor`` (the benchmark's adapters,
:mod:`benchmarks.adapters_async`); the pool has POOL connections (min = max);
TASKS tasks run the benchmark's select1 worker (:func:`benchmarks.cases.run_async_fixed`:
``acquire``, ``select1`` = ``execute("SELECT 1")`` + ``fetchone()``, ``release``, the
latency appended) for K ops in all per segment, on asyncio's default loop.

MODE:

* ``callgrind``: each segment runs inside one ``functools.reduce`` call
  (:func:`benchmarks.cycles.child.in_segment`), for callgrind's
  ``--zero-before``/``--dump-after``;
* ``count``: per segment, event-loop iterations (``selector.select`` calls),
  events returned, ready handles run, GC collections by generation, socket tests
  (``Slot.still_ready`` calls), waited checkouts, and CPU/wall time (informative only);
* ``cprofile``: per segment, the deterministic call counts of every Python and
  built-in function (cProfile; its timings are not used);
* ``plain``: just the segments (run it under ``strace -c -f``, one K per run).

Prints one JSON document on its last line.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import os
import pstats
import sys
import time
from collections import Counter
from time import perf_counter, process_time
from typing import Any

import psycopg_pool  # noqa: F401

import aiopgpool
import aiopgpool.slot
from benchmarks.adapters_async import AiopgpoolAsync, AsyncAdapter, AsyncFloor
from benchmarks.cycles.child import in_segment, set_socket_test_interval

WARMUP_OPS = 3000
SETTLE = 1.0


def make_adapter(subject: str) -> AsyncAdapter:
    """The benchmark's adapter for ``subject``."""
    return {"aiopgpool": AiopgpoolAsync, "floor": AsyncFloor}[subject]()


async def workload(adapter: AsyncAdapter, tasks: int, ops: int) -> None:
    """``tasks`` workers do ``ops`` ops in all: the body of ``run_async_fixed``'s worker."""
    acquire, release, body = adapter.acquire, adapter.release, adapter.select1
    per, extra = divmod(ops, tasks)
    latencies: list[list[float]] = [[] for _ in range(tasks)]

    async def worker(i: int, limit: int) -> None:
        lat = latencies[i]
        n = 0
        while True:
            t0 = perf_counter()
            if n == limit:
                break
            conn = await acquire()
            try:
                await body(conn)
            finally:
                await release(conn)
            lat.append(perf_counter() - t0)
            n += 1

    jobs = [asyncio.ensure_future(worker(i, per + (i < extra))) for i in range(tasks)]
    await asyncio.gather(*jobs)


class LoopCounter:
    """Counts the loop's iterations (``selector.select`` calls) and what they return."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.c: Counter[str] = Counter()
        selector = loop._selector  # type: ignore[attr-defined]
        real_select = selector.select
        real_run_once = loop._run_once  # type: ignore[attr-defined]
        c = self.c

        def select(timeout: float | None = None) -> Any:
            c["select_calls"] += 1
            if timeout == 0:
                c["select_timeout_0"] += 1
            events = real_select(timeout)
            c["select_events"] += len(events)
            return events

        def run_once() -> None:
            c["run_once"] += 1
            c["ready_before"] += len(loop._ready)  # type: ignore[attr-defined]
            scheduled = loop._scheduled  # type: ignore[attr-defined]
            c["timers_in_heap"] += len(scheduled)
            c["timers_live"] += sum(not h._cancelled for h in scheduled)
            real_run_once()

        selector.select = select
        loop._run_once = run_once  # type: ignore[attr-defined]

        real_still_ready = aiopgpool.slot.Slot.still_ready

        def still_ready(slot: Any, now: float) -> bool:
            c["socket_tests"] += 1
            return real_still_ready(slot, now)

        aiopgpool.slot.Slot.still_ready = still_ready  # type: ignore[method-assign,assignment]

        def gc_cb(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                c[f"gc_gen{info['generation']}"] += 1

        gc.callbacks.append(gc_cb)


def main(argv: list[str]) -> int:
    subject, dsn, pool_arg, tasks_arg, ops_arg, mode, *rest = argv
    pool_size, tasks = int(pool_arg), int(tasks_arg)
    segments = [int(x) for x in ops_arg.split(",")]
    patched: list[str] = []
    if rest:
        patched = set_socket_test_interval(float(rest[0]))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    adapter = make_adapter(subject)
    loop.run_until_complete(adapter.open(dsn, pool_size, pool_size))
    # As in the benchmark, where every pool of a round is open on the same loop: the
    # other subject's pool is opened too (and warmed up), so that both subjects run
    # with the same timers in the loop's heap (see REPORT.md: "timer heap").
    bystander = None
    if os.environ.get("SELECT1_ALONE") != "1":
        bystander = make_adapter("floor" if subject == "aiopgpool" else "aiopgpool")
        loop.run_until_complete(bystander.open(dsn, pool_size, pool_size))
    out: dict[str, Any] = {
        "subject": subject,
        "pool": pool_size,
        "tasks": tasks,
        "patched": patched,
        "alone": bystander is None,
        "segments": [],
    }
    try:
        if bystander is not None:
            loop.run_until_complete(workload(bystander, tasks, WARMUP_OPS))
        loop.run_until_complete(workload(adapter, tasks, WARMUP_OPS))
        out["ablations"] = ablate(adapter, os.environ.get("SELECT1_ABLATE", ""))
        if out["ablations"]:
            loop.run_until_complete(workload(adapter, tasks, WARMUP_OPS))
        time.sleep(SETTLE)
        gc.collect()
        counter = LoopCounter(loop) if mode == "count" else None
        for ops in segments:
            seg: dict[str, Any] = {"ops": ops}
            if mode == "callgrind":

                def measured(ops: int = ops) -> None:
                    loop.run_until_complete(workload(adapter, tasks, ops))

                in_segment(measured)
            elif mode == "cprofile":
                prof = cProfile.Profile()
                prof.enable()
                loop.run_until_complete(workload(adapter, tasks, ops))
                prof.disable()
                st = pstats.Stats(prof)
                seg["calls"] = {
                    f"{fn[0]}:{fn[1]}({fn[2]})": v[1]  # primitive + recursive calls
                    for fn, v in st.stats.items()  # type: ignore[attr-defined]
                }
            else:
                if counter is not None:
                    counter.c.clear()
                stats0 = _pool_counters(adapter)
                c0, w0 = process_time(), perf_counter()
                loop.run_until_complete(workload(adapter, tasks, ops))
                seg["cpu_us_per_op"] = (process_time() - c0) / ops * 1e6
                seg["wall_us_per_op"] = (perf_counter() - w0) / ops * 1e6
                if counter is not None:
                    seg["counts"] = dict(counter.c)
                stats1 = _pool_counters(adapter)
                seg["pool_counters"] = {k: stats1[k] - stats0.get(k, 0) for k in stats1}
            out["segments"].append(seg)
    finally:
        loop.run_until_complete(adapter.close())
        if bystander is not None:
            loop.run_until_complete(bystander.close())
        loop.close()
    print(json.dumps(out))
    return 0


def ablate(adapter: AsyncAdapter, what: str) -> list[str]:
    """Experiments only (``SELECT1_ABLATE``, comma-separated), to price one piece of the op.

    * ``floor-aput``: the floor's release awaits a coroutine (``aputconn``), as
      aiopgpool's ``putconn`` is one (the cycles command gives the floor ``aputconn``;
      the benchmark's floor adapter calls the plain ``putconn`` inside ``release``);
    * ``no-state``: aiopgpool's return reads no connection state (each connection's
      baseline from a dict, a C call): the price of the return state check;
    * ``no-maintenance``: aiopgpool's maintenance timer cancelled (one live timer less
      in the loop's heap).
    """
    done = []
    for item in filter(None, what.split(",")):
        pool: Any = getattr(adapter, "_pool", None)
        if item == "floor-aput" and isinstance(adapter, AsyncFloor):

            async def release(conn: Any, aput: Any = pool.aputconn) -> None:
                await aput(conn)

            adapter.release = release  # type: ignore[method-assign]
        elif item == "no-state" and isinstance(adapter, AiopgpoolAsync):
            core = pool._core
            baselines = {s.conn: s.baseline for s in core.queue}
            core._state_of = baselines.get
        elif item == "no-maintenance" and isinstance(adapter, AiopgpoolAsync):
            pool._core.maintenance.stop()
        else:
            raise ValueError(f"unknown ablation {item!r} for {type(adapter).__name__}")
        done.append(item)
    return done


def _pool_counters(adapter: AsyncAdapter) -> dict[str, int]:
    pool = getattr(adapter, "_pool", None)
    core = getattr(pool, "_core", None)
    if core is None:
        return {}
    c = core.counters
    return {k: getattr(c, k) for k in ("requests", "requests_waited") if hasattr(c, k)}


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
