"""Writes a run's results as JSON: settings, machine, every raw sample, the medians."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.plan import BURST_TASKS, POOL_SIZE, Plan, Settings
from benchmarks.report import Row
from benchmarks.runner import Results
from benchmarks.targets import TargetResult

SCHEMA_VERSION = 1


def _clean(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def build_document(
    *,
    command: str,
    settings: Settings,
    plan: Plan,
    results: Results,
    rows: list[Row],
    targets: list[TargetResult],
    machine: dict[str, Any],
    server: dict[str, Any],
    started_at: str,
    wall_s: float,
) -> dict[str, Any]:
    """The whole run as one JSON-ready dict."""
    pools = {}
    for p in plan.pools:
        pools[p.key] = {
            "family": p.family,
            "name": p.name,
            "driver": p.adapter.driver,
            "is_floor": p.is_floor,
            "description": p.adapter.description,
            "status": results.pool_problems.get(p.key, "ok"),
        }
    cases = []
    for row in rows:
        cases.append(
            {
                "case": row.case.id,
                "family": row.case.family,
                "kind": row.case.kind,
                "concurrency": row.case.concurrency,
                "pool": row.pool.key,
                "problem": row.problem,
                "rounds": [
                    {**s.as_dict(), "ratio_to_floor": row.ratios.get(s.round)} for s in row.samples
                ],
                "median": {
                    "ops_s": row.ops_s,
                    "ratio_to_floor": row.ratio,
                    "p50_us": row.p50_us,
                    "p99_us": row.p99_us,
                    "evenness": row.evenness,
                    "cpu_us_per_op": row.cpu_us,
                },
            }
        )
    document: dict[str, Any] = _clean(
        {
            "schema": SCHEMA_VERSION,
            "command": command,
            "started_at": started_at,
            "wall_s": round(wall_s, 1),
            "settings": {
                "rounds": settings.rounds,
                "duration_s": settings.duration,
                "warmup_s": settings.warmup,
                "quick": settings.quick,
                "pool_size": POOL_SIZE,
                "burst_tasks": BURST_TASKS,
            },
            "machine": machine,
            "server": server,
            "pools": pools,
            "results": cases,
            "targets": [
                {
                    "target": t.target.label,
                    "case": t.target.case_id,
                    "pool": t.target.pool_key,
                    "baseline": t.target.baseline_key,
                    "threshold": t.target.threshold,
                    "value": t.value,
                    "rounds": t.rounds,
                    "status": t.status,
                    "note": t.note,
                    "by_cpu": t.by_cpu,
                    "spread": list(t.spread) if t.spread is not None else None,
                }
                for t in targets
            ],
        }
    )
    return document


def write_json(document: dict[str, Any], path: Path) -> None:
    """Write ``document`` to ``path`` (atomically: a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
