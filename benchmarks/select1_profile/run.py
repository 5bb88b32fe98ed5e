"""Per-op profiles of the SELECT 1 op, aiopgpool against the floor (see REPORT.md).

``python -m benchmarks.select1_profile.run callgrind|count|strace|syscalls|samples|cprofile
[options]``

* ``callgrind``: instructions per op, ``(I(K2) - I(K1)) / (K2 - K1)``, in all and by
  function (exclusive and inclusive, from ``callgrind_annotate``);
* ``count``: loop iterations, socket tests, GC collections per op (native run);
* ``strace``: system calls per op, by name, from ``strace -c -f`` of two runs of one
  segment each (K1 ops, K2 ops), differenced;
* ``syscalls``: system calls per op from ``perf stat`` tracepoints (no slow-down);
* ``samples``: client CPU per op in µs, by shared object and function, from
  ``perf record -e cpu-clock`` of two runs, differenced: what the instructions
  cost, cache misses included;
* ``cprofile``: Python-level call counts per op, differenced the same way.

Results go to ``--out`` (one JSON file per mode and case).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_OUT = Path("/tmp/select1_profile")
CASES = ("2x1", "2x10", "2x100", "10x1", "10x10", "10x100")
#: aiopgpool's SOCKET_TEST_INTERVAL under callgrind: never / always / as shipped.
VARIANTS = {"never": "1e9", "always": "0", "real": "0.01"}
_LINE = re.compile(r"^\s*([\d,]+) \([^)]*\)\s+(.*)$")


def _child(
    subject: str, dsn: str, case: str, ops: str, mode: str, interval: str | None
) -> list[str]:
    pool, tasks = case.split("x")
    argv = [sys.executable, "-m", "benchmarks.select1_profile.child", subject, dsn, pool, tasks]
    argv += [ops, mode]
    if interval is not None:
        argv.append(interval)
    return argv


def _native_child(
    args: argparse.Namespace, case: str, subject: str, ops: str, mode: str
) -> list[str]:
    """The child's command for a native (not callgrind) run: aiopgpool's socket test at
    its shipped interval."""
    interval = VARIANTS["real"] if subject == "aiopgpool" else None
    return _child(subject, args.dsn, case, ops, mode, interval)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}


def _annotate(path: Path, inclusive: bool) -> dict[str, int]:
    out = subprocess.run(
        [
            "callgrind_annotate",
            "--threshold=100",
            f"--inclusive={'yes' if inclusive else 'no'}",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows: dict[str, int] = {}
    started = False
    for line in out.splitlines():
        if "file:function" in line:
            started = True
            continue
        if not started:
            continue
        m = _LINE.match(line)
        if m:
            name = m.group(2)
            # Keep the function and its object, drop the build path.
            name = re.sub(r"^/tmp/python-build[^:]*/", "", name)
            rows[name] = rows.get(name, 0) + int(m.group(1).replace(",", ""))
        elif started and line.startswith("-----") and rows:
            break
    return rows


def _summary(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise ValueError(f"no summary in {path}")


def callgrind(
    args: argparse.Namespace, case: str, subject: str, variant: str | None
) -> dict[str, Any]:
    k1, k2 = (int(x) for x in args.ops.split(","))
    interval = VARIANTS[variant] if variant else None
    with tempfile.TemporaryDirectory(prefix="s1cg-") as tmp:
        out = Path(tmp) / "cg.out"
        cmd = [
            "valgrind",
            "-q",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--zero-before=functools_reduce",
            "--dump-after=functools_reduce",
        ]
        cmd += _child(subject, args.dsn, case, args.ops, "callgrind", interval)
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        d1, d2 = Path(f"{out}.2"), Path(f"{out}.4")
        i1, i2 = _summary(d1), _summary(d2)
        per_op = (i2 - i1) / (k2 - k1)
        funcs: dict[str, dict[str, float]] = {}
        for kind, inclusive in (("excl", False), ("incl", True)):
            a, b = _annotate(d1, inclusive), _annotate(d2, inclusive)
            diff = {k: (b.get(k, 0) - a.get(k, 0)) / (k2 - k1) for k in set(a) | set(b)}
            funcs[kind] = {k: v for k, v in diff.items() if abs(v) >= 20}
        if args.keep:
            keep = Path(args.out) / f"cg-{case}-{subject}-{variant or 'x'}"
            keep.mkdir(parents=True, exist_ok=True)
            for p in (d1, d2):
                (keep / p.name).write_bytes(p.read_bytes())
    return {
        "case": case,
        "subject": subject,
        "variant": variant,
        "ops": [k1, k2],
        "parts": [i1, i2],
        "instr_per_op": per_op,
        "functions": funcs,
    }


def count(args: argparse.Namespace, case: str, subject: str) -> dict[str, Any]:
    cmd = _native_child(args, case, subject, args.ops, "count")
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"case": case, "subject": subject, "segments": doc["segments"]}


def _strace(args: argparse.Namespace, case: str, subject: str, ops: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory(prefix="s1st-") as tmp:
        out = Path(tmp) / "st.txt"
        cmd = ["strace", "-c", "-f", "-o", str(out)]
        cmd += _native_child(args, case, subject, str(ops), "plain")
        subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
        calls: dict[str, int] = {}
        for line in out.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                calls[parts[-1]] = int(parts[3])
        return calls


def _per_op(
    count: Callable[[argparse.Namespace, str, str, int], dict[str, int]],
    args: argparse.Namespace,
    case: str,
    subject: str,
) -> tuple[int, int, dict[str, float]]:
    """``count`` at the two segment lengths of ``--ops``, differenced per op."""
    k1, k2 = (int(x) for x in args.ops.split(","))
    a, b = count(args, case, subject, k1), count(args, case, subject, k2)
    return k1, k2, {k: (b.get(k, 0) - a.get(k, 0)) / (k2 - k1) for k in set(a) | set(b)}


def strace(args: argparse.Namespace, case: str, subject: str) -> dict[str, Any]:
    k1, k2, diff = _per_op(_strace, args, case, subject)
    return {
        "case": case,
        "subject": subject,
        "ops": [k1, k2],
        "per_op": {k: v for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if abs(v) >= 0.005},
        "total_per_op": sum(diff.values()),
    }


#: The system calls counted with ``perf stat`` (tracepoints: no slow-down, unlike strace).
PERF_SYSCALLS = (
    "sendto",
    "recvfrom",
    "epoll_wait",
    "epoll_ctl",
    "getpid",
    "poll",
    "select",
    "read",
    "write",
    "futex",
)


def _perf(args: argparse.Namespace, case: str, subject: str, ops: int) -> dict[str, int]:
    events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{n}" for n in PERF_SYSCALLS]
    with tempfile.TemporaryDirectory(prefix="s1pf-") as tmp:
        out = Path(tmp) / "perf.txt"
        cmd = ["perf", "stat", "-x", ",", "-o", str(out), "-e", ",".join(events)]
        cmd += _native_child(args, case, subject, str(ops), "plain")
        subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
        calls: dict[str, int] = {}
        for line in out.read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[0].isdigit():
                name = parts[2].split(":")[-1].replace("sys_enter_", "")
                calls["all" if name == "sys_enter" else name] = int(parts[0])
        return calls


def syscalls(args: argparse.Namespace, case: str, subject: str) -> dict[str, Any]:
    k1, k2, diff = _per_op(_perf, args, case, subject)
    return {
        "case": case,
        "subject": subject,
        "ops": [k1, k2],
        "per_op": dict(sorted(diff.items(), key=lambda kv: -kv[1])),
    }


#: The sampling rate of ``samples`` (``perf record -e cpu-clock``): one sample per 100 µs
#: of CPU, so a sample per op is 100 µs of client CPU per op.
SAMPLE_HZ = 10_000


def _samples(args: argparse.Namespace, case: str, subject: str, ops: int) -> dict[str, int]:
    """CPU-clock samples of one run of ``ops`` ops, by object and function ("dso:symbol")."""
    with tempfile.TemporaryDirectory(prefix="s1pr-") as tmp:
        data = Path(tmp) / "perf.data"
        cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(SAMPLE_HZ), "-o", str(data)]
        cmd += _native_child(args, case, subject, str(ops), "plain")
        subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
        fields = ["--no-children", "--sort", "dso,sym", "-F", "sample,dso,sym", "-t", ";"]
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", *fields],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    counts: dict[str, int] = {}
    for line in report.splitlines():
        parts = [part.strip() for part in line.split(";")]
        if len(parts) == 3 and parts[0].isdigit():
            dso = Path(parts[1]).name
            sym = parts[2].split("] ", 1)[-1]  # drop perf's "[.] " / "[k] "
            key = f"{dso}:{sym}"
            counts[key] = counts.get(key, 0) + int(parts[0])
    return counts


def samples(args: argparse.Namespace, case: str, subject: str) -> dict[str, Any]:
    """Client CPU per op, in µs, by shared object and by function: where the time goes,
    cache misses included (callgrind counts instructions, not what they cost)."""
    k1, k2, diff = _per_op(_samples, args, case, subject)
    us = {k: v * 1e6 / SAMPLE_HZ for k, v in diff.items()}
    by_object: dict[str, float] = {}
    for key, v in us.items():
        dso = key.split(":", 1)[0]
        by_object[dso] = by_object.get(dso, 0.0) + v
    return {
        "case": case,
        "subject": subject,
        "ops": [k1, k2],
        "us_per_op": sum(us.values()),
        "by_object": dict(sorted(by_object.items(), key=lambda kv: -kv[1])),
        "by_function": {
            k: v for k, v in sorted(us.items(), key=lambda kv: -kv[1]) if abs(v) >= 0.02
        },
    }


def cprofile(
    args: argparse.Namespace, case: str, subject: str, variant: str | None
) -> dict[str, Any]:
    k1, k2 = (int(x) for x in args.ops.split(","))
    interval = VARIANTS[variant] if variant else None
    cmd = _child(subject, args.dsn, case, args.ops, "cprofile", interval)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
    s1, s2 = json.loads(proc.stdout.strip().splitlines()[-1])["segments"]
    a, b = s1["calls"], s2["calls"]
    diff = {k: (b.get(k, 0) - a.get(k, 0)) / (k2 - k1) for k in set(a) | set(b)}
    return {
        "case": case,
        "subject": subject,
        "variant": variant,
        "per_op": {k: v for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if abs(v) >= 0.005},
        "total_calls_per_op": sum(diff.values()),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument(
        "mode", choices=("callgrind", "count", "strace", "syscalls", "samples", "cprofile")
    )
    p.add_argument(
        "--dsn",
        default=Path("/tmp/prof/dsn").read_text().strip()
        if Path("/tmp/prof/dsn").exists()
        else None,
    )
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--subjects", default="aiopgpool:never,floor")
    p.add_argument("--ops", default=None, help="K1,K2")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--tag", default="")
    p.add_argument("--keep", action="store_true", help="keep the callgrind dumps")
    args = p.parse_args(argv)
    if args.ops is None:
        args.ops = {
            "callgrind": "1000,3000",
            "count": "5000,20000",
            "strace": "2000,10000",
            "syscalls": "5000,25000",
            "samples": "10000,90000",
            "cprofile": "1000,3000",
        }[args.mode]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for case in args.cases.split(","):
        for spec in args.subjects.split(","):
            subject, _, variant = spec.partition(":")
            if args.mode == "callgrind":
                r = callgrind(args, case, subject, variant or None)
                print(f"{case} {spec}: {r['instr_per_op']:,.0f} instr/op", flush=True)
            elif args.mode == "count":
                r = count(args, case, subject)
                print(case, spec, json.dumps(r["segments"]), flush=True)
            elif args.mode == "syscalls":
                r = syscalls(args, case, subject)
                print(
                    case,
                    spec,
                    json.dumps({k: round(v, 3) for k, v in r["per_op"].items()}),
                    flush=True,
                )
            elif args.mode == "samples":
                r = samples(args, case, subject)
                top = ", ".join(f"{k} {v:+.2f}" for k, v in list(r["by_object"].items())[:6])
                print(f"{case} {spec}: {r['us_per_op']:.1f} us/op ({top})", flush=True)
            elif args.mode == "strace":
                r = strace(args, case, subject)
                print(case, spec, f"{r['total_per_op']:.2f}", json.dumps(r["per_op"]), flush=True)
            else:
                r = cprofile(args, case, subject, variant or None)
                print(case, spec, f"{r['total_calls_per_op']:.1f} calls/op", flush=True)
            name = f"{args.mode}-{case}-{subject}-{variant or 'x'}{args.tag}.json"
            (Path(args.out) / name).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
