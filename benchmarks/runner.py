"""Runs the plan: pools take turns, round by round, in one process.

Families run one after the other: async (on asyncio's loop), uvloop (the same
async pools on uvloop's loop), sync (threads).

Round ``r``: for every case, every pool of the case's family runs it once (a
short warm-up, then ``duration`` seconds measured), in an order shuffled anew
(seeded by ``r``), so that no pool always follows the same one: what a pool
leaves behind in the shared event loop and on the server changes the next
pool's figures by several per cent, and a fixed cyclic order (a rotation)
would give every pool the same predecessor in every round. The steady-state
pools of a family are opened, pre-filled, at the start of every round and
closed at its end. Each cold burst gets a fresh pool, and a round makes
``BURSTS_PER_ROUND`` of them per pool, the pools taking turns burst by burst:
one burst of 200 requests lasts about 25 ms, and single bursts differ by
10-20 % from one to the next, so one per round could not tell 0.94 from
0.96. The round's bursts add up to one sample (their ops over their summed
time). Fresh pools each round matter: a pool
reuses its most recently returned connection, and a connection's server
backend can be 20 % faster or slower than another's for seconds at a time
(where the scheduler puts it on a small machine), so a pool kept for the whole
run would keep its luck for the whole run. A pool that cannot open is
*skipped*; one that raises in a case has that case marked *failed* (other
cases go on); one that hangs is *dead* and not run again. Every pool is closed
in ``finally`` blocks.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from benchmarks.adapters_async import AdapterUnavailable, AsyncAdapter
from benchmarks.adapters_sync import SyncAdapter
from benchmarks.cases import (
    WorkloadHung,
    bounded,
    call_bounded,
    run_async_burst,
    run_async_fixed,
    run_sync_fixed,
)
from benchmarks.environment import describe
from benchmarks.metrics import Measurement, Sample, combined, summarize
from benchmarks.plan import POOL_SIZE, Case, Family, Plan, PoolSpec, Settings

#: Seconds beyond ``duration`` a measured run may take before the pool counts as hung.
HANG_GRACE = 30.0
#: Seconds a pool may take to open or to close.
OPEN_LIMIT = 90.0
CLOSE_LIMIT = 20.0
#: Seconds the cold burst may take.
BURST_LIMIT = 90.0
#: Seconds to wait after a cold burst's pool closed, so that the next pool's
#: burst does not share the server with the backends still exiting.
BURST_SETTLE = 0.2
#: Cold bursts per pool per round, added up into the round's sample.
BURSTS_PER_ROUND = 5

T = TypeVar("T")


def shuffled(items: Sequence[T], round_no: int) -> list[T]:
    """``items`` in the order of round ``round_no``: shuffled, the same in every run."""
    order = list(items)
    random.Random(f"round {round_no}").shuffle(order)
    return order


def _skip_reason(exc: BaseException) -> str:
    if isinstance(exc, AdapterUnavailable):
        return f"skipped: {exc}"
    return f"skipped: open failed: {describe(exc)}"


class Progress:
    """A tqdm progress bar over every (round, case, pool) run; quiet if tqdm is missing."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def show(self, label: str) -> None:
        """Say what is running now."""
        if self._bar is not None:
            self._bar.set_description_str(label, refresh=True)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` runs as done (or skipped)."""
        if self._bar is not None:
            self._bar.update(n)

    def note(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()


@dataclass
class Results:
    """Everything measured so far, and what went wrong with which pool."""

    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    #: pool key -> why it was skipped (it could not open) or declared dead (it hung).
    pool_problems: dict[str, str] = field(default_factory=dict)
    #: (case id, pool key) -> the error that failed that case for that pool.
    failures: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, case: Case, pool: PoolSpec, sample: Sample) -> None:
        """Record one sample."""
        self.samples.setdefault((case.id, pool.key), []).append(sample)

    def of(self, case: Case, pool: PoolSpec) -> list[Sample]:
        """The samples of one pool in one case, by round."""
        return self.samples.get((case.id, pool.key), [])


class Runner:
    """Runs a :class:`Plan` against one server and fills a :class:`Results`."""

    def __init__(self, plan: Plan, settings: Settings, dsn: str, progress: Progress) -> None:
        self.plan = plan
        self.settings = settings
        self.dsn = dsn
        self.progress = progress
        self.results = Results()

    # -- bookkeeping ------------------------------------------------------------

    def _usable(self, pool: PoolSpec, case: Case) -> bool:
        return pool.key not in self.results.pool_problems and (
            (case.id, pool.key) not in self.results.failures
        )

    def _problem(self, pool: PoolSpec, why: str) -> None:
        if pool.key not in self.results.pool_problems:
            self.results.pool_problems[pool.key] = why
            self.progress.note(f"[{pool.key}] {why}")

    def _failed(self, case: Case, pool: PoolSpec, exc: BaseException) -> None:
        why = describe(exc)
        self.results.failures[(case.id, pool.key)] = why
        self.progress.note(f"[{pool.key}] {case.id} failed: {why}")
        if not isinstance(exc, (AdapterUnavailable, WorkloadHung)):
            detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.progress.note(detail.rstrip())

    def _record(self, case: Case, pool: PoolSpec, m: Measurement, round_no: int) -> None:
        even = case.fixed_duration and case.ops_per_task is None  # else even by design
        self.results.add(case, pool, summarize(m, round_no, with_evenness=even))

    # -- the whole run -------------------------------------------------------------

    def run(self) -> Results:
        """Run the async family, the uvloop family, then the sync family; return the results."""
        if self.plan.cases_of("async"):
            asyncio.run(self._run_async("async"))
        if self.plan.cases_of("uvloop"):
            try:
                import uvloop
            except Exception as exc:
                for pool in self.plan.pools_of("uvloop"):
                    self._problem(pool, f"skipped: cannot import uvloop ({describe(exc)})")
            else:
                uvloop.run(self._run_async("uvloop"))
        if self.plan.cases_of("sync"):
            self._run_sync()
        return self.results

    # -- async -----------------------------------------------------------------

    async def _open_async(self, pool: PoolSpec, min_size: int) -> AsyncAdapter | None:
        adapter = pool.adapter()
        assert isinstance(adapter, AsyncAdapter)
        try:
            await bounded(adapter.open(self.dsn, min_size, POOL_SIZE), OPEN_LIMIT, "open()")
        except Exception as exc:
            self._problem(pool, _skip_reason(exc))
            await self._close_async(pool, adapter)
            return None
        except BaseException:  # cancelled (Ctrl-C) half-way through opening
            await self._close_async(pool, adapter)
            raise
        return adapter

    async def _close_async(self, pool: PoolSpec, adapter: AsyncAdapter) -> None:
        try:
            await bounded(adapter.close(), CLOSE_LIMIT, "close()")
        except Exception as exc:
            self.progress.note(f"[{pool.key}] close failed: {describe(exc)}")

    async def _run_async(self, family: Family) -> None:
        pools = self.plan.pools_of(family)
        cases = self.plan.cases_of(family)
        fixed = [c for c in cases if c.fixed_duration]
        bursts = [c for c in cases if not c.fixed_duration]
        s = self.settings
        for r in range(s.rounds):
            order = shuffled(pools, r)
            open_pools: dict[str, AsyncAdapter] = {}
            try:
                if fixed:
                    for pool in pools:
                        if pool.key not in self.results.pool_problems:
                            self.progress.show(f"r{r + 1}/{s.rounds} opening {pool.key}")
                            adapter = await self._open_async(pool, POOL_SIZE)
                            if adapter is not None:
                                open_pools[pool.key] = adapter
                for case in (c for c in fixed if r < c.rounds_of(s.rounds)):
                    for pool in order:
                        adapter = open_pools.get(pool.key)
                        if adapter is not None and self._usable(pool, case):
                            self.progress.show(f"r{r + 1}/{s.rounds} {case.id} {pool.name}")
                            await self._measure_async(case, pool, adapter, r)
                        self.progress.advance()
            finally:
                for key, adapter in open_pools.items():
                    self.progress.show(f"closing {key}")
                    await self._close_async(next(p for p in pools if p.key == key), adapter)
            for case in bursts:
                measured: dict[str, list[Measurement]] = {}
                for k in range(BURSTS_PER_ROUND):
                    for pool in order:
                        if self._usable(pool, case):
                            self.progress.show(
                                f"r{r + 1}/{s.rounds} {case.id} {pool.name} ({k + 1})"
                            )
                            m = await self._measure_burst(case, pool)
                            if m is not None:
                                measured.setdefault(pool.key, []).append(m)
                for pool in order:
                    if self._usable(pool, case) and pool.key in measured:
                        self._record(case, pool, combined(measured[pool.key]), r)
                    self.progress.advance()

    async def _measure_async(
        self, case: Case, pool: PoolSpec, adapter: AsyncAdapter, round_no: int
    ) -> None:
        s = self.settings
        limit = s.duration + HANG_GRACE
        try:
            if s.warmup > 0 and case.ops_per_task is None:
                await bounded(
                    run_async_fixed(adapter, case, s.warmup),
                    limit,
                    f"{case.id} warm-up",
                )
            gc.collect()
            m = await bounded(run_async_fixed(adapter, case, s.duration), limit, case.id)
        except WorkloadHung as exc:
            self._problem(pool, f"dead: hung in {case.id}: {exc}")
            return
        except Exception as exc:
            self._failed(case, pool, exc)
            return
        self._record(case, pool, m, round_no)

    async def _measure_burst(self, case: Case, pool: PoolSpec) -> Measurement | None:
        """One burst on a fresh pool; None if it failed (recorded as the pool's problem)."""
        adapter = await self._open_async(pool, 0)
        if adapter is None:
            return None
        try:
            gc.collect()
            m: Measurement = await bounded(
                run_async_burst(adapter, case.concurrency), BURST_LIMIT, case.id
            )
        except WorkloadHung as exc:
            self._problem(pool, f"dead: hung in {case.id}: {exc}")
            return None
        except Exception as exc:
            self._failed(case, pool, exc)
            return None
        finally:
            await self._close_async(pool, adapter)
            await asyncio.sleep(BURST_SETTLE)
        return m

    # -- sync ------------------------------------------------------------------

    def _open_sync(self, pool: PoolSpec, min_size: int) -> SyncAdapter | None:
        adapter = pool.adapter()
        assert isinstance(adapter, SyncAdapter)
        try:
            adapter.open(self.dsn, min_size, POOL_SIZE)
        except Exception as exc:
            self._problem(pool, _skip_reason(exc))
            self._close_sync(pool, adapter)
            return None
        except BaseException:  # Ctrl-C half-way through opening
            self._close_sync(pool, adapter)
            raise
        return adapter

    def _close_sync(self, pool: PoolSpec, adapter: SyncAdapter) -> None:
        try:
            call_bounded(adapter.close, CLOSE_LIMIT, "close()")
        except Exception as exc:
            self.progress.note(f"[{pool.key}] close failed: {describe(exc)}")

    def _run_sync(self) -> None:
        pools = self.plan.pools_of("sync")
        cases = self.plan.cases_of("sync")
        s = self.settings
        for r in range(s.rounds):
            order = shuffled(pools, r)
            open_pools: dict[str, SyncAdapter] = {}
            try:
                for pool in pools:
                    if pool.key not in self.results.pool_problems:
                        self.progress.show(f"r{r + 1}/{s.rounds} opening {pool.key}")
                        adapter = self._open_sync(pool, POOL_SIZE)
                        if adapter is not None:
                            open_pools[pool.key] = adapter
                for case in cases:
                    for pool in order:
                        adapter = open_pools.get(pool.key)
                        if adapter is not None and self._usable(pool, case):
                            self.progress.show(f"r{r + 1}/{s.rounds} {case.id} {pool.name}")
                            self._measure_sync(case, pool, adapter, r)
                        self.progress.advance()
            finally:
                for key, adapter in open_pools.items():
                    self.progress.show(f"closing {key}")
                    self._close_sync(next(p for p in pools if p.key == key), adapter)

    def _measure_sync(
        self, case: Case, pool: PoolSpec, adapter: SyncAdapter, round_no: int
    ) -> None:
        s = self.settings
        limit = s.duration + HANG_GRACE
        try:
            if s.warmup > 0:
                run_sync_fixed(adapter, case.kind, case.concurrency, s.warmup, limit)
            gc.collect()
            m = run_sync_fixed(adapter, case.kind, case.concurrency, s.duration, limit)
        except WorkloadHung as exc:
            self._problem(pool, f"dead: hung in {case.id}: {exc}")
            return
        except Exception as exc:
            self._failed(case, pool, exc)
            return
        self._record(case, pool, m, round_no)
