"""``python -m benchmarks cycles``: instructions per checkout/return, counted with callgrind.

Each subject (a pool, through its own calls) runs in a child process
(:mod:`benchmarks.cycles.child`) under ``valgrind --tool=callgrind``, against a
throwaway server. The child opens a pool of 2 real connections and warms up
first; the measured loops do no I/O (asyncpg's default reset on return is the
exception: it is a query). Two cycles:

* **plain**: one task, an idle connection ready: ``conn = await getconn()``,
  ``await putconn(conn)`` (sync: ``putconn(getconn())``);
* **waited**: 20 tasks (threads) on the 2 connections; each op is getconn,
  one turn of the loop while holding it (``await asyncio.sleep(0)``;
  ``time.sleep(0)``), putconn. Most checkouts wait in line.

Each loop runs ``N1`` and then ``N2`` times; the figure is
``(I(N2) - I(N1)) / (N2 - N1)``, which cancels the set-up of a segment.
Instruction counts do not depend on the machine's load: a repeat agrees to a
few instructions for the async subjects.

aiopgpool tests an idle connection's socket at checkout unless it was tested in
the last ``SOCKET_TEST_INTERVAL`` (10 ms). Under callgrind time runs about 50
times slower, which would make the test 50 times more frequent per cycle, so
the child sets the interval so long that the measured loops never test; the
test's own cost is measured apart (interval 0: a test at every checkout) and
reported per test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.cycles.child import POOL_SIZE, PURE, SEGMENT_FUNCTION, SUBJECTS, TASKS
from benchmarks.environment import (
    ServerUnavailable,
    aiopgpool_form,
    command_line,
    database,
    machine_info,
    redact_dsn,
    server_info,
)

DESCRIPTION = (
    "Count the instructions of one checkout/return cycle (plain: a connection idle;"
    " waited: 20 tasks on 2 connections) with valgrind's callgrind, for aiopgpool,"
    " psycopg_pool, asyncpg and the floors. Independent of machine noise."
)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "cycles.json"
REPO = Path(__file__).resolve().parent.parent.parent
#: (plain N1, N2), (waited N1, N2): full run and --quick.
FULL = ((2_000, 12_000), (1_000, 6_000))
QUICK = ((500, 2_500), (200, 1_000))
#: SOCKET_TEST_INTERVAL in the child: never due in the measured loops / due at every checkout.
NEVER = 1e9
ALWAYS = 0.0


@dataclass
class Measured:
    """One child run: instructions per plain cycle and per waited op."""

    subject: str
    plain: float
    waited: float
    parts: list[int]
    socket_test_interval: float | None
    wall_s: float


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The cycles command's options."""
    p.add_argument("--dsn", help="use this server (libpq conninfo or URL) for the connections")
    p.add_argument(
        "--subjects",
        default=",".join(SUBJECTS),
        help="comma-separated, from: %(default)s",
    )
    p.add_argument("--repeat", type=int, default=1, help="child runs per subject (default 1)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"fewer cycles: plain {QUICK[0]}, waited {QUICK[1]} (else {FULL[0]}, {FULL[1]})",
    )
    p.add_argument(
        "--no-socket-test",
        action="store_true",
        help="skip measuring aiopgpool's socket test apart",
    )
    p.add_argument("--valgrind", default="valgrind", help="the valgrind executable")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")


def _callgrind(valgrind: str, out_dir: Path) -> list[str]:
    return [
        valgrind,
        "-q",
        "--tool=callgrind",
        f"--callgrind-out-file={out_dir / 'cg.out'}",
        f"--zero-before={SEGMENT_FUNCTION}",
        f"--dump-after={SEGMENT_FUNCTION}",
        "--dump-instr=no",
        "--dump-line=no",
    ]


def _summary(path: Path) -> int:
    """The instruction count of one callgrind dump (its ``summary:`` line)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise ValueError(f"no summary line in {path}")


def measure(
    key: str,
    dsn: str,
    counts: tuple[tuple[int, int], tuple[int, int]],
    valgrind: str,
    interval: float | None,
) -> Measured:
    """Run subject ``key`` in a child under callgrind; instructions per cycle from its dumps."""
    (p1, p2), (w1, w2) = counts
    argv = [sys.executable, "-m", "benchmarks.cycles.child", key, dsn]
    argv += [f"{p1},{p2}", f"{w1},{w2}"]
    if interval is not None:
        argv.append(repr(interval))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("AIOPGPOOL_PURE_PYTHON", None)
    if key.endswith(PURE):
        env["AIOPGPOOL_PURE_PYTHON"] = "1"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-cycles-") as tmp:
        out_dir = Path(tmp)
        proc = subprocess.run(
            [*_callgrind(valgrind, out_dir), *argv],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{key}: child exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
        # Dumps come in pairs (see child.in_segment): the second of each is the segment.
        parts = [_summary(out_dir / f"cg.out.{i}") for i in range(2, 9, 2)]
    i1, i2, i3, i4 = parts
    return Measured(
        subject=key,
        plain=(i2 - i1) / (p2 - p1),
        waited=(i4 - i3) / (w2 - w1),
        parts=parts,
        socket_test_interval=interval,
        wall_s=round(time.perf_counter() - started, 1),
    )


def build_rows(results: dict[str, list[Measured]]) -> list[dict[str, Any]]:
    """Per subject: the figures (median of repeats), their spread, and the ratios."""
    import statistics

    def med(key: str, attr: str) -> float | None:
        runs = results.get(key)
        return statistics.median(getattr(m, attr) for m in runs) if runs else None

    rows = []
    for key, runs in results.items():
        family = key.split("/", 1)[0]
        row: dict[str, Any] = {"subject": key, "runs": len(runs)}
        for attr in ("plain", "waited"):
            values = [getattr(m, attr) for m in runs]
            row[attr] = med(key, attr)
            row[f"{attr}_spread_pct"] = (
                (max(values) - min(values)) / min(values) * 100 if len(values) > 1 else None
            )
            for base in ("floor", "psycopg_pool"):
                b = med(f"{family}/{base}", attr)
                row[f"{attr}_x_{base}"] = None if b is None else row[attr] / b
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    out = [
        "| subject | plain instr/cycle | x floor | x psycopg_pool "
        "| waited instr/op | x floor | x psycopg_pool | runs (spread plain / waited) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        cells = [r["subject"]]
        for attr in ("plain", "waited"):
            cells.append(f"{r[attr]:,.0f}")
            for base in ("floor", "psycopg_pool"):
                v = r[f"{attr}_x_{base}"]
                cells.append("-" if v is None else f"{v:.2f}")
        spread = [r[f"{attr}_spread_pct"] for attr in ("plain", "waited")]
        runs = str(r["runs"])
        if None not in spread:
            runs += " ({:.2f} % / {:.2f} %)".format(*spread)
        cells.append(runs)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Measure every subject; print the table; write cycles.json."""
    if shutil.which(args.valgrind) is None:
        print(f"error: {args.valgrind} not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    keys = [k.strip() for k in args.subjects.split(",") if k.strip()]
    for key in keys:
        if key not in SUBJECTS:
            parser.error(f"unknown subject {key!r}; known: {', '.join(SUBJECTS)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    counts = QUICK if args.quick else FULL
    command = command_line(argv)
    print(f"$ {command}", flush=True)
    print(f"aiopgpool hot paths: {aiopgpool_form()}", flush=True)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    results: dict[str, list[Measured]] = {}
    socket_tests: dict[str, Measured] = {}
    failures: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
        with database(args.dsn) as (dsn, source):
            server = {"source": source, "dsn": redact_dsn(dsn), **server_info(dsn)}
            for key in keys:
                subject = SUBJECTS[key]
                aiopgpool = subject.name == "aiopgpool"
                interval = NEVER if aiopgpool else None
                for i in range(args.repeat):
                    print(f"{key} run {i + 1}/{args.repeat} ...", end=" ", flush=True)
                    try:
                        m = measure(key, dsn, counts, args.valgrind, interval)
                    except Exception as exc:
                        failures[key] = str(exc)
                        print(f"failed: {str(exc)[:300]}", flush=True)
                        break
                    results.setdefault(key, []).append(m)
                    print(
                        f"plain {m.plain:,.0f}, waited {m.waited:,.0f} ({m.wall_s} s)", flush=True
                    )
                if aiopgpool and not args.no_socket_test and key in results:
                    print(f"{key} with a socket test at every checkout ...", end=" ", flush=True)
                    m = measure(key, dsn, counts, args.valgrind, ALWAYS)
                    socket_tests[key] = m
                    print(f"plain {m.plain:,.0f} ({m.wall_s} s)", flush=True)
    except ServerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = build_rows(results)
    print()
    print(format_table(rows))
    plain = {r["subject"]: r["plain"] for r in rows}
    tests = {key: m.plain - plain[key] for key, m in socket_tests.items()}
    for key, cost in tests.items():
        print(f"{key}: one socket test costs {cost:,.0f} instructions (at most one per 10 ms)")
    for key, why in failures.items():
        print(f"{key}: not measured: {why[:300]}")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    doc = {
        "command": command,
        "started_at": started_at,
        "machine": machine,
        "server": server,
        "settings": {
            "plain_cycles": list(counts[0]),
            "waited_ops": list(counts[1]),
            "pool_size": POOL_SIZE,
            "waited_tasks": TASKS,
            "repeat": args.repeat,
            "segment_function": SEGMENT_FUNCTION,
        },
        "rows": rows,
        "socket_test_instructions": tests,
        "runs": [asdict(m) for runs in results.values() for m in runs]
        + [asdict(m) for m in socket_tests.values()],
        "failures": failures,
        "markdown": format_table(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if not failures else 1
