"""The load (tasks making requests back to back) and the faults injected under it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.adapters_async import ASYNC_ADAPTERS, OPEN_TIMEOUT, AsyncAdapter
from benchmarks.environment import local_cluster
from benchmarks.reliability.recorder import Recorder

#: Seconds to wait for abandoned requests to wind down, and for a pool to close.
WIND_DOWN = 15.0

#: The pools that take part: those whose errors are psycopg errors (the classification
#: relies on it) and that have a timeout (the floors wait forever).
POOLS: dict[str, type[AsyncAdapter]] = {
    a.name: a
    for a in ASYNC_ADAPTERS
    if a.driver == "psycopg" and not a.is_floor and a.name != "aiopgpool-discard"
}


@dataclass
class Settings:
    """Everything a run depends on (from the command line)."""

    pool_size: int
    tasks: int
    timeout: float
    give_up: float
    error_pause: float
    restarts: int
    down: float
    up: float
    warmup: float
    blackhole: float
    reset: float
    max_requests: int
    connect_timeout: int
    outage: float = 2.0
    after: float = 12.0
    clean: float = 2.0
    duration: float = 5.0


async def _worker(adapter: AsyncAdapter, rec: Recorder, stop: asyncio.Event, s: Settings) -> None:
    """Make requests back to back until told to stop."""
    while not stop.is_set() and rec.total < rec.max_requests:
        deadline = rec.now() + s.timeout
        task = asyncio.ensure_future(adapter.query_once())
        done, _ = await asyncio.wait({task}, timeout=s.timeout + s.give_up)
        end = rec.now()
        if not done:
            # An application-level timeout: cancel, and do not wait for the pool to wind down.
            task.cancel()
            rec.orphans.add(task)
            task.add_done_callback(_consume)
            rec.record(end, deadline, None, finished=False)
            continue
        exc = task.exception() if not task.cancelled() else asyncio.CancelledError()
        rec.record(end, deadline, exc, finished=True)
        if exc is not None and s.error_pause > 0:
            await asyncio.sleep(s.error_pause)


def _consume(task: asyncio.Future[None]) -> None:
    """Retrieve an abandoned task's outcome so that asyncio does not log it."""
    if not task.cancelled():
        task.exception()


@contextlib.asynccontextmanager
async def _load(pool: str, dsn: str, s: Settings, rec: Recorder) -> AsyncIterator[None]:
    """Open the pool, run the workers for the body's duration, then stop and close."""
    adapter = POOLS[pool]()
    await asyncio.wait_for(
        adapter.open(dsn, s.pool_size, s.pool_size, timeout=s.timeout), OPEN_TIMEOUT + 5
    )
    stop = asyncio.Event()
    workers = [asyncio.ensure_future(_worker(adapter, rec, stop, s)) for _ in range(s.tasks)]
    try:
        yield
    finally:
        stop.set()
        # Each worker finishes its current request: at most timeout + give_up.
        _, pending = await asyncio.wait(workers, timeout=s.timeout + s.give_up + 5)
        for w in pending:
            w.cancel()
        if rec.orphans:
            await asyncio.wait(rec.orphans, timeout=WIND_DOWN)
        try:
            await asyncio.wait_for(adapter.close(), WIND_DOWN)
        except Exception as exc:
            rec.close_error = repr(exc)


def _with_connect_timeout(dsn: str, s: Settings) -> str:
    if not s.connect_timeout:
        return dsn
    from psycopg.conninfo import make_conninfo

    return make_conninfo(dsn, connect_timeout=str(s.connect_timeout))


async def _fault(
    rec: Recorder,
    name: str,
    begin: Callable[[], Any],
    lasts: float,
    end: Callable[[], Any],
    back: str,
    then: float,
) -> None:
    """Mark ``name``, ``begin()``, wait ``lasts`` s, ``end()``, mark ``back``, wait ``then`` s.

    ``begin`` and ``end`` are blocking calls; they run in a thread. ``back`` is a
    recovery point: the first success after it measures the recovery.
    """
    rec.event(name)
    await asyncio.to_thread(begin)
    rec.event(f"{name}: in effect")
    await asyncio.sleep(lasts)
    await asyncio.to_thread(end)
    rec.event(back, recovery_point=True)
    await asyncio.sleep(then)


async def scenario_restart(pool: str, s: Settings, rec: Recorder) -> dict[str, Any]:
    """Restart the server ``s.restarts`` times, each time down ``s.down`` seconds."""
    cluster = await asyncio.to_thread(local_cluster)
    try:
        dsn = _with_connect_timeout(cluster.dsn, s)
        rec.t0 = time.monotonic()
        async with _load(pool, dsn, s, rec):
            rec.event("load started")
            await asyncio.sleep(s.warmup)
            for i in range(s.restarts):
                n = f"#{i + 1}"
                await _fault(
                    rec, f"stop {n}", cluster.stop, s.down, cluster.start, f"server back {n}", s.up
                )
            rec.event("load stopping")
        return {"dsn": dsn}
    finally:
        await asyncio.to_thread(cluster.close)


async def scenario_network_cut(pool: str, s: Settings, rec: Recorder) -> dict[str, Any]:
    """Blackhole the pool's traffic, forward, reset every connection, forward."""
    from aiopgpool.testing.proxy import TcpProxy

    cluster = await asyncio.to_thread(local_cluster)
    try:
        with TcpProxy(cluster.host, cluster.port) as proxy:
            dsn = _with_connect_timeout(proxy.dsn(cluster.dsn), s)
            rec.t0 = time.monotonic()
            async with _load(pool, dsn, s, rec):
                rec.event("load started")
                await asyncio.sleep(s.warmup)
                forward, back = proxy.forward, "forward (after {})"
                await _fault(
                    rec,
                    "blackhole",
                    proxy.blackhole,
                    s.blackhole,
                    forward,
                    back.format("blackhole"),
                    s.up,
                )
                await _fault(
                    rec, "reset", proxy.reset, s.reset, forward, back.format("reset"), s.up
                )
                rec.event("load stopping")
        return {"dsn": dsn}
    finally:
        await asyncio.to_thread(cluster.close)


SCENARIOS: dict[str, Callable[[str, Settings, Recorder], Awaitable[dict[str, Any]]]] = {
    "restart": scenario_restart,
    "network-cut": scenario_network_cut,
}


async def run_one(scenario: str, pool: str, s: Settings) -> dict[str, Any]:
    """Run one scenario against one pool; never raises (errors go in the result)."""
    rec = Recorder(t0=time.monotonic(), max_requests=s.max_requests)
    started = time.monotonic()
    result: dict[str, Any] = {"scenario": scenario, "pool": pool}
    try:
        extra = await SCENARIOS[scenario](pool, s, rec)
        result.update(extra)
        result["status"] = "done"
    except Exception as exc:
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["close_error"] = rec.close_error
    result.update(rec.summary())
    return result
