"""Draws the ratio-to-floor chart (matplotlib, Agg backend) as a PNG."""

from __future__ import annotations

import textwrap
from pathlib import Path

from benchmarks.plan import FAMILIES
from benchmarks.report import Row
from benchmarks.targets import TargetResult

_COLORS = {
    "aiopgpool": "#d62728",
    "psycopg_pool": "#1f77b4",
    "asyncpg": "#2ca02c",
    "asyncpg-noreset": "#98df8a",
    "psycopg2": "#9467bd",
    "floor-fifo": "#7f7f7f",
}


def draw_chart(
    rows: list[Row], targets: list[TargetResult], command: str, subtitle: str, path: Path
) -> None:
    """Grouped bars of each pool's median ratio to its floor, per case, one panel per family.

    A dashed line marks the floor (1.0); short dotted segments over a group mark
    its target (for the sync targets, which are relative to psycopg_pool, the
    segment sits at psycopg_pool's bar).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [f for f in FAMILIES if any(r.case.family == f for r in rows)]
    if not families:
        return
    fig, axes = plt.subplots(len(families), 1, figsize=(13, 4.8 * len(families)), squeeze=False)
    for ax, family in zip((a[0] for a in axes), families, strict=True):
        _panel(ax, [r for r in rows if r.case.family == family], targets, family)
    fig.suptitle(
        "aiopgpool vs peers: throughput as a ratio to the floor (median over rounds)",
        fontsize=13,
        fontweight="bold",
    )
    caption = "\n".join([*textwrap.wrap(f"$ {command}", 150), subtitle])
    fig.text(0.01, 0.005, caption, fontsize=8, family="monospace", va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax: object, rows: list[Row], targets: list[TargetResult], family: str) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    case_ids = list(dict.fromkeys(r.case.id for r in rows))
    pools = list(dict.fromkeys(r.pool.name for r in rows if not r.pool.is_floor))
    by_key = {(r.case.id, r.pool.name): r for r in rows}
    unmeasured = [p for p in pools if all(r.ratio is None for r in rows if r.pool.name == p)]
    pools = [p for p in pools if p not in unmeasured]
    width = 0.8 / max(1, len(pools))
    top = 1.2
    for j, pool in enumerate(pools):
        xs, ys = [], []
        for i, cid in enumerate(case_ids):
            row = by_key.get((cid, pool))
            if row is not None and row.ratio is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(row.ratio)
        color = _COLORS.get(pool)
        bars = ax.bar(xs, ys, width * 0.95, label=pool, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1, rotation=90)
        top = max([top, *ys])
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="floor = 1.0")
    labelled = False
    for t in targets:
        if not t.target.case_id.startswith(family + "/") or t.target.case_id not in case_ids:
            continue
        i = case_ids.index(t.target.case_id)
        level = t.target.threshold
        if not t.target.baseline_key.endswith("/floor"):
            base = by_key.get((t.target.case_id, t.target.baseline_key.split("/", 1)[1]))
            if base is None or base.ratio is None:
                continue
            level = base.ratio * t.target.threshold
        ax.hlines(
            level,
            i - 0.45,
            i + 0.45,
            colors="#ff7f0e",
            linestyles=":",
            linewidth=2,
            label="_nolegend_" if labelled else "aiopgpool target",
        )
        labelled = True
    if unmeasured:
        reasons = {r.pool.name: r.problem or "no data" for r in rows if r.pool.name in unmeasured}
        text = "\n".join(f"not measured: {p} ({reasons[p][:110]})" for p in unmeasured)
        ax.text(0.01, 0.97, text, transform=ax.transAxes, fontsize=7, va="top", color="#a00")
    ax.set_xticks(range(len(case_ids)))
    ax.set_xticklabels([cid.split("/", 1)[1].replace("@", "\nN=") for cid in case_ids])
    ax.set_ylim(0, top * (1.3 if unmeasured else 1.15))
    ax.set_ylabel("ops/s ÷ floor ops/s")
    unit = "threads" if family == "sync" else "asyncio tasks"
    ax.set_title(f"{family} pools (N = {unit}; floor = minimal fair queue of psycopg connections)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
