"""The side-by-side reliability table, as markdown (ready for the README)."""

from __future__ import annotations

from typing import Any


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
    """One row per (scenario, pool) result of :func:`~benchmarks.reliability.scenarios.run_one`."""
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


def explanation(s: Any, hang_margin: float) -> list[str]:
    """The lines printed above the table: the settings and what the columns mean."""
    return [
        f"Pool of {s.pool_size} (min = max), {s.tasks} tasks, acquire timeout {s.timeout:g} s, "
        f"hang = more than {hang_margin:g} s past the deadline, requests abandoned "
        f"{s.give_up:g} s past it.",
        "Recovery: from server back (or proxy forwarding again) to the first successful "
        f"request, within the {s.up:g} s that follow; 'never': none in that window. "
        "Lateness: end minus deadline of every request that did not succeed "
        "(negative: failed early; '≥': includes abandoned requests).",
    ]
