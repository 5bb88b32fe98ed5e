"""What :mod:`aiopgpool.opentelemetry` and :mod:`aiopgpool.prometheus` both export.

One table of figures read from :class:`~aiopgpool.PoolStats`, named after the
OpenTelemetry semantic conventions for database client connection pools
(``db.client.connection.*``) where they have a name for it, and ``aiopgpool.pool.*``
for the pool's other counters. The OpenTelemetry exporter uses the dotted names,
the Prometheus collector the same names with ``_`` for ``.``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from .stats import DURATION_BOUNDS, USE_FLOOR_BITS, PoolStats

__all__ = [
    "COUNT",
    "FIGURES",
    "HISTOGRAMS",
    "STATES",
    "Figure",
    "HistogramFigure",
    "PoolRef",
    "Sample",
    "read_samples",
]

logger = logging.getLogger("aiopgpool")

#: How often a snapshot is retried when ``stats()`` raised RuntimeError: an async
#: pool read from another thread while its loop changed it ("deque mutated during
#: iteration"); the next try normally succeeds.
_STATS_TRIES = 5


@dataclass(frozen=True)
class Sample:
    """One pool's figures at one collection."""

    stats: PoolStats
    keeps_idle: bool
    """False for the null pools, which keep no idle connection."""


@dataclass(frozen=True)
class Figure:
    """A single-valued figure per pool: a gauge (up-down counter) or a monotonic counter."""

    name: str
    """Dotted OpenTelemetry name; Prometheus uses it with ``_`` for ``.``."""
    kind: Literal["gauge", "counter"]
    unit: str
    """UCUM unit for OpenTelemetry (``{connection}``, ``{request}``...)."""
    description: str
    read: Callable[[Sample], int | None]
    """The value for one pool; None when the pool has none (an unbounded null pool's max)."""

    @property
    def prometheus_name(self) -> str:
        """The Prometheus family name (counters get ``_total`` from prometheus_client)."""
        return self.name.replace(".", "_")


@dataclass(frozen=True)
class HistogramFigure:
    """A duration histogram, read from one of PoolStats' ``*_histogram`` fields (seconds)."""

    name: str
    description: str
    field: Literal["wait_time_histogram", "use_time_histogram", "connect_time_histogram"]
    bounds: tuple[float, ...] = DURATION_BOUNDS
    """The pool histogram's bucket bounds (seconds)."""

    @property
    def prometheus_name(self) -> str:
        """The Prometheus family name, unit included."""
        return self.name.replace(".", "_") + "_seconds"


#: ``db.client.connection.count``, one value per ``db.client.connection.state``.
COUNT = Figure(
    "db.client.connection.count",
    "gauge",
    "{connection}",
    "The number of connections that are currently in the state described by the state attribute.",
    lambda s: s.stats.size,
)
#: The states of ``db.client.connection.count`` and how each is read.
STATES: tuple[tuple[str, Callable[[PoolStats], int]], ...] = (
    ("idle", lambda st: st.idle),
    ("used", lambda st: st.in_use),
)


def _max_connections(s: Sample) -> int | None:
    # A null pool's max_size 0 means "no bound": no value rather than a false 0.
    if not s.keeps_idle and s.stats.max_size == 0:
        return None
    return s.stats.max_size


FIGURES: tuple[Figure, ...] = (
    Figure(
        "db.client.connection.idle.max",
        "gauge",
        "{connection}",
        "The maximum number of idle open connections allowed.",
        lambda s: s.stats.max_size if s.keeps_idle else 0,
    ),
    Figure(
        "db.client.connection.idle.min",
        "gauge",
        "{connection}",
        "The minimum number of idle open connections allowed.",
        lambda s: s.stats.min_size if s.keeps_idle else 0,
    ),
    Figure(
        "db.client.connection.max",
        "gauge",
        "{connection}",
        "The maximum number of open connections allowed.",
        _max_connections,
    ),
    Figure(
        "db.client.connection.pending_requests",
        "gauge",
        "{request}",
        "The number of current pending requests for an open connection.",
        lambda s: s.stats.waiting,
    ),
    Figure(
        "db.client.connection.timeouts",
        "counter",
        "{timeout}",
        "The number of connection timeouts that have occurred trying to obtain a connection "
        "from the pool.",
        lambda s: s.stats.timeouts,
    ),
    # Beyond the conventions: the pool's other counters.
    Figure(
        "aiopgpool.pool.requests",
        "counter",
        "{request}",
        "Connection requests (getconn) served or failed.",
        lambda s: s.stats.requests,
    ),
    Figure(
        "aiopgpool.pool.requests_waited",
        "counter",
        "{request}",
        "Connection requests that found no idle connection and had to wait.",
        lambda s: s.stats.requests_waited,
    ),
    Figure(
        "aiopgpool.pool.connections_created",
        "counter",
        "{connection}",
        "Connections opened.",
        lambda s: s.stats.connections_created,
    ),
    Figure(
        "aiopgpool.pool.connections_failed",
        "counter",
        "{connection}",
        "Connection attempts that failed.",
        lambda s: s.stats.connections_failed,
    ),
    Figure(
        "aiopgpool.pool.connections_lost",
        "counter",
        "{connection}",
        "Connections found dead (closed by the server, failed a check) and replaced.",
        lambda s: s.stats.connections_lost,
    ),
    Figure(
        "aiopgpool.pool.connections_closed",
        "counter",
        "{connection}",
        "Connections the pool closed (expired, idle, discarded, resized away).",
        lambda s: s.stats.connections_closed,
    ),
    Figure(
        "aiopgpool.pool.returns_bad",
        "counter",
        "{connection}",
        "Connections returned in a transaction, in error, mid-query or broken.",
        lambda s: s.stats.returns_bad,
    ),
    Figure(
        "aiopgpool.pool.leaks",
        "counter",
        "{connection}",
        "Connections held longer than leak_timeout.",
        lambda s: s.stats.leaks,
    ),
)

HISTOGRAMS: tuple[HistogramFigure, ...] = (
    HistogramFigure(
        "db.client.connection.create_time",
        "The time it took to create a new connection.",
        "connect_time_histogram",
    ),
    HistogramFigure(
        "db.client.connection.wait_time",
        "The time it took to obtain an open connection from the pool.",
        "wait_time_histogram",
    ),
    HistogramFigure(
        "db.client.connection.use_time",
        "The time between borrowing a connection and returning it to the pool.",
        "use_time_histogram",
        # Use times under about 1 ms share the first bucket (see stats.USE_FLOOR_BITS).
        DURATION_BOUNDS[USE_FLOOR_BITS:],
    ),
)


def _keeps_idle(pool: object) -> bool:
    """False for a null pool (async, sync, or a drop-in built with ``disable_pooling``)."""
    # A drop-in wraps a sync pool (``_pool``), a public pool holds its core (``_core``);
    # the core knows (``null``, or ``_keep_idle`` in older cores). Anything else counts
    # as a pool that keeps idle connections.
    obj = pool
    for attr in ("_pool", "_core"):
        obj = getattr(obj, attr, obj)
    null = getattr(obj, "null", None)
    if isinstance(null, bool):
        return not null
    return bool(getattr(obj, "_keep_idle", True))


P = TypeVar("P")


class PoolRef(Generic[P]):
    """A pool held weakly when it can be, so that exporting it does not keep it alive."""

    __slots__ = ("_ref", "_strong", "keeps_idle")

    def __init__(self, pool: P) -> None:
        self.keeps_idle = _keeps_idle(pool)
        self._strong: P | None = None
        self._ref: weakref.ref[Any] | None = None
        try:
            self._ref = weakref.ref(pool)
        except TypeError:
            self._strong = pool

    def get(self) -> P | None:
        """The pool, or None when it was garbage-collected."""
        if self._ref is not None:
            pool: P | None = self._ref()
            return pool
        return self._strong


def _read_stats(pool: Any) -> list[PoolStats]:
    """``pool.stats()`` as a list: one PoolStats, or one per member for a set of pools."""
    for attempt in range(_STATS_TRIES):
        try:
            result = pool.stats()
        except RuntimeError:
            # An async pool read from another thread while its loop changed it.
            if attempt + 1 < _STATS_TRIES:
                continue
            logger.warning("cannot read the stats of pool %r", _name_of(pool), exc_info=True)
            return []
        except Exception:
            logger.debug("cannot read the stats of pool %r", _name_of(pool), exc_info=True)
            return []
        if isinstance(result, PoolStats):
            return [result]
        if isinstance(result, Mapping):
            return [st for st in result.values() if isinstance(st, PoolStats)]
        logger.warning("stats() of pool %r is not a PoolStats", _name_of(pool))
        return []
    return []


def _name_of(pool: Any) -> str:
    try:
        return str(pool.name)
    except Exception:
        return type(pool).__name__


def read_samples(refs: Iterable[PoolRef[Any]], warned: set[str]) -> list[Sample]:
    """One :class:`Sample` per live pool (per member of a pool set), unique by pool name.

    A second pool with a name already seen is left out (its figures would overwrite
    the first's under the same labels); ``warned`` keeps the names already logged.
    """
    samples: list[Sample] = []
    seen: set[str] = set()
    for ref in refs:
        pool = ref.get()
        if pool is None:
            continue
        for stats in _read_stats(pool):
            if stats.name in seen:
                if stats.name not in warned:
                    warned.add(stats.name)
                    logger.warning(
                        "two pools are named %r: only the first one's metrics are exported",
                        stats.name,
                    )
                continue
            seen.add(stats.name)
            samples.append(Sample(stats, ref.keeps_idle))
    return samples
