"""The tables of REPORT.md, from the JSON files :mod:`benchmarks.select1_profile.run` wrote.

``python -m benchmarks.select1_profile.summarize [DIR]`` (default /tmp/select1_profile).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CASES = ("10x1", "10x10", "10x100", "2x1", "2x10", "2x100")
SYSCALLS = ("sendto", "recvfrom", "epoll_ctl", "epoll_wait", "getpid", "poll")


def _load(d: Path, name: str) -> Any:
    p = d / name
    return json.loads(p.read_text()) if p.exists() else None


def _instr(d: Path, case: str, subject: str, variant: str, tag: str) -> float | None:
    doc = _load(d, f"callgrind-{case}-{subject}-{variant}{tag}.json")
    return None if doc is None else float(doc["instr_per_op"])


def _counts(d: Path, case: str, subject: str) -> dict[str, float]:
    doc = _load(d, f"count-{case}-{subject}-x-shared.json")
    if doc is None:
        return {}
    seg = doc["segments"][-1]  # the longer segment
    return {k: v / seg["ops"] for k, v in seg["counts"].items()}


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str]) -> int:
    d = Path(argv[0]) if argv else Path("/tmp/select1_profile")
    print(
        "| pool x tasks | aiopgpool instr/op | floor instr/op | diff"
        " | diff, pool alone in its loop |"
    )
    print("|---|--:|--:|--:|--:|")
    for case in CASES:
        a = _instr(d, case, "aiopgpool", "never", "-shared")
        f = _instr(d, case, "floor", "x", "-shared")
        a1 = _instr(d, case, "aiopgpool", "never", "")
        f1 = _instr(d, case, "floor", "x", "")
        diff = None if a is None or f is None else a - f
        diff1 = None if a1 is None or f1 is None else a1 - f1
        print(
            f"| {case} | {_fmt(a)} | {_fmt(f)} | {_fmt(diff, '+,.0f')} | {_fmt(diff1, '+,.0f')} |"
        )
    print()
    head = " | ".join(SYSCALLS)
    print(
        f"| pool x tasks | subject | all syscalls | {head}"
        " | loop iterations | socket tests | GC (gen0) |"
    )
    print("|---|---|--:|" + "--:|" * len(SYSCALLS) + "--:|--:|--:|")
    for case in CASES:
        for subject in ("aiopgpool", "floor"):
            sc = _load(d, f"syscalls-{case}-{subject}-x-shared.json")
            per = sc["per_op"] if sc else {}
            c = _counts(d, case, subject)
            cells = [_fmt(per.get("all"), ".2f")]
            cells += [_fmt(max(per.get(n, 0.0), 0.0), ".2f") for n in SYSCALLS]
            cells += [
                _fmt(c.get("run_once"), ".3f"),
                _fmt(c.get("socket_tests", 0.0), ".3f"),
                _fmt(c.get("gc_gen0", 0.0), ".4f"),
            ]
            print(f"| {case} | {subject} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
