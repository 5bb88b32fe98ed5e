"""A prometheus_client collector for aiopgpool pools (``pip install aiopgpool[prometheus]``).

``PoolCollector(*pools)`` exposes the figures of :mod:`aiopgpool.opentelemetry` under
Prometheus names, each labelled ``pool_name``:

* gauges ``db_client_connection_count{state="idle"|"used"}``,
  ``db_client_connection_idle_max``, ``db_client_connection_idle_min``,
  ``db_client_connection_max`` (absent for an unbounded null pool),
  ``db_client_connection_pending_requests``;
* counter ``db_client_connection_timeouts_total``;
* histograms ``db_client_connection_create_time_seconds``,
  ``db_client_connection_wait_time_seconds``, ``db_client_connection_use_time_seconds``
  (the pool's own buckets, made cumulative);
* counters ``aiopgpool_pool_requests_total``, ``aiopgpool_pool_requests_waited_total``,
  ``aiopgpool_pool_connections_created_total``, ``..._connections_failed_total``,
  ``..._connections_lost_total``, ``..._connections_closed_total``,
  ``aiopgpool_pool_returns_bad_total``, ``aiopgpool_pool_leaks_total``.

Every scrape reads ``pool.stats()`` once per pool. Usage::

    from prometheus_client import REGISTRY
    from aiopgpool.prometheus import PoolCollector

    REGISTRY.register(PoolCollector(pool))

``pool.pop_stats()`` resets the pool's counters: Prometheus sees a counter reset,
which ``rate()`` and ``increase()`` handle.

An async pool is best scraped on its own event loop's thread (an ASGI ``/metrics``
endpoint, as in ``examples/asgi_app.py``); read from another thread (prometheus_client's
own HTTP server), its ``stats()`` may meet the loop changing the pool and is retried.
The sync pools may be read from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .metrics_common import COUNT, FIGURES, HISTOGRAMS, PoolRef, Sample, read_samples
from .stats import Histogram

__all__ = ["PoolCollector", "cumulative_buckets"]

_POOL = "pool_name"
_STATE = "state"


def cumulative_buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """``(le, cumulative count)`` per bucket, +Inf last, as Prometheus wants them."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(histogram.bounds, histogram.counts[: len(histogram.bounds)], strict=True):
        running += n
        buckets.append((str(float(bound)), float(running)))
    running += sum(histogram.counts[len(histogram.bounds) :])
    buckets.append(("+Inf", float(running)))
    return buckets


class PoolCollector(Collector):
    """A custom collector exporting the figures of the given pools (see the module).

    Pools are held weakly where possible (a pool that is garbage-collected disappears
    from the metrics); their names must differ (a second pool with the same name is left
    out, with a warning). ``add(pool)`` and ``remove(pool)`` change the set at any time.
    """

    def __init__(self, *pools: Any) -> None:
        self._lock = threading.Lock()
        self._pools: dict[int, PoolRef[Any]] = {}
        self._warned: set[str] = set()
        for pool in pools:
            self.add(pool)

    def add(self, pool: Any) -> None:
        """Export ``pool`` too (anything whose ``stats()`` gives a PoolStats, or a mapping)."""
        if not callable(getattr(pool, "stats", None)):
            raise TypeError(f"{type(pool).__name__} has no stats(): not a pool")
        with self._lock:
            self._pools[id(pool)] = PoolRef(pool)

    def remove(self, pool: Any) -> None:
        """Stop exporting ``pool`` (nothing happens if it was not exported)."""
        with self._lock:
            ref = self._pools.get(id(pool))
            if ref is not None and ref.get() is pool:
                del self._pools[id(pool)]

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so registering reads no pool."""
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        """The families, with one sample set per pool (``pool.stats()`` read once each)."""
        with self._lock:
            for key, ref in list(self._pools.items()):
                if ref.get() is None:
                    del self._pools[key]
            refs = list(self._pools.values())
            samples = read_samples(refs, self._warned)
        return self._families(samples)

    def _families(self, samples: list[Sample]) -> Iterator[Metric]:
        count = GaugeMetricFamily(COUNT.prometheus_name, COUNT.description, labels=[_POOL, _STATE])
        for sample in samples:
            count.add_metric([sample.stats.name, "idle"], sample.stats.idle)
            count.add_metric([sample.stats.name, "used"], sample.stats.in_use)
        yield count
        for figure in FIGURES:
            family: GaugeMetricFamily | CounterMetricFamily
            if figure.kind == "counter":
                family = CounterMetricFamily(
                    figure.prometheus_name, figure.description, labels=[_POOL]
                )
            else:
                family = GaugeMetricFamily(
                    figure.prometheus_name, figure.description, labels=[_POOL]
                )
            for sample in samples:
                value = figure.read(sample)
                if value is None:
                    continue
                if isinstance(family, CounterMetricFamily):
                    # _created: a reset (pop_stats(), a new pool under the name) is seen
                    # even when the counter has grown past its old value since.
                    family.add_metric(
                        [sample.stats.name], value, created=sample.stats.counters_since
                    )
                else:
                    family.add_metric([sample.stats.name], value)
            yield family
        for hist in HISTOGRAMS:
            histogram = HistogramMetricFamily(
                hist.prometheus_name, hist.description, labels=[_POOL], unit="seconds"
            )
            for sample in samples:
                snapshot: Histogram = getattr(sample.stats, hist.field)
                histogram.add_metric(
                    [sample.stats.name], cumulative_buckets(snapshot), snapshot.sum
                )
            yield histogram
