"""``python -m benchmarks reliability``: options, the run, the table and the JSON file."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.environment import command_line, machine_info
from benchmarks.reliability.peers import PEERS
from benchmarks.reliability.recorder import HANG_MARGIN
from benchmarks.reliability.report import bouncer_table, explanation, markdown_table, roles_table
from benchmarks.reliability.roles import ROLE_SCENARIOS, run_role
from benchmarks.reliability.scenarios import POOLS, SCENARIOS, Settings, run_one

#: Every pool and scenario name (asyncpg takes part in the role scenarios only: the
#: restart and network-cut classification relies on psycopg errors).
ALL_POOLS = list(PEERS)
ALL_SCENARIOS = [*SCENARIOS, *ROLE_SCENARIOS]

RESULTS_PATH = Path(__file__).resolve().parent.parent / "results" / "reliability.json"
DESCRIPTION = (
    "Server restarts, network cuts, failovers and PgBouncer against aiopgpool and its"
    " peers, each pool on its own throwaway servers; prints markdown tables, writes"
    " reliability.json."
)

#: option -> (full run's default, --quick's default).
TIMINGS: dict[str, tuple[float, float]] = {
    "restarts": (5, 2),
    "down": (1.0, 0.5),
    "up": (4.0, 2.0),
    "warmup": (1.0, 0.5),
    "blackhole": (3.0, 1.5),
    "reset": (1.0, 0.5),
    "outage": (2.0, 1.0),
    "after": (12.0, 7.0),
    "clean": (2.0, 2.0),
    "duration": (5.0, 2.0),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The reliability command's options."""
    p.add_argument(
        "--pools",
        default=",".join(ALL_POOLS),
        help="comma-separated, from: %(default)s (asyncpg: role scenarios only)",
    )
    p.add_argument(
        "--scenarios", default=",".join(ALL_SCENARIOS), help="comma-separated, from: %(default)s"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="about 45 s: 2 restarts, shorter faults and pauses (explicit values beat it)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat every (scenario, pool) this many times, interleaved; the failover,"
        " read-only and pgbouncer tables give median (min - max), the others a row a run",
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
    helps = {
        "restarts": "server restarts",
        "down": "seconds the server stays down",
        "up": "seconds of normal service after each fault",
        "warmup": "seconds of load before the first fault",
        "blackhole": "seconds the proxy drops every byte",
        "reset": "seconds the proxy resets every connection",
        "outage": "failover, read-only: seconds from the fault to pg_promote()",
        "after": "seconds of load after pg_promote() (or the restart behind PgBouncer)",
        "clean": "seconds of failure-free requests that make '100 %%' count",
        "duration": "pgbouncer: seconds of measured SELECT 1 load, each way",
    }
    for name, (full, quick) in TIMINGS.items():
        kind = int if name == "restarts" else float
        p.add_argument(
            f"--{name}", type=kind, help=f"{helps[name]} (default {full:g}; --quick {quick:g})"
        )
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


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's settings: explicit options, else the full or --quick defaults."""
    timings = {
        name: getattr(args, name) if getattr(args, name) is not None else pair[args.quick]
        for name, pair in TIMINGS.items()
    }
    return Settings(
        pool_size=args.pool_size,
        tasks=args.tasks,
        timeout=args.timeout,
        give_up=args.give_up,
        error_pause=args.error_pause,
        restarts=int(timings["restarts"]),
        down=timings["down"],
        up=timings["up"],
        warmup=timings["warmup"],
        blackhole=timings["blackhole"],
        reset=timings["reset"],
        max_requests=args.max_requests,
        connect_timeout=args.connect_timeout,
        outage=timings["outage"],
        after=timings["after"],
        clean=timings["clean"],
        duration=timings["duration"],
    )


def _names(
    text: str, known: Sequence[str], what: str, parser: argparse.ArgumentParser
) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name not in known:
            parser.error(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return names


async def _run_all(
    scenarios: list[str], pools: list[str], s: Settings, runs: int
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for run in range(1, runs + 1):
        for scenario in scenarios:
            for pool in pools:
                r = await _run_pair(scenario, pool, s, f"{run}/{runs}" if runs > 1 else "")
                if r is not None:
                    r["run"] = run
                    results.append(r)
    return results


async def _run_pair(scenario: str, pool: str, s: Settings, run: str) -> dict[str, Any] | None:
    if scenario in SCENARIOS and pool not in POOLS:
        print(f"skipping {scenario} x {pool}: psycopg pools only", flush=True)
        return None
    print(f"running {scenario} x {pool} {run}...", end=" ", flush=True)
    if scenario in SCENARIOS:
        r = await run_one(scenario, pool, s)
    else:
        r = await run_role(scenario, pool, s)
    note = r["status"] if r["status"] == "done" else f"error: {r['error']}"
    print(f"{note} ({r['wall_s']} s)", flush=True)
    return r


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Run every (scenario, pool); print the table; write the JSON file."""
    handler = logging.StreamHandler()
    # The pools log every failed connection attempt: by design, there are many.
    handler.setLevel(logging.WARNING if args.verbose else logging.ERROR)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])

    if args.runs < 1:
        parser.error("--runs must be at least 1")
    s = settings_from(args)
    pools = _names(args.pools, ALL_POOLS, "pool", parser)
    scenarios = _names(args.scenarios, ALL_SCENARIOS, "scenario", parser)
    command = command_line(argv)
    print(f"$ {command}", flush=True)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    results = asyncio.run(_run_all(scenarios, pools, s, args.runs))

    old = [r for r in results if r["scenario"] in SCENARIOS]
    tables = []
    if old:
        tables.append("\n".join([*explanation(s, HANG_MARGIN), "", markdown_table(old)]))
    if any(r["scenario"] in ("failover", "read-only") for r in results):
        tables.append(
            f"Failover / read-only: pool of {s.pool_size} (min = max), {s.tasks} tasks "
            f"inserting, acquire timeout {s.timeout:g} s, pg_promote() {s.outage:g} s after "
            f"the fault, {s.after:g} s of load after it; '100 %': no failure from then on "
            f"(at least {s.clean:g} s of it).\n\n" + roles_table(results)
        )
    if any(r["scenario"] == "pgbouncer" for r in results):
        tables.append(
            f"PgBouncer (transaction mode): pool of {s.pool_size}, {s.tasks} tasks, "
            f"{s.duration:g} s each way; restart: server down {s.down:g} s.\n\n"
            + bouncer_table(results)
        )
    table = "\n\n".join(tables)
    print()
    print(f"Command: `{command}`")
    print()
    print(table)
    doc = {
        "command": command,
        "date": started_at,
        "machine": machine,
        "settings": {**vars(s), "hang_margin_s": HANG_MARGIN},
        "results": results,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(r["status"] == "done" for r in results) else 1
