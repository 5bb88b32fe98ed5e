"""Reliability benchmark: server restarts and network cuts, pool by pool, side by side.

Run from the repository root::

    python -m benchmarks.reliability                # every pool that imports, both scenarios
    python -m benchmarks.reliability --pools psycopg_pool --scenarios network-cut

Each (scenario, pool) pair gets its own throwaway PostgreSQL cluster
(:func:`aiopgpool.testing.server.local_cluster`, loopback only) and a pool of
``--pool-size`` connections (min = max). ``--tasks`` asyncio tasks then make
requests back to back: acquire a connection with a ``--timeout`` deadline, run
``SELECT 1``, give it back. Meanwhile the scenario injects faults:

``restart``
    The server is stopped (``pg_ctl stop -m fast``: every backend is
    terminated), stays down ``--down`` seconds, is started again, then runs
    ``--up`` seconds; ``--restarts`` times.
``network-cut``
    The pool reaches the server through :class:`aiopgpool.testing.proxy.TcpProxy`.
    The proxy drops every byte for ``--blackhole`` seconds (a partition: nothing
    fails, everything hangs), forwards again for ``--up`` seconds, then resets
    every connection with a TCP RST and keeps resetting new ones for ``--reset``
    seconds, then forwards for ``--up`` seconds.

Every request is classified once:

* **ok**: it succeeded before its deadline + 0.5 s;
* **failed**: it raised a psycopg error (pool errors derive from
  ``psycopg.OperationalError`` in both pools) before its deadline + 0.5 s;
* **hang**: it had not finished 0.5 s after its deadline (whatever it did later;
  a request still unfinished ``--give-up`` seconds after its deadline is
  cancelled and abandoned, as an application-level timeout would do);
* **other**: any other exception, by type.

Also reported: *recovery*, the time from "server back" (``start()`` returned,
or the proxy forwards again) to the first request that completed successfully
after it (median and max over the events; "never" if none did before the next
fault or the end); *lateness*, how long after its deadline each request that
did not succeed ended (negative: it failed before its deadline; unfinished
requests count at their give-up time, so a max shown as ``≥`` is a lower
bound).

A request that fails is retried by its task after ``--error-pause`` seconds
(default 0.05), so that a pool that fails at once does not spin the CPU.

The table is printed as markdown (ready for the README) and everything,
timelines included, is written to ``benchmarks/results/reliability.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Protocol

import psycopg

from benchmarks.adapters_async import psycopg_style_pool

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "reliability.json"

#: A request finishing later than this past its deadline is a hang.
HANG_MARGIN = 0.5
#: Seconds a pool may take to open (min_size connections) before the run counts as broken.
OPEN_TIMEOUT = 30.0
#: Seconds to wait for abandoned requests to wind down, and for a pool to close.
WIND_DOWN = 15.0
#: Width of a timeline bucket, in seconds.
BUCKET = 0.25

SCENARIOS = ("restart", "network-cut")


# -- adapters -----------------------------------------------------------------------


class Adapter(Protocol):
    """One open pool under test."""

    async def acquire_and_query(self) -> None:
        """Acquire a connection (waiting at most the timeout), ``SELECT 1``, release."""

    async def close(self) -> None:
        """Close the pool."""


#: ``await open(dsn, min_size, max_size, timeout)`` -> an open :class:`Adapter`.
OpenFn = Callable[[str, int, int, float], Awaitable[Adapter]]


class _ConnectionContextAdapter:
    """A pool with psycopg_pool's interface, through ``async with pool.connection()``."""

    name: ClassVar[str]

    def __init__(self, pool: Any, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    @staticmethod
    def _make_pool(dsn: str, min_size: int, max_size: int, timeout: float) -> Any:
        """The pool, created but not opened."""
        raise NotImplementedError

    @classmethod
    async def open(
        cls, dsn: str, min_size: int, max_size: int, timeout: float
    ) -> _ConnectionContextAdapter:
        """Create the pool and wait until ``min_size`` connections exist."""
        pool = cls._make_pool(dsn, min_size, max_size, timeout)
        await pool.open(wait=True, timeout=OPEN_TIMEOUT)
        return cls(pool, timeout)

    async def acquire_and_query(self) -> None:
        """``async with pool.connection(timeout)``: ``SELECT 1``."""
        async with self._pool.connection(timeout=self._timeout) as conn:
            cur = await conn.execute("SELECT 1")
            await cur.fetchone()

    async def close(self) -> None:
        """``await pool.close()``."""
        await self._pool.close()


class PsycopgPoolAdapter(_ConnectionContextAdapter):
    """``psycopg_pool.AsyncConnectionPool``."""

    name: ClassVar[str] = "psycopg_pool"

    @staticmethod
    def available() -> str | None:
        """None if the pool can run here, else why not."""
        try:
            importlib.import_module("psycopg_pool")
        except Exception as exc:
            return f"import psycopg_pool failed: {exc!r}"
        return None

    @staticmethod
    def _make_pool(dsn: str, min_size: int, max_size: int, timeout: float) -> Any:
        return psycopg_style_pool(
            "psycopg_pool.AsyncConnectionPool",
            dsn,
            min_size,
            max_size,
            timeout=timeout,
            open=False,
            name="reliability-psycopg_pool",
        )


class AiopgpoolAdapter(_ConnectionContextAdapter):
    """``aiopgpool.AsyncConnectionPool``."""

    name: ClassVar[str] = "aiopgpool"

    @staticmethod
    def available() -> str | None:
        """None if the pool can run here, else why not."""
        try:
            mod = importlib.import_module("aiopgpool")
            mod.AsyncConnectionPool  # noqa: B018
        except Exception as exc:
            return f"import aiopgpool.AsyncConnectionPool failed: {exc!r}"
        return None

    @staticmethod
    def _make_pool(dsn: str, min_size: int, max_size: int, timeout: float) -> Any:
        return psycopg_style_pool(
            "aiopgpool.AsyncConnectionPool",
            dsn,
            min_size,
            max_size,
            timeout=timeout,
            name="reliability-aiopgpool",
        )


ADAPTERS: dict[str, Any] = {a.name: a for a in (AiopgpoolAdapter, PsycopgPoolAdapter)}


# -- recording ------------------------------------------------------------------------


@dataclass
class Event:
    """A fault or a recovery point on the run's clock."""

    name: str
    at: float
    recovery_point: bool = False
    first_ok: float | None = None
    #: A recovery point's window closes at the next event (fault or end of load).
    window_open: bool = True


@dataclass
class Recorder:
    """Counts and classifies every request of one (scenario, pool) run."""

    t0: float
    max_requests: int
    ok: int = 0
    failed: int = 0
    hangs: int = 0
    other: Counter[str] = field(default_factory=Counter)
    failed_types: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)
    hang_finals: Counter[str] = field(default_factory=Counter)
    lateness: list[float] = field(default_factory=list)
    unfinished: int = 0
    unfinished_lateness: float = -math.inf
    close_error: str | None = None
    events: list[Event] = field(default_factory=list)
    timeline: dict[int, list[int]] = field(default_factory=dict)
    orphans: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def total(self) -> int:
        """Requests recorded so far."""
        return self.ok + self.failed + self.hangs + sum(self.other.values())

    def now(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.t0

    def event(self, name: str, *, recovery_point: bool = False) -> None:
        """Mark a fault (or the moment the server is reachable again) now."""
        for ev in self.events:
            ev.window_open = False
        self.events.append(Event(name, self.now(), recovery_point))

    def record(
        self, start: float, end: float, deadline: float, exc: BaseException | None, finished: bool
    ) -> None:
        """Classify one request (times on the run's clock)."""
        late = end - deadline
        bucket = self.timeline.setdefault(int(end // BUCKET), [0, 0, 0, 0])
        if late > HANG_MARGIN or not finished:
            self.hangs += 1
            bucket[2] += 1
            final = "unfinished" if not finished else "ok" if exc is None else type(exc).__name__
            self.hang_finals[final] += 1
            if not finished:
                self.unfinished += 1
                self.unfinished_lateness = max(self.unfinished_lateness, late)
            self.lateness.append(late)
            if exc is not None:
                self._sample(exc)
            return
        if exc is None:
            self.ok += 1
            bucket[0] += 1
            for ev in self.events:
                if ev.recovery_point and ev.window_open and ev.first_ok is None and end >= ev.at:
                    ev.first_ok = end
            return
        self.lateness.append(late)
        self._sample(exc)
        if isinstance(exc, psycopg.Error):
            self.failed += 1
            self.failed_types[type(exc).__name__] += 1
            bucket[1] += 1
        else:
            self.other[f"{type(exc).__module__}.{type(exc).__qualname__}"] += 1
            bucket[3] += 1

    def _sample(self, exc: BaseException) -> None:
        """Keep the first few distinct messages of each exception type."""
        seen = self.samples.setdefault(type(exc).__name__, [])
        msg = (str(exc).strip().splitlines() or [""])[0][:200]
        if len(seen) < 3 and msg not in seen:
            seen.append(msg)

    def summary(self) -> dict[str, Any]:
        """The figures of the run, JSON-ready."""
        points = [e for e in self.events if e.recovery_point]
        recov = [None if e.first_ok is None else round(e.first_ok - e.at, 3) for e in points]
        known = [r for r in recov if r is not None]
        late = sorted(self.lateness)
        return {
            "requests": self.total,
            "ok": self.ok,
            "failed": self.failed,
            "hangs": self.hangs,
            "other": dict(self.other),
            "failed_types": dict(self.failed_types),
            "hang_outcomes": dict(self.hang_finals),
            "error_samples": self.samples,
            "recovery_s": recov,
            "recovery_median_s": round(statistics.median(known), 3) if known else None,
            "recovery_max_s": (round(max(known), 3) if known else None),
            "recovery_never": sum(r is None for r in recov),
            "lateness_p50_s": round(_percentile(late, 50), 3) if late else None,
            "lateness_max_s": round(late[-1], 3) if late else None,
            "lateness_max_is_lower_bound": bool(late) and self.unfinished_lateness >= late[-1],
            "unfinished": self.unfinished,
            "events": [{"name": e.name, "at_s": round(e.at, 3)} for e in self.events],
            "timeline": {
                "bucket_s": BUCKET,
                "columns": ["ok", "failed", "hang", "other"],
                "rows": [[round(k * BUCKET, 2), *v] for k, v in sorted(self.timeline.items())],
            },
            "truncated": self.total >= self.max_requests,
        }


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


# -- load -----------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything a run depends on (from the command line)."""

    pool_size: int
    tasks: int
    timeout: float
    give_up: float
    error_pause: float
    restarts: int
    down: float
    up: float
    warmup: float
    blackhole: float
    reset: float
    max_requests: int
    connect_timeout: int


async def _worker(adapter: Adapter, rec: Recorder, stop: asyncio.Event, s: Settings) -> None:
    """Make requests back to back until told to stop."""
    while not stop.is_set() and rec.total < rec.max_requests:
        start = rec.now()
        deadline = start + s.timeout
        task = asyncio.ensure_future(adapter.acquire_and_query())
        done, _ = await asyncio.wait({task}, timeout=s.timeout + s.give_up)
        end = rec.now()
        if not done:
            # An application-level timeout: cancel, and do not wait for the pool to wind down.
            task.cancel()
            rec.orphans.add(task)
            task.add_done_callback(_consume)
            rec.record(start, end, deadline, None, finished=False)
            continue
        exc = task.exception() if not task.cancelled() else asyncio.CancelledError()
        rec.record(start, end, deadline, exc, finished=True)
        if exc is not None and s.error_pause > 0:
            await asyncio.sleep(s.error_pause)


def _consume(task: asyncio.Task[None]) -> None:
    """Retrieve an abandoned task's outcome so that asyncio does not log it."""
    if not task.cancelled():
        task.exception()


@contextlib.asynccontextmanager
async def _load(open_fn: OpenFn, dsn: str, s: Settings, rec: Recorder) -> AsyncIterator[Adapter]:
    """Open the pool, run the workers for the body's duration, then stop and close."""
    adapter = await asyncio.wait_for(
        open_fn(dsn, s.pool_size, s.pool_size, s.timeout), OPEN_TIMEOUT + 5
    )
    stop = asyncio.Event()
    workers = [asyncio.ensure_future(_worker(adapter, rec, stop, s)) for _ in range(s.tasks)]
    try:
        yield adapter
    finally:
        stop.set()
        # Each worker finishes its current request: at most timeout + give_up.
        _, pending = await asyncio.wait(workers, timeout=s.timeout + s.give_up + 5)
        for w in pending:
            w.cancel()
        if rec.orphans:
            await asyncio.wait(rec.orphans, timeout=WIND_DOWN)
        try:
            await asyncio.wait_for(adapter.close(), WIND_DOWN)
        except Exception as exc:
            rec.close_error = repr(exc)


# -- scenarios ------------------------------------------------------------------------


def _testing_module(name: str) -> Any:
    """``aiopgpool.testing.<name>``; loaded from its file if the aiopgpool package is broken.

    The scenarios need the throwaway cluster and the proxy even when aiopgpool's
    core does not import (then only the other pools run).
    """
    try:
        return importlib.import_module(f"aiopgpool.testing.{name}")
    except ImportError:
        path = Path(__file__).resolve().parent.parent / "aiopgpool" / "testing" / f"{name}.py"
        if not path.exists():
            raise
        mod_name = f"_reliability_testing_{name}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        return module


def _with_connect_timeout(dsn: str, s: Settings) -> str:
    if not s.connect_timeout:
        return dsn
    from psycopg.conninfo import make_conninfo

    return make_conninfo(dsn, connect_timeout=str(s.connect_timeout))


async def scenario_restart(open_fn: OpenFn, s: Settings, rec: Recorder) -> dict[str, Any]:
    """Restart the server ``s.restarts`` times, each time down ``s.down`` seconds."""
    local_cluster = _testing_module("server").local_cluster
    cluster = await asyncio.to_thread(local_cluster)
    try:
        dsn = _with_connect_timeout(cluster.dsn, s)
        rec.t0 = time.monotonic()
        async with _load(open_fn, dsn, s, rec):
            rec.event("load started")
            await asyncio.sleep(s.warmup)
            for i in range(s.restarts):
                rec.event(f"stop #{i + 1}")
                await asyncio.to_thread(cluster.stop)
                rec.event(f"stopped #{i + 1}")
                await asyncio.sleep(s.down)
                await asyncio.to_thread(cluster.start)
                rec.event(f"server back #{i + 1}", recovery_point=True)
                await asyncio.sleep(s.up)
            rec.event("load stopping")
        return {"dsn": dsn}
    finally:
        await asyncio.to_thread(cluster.close)


async def scenario_network_cut(open_fn: OpenFn, s: Settings, rec: Recorder) -> dict[str, Any]:
    """Blackhole the pool's traffic, forward, reset every connection, forward."""
    local_cluster = _testing_module("server").local_cluster
    proxy_cls = _testing_module("proxy").TcpProxy
    cluster = await asyncio.to_thread(local_cluster)
    try:
        with proxy_cls(cluster.host, cluster.port) as proxy:
            dsn = _with_connect_timeout(proxy.dsn(cluster.dsn), s)
            rec.t0 = time.monotonic()
            async with _load(open_fn, dsn, s, rec):
                rec.event("load started")
                await asyncio.sleep(s.warmup)
                rec.event("blackhole")
                proxy.blackhole()
                await asyncio.sleep(s.blackhole)
                proxy.forward()
                rec.event("forward (after blackhole)", recovery_point=True)
                await asyncio.sleep(s.up)
                rec.event("reset")
                proxy.reset()
                await asyncio.sleep(s.reset)
                proxy.forward()
                rec.event("forward (after reset)", recovery_point=True)
                await asyncio.sleep(s.up)
                rec.event("load stopping")
        return {"dsn": dsn}
    finally:
        await asyncio.to_thread(cluster.close)


SCENARIO_FNS: dict[str, Callable[[OpenFn, Settings, Recorder], Awaitable[dict[str, Any]]]] = {
    "restart": scenario_restart,
    "network-cut": scenario_network_cut,
}


async def run_one(scenario: str, pool: str, s: Settings) -> dict[str, Any]:
    """Run one scenario against one pool; never raises (errors go in the result)."""
    rec = Recorder(t0=time.monotonic(), max_requests=s.max_requests)
    started = time.monotonic()
    result: dict[str, Any] = {"scenario": scenario, "pool": pool}
    try:
        extra = await SCENARIO_FNS[scenario](ADAPTERS[pool].open, s, rec)
        result.update(extra)
        result["status"] = "done"
    except Exception as exc:
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["close_error"] = rec.close_error
    result.update(rec.summary())
    return result


# -- output ---------------------------------------------------------------------------


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _cell_recovery(r: dict[str, Any]) -> str:
    if not r["recovery_s"]:
        return "-"
    if r["recovery_median_s"] is None:
        return f"never ({r['recovery_never']}/{len(r['recovery_s'])})"
    text = f"{_fmt_s(r['recovery_median_s'])} / {_fmt_s(r['recovery_max_s'])}"
    if r["recovery_never"]:
        text += f" (+{r['recovery_never']} never)"
    return text


def _cell_lateness(r: dict[str, Any]) -> str:
    if r["lateness_p50_s"] is None:
        return "-"
    mark = "≥" if r["lateness_max_is_lower_bound"] else ""
    return f"{r['lateness_p50_s']:+.2f} s / {mark}{r['lateness_max_s']:+.2f} s"


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The side-by-side table, as markdown."""
    head = (
        "| scenario | pool | ok | failed | hangs (>0.5 s late) | other exceptions "
        "| recovery median / max | not-ok lateness p50 / max |\n"
        "|---|---|--:|--:|--:|---|--:|--:|"
    )
    rows = [head]
    for r in results:
        if r["status"] != "done":
            rows.append(
                f"| {r['scenario']} | {r['pool']} | - | - | - | did not run: "
                f"{r['error'].splitlines()[0][:80]} | - | - |"
            )
            continue
        other = ", ".join(f"{k} x{v}" for k, v in r["other"].items()) or "0"
        failed = str(r["failed"])
        if r["failed_types"]:
            kinds = sorted(r["failed_types"].items(), key=lambda kv: -kv[1])
            failed += " (" + ", ".join(f"{k} {v}" for k, v in kinds) + ")"
        hangs = str(r["hangs"])
        if r["unfinished"]:
            hangs += f" ({r['unfinished']} abandoned)"
        rows.append(
            f"| {r['scenario']} | {r['pool']} | {r['ok']} | {failed} | {hangs} "
            f"| {other} | {_cell_recovery(r)} | {_cell_lateness(r)} |"
        )
    return "\n".join(rows)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "psycopg": psycopg.__version__}
    for mod in ("psycopg_pool", "aiopgpool"):
        try:
            out[mod] = str(getattr(importlib.import_module(mod), "__version__", "?"))
        except Exception:
            out[mod] = "not importable"
    out["libpq"] = str(psycopg.pq.version())
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.reliability",
        description="Server restarts and network cuts against several asyncio pools.",
    )
    p.add_argument(
        "--pools", default=",".join(sorted(ADAPTERS)), help="comma-separated, from: %(default)s"
    )
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated, from: %(default)s"
    )
    p.add_argument("--pool-size", type=int, default=5)
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--timeout", type=float, default=2.0, help="acquire timeout (the deadline)")
    p.add_argument(
        "--give-up", type=float, default=5.0, help="abandon a request this long after its deadline"
    )
    p.add_argument(
        "--error-pause", type=float, default=0.05, help="a task's pause after a failed request"
    )
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--down", type=float, default=1.0, help="seconds the server stays down")
    p.add_argument(
        "--up", type=float, default=4.0, help="seconds of normal service after each fault"
    )
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--blackhole", type=float, default=3.0)
    p.add_argument("--reset", type=float, default=1.0)
    p.add_argument(
        "--max-requests",
        type=int,
        default=2_000_000,
        help="per run; the workers stop early past it",
    )
    p.add_argument(
        "--connect-timeout",
        type=int,
        default=0,
        help="connect_timeout added to the DSN (0: psycopg's default)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_PATH)
    p.add_argument("-v", "--verbose", action="store_true", help="show the pools' warnings")
    return p.parse_args(argv)


async def amain(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = _parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.reliability", *(argv or sys.argv[1:])])
    s = Settings(
        pool_size=args.pool_size,
        tasks=args.tasks,
        timeout=args.timeout,
        give_up=args.give_up,
        error_pause=args.error_pause,
        restarts=args.restarts,
        down=args.down,
        up=args.up,
        warmup=args.warmup,
        blackhole=args.blackhole,
        reset=args.reset,
        max_requests=args.max_requests,
        connect_timeout=args.connect_timeout,
    )
    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    for name in pools:
        if name not in ADAPTERS:
            print(f"unknown pool {name!r}; known: {', '.join(sorted(ADAPTERS))}", file=sys.stderr)
            return 2
    for name in scenarios:
        if name not in SCENARIOS:
            print(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
            return 2

    skipped: dict[str, str] = {}
    runnable = []
    for name in pools:
        why = ADAPTERS[name].available()
        if why is None:
            runnable.append(name)
        else:
            skipped[name] = why
            print(f"skipping pool {name}: {why}", file=sys.stderr)

    print(f"$ {command}", flush=True)
    results: list[dict[str, Any]] = []
    for scenario in scenarios:
        for pool in runnable:
            print(f"running {scenario} x {pool} ...", end=" ", flush=True)
            r = await run_one(scenario, pool, s)
            results.append(r)
            note = r["status"] if r["status"] == "done" else f"error: {r['error']}"
            print(f"{note} ({r['wall_s']} s, {r['requests']} requests)", flush=True)

    table = markdown_table(results)
    print()
    print(f"Command: `{command}`")
    print(
        f"Pool of {s.pool_size} (min = max), {s.tasks} tasks, acquire timeout {s.timeout:g} s, "
        f"hang = more than {HANG_MARGIN:g} s past the deadline, requests abandoned "
        f"{s.give_up:g} s past it."
    )
    print(
        "Recovery: from server back (or proxy forwarding again) to the first successful "
        f"request, within the {s.up:g} s that follow; 'never': none in that window. "
        "Lateness: end minus deadline of every request that did not succeed "
        "(negative: failed early; '≥': includes abandoned requests)."
    )
    print()
    print(table)
    if skipped:
        print()
        for name, why in skipped.items():
            print(f"Skipped {name}: {why}")

    doc = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "versions": _versions(),
        "settings": {**vars(s), "hang_margin_s": HANG_MARGIN},
        "skipped": skipped,
        "results": results,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(r["status"] == "done" for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    verbose = "-v" in (argv if argv is not None else sys.argv[1:]) or "--verbose" in (
        argv if argv is not None else sys.argv[1:]
    )
    handler = logging.StreamHandler()
    # The pools log every failed connection attempt: by design, there are many.
    handler.setLevel(logging.WARNING if verbose else logging.ERROR)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    return asyncio.run(amain(argv))


if __name__ == "__main__":
    raise SystemExit(main())
