"""What a run measures: the cases, the pools, the settings, and ``--only`` selection."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

from benchmarks.adapters_async import ASYNC_ADAPTERS, AsyncAdapter
from benchmarks.adapters_sync import SYNC_ADAPTERS, SyncAdapter

#: "uvloop": the async pools again, on uvloop's event loop instead of asyncio's.
Family = Literal["async", "sync", "uvloop"]
Kind = Literal["checkout", "select1", "cold_burst", "waiters", "overload"]
FAMILIES: tuple[Family, ...] = ("async", "uvloop", "sync")

#: Every pool is min_size = max_size = POOL_SIZE for the steady-state cases.
POOL_SIZE = 10
ASYNC_CONCURRENCY = (1, 10, 100)
SYNC_CONCURRENCY = (1, 4, 16, 50)
#: Tasks in the cold burst (each does select1 once on a fresh min_size=0 pool).
BURST_TASKS = 200
#: Scale: checkout with this many tasks waiting in line (POOL_SIZE more tasks hold the
#: connections), and SELECT 1 with OVERLOAD_PER_CONNECTION tasks per connection.
WAITERS = (10, 1_000, 10_000)
OVERLOAD_PER_CONNECTION = 100
#: The scale cases do a fixed amount of work instead of running ``--duration``: every task
#: makes max(SCALE_MIN_OPS, SCALE_OPS / tasks) ops, so that the line of waiters turns over
#: several times (in 0.1 s, 10,000 tasks would not all get a connection once).
SCALE_OPS = 5_000
SCALE_MIN_OPS = 3
#: ... and run in the first third of the rounds only, at least 2 (a round of them takes
#: about 30 s): 5 of the full run's 15, 2 of --quick's 5.
SCALE_ROUNDS_DIVISOR = 3


@dataclass(frozen=True)
class Case:
    """One workload at one concurrency, for one family of pools."""

    family: Family
    kind: Kind
    concurrency: int

    @property
    def id(self) -> str:
        """A stable name such as ``async/select1@10``."""
        return f"{self.family}/{self.kind}@{self.concurrency}"

    @property
    def fixed_duration(self) -> bool:
        """True for the cases that run for ``--duration``; False for the cold burst."""
        return self.kind != "cold_burst"

    @property
    def tasks(self) -> int:
        """Tasks (threads) that run the case: ``waiters@N`` has N waiting beyond the pool."""
        return self.concurrency + POOL_SIZE if self.kind == "waiters" else self.concurrency

    @property
    def workload(self) -> str:
        """What each task repeats: ``checkout`` or ``select1``."""
        return {"waiters": "checkout", "overload": "select1"}.get(self.kind, self.kind)

    @property
    def ops_per_task(self) -> int | None:
        """For the scale cases, the ops every task makes (None: run for ``--duration``)."""
        if self.kind not in ("waiters", "overload"):
            return None
        return max(SCALE_MIN_OPS, -(-SCALE_OPS // self.tasks))

    def rounds_of(self, rounds: int) -> int:
        """In how many of ``rounds`` rounds the case runs (the first ones)."""
        if not self.ops_per_task:
            return rounds
        return min(rounds, max(2, rounds // SCALE_ROUNDS_DIVISOR))

    @property
    def times_wait(self) -> bool:
        """True for the scale cases, whose latency is the wait (ask to having the connection)."""
        return self.kind in ("waiters", "overload")


@dataclass(frozen=True)
class PoolSpec:
    """One pool under test: its family, its adapter class and its display name."""

    family: Family
    adapter: type[AsyncAdapter] | type[SyncAdapter]

    @property
    def name(self) -> str:
        """The pool's short name, e.g. ``psycopg_pool``."""
        return self.adapter.name

    @property
    def key(self) -> str:
        """A stable name such as ``sync/psycopg_pool``."""
        return f"{self.family}/{self.adapter.name}"

    @property
    def is_floor(self) -> bool:
        """True for the family's floor."""
        return self.adapter.is_floor

    @property
    def is_reference(self) -> bool:
        """True for a row shown for comparison only (never the fastest pool)."""
        return self.adapter.is_reference


@dataclass(frozen=True)
class Settings:
    """How long and how often each pool runs each case."""

    rounds: int
    duration: float
    warmup: float
    quick: bool


@dataclass
class Plan:
    """The selected cases and pools of one run."""

    cases: list[Case] = field(default_factory=list)
    pools: list[PoolSpec] = field(default_factory=list)

    def cases_of(self, family: Family) -> list[Case]:
        """The selected cases of one family."""
        return [c for c in self.cases if c.family == family]

    def pools_of(self, family: Family) -> list[PoolSpec]:
        """The selected pools of one family (its floor included)."""
        return [p for p in self.pools if p.family == family]

    def floor_of(self, family: Family) -> PoolSpec | None:
        """The family's floor, if the family is selected at all."""
        return next((p for p in self.pools_of(family) if p.is_floor), None)

    def run_count(self, rounds: int) -> int:
        """How many (round, case, pool) measurements the plan makes."""
        return sum(len(self.pools_of(c.family)) * c.rounds_of(rounds) for c in self.cases)


def all_cases() -> list[Case]:
    """Every case the suite knows, in table order."""
    steady: tuple[Kind, ...] = ("checkout", "select1")
    cases = [Case("async", kind, n) for kind in steady for n in ASYNC_CONCURRENCY]
    cases.append(Case("async", "cold_burst", BURST_TASKS))
    cases += [Case("async", "waiters", n) for n in WAITERS]
    cases.append(Case("async", "overload", OVERLOAD_PER_CONNECTION * POOL_SIZE))
    cases += [Case("uvloop", kind, n) for kind in steady for n in ASYNC_CONCURRENCY]
    cases += [Case("sync", kind, n) for kind in steady for n in SYNC_CONCURRENCY]
    return cases


def all_pools() -> list[PoolSpec]:
    """Every pool the suite knows, in table order (each family's floor last)."""
    specs = [PoolSpec("async", a) for a in ASYNC_ADAPTERS]
    specs += [PoolSpec("uvloop", a) for a in ASYNC_ADAPTERS]
    specs += [PoolSpec("sync", a) for a in SYNC_ADAPTERS]
    return specs


def _matches(pattern: str, key: str) -> bool:
    """Glob on the whole key or its part after ``/``; else a substring at a ``/`` boundary."""
    tail = key.split("/", 1)[-1]
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(tail, pattern)
    if "@" in pattern:  # a concurrency is exact: checkout@1 is not checkout@10
        return pattern in (key, tail)
    return key.startswith(pattern) or tail.startswith(pattern)


def build_plan(only: str | None) -> Plan:
    """Select cases and pools with ``--only``.

    ``only`` is a comma-separated list of patterns: a prefix of a key or of its
    part after the family (``sync``, ``asyncpg``, ``select1``, ``checkout@1``), or
    a glob (``*noreset``). A pattern that matches a pool key (``async/aiopgpool``,
    ``sync/psycopg2``, ...) selects pools; one that matches a case id
    (``async/select1@10``, ``cold_burst``, ...) selects cases; a dimension no
    pattern touches is kept whole. Each selected family keeps its floor, since
    every ratio is taken against it.
    """
    cases, pools = all_cases(), all_pools()
    patterns = [p.strip() for p in (only or "").split(",") if p.strip()]
    if patterns:
        pool_hits = [p for p in pools if any(_matches(x, p.key) for x in patterns)]
        case_hits = [c for c in cases if any(_matches(x, c.id) for x in patterns)]
        if not pool_hits and not case_hits:
            raise ValueError(f"--only {only!r} matches no pool and no case")
        if pool_hits:
            pools = [p for p in pools if p in pool_hits or p.is_floor]
            families = {p.family for p in pool_hits}
            pools = [p for p in pools if p.family in families]
            cases = [c for c in cases if c.family in families]
        if case_hits:
            cases = [c for c in cases if c in case_hits]
    families_left = {c.family for c in cases}
    pools = [p for p in pools if p.family in families_left]
    return Plan(cases=cases, pools=pools)
