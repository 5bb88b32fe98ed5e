"""The project's performance targets, checked against one run (printed, never asserted)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.metrics import Sample, median, paired_ratios, quartiles
from benchmarks.plan import ASYNC_CONCURRENCY, BURST_TASKS, SYNC_CONCURRENCY
from benchmarks.runner import Results

ASYNC_FLOOR = "async/floor"
SYNC_FLOOR = "sync/floor"
SYNC_FLOOR_FIFO = "sync/floor-fifo"
SYNC_PEER = "sync/psycopg_pool"


@dataclass(frozen=True)
class Target:
    """``pool`` must reach ``threshold`` x ``baseline``'s ops/s in ``case``."""

    case_id: str
    pool_key: str
    baseline_key: str
    threshold: float

    @property
    def label(self) -> str:
        """A readable statement of the target."""
        base = "floor" if self.baseline_key.endswith("/floor") else self.baseline_key
        return f"{self.pool_key} {self.case_id.split('/', 1)[1]} >= {self.threshold:.2f}x {base}"


@dataclass(frozen=True)
class TargetResult:
    """A target, the median over rounds of the paired ratio, and the verdict."""

    target: Target
    value: float | None
    rounds: int
    status: str  # PASS, FAIL or SKIP
    note: str = ""
    #: the same comparison by CPU time: median of (baseline cpu/op / pool cpu/op).
    by_cpu: float | None = None
    #: first and third quartiles of the per-round ratios: how much rounds disagree.
    spread: tuple[float, float] | None = None


def all_targets() -> list[Target]:
    """The targets from the project brief."""
    out = [
        Target(f"async/checkout@{n}", "async/aiopgpool", ASYNC_FLOOR, 0.70)
        for n in ASYNC_CONCURRENCY
    ]
    out += [
        Target(f"async/select1@{n}", "async/aiopgpool", ASYNC_FLOOR, 0.95)
        for n in ASYNC_CONCURRENCY
    ]
    out.append(Target(f"async/cold_burst@{BURST_TASKS}", "async/aiopgpool", ASYNC_FLOOR, 0.95))
    out += [Target(f"sync/select1@{n}", "sync/aiopgpool", SYNC_PEER, 1.0) for n in SYNC_CONCURRENCY]
    # The sync facade under contention (issue #17): ahead of psycopg_pool at 1, 16 and 50 threads.
    out += [
        Target(f"sync/checkout@{n}", "sync/aiopgpool", SYNC_PEER, 1.0)
        for n in SYNC_CONCURRENCY
        if n != 4
    ]
    return out


def _cpu_ratio(mine: list[Sample], base: list[Sample]) -> float | None:
    """Median over rounds of the baseline's CPU per op over this pool's (higher: cheaper)."""
    base_cpu = {s.round: s.cpu_us_per_op for s in base}
    ratios = []
    for s in mine:
        b = base_cpu.get(s.round)
        if b and s.cpu_us_per_op:
            ratios.append(b / s.cpu_us_per_op)
    return median(ratios)


def evaluate(results: Results) -> list[TargetResult]:
    """Check every target on the samples in ``results``.

    The value is the median over rounds of (pool's ops/s / baseline's ops/s in the
    same round); a target whose pool or baseline has no sample is SKIP.
    """
    out: list[TargetResult] = []
    for t in all_targets():
        mine = results.samples.get((t.case_id, t.pool_key), [])
        base = results.samples.get((t.case_id, t.baseline_key), [])
        ratios = paired_ratios(mine, base)
        value = median(ratios.values())
        if value is None:
            why = "not measured in this run"
            for key in (t.pool_key, t.baseline_key):
                if (t.case_id, key) in results.failures:
                    why = f"{key} failed in this case"
                    break
                if key in results.pool_problems:
                    why = f"{key} {results.pool_problems[key].split(':', 1)[0]}"
                    break
            out.append(TargetResult(t, None, 0, "SKIP", why))
        else:
            status = "PASS" if value >= t.threshold else "FAIL"
            out.append(
                TargetResult(
                    t,
                    value,
                    len(ratios),
                    status,
                    note=(
                        _order_note(results, t, mine, base)
                        if t.case_id.startswith("sync/select1@")
                        else ""
                    ),
                    by_cpu=_cpu_ratio(mine, base),
                    spread=quartiles(ratios.values()),
                )
            )
    return out


def _order_note(results: Results, target: Target, mine: list[Sample], peer: list[Sample]) -> str:
    """psycopg_pool's order alone, in ``target``'s case: the FIFO floor over the floor.

    Only where queries run: which idle connection a checkout gets matters to
    the server and the kernel's scheduling (client CPU included), not to the
    pool's own work. Then each pool against the floor of its own order
    (aiopgpool LIFO, psycopg_pool FIFO): the pools' own costs, compared.
    ``mine`` and ``peer`` are the target's pool's and baseline's samples.
    """
    fifo = results.samples.get((target.case_id, SYNC_FLOOR_FIFO), [])
    lifo = results.samples.get((target.case_id, SYNC_FLOOR), [])
    order = median(paired_ratios(fifo, lifo).values())
    if order is None:
        return ""
    note = f"psycopg_pool's order alone: floor-fifo {order:.2f}x floor{_by_cpu(fifo, lifo)}"
    # Each pool against the floor that hands out connections in its own order:
    # what is left is the pool's own work.
    own = median(paired_ratios(mine, lifo).values())
    peer_own = median(paired_ratios(peer, fifo).values())
    if own is None or peer_own is None:
        return note
    return (
        f"{note}; each against its order's floor: {target.pool_key.split('/')[1]} {own:.2f}x"
        f"{_by_cpu(mine, lifo)}, {target.baseline_key.split('/')[1]} {peer_own:.2f}x"
        f"{_by_cpu(peer, fifo)}"
    )


def _by_cpu(mine: list[Sample], base: list[Sample]) -> str:
    by_cpu = _cpu_ratio(mine, base)
    return "" if by_cpu is None else f" (by cpu {by_cpu:.2f}x)"
