"""``python -m benchmarks [throughput] [--quick] [--dsn DSN] [--only PATTERN] ...``: throughput."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.environment import (
    ServerUnavailable,
    aiopgpool_form,
    command_line,
    database,
    describe,
    load_average,
    machine_info,
    redact_dsn,
    server_info,
)
from benchmarks.plan import POOL_SIZE, Plan, Settings, build_plan
from benchmarks.report import build_rows, format_pool_status, format_table, format_targets
from benchmarks.runner import Progress, Runner
from benchmarks.targets import evaluate

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: (rounds, duration s, warm-up s): full run, and --quick.
FULL = (15, 0.4, 0.08)
QUICK = (5, 0.1, 0.02)


DESCRIPTION = (
    "Measure aiopgpool against psycopg_pool, asyncpg and psycopg2.pool, and against a"
    " minimal fair queue of connections (the floor), on a throwaway local PostgreSQL"
    " cluster (or --dsn). Pools take turns round by round; each ratio is the median"
    " over rounds of (pool ops/s / floor ops/s in the same round)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The throughput command's options (also the default command's)."""
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"about a minute: {QUICK[0]} rounds of {QUICK[1]} s (else {FULL[0]} of {FULL[1]} s)",
    )
    p.add_argument("--dsn", help="benchmark this server (libpq conninfo or URL) instead")
    p.add_argument("--rounds", type=int, help="rounds (each pool runs each case once per round)")
    p.add_argument("--duration", type=float, help="seconds each pool runs each case per round")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each measured run")
    p.add_argument(
        "--only",
        metavar="PATTERN",
        help=(
            "comma-separated pools and/or cases to run, by prefix or glob: e.g. 'aiopgpool',"
            " 'sync', 'uvloop', 'asyncpg', 'select1', 'checkout@1', 'cold_burst', 'waiters',"
            " '*noreset'. The floors always run (ratios need them)."
        ),
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help="where latest.json and latest.png go (default: benchmarks/results)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Rounds, duration and warm-up from the arguments (explicit values beat --quick)."""
    rounds, duration, warmup = QUICK if args.quick else FULL
    s = Settings(
        rounds=args.rounds if args.rounds is not None else rounds,
        duration=args.duration if args.duration is not None else duration,
        warmup=args.warmup if args.warmup is not None else warmup,
        quick=bool(args.quick),
    )
    if s.rounds < 1:
        parser.error("--rounds must be at least 1")
    if s.duration <= 0 or s.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    return s


#: Ops per second assumed for the estimate of the scale cases (fixed work, not --duration).
SCALE_OPS_S = 8_000


def _estimate(plan: Plan, s: Settings) -> float:
    """Seconds the run should take: each run, plus ~0.08 s of set-up, plus the server."""
    runs = plan.run_count(s.rounds)
    scale = sum(
        c.tasks * c.ops_per_task * len(plan.pools_of(c.family)) * c.rounds_of(s.rounds)
        for c in plan.cases
        if c.ops_per_task
    )
    return runs * (s.duration + s.warmup + 0.08) + scale / SCALE_OPS_S + 5


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Run the benchmark; print the table and targets; write latest.json and latest.png."""
    settings = settings_from(args, parser)
    try:
        plan = build_plan(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    command = command_line(argv)
    print(f"$ {command}")
    print(f"aiopgpool hot paths: {aiopgpool_form()}")
    print(
        f"{len(plan.cases)} cases x {len(plan.pools)} pools, {settings.rounds} rounds of"
        f" {settings.duration:g} s (+{settings.warmup:g} s warm-up), pool size {POOL_SIZE};"
        f" about {_estimate(plan, settings) / 60:.1f} min",
        flush=True,
    )
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    machine = machine_info()
    server: dict[str, object] = {}
    runner: Runner | None = None
    interrupted = False
    progress = Progress(plan.run_count(settings.rounds), enabled=not args.no_progress)
    try:
        with database(args.dsn, max_connections="300") as (dsn, source):
            server = {"source": source, "dsn": redact_dsn(dsn), **server_info(dsn)}
            runner = Runner(plan, settings, dsn, progress)
            runner.run()
    except KeyboardInterrupt:
        interrupted = True
    except ServerUnavailable as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        progress.close()
    wall = time.perf_counter() - t0
    machine["load_average_at_end"] = load_average()
    if runner is None:
        return 130 if interrupted else 1

    results = runner.results
    rows = build_rows(plan, results)
    targets = evaluate(results)
    print()
    print(format_table(plan, rows, settings.rounds))
    print()
    print(format_targets(targets))
    print()
    print(format_pool_status(plan, results))
    print(f"\nwall time {wall:.0f} s")
    if interrupted:
        print("interrupted: partial results above; nothing written.")
        return 130

    from benchmarks.store import build_document, write_json

    out: Path = args.out
    doc = build_document(
        command=command,
        settings=settings,
        plan=plan,
        results=results,
        rows=rows,
        targets=targets,
        machine=machine,
        server=server,
        started_at=started_at,
        wall_s=wall,
    )
    write_json(doc, out / "latest.json")
    print(f"wrote {out / 'latest.json'}")
    try:
        from benchmarks.chart import draw_chart

        subtitle = (
            f"{started_at}  {machine['cpu_count']} CPU {machine['cpu_model']}  Python"
            f" {machine['python']}  PostgreSQL {server.get('server_version', '?')}"
            f" ({server.get('source')})  {settings.rounds} rounds x {settings.duration:g} s"
            f"  aiopgpool {machine['aiopgpool_form'].split(' (')[0]}"
        )
        draw_chart(rows, targets, command, subtitle, out / "latest.png")
        print(f"wrote {out / 'latest.png'}")
    except Exception as exc:  # the chart is a nicety; never lose the numbers over it
        print(f"chart not drawn: {describe(exc)}", file=sys.stderr)
    return 0
