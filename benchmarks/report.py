"""Turns results into per-case, per-pool medians and prints them as a plain text table."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.metrics import Sample, median, paired_ratios
from benchmarks.plan import FAMILIES, Case, Plan, PoolSpec
from benchmarks.runner import Results
from benchmarks.targets import TargetResult


@dataclass
class Row:
    """One pool in one case: medians over rounds, or why there are none."""

    case: Case
    pool: PoolSpec
    samples: list[Sample]
    #: round -> this pool's ops/s over its family floor's ops/s in that round.
    ratios: dict[int, float] = field(default_factory=dict)
    problem: str | None = None

    @property
    def ops_s(self) -> float | None:
        """Median ops/s over rounds."""
        return median(s.ops_s for s in self.samples)

    @property
    def ratio(self) -> float | None:
        """Median over rounds of the per-round ratio to the floor."""
        return median(self.ratios.values())

    @property
    def p50_us(self) -> float | None:
        """Median over rounds of the per-round p50 latency, in microseconds."""
        return median(s.p50_us for s in self.samples)

    @property
    def p99_us(self) -> float | None:
        """Median over rounds of the per-round p99 latency, in microseconds."""
        return median(s.p99_us for s in self.samples)

    @property
    def cpu_us(self) -> float | None:
        """Median over rounds of this process's CPU time per op, in microseconds."""
        return median(s.cpu_us_per_op for s in self.samples)

    @property
    def evenness(self) -> float | None:
        """Median over rounds of min/mean ops per worker."""
        return median(s.evenness for s in self.samples)


def build_rows(plan: Plan, results: Results) -> list[Row]:
    """A :class:`Row` for every (case, pool) of the plan, in table order."""
    rows: list[Row] = []
    for case in plan.cases:
        floor = plan.floor_of(case.family)
        floor_samples = results.of(case, floor) if floor else []
        for pool in plan.pools_of(case.family):
            samples = results.of(case, pool)
            problem = results.failures.get((case.id, pool.key))
            if problem is None and not samples:
                problem = results.pool_problems.get(pool.key, "not run")
            elif problem is not None:
                problem = f"failed: {problem}"
            rows.append(Row(case, pool, samples, paired_ratios(samples, floor_samples), problem))
    return rows


def winners(rows: list[Row]) -> dict[str, Row]:
    """Per case id, the non-floor pool with the highest median ratio."""
    best: dict[str, Row] = {}
    for row in rows:
        if row.pool.is_floor or row.pool.is_reference or row.ratio is None:
            continue
        cur = best.get(row.case.id)
        if cur is None or (cur.ratio is not None and row.ratio > cur.ratio):
            best[row.case.id] = row
    return best


def _fmt_us(us: float | None) -> str:
    if us is None or us != us:
        return "-"
    if us >= 10_000:
        return f"{us / 1000:.1f}ms"
    if us >= 1000:
        return f"{us / 1000:.2f}ms"
    if us >= 10:
        return f"{us:.0f}us"
    return f"{us:.1f}us"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


_HEADERS = ("case", "N", "pool", "ops/s", "x floor", "p50", "p99", "even", "cpu/op", "rounds")
_FAMILY_TITLES = {
    "async": "ASYNC pools (N = asyncio tasks; floor = minimal fair queue of psycopg"
    " AsyncConnections)",
    "sync": "SYNC pools (N = threads; floor = minimal fair queue of psycopg Connections)",
    "uvloop": "UVLOOP: the async pools on uvloop's event loop (floor: the async floor, on uvloop)",
}


def format_table(plan: Plan, rows: list[Row], rounds: int) -> str:
    """The results as a plain text table, one section per family, with footers."""
    best = winners(rows)
    out: list[str] = []
    for family in FAMILIES:
        fam_rows = [r for r in rows if r.case.family == family]
        if not fam_rows:
            continue
        table: list[tuple[str, ...]] = [_HEADERS]
        last_case = ""
        for r in fam_rows:
            case_label: str = r.case.kind if r.case.kind != last_case else ""
            last_case = r.case.kind
            win = best.get(r.case.id)
            name = r.pool.name + (" *" if win is r else "")
            cells: tuple[str, ...]
            if r.problem is not None and not r.samples:
                cells = (case_label, str(r.case.concurrency), name, _clip(r.problem, 90))
            else:
                cells = (
                    case_label,
                    str(r.case.concurrency),
                    name,
                    _fmt(r.ops_s, ",.0f"),
                    _fmt(r.ratio, ".2f"),
                    _fmt_us(r.p50_us),
                    _fmt_us(r.p99_us),
                    _fmt(r.evenness, ".2f"),
                    _fmt_us(r.cpu_us),
                    f"{len(r.samples)}/{rounds}",
                )
            table.append(cells)
        out.append(_FAMILY_TITLES[family])
        out.extend(_render(table))
        out.append("")
    out.extend(_footers(plan))
    return "\n".join(out)


def _render(table: list[tuple[str, ...]]) -> list[str]:
    """Align columns; a short row (case, N, pool, note) lets its note run on."""
    ncols = len(table[0])
    widths = [0] * ncols
    for row in table:
        for i, cell in enumerate(row):
            if len(row) == ncols or i < 3:
                widths[i] = max(widths[i], len(cell))
    lines = []
    for n, row in enumerate(table):
        parts = [c.ljust(widths[i]) if i < 3 else c.rjust(widths[i]) for i, c in enumerate(row)]
        if len(row) < ncols:
            parts = [*parts[:3], " ".join(row[3:])]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _footers(plan: Plan) -> list[str]:
    notes = [
        "x floor: median over rounds of (pool ops/s / same-family floor ops/s in the same round).",
        "p50/p99: per op, from asking for a connection to having given it back (median over"
        " rounds);",
        "  cold_burst: ops/s = requests / time to serve them all, over the round's bursts (each"
        " on a fresh pool); latency = each request's wait + query.",
        "even: min/mean ops completed per worker (1.00 = even, near 0 = a worker starved).",
        "cpu/op: this process's CPU time per op, all threads (not the server's): the pool's"
        " cost, little affected by other load on the machine.",
        "* = fastest pool (floors excluded) in that case.",
    ]
    keys = {p.key for p in plan.pools}
    kinds = {c.kind for c in plan.cases}
    if kinds & {"waiters", "overload"}:
        notes.append(
            "waiters@N: checkout with N tasks waiting in line (10 more hold the connections);"
            " overload@N: SELECT 1 with N tasks on 10 connections. Both make a fixed number of"
            " ops per task (no warm-up), in the first third of the rounds; p50/p99 are the wait"
            " (ask to having the connection); waiters' cpu/op is the cost of a waited checkout."
        )
    if keys & {"async/asyncpg", "async/asyncpg-noreset"}:
        notes.append(
            "asyncpg rows use the asyncpg driver, not psycopg: their ratio is still against the"
            " psycopg async floor, so it mixes driver speed with pool cost."
        )
    if "async/asyncpg-noreset" in keys:
        notes.append(
            "asyncpg-noreset: a Connection subclass whose get_reset_query() returns '' (no"
            " reset query on release)."
        )
    if "sync/psycopg2" in keys:
        notes.append(
            "psycopg2 rows: ThreadedConnectionPool (psycopg2 driver) behind a Semaphore(maxconn)"
            " so it waits instead of raising; ratio against the psycopg sync floor."
        )
    notes.append("Every psycopg connection is autocommit; every pool is min=max=10, pre-filled.")
    return notes


def format_targets(results: list[TargetResult]) -> str:
    """The targets section: one PASS/FAIL/SKIP line per target."""
    lines = [
        "TARGETS (median over rounds of the paired ops/s ratio; informational, never asserted;",
        "         'by cpu' = the same comparison by this process's CPU time per op;",
        "         'rounds' = the middle half of the per-round ratios, how much rounds disagree)",
    ]
    width = max((len(r.target.label) for r in results), default=0)
    for r in results:
        value = "" if r.value is None else f"{r.value:.2f}x"
        note = f"  ({r.note})" if r.note else ""
        if r.by_cpu is not None:
            spread = "" if r.spread is None else f", rounds {r.spread[0]:.2f}-{r.spread[1]:.2f}"
            note = f"  (by cpu {r.by_cpu:.2f}x{spread}){note}"
        lines.append(f"  {r.status:<4}  {r.target.label.ljust(width)}  {value:>6}{note}")
    passed = sum(r.status == "PASS" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    skipped = sum(r.status == "SKIP" for r in results)
    lines.append(f"  PASS {passed} / FAIL {failed} / SKIP {skipped}")
    return "\n".join(lines)


def format_pool_status(plan: Plan, results: Results) -> str:
    """Which pools were skipped, declared dead, or failed some case, and why."""
    lines = []
    for pool in plan.pools:
        why = results.pool_problems.get(pool.key)
        if why:
            lines.append(f"  {pool.key}: {why}")
    for (case_id, key), why in sorted(results.failures.items()):
        lines.append(f"  {key} in {case_id}: failed: {why}")
    if not lines:
        return "All pools ran every selected case."
    return "\n".join(["POOLS NOT (FULLY) MEASURED", *lines])
