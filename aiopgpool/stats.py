"""Pool statistics: the public :class:`PoolStats` snapshot and the live counters behind it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import floor
from time import time
from typing import Any

__all__ = [
    "DURATION_BOUNDS",
    "USE_FLOOR_BITS",
    "Counters",
    "Histogram",
    "HistogramRecorder",
    "PoolStats",
    "psycopg_pool_stats",
    "snapshot",
]

#: Upper bounds (seconds) of the buckets of every duration histogram:
#: powers of two from 1 µs to about 16.8 s (2**24 µs). A value goes to the
#: bucket of the bit length of its whole microseconds, which costs a few
#: bytecodes on a hot path (a bisect over decimal bounds cost about 1,700
#: instructions per return); a value exactly at a bound counts in the next.
#: Whole microseconds come from ``math.floor``: ``int()`` of a float costs
#: twice as much (about 620 instructions against 280 on CPython 3.11).
DURATION_BOUNDS: tuple[float, ...] = tuple(2**k / 1e6 for k in range(25))
#: The use-time histogram's first bound: 2**10 µs, about 1 ms (use times below it are
#: counted, not bucketed: a third of the cost on the return hot path).
USE_FLOOR_BITS = 10
# Slots of a recorder's counts: bit lengths of any plausible duration in µs;
# those past the last bound are folded into +Inf by snapshot().
_RAW_SLOTS = 64


@dataclass(frozen=True)
class Histogram:
    """A snapshot of a duration histogram, in seconds.

    ``counts[i]`` counts the values ``<= bounds[i]`` and above the previous
    bound (not cumulative); the last count, one more than ``bounds``, is for
    values above the last bound (+Inf).
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int

    @classmethod
    def empty(cls, bounds: tuple[float, ...] = DURATION_BOUNDS) -> Histogram:
        """A histogram with nothing recorded."""
        return cls(bounds, (0,) * (len(bounds) + 1), 0.0, 0)


class HistogramRecorder:
    """The live, mutable side of a :class:`Histogram` (one pool's loop writes it).

    ``counts[i]`` counts values whose whole microseconds have bit length
    ``i``; ``total_us`` is their sum in whole microseconds. A hot path may
    record inline: ``us = floor(seconds * 1e6); rec.counts[us.bit_length()] += 1;
    rec.total_us += us``; or, for a value below :attr:`short_below`, count it
    in ``short`` and add it to ``short_sum`` (seconds), about a third of the
    cost. A histogram whose sum is kept elsewhere only counts (:meth:`count`)
    and is given its sum at :meth:`snapshot`. ``floor_bits``: the first
    bucket's bound is ``2**floor_bits`` µs.
    """

    __slots__ = ("bounds", "counts", "floor_bits", "short", "short_below", "short_sum", "total_us")

    def __init__(self, floor_bits: int = 0) -> None:
        self.floor_bits = floor_bits
        self.bounds = DURATION_BOUNDS[floor_bits:]
        #: Values below this (seconds) all fall in the first bucket.
        self.short_below = DURATION_BOUNDS[floor_bits] if floor_bits else 0.0
        self.clear()

    def record(self, seconds: float) -> None:
        """Count one duration and add it to the sum."""
        us = floor(seconds * 1e6)
        self.counts[us.bit_length()] += 1
        self.total_us += us

    def count(self, seconds: float) -> None:
        """Count one duration in its bucket only (the sum is kept elsewhere)."""
        self.counts[floor(seconds * 1e6).bit_length()] += 1

    def snapshot(self, extra_zeros: int = 0, total: float | None = None) -> Histogram:
        """The histogram now.

        ``extra_zeros`` durations of 0 not recorded one by one are added;
        ``total``: the sum, when it is kept elsewhere (see :meth:`count`).
        """
        first, n = self.floor_bits, len(DURATION_BOUNDS)
        raw = self.counts
        counts = [sum(raw[: first + 1]) + self.short + extra_zeros, *raw[first + 1 : n]]
        counts.append(sum(raw[n:]))
        if total is None:
            total = self.total_us / 1e6 + self.short_sum
        return Histogram(self.bounds, tuple(counts), total, sum(counts))

    def clear(self) -> None:
        """Forget every value."""
        self.counts = [0] * _RAW_SLOTS
        self.total_us = 0
        self.short = 0
        self.short_sum = 0.0


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's state and counters (``pool.stats()``)."""

    name: str
    size: int
    """Connections open now: idle + in use."""
    idle: int
    in_use: int
    waiting: int
    """Requests pending right now: queued for a connection, or opening their own."""
    min_size: int
    max_size: int
    requests: int
    """getconn() calls served or failed since the pool was created."""
    requests_waited: int
    """Requests that found no idle connection and had to wait: in line, or for a
    connection opened for them."""
    wait_time_total: float
    """Seconds spent waiting, summed over all requests that waited."""
    timeouts: int
    """Requests that failed with PoolTimeout (or TooManyRequests)."""
    connections_created: int
    connections_failed: int
    """Connection attempts that failed."""
    connections_lost: int
    """Connections found dead (closed by the server, failed a check) and replaced."""
    returns_bad: int
    """Connections returned in a transaction, in error, mid-query or broken."""
    leaks: int
    """Connections held longer than leak_timeout."""
    connections_closed: int
    """Connections the pool closed (expired, idle, discarded, resized away)."""
    wait_time_histogram: Histogram = field(default_factory=Histogram.empty)
    """Time from request to checkout, every request (0 for those that did not wait)."""
    use_time_histogram: Histogram = field(default_factory=Histogram.empty)
    """Time from checkout to return, every return."""
    connect_time_histogram: Histogram = field(default_factory=Histogram.empty)
    """Time to open (and configure) a connection, every successful attempt."""
    counters_since: float = 0.0
    """When the counters and histograms began (Unix time): the pool's creation, or
    the last ``pop_stats()``. Exporters tell a reset by it (Prometheus ``_created``)."""

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict."""
        return asdict(self)


class Counters:
    """Mutable counters owned by one pool; read into a :class:`PoolStats`."""

    __slots__ = (
        "connections_closed",
        "connections_created",
        "connections_failed",
        "connections_lost",
        "leaks",
        "requests",
        "requests_waited",
        "returns_bad",
        "since",
        "timeouts",
        "wait_time_total",
    )

    def __init__(self) -> None:
        self.since = time()  # see PoolStats.counters_since
        self.requests = 0
        self.requests_waited = 0
        self.wait_time_total = 0.0
        self.timeouts = 0
        self.connections_created = 0
        self.connections_failed = 0
        self.connections_lost = 0
        self.returns_bad = 0
        self.leaks = 0
        self.connections_closed = 0


def snapshot(
    name: str,
    size: int,
    idle: int,
    in_use: int,
    waiting: int,
    min_size: int,
    max_size: int,
    c: Counters,
    histograms: tuple[HistogramRecorder, HistogramRecorder, HistogramRecorder],
) -> PoolStats:
    """A :class:`PoolStats` from a pool's state, counters and (wait, use, connect) histograms."""
    wait, use, connect = histograms
    return PoolStats(
        name=name,
        size=size,
        idle=idle,
        in_use=in_use,
        waiting=waiting,
        min_size=min_size,
        max_size=max_size,
        requests=c.requests,
        requests_waited=c.requests_waited,
        wait_time_total=c.wait_time_total,
        timeouts=c.timeouts,
        connections_created=c.connections_created,
        connections_failed=c.connections_failed,
        connections_lost=c.connections_lost,
        returns_bad=c.returns_bad,
        leaks=c.leaks,
        connections_closed=c.connections_closed,
        # Requests served at once are not recorded one by one: they waited 0.
        # Waits are only counted in their buckets: their sum is wait_time_total.
        # (never below 0: a pop_stats() may land between a request and its wait's start)
        wait_time_histogram=wait.snapshot(
            max(c.requests - c.requests_waited, 0), c.wait_time_total
        ),
        use_time_histogram=use.snapshot(),
        connect_time_histogram=connect.snapshot(),
        counters_since=c.since,
    )


def psycopg_pool_stats(stats: PoolStats) -> dict[str, int]:
    """``stats`` under psycopg_pool's ``get_stats()`` keys (durations in whole ms).

    Every key is present, zero or not (psycopg_pool leaves out counters still at zero).
    """
    return {
        "pool_min": stats.min_size,
        "pool_max": stats.max_size,
        "pool_size": stats.size,
        "pool_available": stats.idle,
        "requests_waiting": stats.waiting,
        "usage_ms": int(stats.use_time_histogram.sum * 1000),
        "requests_num": stats.requests,
        "requests_queued": stats.requests_waited,
        "requests_wait_ms": int(stats.wait_time_total * 1000),
        "requests_errors": stats.timeouts,
        "returns_bad": stats.returns_bad,
        "connections_num": stats.connections_created + stats.connections_failed,
        "connections_ms": int(stats.connect_time_histogram.sum * 1000),
        "connections_errors": stats.connections_failed,
        "connections_lost": stats.connections_lost,
    }
