"""The side-by-side reliability table, as markdown (ready for the README)."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

#: Between the min and the max of several runs.
DASH = " \N{EN DASH} "


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


def _ms(value: float) -> str:
    return f"{value * 1000:.0f} ms"


def _times(values: list[float | None], window: float) -> str:
    """One run: the value; several: median (min to max) of those known, and how many
    runs had none within the window."""
    known = sorted(v for v in values if v is not None)
    missing = len(values) - len(known)
    if not known:
        return f"not within {window:g} s" + (f" ({missing}/{missing} runs)" if missing > 1 else "")
    if len(values) == 1:
        return _ms(known[0])
    text = f"{_ms(statistics.median(known))} ({_ms(known[0])}{DASH}{_ms(known[-1])})"
    if len(known) == 1:
        text = _ms(known[0])
    if missing:
        text += f"; {missing}/{len(values)} runs not within {window:g} s"
    return text


def _numbers(values: list[float], fmt: str = ",.0f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    ordered = sorted(values)
    median = statistics.median(ordered)
    return f"{median:{fmt}} ({ordered[0]:{fmt}}{DASH}{ordered[-1]:{fmt}})"


def _kinds(types: list[dict[str, int]]) -> str:
    total: Counter[str] = Counter()
    for one in types:
        total.update(one)
    if not total:
        return ""
    kinds = ", ".join(f"{k} {v:,}" for k, v in total.most_common())
    return f" ({kinds}{' in all' if len(types) > 1 else ''})"


def _groups(
    results: list[dict[str, Any]], scenarios: tuple[str, ...]
) -> list[list[dict[str, Any]]]:
    """The results of ``scenarios``, grouped by (scenario, pool) in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r["scenario"] in scenarios:
            groups.setdefault((r["scenario"], r["pool"]), []).append(r)
    return list(groups.values())


def _failures(group: list[dict[str, Any]]) -> str | None:
    bad = [r for r in group if r["status"] != "done"]
    if not bad:
        return None
    why = bad[0]["error"].splitlines()[0][:100].replace("|", "/")
    return f"did not run ({len(bad)}/{len(group)} runs): {why}"


def roles_table(results: list[dict[str, Any]]) -> str:
    """The failover and read-only rows (:mod:`benchmarks.reliability.roles`)."""
    rows = [
        "| scenario | pool | runs | pg_promote → first write | → 100 % of writes "
        "| failed writes | of which after pg_promote | ok writes |",
        "|---|---|--:|--:|--:|---|--:|--:|",
    ]
    for group in _groups(results, ("failover", "read-only")):
        head = f"| {group[0]['scenario']} | {group[0]['pool']} | {len(group)} "
        failure = _failures(group)
        if failure:
            rows.append(head + f"| {failure} | - | - | - | - |")
            continue
        window = min(r["window_s"] for r in group)
        rows.append(
            head + f"| {_times([r['first_write_s'] for r in group], window)} "
            f"| {_times([r['all_writes_s'] for r in group], window)} "
            f"| {_numbers([r['failed'] for r in group])}"
            f"{_kinds([r['failed_types'] for r in group])} "
            f"| {_numbers([r['failed_after_promotion'] for r in group])} "
            f"| {_numbers([r['ok'] for r in group])} |"
        )
    return "\n".join(rows)


def bouncer_table(results: list[dict[str, Any]]) -> str:
    """The pgbouncer rows (:mod:`benchmarks.reliability.roles`)."""
    rows = [
        "| pool | runs | SELECT 1/s via PgBouncer | direct | ratio | errors (via / direct) "
        "| restart: server back → first success | → 100 % | failed requests |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for group in _groups(results, ("pgbouncer",)):
        head = f"| {group[0]['pool']} | {len(group)} "
        failure = _failures(group)
        if failure:
            rows.append(head + f"| {failure} | - | - | - | - | - | - |")
            continue
        via = [r["via_bouncer"] for r in group]
        direct = [r["direct"] for r in group]
        rs = [r["restart"] for r in group]
        window = min(x["window_s"] for x in rs)
        rows.append(
            head + f"| {_numbers([x['ops_s'] for x in via])} "
            f"| {_numbers([x['ops_s'] for x in direct])} "
            f"| {_numbers([r['ratio'] for r in group], '.2f')} "
            f"| {sum(x['failed'] for x in via)} / {sum(x['failed'] for x in direct)} "
            f"| {_times([x['first_ok_s'] for x in rs], window)} "
            f"| {_times([x['all_ok_s'] for x in rs], window)} "
            f"| {_numbers([x['failed'] for x in rs])}{_kinds([x['failed_types'] for x in rs])} |"
        )
    return "\n".join(rows)
