"""aiopgpool.prometheus: PoolCollector in a fresh CollectorRegistry, served by
prometheus_client's own HTTP server on loopback, scraped and parsed back."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from aiopgpool import (
    AsyncConnectionPool,
    ConnectionPool,
    NullConnectionPool,
    PoolStats,
    PoolTimeout,
    ThreadedConnectionPool,
)
from aiopgpool.prometheus import PoolCollector, cumulative_buckets
from aiopgpool.stats import HistogramRecorder

HISTOGRAMS = (
    "db_client_connection_wait_time_seconds",
    "db_client_connection_use_time_seconds",
    "db_client_connection_create_time_seconds",
)
FIELDS = ("wait_time_histogram", "use_time_histogram", "connect_time_histogram")
_seq = itertools.count(1)


def _name(label: str) -> str:
    return f"prom-{label}-{os.getpid()}-{next(_seq)}"


class Scraper:
    """A registry served on 127.0.0.1 by ``start_http_server``, and its parsed scrapes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.server, self.thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def text(self) -> str:
        """One scrape over HTTP."""
        with urllib.request.urlopen(self.url, timeout=10) as response:
            assert response.status == 200
            body: bytes = response.read()
        return body.decode()

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """(sample name, labels) -> value, from one scrape."""
        found = {}
        for family in text_string_to_metric_families(self.text()):
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                assert key not in found, f"duplicate sample {key}"
                found[key] = s.value
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def scraper() -> Iterator[Scraper]:
    """A fresh registry served over HTTP on a free loopback port."""
    scraper = Scraper()
    try:
        yield scraper
    finally:
        scraper.close()


def _get(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _check_pool(samples: dict[Any, float], stats: PoolStats, idle_max: int) -> None:
    pool = stats.name
    assert _get(samples, "db_client_connection_count", pool_name=pool, state="idle") == stats.idle
    assert _get(samples, "db_client_connection_count", pool_name=pool, state="used") == (
        stats.in_use
    )
    assert _get(samples, "db_client_connection_idle_max", pool_name=pool) == idle_max
    assert _get(samples, "db_client_connection_max", pool_name=pool) == stats.max_size
    assert _get(samples, "db_client_connection_pending_requests", pool_name=pool) == stats.waiting
    assert _get(samples, "db_client_connection_timeouts_total", pool_name=pool) == stats.timeouts
    assert _get(samples, "aiopgpool_pool_requests_total", pool_name=pool) == stats.requests
    assert _get(samples, "aiopgpool_pool_connections_created_total", pool_name=pool) == (
        stats.connections_created
    )
    assert _get(samples, "aiopgpool_pool_connections_failed_total", pool_name=pool) == 0
    for hist, field in zip(HISTOGRAMS, FIELDS, strict=True):
        bounds = getattr(stats, field).bounds
        buckets = [
            (float(dict(labels)["le"]), value)
            for (name, labels), value in samples.items()
            if name == hist + "_bucket" and dict(labels)["pool_name"] == pool
        ]
        buckets.sort()
        assert [le for le, _ in buckets] == [*bounds, float("inf")]
        values = [v for _, v in buckets]
        assert values == sorted(values), "buckets are cumulative"
        assert values[-1] == _get(samples, hist + "_count", pool_name=pool)
        assert _get(samples, hist + "_sum", pool_name=pool) is not None


def test_sync_pools_scraped(dsn: str, scraper: Scraper) -> None:
    """A sync pool, a null pool and a drop-in in one collector, scraped over HTTP."""
    names = _name("sync"), _name("null"), _name("dropin")
    with (
        ConnectionPool(dsn, min_size=1, max_size=3, name=names[0]) as pool,
        NullConnectionPool(dsn, max_size=2, name=names[1]) as null,
    ):
        drop = ThreadedConnectionPool(1, 2, dsn, name=names[2])
        try:
            scraper.registry.register(PoolCollector(pool, null, drop))
            for p in (pool, null, drop):
                with p.connection() as conn:
                    conn.execute("SELECT 1")
            held = pool.getconn()
            samples = scraper.samples()
            _check_pool(samples, pool.stats(), idle_max=3)
            _check_pool(samples, null.stats(), idle_max=0)
            _check_pool(samples, drop.stats(), idle_max=2)
            assert _get(samples, "db_client_connection_count", pool_name=names[0], state="used")
            assert _get(samples, "db_client_connection_idle_min", pool_name=names[0]) == 1
            assert _get(samples, "db_client_connection_idle_min", pool_name=names[1]) == 0
            pool.putconn(held)
        finally:
            drop.closeall()


async def test_async_pool_scraped_from_another_thread(dsn: str, scraper: Scraper) -> None:
    """An async pool, busy on its loop while the HTTP server's thread reads it."""
    name = _name("async")
    async with AsyncConnectionPool(dsn, min_size=1, max_size=2, name=name) as pool:
        collector = PoolCollector()
        collector.add(pool)
        scraper.registry.register(collector)

        async def query() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(0.002)")

        busy = asyncio.gather(*(query() for _ in range(60)))
        for _ in range(5):
            text = await asyncio.to_thread(scraper.text)
            assert f'pool_name="{name}"' in text
        await busy
        held = [await pool.getconn() for _ in range(2)]
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.05)
        samples = await asyncio.to_thread(scraper.samples)
        _check_pool(samples, pool.stats(), idle_max=2)
        assert _get(samples, "db_client_connection_timeouts_total", pool_name=name) == 1
        assert (
            _get(samples, "aiopgpool_pool_requests_total", pool_name=name) == pool.stats().requests
        )
        for conn in held:
            await pool.putconn(conn)
        collector.remove(pool)
        text = await asyncio.to_thread(scraper.text)
        assert f'pool_name="{name}"' not in text
        assert "# TYPE db_client_connection_wait_time_seconds histogram" in text


def test_same_name_exported_once(dsn: str, scraper: Scraper, caplog: Any) -> None:
    """Two pools with one name: the first one's series only, and a warning."""
    name = _name("twin")
    with (
        ConnectionPool(dsn, min_size=1, max_size=2, name=name) as first,
        ConnectionPool(dsn, min_size=1, max_size=5, name=name) as second,
    ):
        scraper.registry.register(PoolCollector(first, second))
        samples = scraper.samples()  # raises on a duplicate sample
        assert _get(samples, "db_client_connection_max", pool_name=name) == 2
    assert "two pools are named" in caplog.text


def test_counters_carry_their_start_so_a_pop_stats_is_seen(dsn: str, scraper: Scraper) -> None:
    """Every counter has its ``_created`` sample, the time its counting began: after a
    pop_stats() it moves, so Prometheus sees the reset even where the counter has grown
    past its old value by the next scrape."""
    name = _name("created")
    with ConnectionPool(dsn, name=name, min_size=1, max_size=1) as pool:
        scraper.registry.register(PoolCollector(pool))
        with pool.connection():
            pass
        before = scraper.samples()
        created = _get(before, "aiopgpool_pool_requests_created", pool_name=name)
        assert created == pytest.approx(pool.stats().counters_since)
        assert _get(before, "aiopgpool_pool_requests_total", pool_name=name) == 1
        pool.pop_stats()
        for _ in range(3):
            with pool.connection():
                pass
        after = scraper.samples()
        assert _get(after, "aiopgpool_pool_requests_total", pool_name=name) == 3
        moved = _get(after, "aiopgpool_pool_requests_created", pool_name=name)
        assert moved is not None and created is not None and moved > created
        assert _get(after, "db_client_connection_timeouts_created", pool_name=name) == moved


def test_cumulative_buckets() -> None:
    """Non-cumulative pool counts become Prometheus' cumulative ``le`` buckets."""
    rnd = random.Random(7)
    rec = HistogramRecorder()
    values = [rnd.choice([0.0, rnd.uniform(0, 0.01), rnd.uniform(0, 40)]) for _ in range(500)]
    for value in values:
        rec.record(value)
    buckets = cumulative_buckets(rec.snapshot())
    assert buckets[-1] == ("+Inf", 500.0)
    for le, count in buckets[:-1]:
        assert count == sum(1 for v in values if v <= float(le))


def test_histograms_count_requests(dsn: str, scraper: Scraper) -> None:
    """wait_time counts every request, use_time every return, create_time every connect."""
    name = _name("histograms")
    with ConnectionPool(dsn, min_size=1, max_size=2, name=name) as pool:
        scraper.registry.register(PoolCollector(pool))
        for _ in range(25):
            with pool.connection() as conn:
                conn.execute("SELECT 1")
        samples = scraper.samples()
        stats = pool.stats()
    wait = _get(samples, "db_client_connection_wait_time_seconds_count", pool_name=name)
    use = _get(samples, "db_client_connection_use_time_seconds_count", pool_name=name)
    create = _get(samples, "db_client_connection_create_time_seconds_count", pool_name=name)
    assert wait == stats.requests == 25
    assert use == 25
    assert create == stats.connections_created >= 1
