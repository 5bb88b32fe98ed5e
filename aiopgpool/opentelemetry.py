"""OpenTelemetry metrics for aiopgpool pools (``pip install aiopgpool[opentelemetry]``).

``instrument(pool)`` reports the semantic conventions for database client connection
pools, every instrument labelled ``db.client.connection.pool.name``:

========================================  ==============  ===================================
instrument                                kind            value
========================================  ==============  ===================================
``db.client.connection.count``            up-down counter ``size`` by
                                                          ``db.client.connection.state``
                                                          = ``idle`` | ``used``
``db.client.connection.idle.max``         up-down counter ``max_size`` (0 for a null pool)
``db.client.connection.idle.min``         up-down counter ``min_size`` (0 for a null pool)
``db.client.connection.max``              up-down counter ``max_size`` (none for an unbounded
                                                          null pool)
``db.client.connection.pending_requests`` up-down counter ``waiting``
``db.client.connection.timeouts``         counter         ``timeouts``
``db.client.connection.create_time``      histogram (s)   ``connect_time_histogram``
``db.client.connection.wait_time``        histogram (s)   ``wait_time_histogram``
``db.client.connection.use_time``         histogram (s)   ``use_time_histogram``
``aiopgpool.pool.*``                      counters        ``requests``, ``requests_waited``,
                                                          ``connections_created``,
                                                          ``connections_failed``, ...
========================================  ==============  ===================================

Everything is read from ``pool.stats()`` when a metric reader collects, never on the
pool's hot path: the counts and counters through observable instruments; the three
durations, which the pool already keeps as histograms, by replaying at collection
time what each pool histogram gained since the previous collection into an
OpenTelemetry histogram created with the same explicit bucket boundaries (passed as
the advisory, so the SDK's default aggregation uses them). The OpenTelemetry API can
record single values only; each value is replayed as a representative point of its
pool bucket, the points of a collection chosen so that their sum is the pool's sum.
So bucket counts, count and sum are exact; min and max are those of the
representatives (within the right bucket). Replaying costs about what recording
each value as it happened would, but on the collecting thread.

Works with every pool class whose ``stats()`` returns a PoolStats (the async, sync and
null pools, the psycopg2 drop-ins) or a mapping of them (pool sets), for any number
of pools on one or several meter providers.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from opentelemetry.metrics import (
    CallbackOptions,
    Histogram,
    Meter,
    MeterProvider,
    Observation,
    get_meter_provider,
)

from . import __version__
from .metrics_common import (
    COUNT,
    FIGURES,
    HISTOGRAMS,
    STATES,
    Figure,
    HistogramFigure,
    PoolRef,
    Sample,
    read_samples,
)
from .stats import Histogram as PoolHistogram

__all__ = ["POOL_NAME", "STATE", "Instrumentation", "instrument", "replay"]

logger = logging.getLogger("aiopgpool")

#: The attribute naming the pool on every instrument.
POOL_NAME = "db.client.connection.pool.name"
#: The attribute of ``db.client.connection.count``: ``idle`` or ``used``.
STATE = "db.client.connection.state"


def replay(
    bounds: tuple[float, ...], counts: Iterable[int], total: float
) -> Iterator[tuple[float, int]]:
    """Representative values of a histogram: ``(value, how many)`` per non-empty bucket.

    Each value lies strictly between its bucket's bounds (the first bucket starts at 0
    included, the last is above ``bounds[-1]``), so it falls in the same bucket whether
    a value at a bound counts below it (OpenTelemetry, Prometheus) or above it (a pool
    histogram may count either way). The values add up to ``total`` whenever the
    buckets allow it (they do when ``total`` is the sum of the values counted): finite
    buckets take the same relative position between their bounds (their middle at most
    when the +Inf bucket is not empty), and values above the last bound take the rest.
    """
    counts = list(counts)
    finite = [
        (0.0 if i == 0 else bounds[i - 1], bounds[i], n)
        for i, n in enumerate(counts[: len(bounds)])
        if n > 0
    ]
    above = counts[len(bounds)] if len(counts) > len(bounds) else 0
    last = bounds[-1] if bounds else 0.0
    low = sum(lo * n for lo, _, n in finite)
    high = sum(hi * n for _, hi, n in finite)
    # What the finite buckets may take: all of ``total``, or, when values lie above the
    # last bound, what leaves those values above it.
    room = total - above * last
    if high <= low:
        position = 0.5
    else:
        position = max(0.0, min(0.5 if above else 1.0, (room - low) / (high - low)))
    placed = 0.0
    for lo, hi, n in finite:
        value = min(lo + position * (hi - lo), math.nextafter(hi, 0.0))
        if lo > 0.0:
            value = max(value, math.nextafter(lo, math.inf))
        placed += value * n
        yield value, n
    if above > 0:
        value = max((total - placed) / above, math.nextafter(last, math.inf))
        yield value, above


def _delta(previous: PoolHistogram | None, current: PoolHistogram) -> PoolHistogram:
    """What ``current`` gained since ``previous``; all of it after a reset (pop_stats)."""
    if (
        previous is None
        or previous.bounds != current.bounds
        or len(previous.counts) != len(current.counts)
        or current.count < previous.count
        or any(c < p for c, p in zip(current.counts, previous.counts, strict=True))
    ):
        return current
    return PoolHistogram(
        current.bounds,
        tuple(c - p for c, p in zip(current.counts, previous.counts, strict=True)),
        current.sum - previous.sum,
        current.count - previous.count,
    )


class _Instruments:
    """The instruments of one meter provider and the pools they report."""

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._pools: dict[int, PoolRef[Any]] = {}
        # (pool name, histogram field) -> when its counting began, and that pool
        # histogram as last replayed
        self._replayed: dict[tuple[str, str], tuple[float, PoolHistogram]] = {}
        self._warned: set[str] = set()
        self._samples: list[Sample] = []
        self._options: CallbackOptions | None = None
        self._histograms: list[tuple[HistogramFigure, Histogram]] = [
            (h, _create_histogram(meter, h)) for h in HISTOGRAMS
        ]
        meter.create_observable_up_down_counter(
            COUNT.name, [self._observe_count], unit=COUNT.unit, description=COUNT.description
        )
        for figure in FIGURES:
            create = (
                meter.create_observable_counter
                if figure.kind == "counter"
                else meter.create_observable_up_down_counter
            )
            create(
                figure.name,
                [self._observer(figure)],
                unit=figure.unit,
                description=figure.description,
            )

    # -- pools -----------------------------------------------------------------------

    def add(self, pool: Any) -> None:
        with self._lock:
            ref = self._pools.get(id(pool))
            if ref is not None and ref.get() is pool:
                name = getattr(pool, "name", "?")
                raise ValueError(f"pool {name!r} is already instrumented on this provider")
            self._pools[id(pool)] = PoolRef(pool)

    def remove(self, pool: Any) -> bool:
        with self._lock:
            ref = self._pools.get(id(pool))
            if ref is None or ref.get() is not pool:
                return False
            del self._pools[id(pool)]
            return True

    # -- collection ------------------------------------------------------------------

    def _snapshot(self, options: CallbackOptions) -> list[Sample]:
        """The pools' samples for this collection, read once per collection.

        The SDK passes one CallbackOptions to every callback of a collection: the first
        callback to see it reads the pools and replays their histograms (synchronous
        instruments are collected after the callbacks, so the replayed values are in
        this collection). Another SDK passing new options each time only costs more
        reads: values are replayed once whatever the number of reads or readers.
        """
        with self._lock:
            if options is self._options:
                return self._samples
            for key, ref in list(self._pools.items()):
                if ref.get() is None:
                    del self._pools[key]
            samples = read_samples(self._pools.values(), self._warned)
            for sample in samples:
                self._replay(sample)
            self._options = options
            self._samples = samples
            return samples

    def _replay(self, sample: Sample) -> None:
        """Record what the pool's histograms gained since the last replay.

        Kept by pool name (unique among the exported pools), so a pool instrumented
        again continues where it was. All of it is new when the pool's counting began
        since (``counters_since``): a new pool under an old name, or a ``pop_stats()``.
        """
        attributes = {POOL_NAME: sample.stats.name}
        since = sample.stats.counters_since
        for figure, histogram in self._histograms:
            current: PoolHistogram = getattr(sample.stats, figure.field)
            key = (sample.stats.name, figure.field)
            last = self._replayed.get(key)
            gained = _delta(last[1] if last is not None and last[0] == since else None, current)
            self._replayed[key] = (since, current)
            if gained.count <= 0:
                continue
            for value, n in replay(gained.bounds, gained.counts, gained.sum):
                for _ in range(n):
                    histogram.record(value, attributes)

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for sample in self._snapshot(options):
            for state, read in STATES:
                observations.append(
                    Observation(read(sample.stats), {POOL_NAME: sample.stats.name, STATE: state})
                )
        return observations

    def _observer(self, figure: Figure) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            observations = []
            for sample in self._snapshot(options):
                value = figure.read(sample)
                if value is not None:
                    observations.append(Observation(value, {POOL_NAME: sample.stats.name}))
            return observations

        return observe


def _create_histogram(meter: Meter, figure: HistogramFigure) -> Histogram:
    try:
        return meter.create_histogram(
            figure.name,
            unit="s",
            description=figure.description,
            explicit_bucket_boundaries_advisory=list(figure.bounds),
        )
    except TypeError:  # opentelemetry-api < 1.23: no advisory; configure a View instead
        return meter.create_histogram(figure.name, unit="s", description=figure.description)


_registries: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
# The global provider's instruments: made once, on whatever get_meter_provider() gave then
# (a proxy forwards them to the provider set later), so that instrumenting before and
# after set_meter_provider() does not make the same instruments twice.
_global_instruments: _Instruments | None = None
_registries_lock = threading.Lock()


def _instruments_for(provider: MeterProvider | None) -> _Instruments:
    global _global_instruments
    with _registries_lock:
        if provider is None:
            if _global_instruments is None:
                _global_instruments = _make_instruments(get_meter_provider())
            return _global_instruments
        instruments = _registries.get(provider)
        if instruments is None:
            instruments = _registries[provider] = _make_instruments(provider)
        return instruments


def _make_instruments(provider: MeterProvider) -> _Instruments:
    return _Instruments(provider.get_meter("aiopgpool", __version__))


class Instrumentation:
    """What :func:`instrument` returns: ``uninstrument()`` stops reporting the pool.

    Also a context manager: ``with instrument(pool): ...`` uninstruments on exit.
    """

    def __init__(self, pool: Any, instruments: _Instruments) -> None:
        self._pool: PoolRef[Any] = PoolRef(pool)
        self._instruments = instruments

    def uninstrument(self) -> None:
        """Stop reporting this pool (idempotent). The instruments stay, without it."""
        pool = self._pool.get()
        if pool is not None:
            self._instruments.remove(pool)

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstrument()


def instrument(pool: Any, meter_provider: MeterProvider | None = None) -> Instrumentation:
    """Report ``pool``'s metrics through OpenTelemetry (see the module's documentation).

    ``meter_provider`` defaults to the global one (``opentelemetry.metrics``, set before
    or after this call). Any number
    of pools may be instrumented on one provider: they share its instruments and are
    told apart by ``db.client.connection.pool.name``, so their names must differ (a
    second pool with the same name is left out, with a warning). Instrumenting the same
    pool twice on one provider raises ValueError. The pool is held weakly: a pool that
    is garbage-collected stops being reported.
    """
    if not callable(getattr(pool, "stats", None)):
        raise TypeError(f"{type(pool).__name__} has no stats(): not a pool")
    instruments = _instruments_for(meter_provider)
    instruments.add(pool)
    return Instrumentation(pool, instruments)
