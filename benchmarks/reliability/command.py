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
from benchmarks.reliability.recorder import HANG_MARGIN
from benchmarks.reliability.report import explanation, markdown_table
from benchmarks.reliability.scenarios import POOLS, SCENARIOS, Settings, run_one

RESULTS_PATH = Path(__file__).resolve().parent.parent / "results" / "reliability.json"
DESCRIPTION = (
    "Server restarts and network cuts against aiopgpool and psycopg_pool, each pool on"
    " its own throwaway cluster; prints a markdown table, writes reliability.json."
)

#: option -> (full run's default, --quick's default).
TIMINGS: dict[str, tuple[float, float]] = {
    "restarts": (5, 2),
    "down": (1.0, 0.5),
    "up": (4.0, 2.0),
    "warmup": (1.0, 0.5),
    "blackhole": (3.0, 1.5),
    "reset": (1.0, 0.5),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The reliability command's options."""
    p.add_argument("--pools", default=",".join(POOLS), help="comma-separated, from: %(default)s")
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated, from: %(default)s"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="about 45 s: 2 restarts, shorter faults and pauses (explicit values beat it)",
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
    )


def _names(
    text: str, known: Sequence[str], what: str, parser: argparse.ArgumentParser
) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name not in known:
            parser.error(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return names


async def _run_all(scenarios: list[str], pools: list[str], s: Settings) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for scenario in scenarios:
        for pool in pools:
            print(f"running {scenario} x {pool} ...", end=" ", flush=True)
            r = await run_one(scenario, pool, s)
            results.append(r)
            note = r["status"] if r["status"] == "done" else f"error: {r['error']}"
            print(f"{note} ({r['wall_s']} s, {r['requests']} requests)", flush=True)
    return results


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Run every (scenario, pool); print the table; write the JSON file."""
    handler = logging.StreamHandler()
    # The pools log every failed connection attempt: by design, there are many.
    handler.setLevel(logging.WARNING if args.verbose else logging.ERROR)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])

    s = settings_from(args)
    pools = _names(args.pools, list(POOLS), "pool", parser)
    scenarios = _names(args.scenarios, list(SCENARIOS), "scenario", parser)
    command = command_line(argv)
    print(f"$ {command}", flush=True)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    results = asyncio.run(_run_all(scenarios, pools, s))

    table = markdown_table(results)
    print()
    print(f"Command: `{command}`")
    print("\n".join(explanation(s, HANG_MARGIN)))
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
