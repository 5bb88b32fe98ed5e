"""aiopgpool.opentelemetry: the semantic conventions for connection pools, read by the SDK's
InMemoryMetricReader from real pools of every class on the shared server."""

from __future__ import annotations

import asyncio
import bisect
import gc
import itertools
import math
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from aiopgpool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    NullConnectionPool,
    PoolStats,
    PoolTimeout,
    ThreadedConnectionPool,
)
from aiopgpool.opentelemetry import POOL_NAME, STATE, instrument, replay
from aiopgpool.stats import DURATION_BOUNDS, USE_FLOOR_BITS, Histogram, HistogramRecorder

_seq = itertools.count(1)


def _name(label: str) -> str:
    return f"otel-{label}-{os.getpid()}-{next(_seq)}"


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    """A fresh SDK meter provider's in-memory reader (cumulative temporality)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    reader.provider = provider  # type: ignore[attr-defined]
    yield reader
    provider.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Metric name -> its data points, from one collection."""
    data = reader.get_metrics_data()
    found: dict[str, list[Any]] = {}
    if data is None:
        return found
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def _value(points: dict[str, list[Any]], name: str, pool: str, **attrs: str) -> Any:
    """The one data point of ``name`` for ``pool`` (and ``attrs``), or None."""
    wanted = {POOL_NAME: pool, **attrs}
    matches = [p for p in points.get(name, []) if dict(p.attributes) == wanted]
    assert len(matches) <= 1, matches
    return matches[0] if matches else None


def _check_figures(points: dict[str, list[Any]], stats: PoolStats, idle_max: int) -> None:
    name = stats.name
    conn = "db.client.connection."
    assert _value(points, conn + "count", name, **{STATE: "idle"}).value == stats.idle
    assert _value(points, conn + "count", name, **{STATE: "used"}).value == stats.in_use
    assert _value(points, conn + "idle.max", name).value == idle_max
    assert _value(points, conn + "pending_requests", name).value == stats.waiting
    assert _value(points, conn + "timeouts", name).value == stats.timeouts
    assert _value(points, "aiopgpool.pool.requests", name).value == stats.requests
    created = _value(points, "aiopgpool.pool.connections_created", name).value
    assert created == stats.connections_created
    assert _value(points, "aiopgpool.pool.connections_failed", name).value == 0


# -- the async pool -------------------------------------------------------------------


async def test_async_pool_figures(dsn: str, reader: InMemoryMetricReader) -> None:
    """Counts by state, limits, pending requests and timeouts of an async pool."""
    name = _name("async")
    async with AsyncConnectionPool(dsn, min_size=2, max_size=3, name=name) as pool:
        await pool.wait(10)
        handle = instrument(pool, reader.provider)  # type: ignore[attr-defined]
        for _ in range(5):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        held = [await pool.getconn() for _ in range(3)]
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.05)
        points = await asyncio.to_thread(_points, reader)  # the reader's own thread
        stats = pool.stats()
        _check_figures(points, stats, idle_max=3)
        assert _value(points, "db.client.connection.count", name, **{STATE: "used"}).value == 3
        assert _value(points, "db.client.connection.idle.min", name).value == 2
        assert _value(points, "db.client.connection.max", name).value == 3
        assert _value(points, "db.client.connection.timeouts", name).value == 1
        for conn in held:
            await pool.putconn(conn)
        points = _points(reader)
        assert _value(points, "db.client.connection.count", name, **{STATE: "used"}).value == 0
        handle.uninstrument()
        points = _points(reader)
        assert _value(points, "db.client.connection.count", name, **{STATE: "idle"}) is None


async def test_pending_requests(dsn: str, reader: InMemoryMetricReader) -> None:
    """Requests queued for a connection show as pending_requests, then go back to 0."""
    name = _name("pending")
    async with AsyncConnectionPool(dsn, min_size=1, max_size=1, name=name) as pool:
        instrument(pool, reader.provider)  # type: ignore[attr-defined]
        conn = await pool.getconn()
        waiters = [asyncio.create_task(pool.getconn(timeout=10)) for _ in range(3)]
        for _ in range(100):
            if pool.stats().waiting == 3:
                break
            await asyncio.sleep(0.01)
        points = _points(reader)
        assert _value(points, "db.client.connection.pending_requests", name).value == 3
        await pool.putconn(conn)
        for task in waiters:
            await pool.putconn(await asyncio.wait_for(task, 10))
        points = _points(reader)
        assert _value(points, "db.client.connection.pending_requests", name).value == 0


async def test_null_pool(dsn: str, reader: InMemoryMetricReader) -> None:
    """A null pool allows no idle connection."""
    name = _name("null")
    async with AsyncNullConnectionPool(dsn, max_size=2, name=name) as pool:
        instrument(pool, reader.provider)  # type: ignore[attr-defined]
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        points = _points(reader)
        _check_figures(points, pool.stats(), idle_max=0)
        assert _value(points, "db.client.connection.idle.min", name).value == 0
        assert _value(points, "db.client.connection.max", name).value == 2


async def test_unbounded_null_pool(dsn: str, reader: InMemoryMetricReader) -> None:
    """An unbounded null pool (max_size=0) reports no db.client.connection.max."""
    name = _name("null-unbounded")
    async with AsyncNullConnectionPool(dsn, max_size=0, name=name) as pool:
        instrument(pool, reader.provider)  # type: ignore[attr-defined]
        points = _points(reader)
    assert _value(points, "db.client.connection.idle.max", name).value == 0
    assert _value(points, "db.client.connection.max", name) is None


# -- the sync pools -------------------------------------------------------------------


def test_sync_pools_and_dropins(dsn: str, reader: InMemoryMetricReader) -> None:
    """The sync pool, its null twin and a psycopg2 drop-in side by side on one provider."""
    provider = reader.provider  # type: ignore[attr-defined]
    sync_name, null_name, drop_name = _name("sync"), _name("sync-null"), _name("dropin")
    with (
        ConnectionPool(dsn, min_size=1, max_size=4, name=sync_name) as pool,
        NullConnectionPool(dsn, max_size=2, name=null_name) as null,
    ):
        drop = ThreadedConnectionPool(1, 3, dsn, name=drop_name)
        try:
            instrument(pool, provider)
            instrument(null, provider)
            instrument(drop, provider)
            with pool.connection() as conn:
                conn.execute("SELECT 1")
            with null.connection() as conn:
                conn.execute("SELECT 1")
            held = drop.getconn()
            points = _points(reader)
            _check_figures(points, pool.stats(), idle_max=4)
            _check_figures(points, null.stats(), idle_max=0)
            _check_figures(points, drop.stats(), idle_max=3)
            assert _value(points, "db.client.connection.max", drop_name).value == 3
            assert _value(points, "db.client.connection.count", drop_name, **{STATE: "used"}).value
            drop.putconn(held)
        finally:
            drop.closeall()


def test_psycopg2_dropin_without_pooling(dsn: str, reader: InMemoryMetricReader) -> None:
    """aiopgpool.psycopg2's drop-in (real psycopg2 connections) with disable_pooling:
    a null pool underneath, so no idle connection allowed."""
    from aiopgpool.psycopg2 import SimpleConnectionPool

    name = _name("psycopg2-null")
    pool = SimpleConnectionPool(0, 2, dsn, disable_pooling=True, name=name)
    try:
        instrument(pool, reader.provider)  # type: ignore[attr-defined]
        conn = pool.getconn()
        conn.cursor().execute("SELECT 1")
        points = _points(reader)
        _check_figures(points, pool.stats(), idle_max=0)
        assert _value(points, "db.client.connection.max", name).value == 2
        pool.putconn(conn)
    finally:
        pool.closeall()


def test_instrument_twice_and_two_providers(dsn: str, reader: InMemoryMetricReader) -> None:
    """Twice on one provider is an error; two providers each get the pool's figures."""
    other = InMemoryMetricReader()
    other_provider = MeterProvider(metric_readers=[other])
    name = _name("twice")
    try:
        with ConnectionPool(dsn, min_size=1, max_size=2, name=name) as pool:
            with instrument(pool, reader.provider):  # type: ignore[attr-defined]
                with pytest.raises(ValueError, match="already instrumented"):
                    instrument(pool, reader.provider)  # type: ignore[attr-defined]
                instrument(pool, other_provider)
                pool.wait(10)
                for points in (_points(reader), _points(other)):
                    assert _value(points, "db.client.connection.max", name).value == 2
            assert _value(_points(reader), "db.client.connection.max", name) is None
            assert _value(_points(other), "db.client.connection.max", name).value == 2
    finally:
        other_provider.shutdown()


# -- histograms -----------------------------------------------------------------------


class _StatsSource:
    """Not a pool: something with ``stats()``, giving PoolStats whose histograms this test
    fills itself (a mapping of two, as a set of pools does), to check the export's
    arithmetic whatever the core records."""

    def __init__(self, names: tuple[str, str]) -> None:
        self.recorders = {n: HistogramRecorder(USE_FLOOR_BITS) for n in names}
        self.name = names[0]

    def stats(self) -> dict[str, PoolStats]:
        return {n: _stats(n, rec.snapshot()) for n, rec in self.recorders.items()}


def _stats(name: str, hist: Histogram) -> PoolStats:
    zero = dict.fromkeys(
        [
            "size", "idle", "in_use", "waiting", "min_size", "max_size", "requests",
            "requests_waited", "timeouts", "connections_created", "connections_failed",
            "connections_lost", "returns_bad", "leaks", "connections_closed",
        ],
        0,
    )  # fmt: skip
    return PoolStats(name=name, wait_time_total=0.0, use_time_histogram=hist, **zero)  # type: ignore[arg-type]


def _otel_buckets(point: Any) -> list[int]:
    return list(point.bucket_counts)


def test_histogram_replay_is_exact(reader: InMemoryMetricReader) -> None:
    """Replayed deltas give the pool's bucket counts, count and sum, over several
    collections, for two pools in one mapping; after a reset (pop_stats) that the next
    collection sees (a count went down), the total goes on."""
    rnd = random.Random(16)
    names = (_name("hist-a"), _name("hist-b"))
    source = _StatsSource(names)
    instrument(source, reader.provider)  # type: ignore[attr-defined]
    totals = {n: HistogramRecorder(USE_FLOOR_BITS) for n in names}
    for round_ in range(5):
        if round_ == 4:  # a reset, then fewer values than before it
            source.recorders[names[0]].clear()
        for name, rec in source.recorders.items():
            for _ in range(rnd.randrange(0, 300 if round_ < 4 else 10)):
                value = rnd.choice([0.0, rnd.expovariate(100), rnd.uniform(0, 30), 0.01])
                rec.record(value)
                totals[name].record(value)
        points = _points(reader)
        for name in names:
            point = _value(points, "db.client.connection.use_time", name)
            want = totals[name].snapshot()
            assert tuple(point.explicit_bounds) == DURATION_BOUNDS[USE_FLOOR_BITS:]
            assert _otel_buckets(point) == list(want.counts)
            assert point.count == want.count
            assert math.isclose(point.sum, want.sum, rel_tol=1e-9, abs_tol=1e-9)


async def test_pop_stats_and_a_new_pool_under_the_name_lose_nothing(
    dsn: str, reader: InMemoryMetricReader
) -> None:
    """A pop_stats() between two collections, then a new pool under the same name: the
    exported histograms go on counting every use (the reset is told by counters_since,
    not guessed from a count going down, which fewer uses before it would not show)."""
    name = _name("pop")

    async def uses(pool: AsyncConnectionPool, n: int) -> None:
        for _ in range(n):
            async with pool.connection():
                pass

    def use_count() -> int:
        point = _value(_points(reader), "db.client.connection.use_time", name)
        return int(point.count)

    async with AsyncConnectionPool(dsn, name=name, min_size=1, max_size=1) as pool:
        instrument(pool, reader.provider)  # type: ignore[attr-defined]
        await uses(pool, 2)
        assert use_count() == 2
        since = pool.stats().counters_since
        pool.pop_stats()
        assert pool.stats().counters_since > since
        await uses(pool, 5)
        assert use_count() == 7
    del pool  # gone: the name is free for the next pool
    gc.collect()
    async with AsyncConnectionPool(dsn, name=name, min_size=1, max_size=1) as again:
        instrument(again, reader.provider)  # type: ignore[attr-defined]
        await uses(again, 9)
        assert use_count() == 16


@pytest.mark.parametrize("seed", range(20))
def test_replay_values_lie_in_their_buckets(seed: int) -> None:
    """replay(): every value strictly inside its own bucket, the sum the one given."""
    rnd = random.Random(seed)
    rec = HistogramRecorder()
    for _ in range(rnd.randrange(1, 50)):
        rec.record(rnd.choice([0.0, rnd.uniform(0, 0.001), rnd.uniform(0, 40), 0.0025]))
    hist = rec.snapshot()
    bounds = hist.bounds
    placed = [0] * len(hist.counts)
    total = 0.0
    for value, n in replay(bounds, hist.counts, hist.sum):
        i = bisect.bisect_left(bounds, value)
        assert value not in bounds, "a value at a bound falls in either bucket"
        assert value >= 0.0
        placed[i] += n
        total += value * n
    assert placed == list(hist.counts)
    assert math.isclose(total, hist.sum, rel_tol=1e-9, abs_tol=1e-12)


async def test_pool_histograms_exported(dsn: str, reader: InMemoryMetricReader) -> None:
    """wait_time counts every request, use_time every return, create_time every connect."""
    name = _name("histograms")
    async with AsyncConnectionPool(dsn, min_size=1, max_size=2, name=name) as pool:
        instrument(pool, reader.provider)  # type: ignore[attr-defined]

        async def query() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(0.005)")

        await asyncio.gather(*(query() for _ in range(20)))
        points = _points(reader)
        stats = pool.stats()
    wait = _value(points, "db.client.connection.wait_time", name)
    use = _value(points, "db.client.connection.use_time", name)
    create = _value(points, "db.client.connection.create_time", name)
    assert wait is not None and wait.count == stats.requests == 20
    assert use is not None and use.count == 20
    assert use.sum >= 20 * 0.005
    assert create is not None and create.count == stats.connections_created
    assert list(use.bucket_counts) == list(stats.use_time_histogram.counts)


_GLOBAL_PROVIDER_SCRIPT = """
import os
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from aiopgpool import ConnectionPool
from aiopgpool.opentelemetry import instrument

dsn = os.environ["AIOPGPOOL_CHILD_DSN"]
with ConnectionPool(dsn, max_size=2, name="before") as before, ConnectionPool(
    dsn, max_size=3, name="after"
) as after:
    instrument(before)  # on the global proxy: no provider set yet
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    instrument(after)
    found = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "db.client.connection.max":
                    for p in m.data.data_points:
                        found[p.attributes["db.client.connection.pool.name"]] = p.value
    assert found == {"before": 2, "after": 3}, found
"""


def test_global_provider_set_after_instrument(dsn: str) -> None:
    """The global provider: pools instrumented before and after set_meter_provider() are
    both reported (in a fresh interpreter: the global provider can be set once)."""
    proc = subprocess.run(
        [sys.executable, "-c", _GLOBAL_PROVIDER_SCRIPT],
        env={**os.environ, "AIOPGPOOL_CHILD_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
