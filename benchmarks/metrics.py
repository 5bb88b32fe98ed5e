"""Numbers from one measurement: throughput, latency percentiles, evenness; medians."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Measurement:
    """What a workload observed: ops per worker, every op's latency, the wall time."""

    per_worker: list[int]
    latencies: list[float]
    elapsed: float
    #: CPU seconds this process spent (all threads) during ``elapsed``.
    cpu: float = 0.0


@dataclass(frozen=True)
class Sample:
    """One pool's result for one case in one round."""

    round: int
    ops: int
    elapsed_s: float
    ops_s: float
    p50_us: float
    p99_us: float
    #: min/mean ops completed per worker (1.0: perfectly even; 0: someone starved).
    evenness: float | None
    worker_min: int
    worker_max: int
    #: this process's CPU time per op (all threads; the server's is not included).
    cpu_us_per_op: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of already sorted values (NaN if none).

    The smallest value with at least ``q`` of the values at or below it: the
    ``ceil(q * n)``-th. (The tiny allowance keeps 0.29 * 100 from rounding up to 30.)
    """
    if not sorted_values:
        return float("nan")
    rank = math.ceil(q * len(sorted_values) - 1e-9) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, rank))]


def combined(parts: Sequence[Measurement]) -> Measurement:
    """Several runs of one workload as one: their workers side by side, their times summed."""
    return Measurement(
        per_worker=[n for m in parts for n in m.per_worker],
        latencies=[x for m in parts for x in m.latencies],
        elapsed=sum(m.elapsed for m in parts),
        cpu=sum(m.cpu for m in parts),
    )


def summarize(m: Measurement, round_no: int, *, with_evenness: bool = True) -> Sample:
    """Reduce a :class:`Measurement` to a :class:`Sample`."""
    ops = sum(m.per_worker)
    lat = sorted(m.latencies)
    mean = ops / len(m.per_worker) if m.per_worker else 0.0
    evenness = (min(m.per_worker) / mean if mean else 0.0) if with_evenness else None
    return Sample(
        round=round_no,
        ops=ops,
        elapsed_s=m.elapsed,
        ops_s=ops / m.elapsed if m.elapsed > 0 else 0.0,
        p50_us=percentile(lat, 0.50) * 1e6,
        p99_us=percentile(lat, 0.99) * 1e6,
        evenness=evenness,
        worker_min=min(m.per_worker, default=0),
        worker_max=max(m.per_worker, default=0),
        cpu_us_per_op=m.cpu / ops * 1e6 if ops else None,
    )


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def quartiles(values: Iterable[float]) -> tuple[float, float] | None:
    """The first and third quartiles of ``values`` (None with fewer than two values)."""
    present = sorted(values)
    if len(present) < 2:
        return None
    q1, _, q3 = statistics.quantiles(present, n=4, method="inclusive")
    return q1, q3


def paired_ratios(samples: Sequence[Sample], baseline: Sequence[Sample]) -> dict[int, float]:
    """Per round: this pool's ops/s over the baseline's ops/s in the same round."""
    base = {s.round: s.ops_s for s in baseline}
    return {s.round: s.ops_s / base[s.round] for s in samples if base.get(s.round, 0.0) > 0.0}
