"""The workloads: what one pool does for one case, timed.

* ``checkout``: acquire, yield to the scheduler once while holding, release.
* ``select1``: acquire, ``SELECT 1`` and fetch, release.
* ``cold_burst``: on a fresh pool with no connection, many tasks each do select1 once.
* ``waiters`` / ``overload`` (scale): checkout with N tasks waiting in line beyond
  the pool's size, SELECT 1 with 100 tasks per connection; their latency is the wait.

Fixed-duration workloads start every worker together and stop starting new ops
at the deadline; the wall time runs until the last op in flight has finished.
Each op's latency is the time from asking for a connection to having given it
back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from time import perf_counter, process_time
from typing import Any

from benchmarks.adapters_async import AsyncAdapter
from benchmarks.adapters_sync import SyncAdapter
from benchmarks.metrics import Measurement
from benchmarks.plan import Case


class WorkloadHung(Exception):
    """The workload did not finish within its time limit."""


async def _yield_async(conn: Any) -> None:
    await asyncio.sleep(0)


def _yield_sync(conn: Any) -> None:
    time.sleep(0)


async def run_async_fixed(adapter: AsyncAdapter, case: Case, duration: float) -> Measurement:
    """``case.tasks`` tasks repeat the case's op on ``adapter`` for ``duration`` s.

    The scale cases make ``case.ops_per_task`` ops per task instead, and time each
    op's wait (ask to having the connection; else ask to given back).
    """
    body: Callable[[Any], Awaitable[None]]
    body = adapter.select1 if case.workload == "select1" else _yield_async
    acquire, release = adapter.acquire, adapter.release
    concurrency = case.tasks
    counts = [0] * concurrency
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    deadline = 0.0
    times_wait = case.times_wait
    limit = case.ops_per_task or -1

    async def worker(i: int) -> None:
        lat = latencies[i]
        n = 0
        try:
            while True:
                t0 = perf_counter()
                if t0 >= deadline or n == limit:
                    break
                conn = await acquire()
                if times_wait:
                    lat.append(perf_counter() - t0)
                try:
                    await body(conn)
                finally:
                    await release(conn)
                if not times_wait:
                    lat.append(perf_counter() - t0)
                n += 1
        finally:
            counts[i] = n

    cpu0 = process_time()
    start = perf_counter()
    deadline = start + duration if limit < 0 else float("inf")
    tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    await _gather_or_cancel(tasks)
    elapsed = perf_counter() - start
    cpu = process_time() - cpu0
    return Measurement(counts, [x for lat in latencies for x in lat], elapsed, cpu)


async def run_async_burst(adapter: AsyncAdapter, tasks: int) -> Measurement:
    """``tasks`` tasks each do select1 once, all at once; time until all are served."""
    latencies = [0.0] * tasks

    async def one(i: int) -> None:
        t0 = perf_counter()
        await adapter.query_once()
        latencies[i] = perf_counter() - t0

    cpu0 = process_time()
    start = perf_counter()
    await _gather_or_cancel([asyncio.ensure_future(one(i)) for i in range(tasks)])
    elapsed = perf_counter() - start
    return Measurement([1] * tasks, latencies, elapsed, process_time() - cpu0)


async def _gather_or_cancel(tasks: Sequence[asyncio.Future[None]]) -> None:
    """Wait for all tasks; if one fails or we are cancelled, cancel the rest first."""
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=10.0)
        raise


async def bounded(awaitable: Awaitable[Any], limit: float, what: str) -> Any:
    """Await ``awaitable``, but raise :class:`WorkloadHung` after ``limit`` seconds.

    Unlike ``asyncio.wait_for`` this does not wait forever for a task that
    ignores its cancellation.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=limit)
    except BaseException:
        task.cancel()
        await asyncio.wait({task}, timeout=10.0)
        raise
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=10.0)
        raise WorkloadHung(f"{what} did not finish within {limit:.0f} s")
    return task.result()


def run_sync_fixed(
    adapter: SyncAdapter, kind: str, concurrency: int, duration: float, limit: float
) -> Measurement:
    """``concurrency`` threads repeat the ``kind`` op on ``adapter`` for ``duration`` s.

    Raises :class:`WorkloadHung` if the threads have not all finished after
    ``limit`` seconds (they are daemon threads, told to stop, and left behind),
    or re-raises the first error a thread hit.
    """
    body: Callable[[Any], None] = adapter.select1 if kind == "select1" else _yield_sync
    acquire, release = adapter.acquire, adapter.release
    counts = [0] * concurrency
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    go = threading.Event()
    stop = threading.Event()
    timing = {"deadline": 0.0}

    def worker(i: int) -> None:
        lat = latencies[i]
        n = 0
        go.wait()
        deadline = timing["deadline"]
        try:
            while not stop.is_set():
                t0 = perf_counter()
                if t0 >= deadline:
                    break
                conn = acquire()
                try:
                    body(conn)
                finally:
                    release(conn)
                lat.append(perf_counter() - t0)
                n += 1
        except BaseException as exc:
            errors.append(exc)
            stop.set()
        finally:
            counts[i] = n

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"bench-{i}", daemon=True)
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    try:
        cpu0 = process_time()
        start = perf_counter()
        timing["deadline"] = start + duration
        go.set()
        give_up = start + limit
        for t in threads:
            t.join(max(0.0, give_up - perf_counter()))
        elapsed = perf_counter() - start
        cpu = process_time() - cpu0
    finally:
        go.set()
        if any(t.is_alive() for t in threads):
            stop.set()
            for t in threads:
                t.join(1.0)
    alive = sum(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    if alive:
        raise WorkloadHung(f"{alive} of {concurrency} threads still running after {limit:.0f} s")
    return Measurement(counts, [x for lat in latencies for x in lat], elapsed, cpu)


def call_bounded(fn: Callable[[], Any], limit: float, what: str) -> Any:
    """Run a blocking call in a daemon thread; raise :class:`WorkloadHung` after ``limit`` s."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=target, name="bench-call", daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        raise WorkloadHung(f"{what} did not finish within {limit:.0f} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")
