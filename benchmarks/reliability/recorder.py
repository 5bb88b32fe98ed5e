"""Classifies every request of one (scenario, pool) run and sums the run up."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

from benchmarks.metrics import percentile

#: A request finishing later than this past its deadline is a hang.
HANG_MARGIN = 0.5
#: Width of a timeline bucket, in seconds.
BUCKET = 0.25


@dataclass
class Event:
    """A fault or a recovery point on the run's clock."""

    name: str
    at: float
    recovery_point: bool = False
    first_ok: float | None = None
    #: A recovery point's window closes at the next event (fault or end of load).
    window_open: bool = True


@dataclass
class Recorder:
    """Counts and classifies every request of one (scenario, pool) run."""

    t0: float
    max_requests: int
    ok: int = 0
    failed: int = 0
    hangs: int = 0
    other: Counter[str] = field(default_factory=Counter)
    failed_types: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)
    hang_finals: Counter[str] = field(default_factory=Counter)
    lateness: list[float] = field(default_factory=list)
    unfinished: int = 0
    unfinished_lateness: float = -math.inf
    close_error: str | None = None
    events: list[Event] = field(default_factory=list)
    timeline: dict[int, list[int]] = field(default_factory=dict)
    orphans: set[asyncio.Future[None]] = field(default_factory=set)

    @property
    def total(self) -> int:
        """Requests recorded so far."""
        return self.ok + self.failed + self.hangs + sum(self.other.values())

    def now(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.t0

    def event(self, name: str, *, recovery_point: bool = False) -> None:
        """Mark a fault (or the moment the server is reachable again) now."""
        for ev in self.events:
            ev.window_open = False
        self.events.append(Event(name, self.now(), recovery_point))

    def record(
        self, end: float, deadline: float, exc: BaseException | None, finished: bool
    ) -> None:
        """Classify one request (times on the run's clock)."""
        late = end - deadline
        bucket = self.timeline.setdefault(int(end // BUCKET), [0, 0, 0, 0])
        if late > HANG_MARGIN or not finished:
            self.hangs += 1
            bucket[2] += 1
            final = "unfinished" if not finished else "ok" if exc is None else type(exc).__name__
            self.hang_finals[final] += 1
            if not finished:
                self.unfinished += 1
                self.unfinished_lateness = max(self.unfinished_lateness, late)
            self.lateness.append(late)
            if exc is not None:
                self._sample(exc)
            return
        if exc is None:
            self.ok += 1
            bucket[0] += 1
            for ev in self.events:
                if ev.recovery_point and ev.window_open and ev.first_ok is None and end >= ev.at:
                    ev.first_ok = end
            return
        self.lateness.append(late)
        self._sample(exc)
        if isinstance(exc, psycopg.Error):
            self.failed += 1
            self.failed_types[type(exc).__name__] += 1
            bucket[1] += 1
        else:
            self.other[f"{type(exc).__module__}.{type(exc).__qualname__}"] += 1
            bucket[3] += 1

    def _sample(self, exc: BaseException) -> None:
        """Keep the first few distinct messages of each exception type."""
        seen = self.samples.setdefault(type(exc).__name__, [])
        msg = (str(exc).strip().splitlines() or [""])[0][:200]
        if len(seen) < 3 and msg not in seen:
            seen.append(msg)

    def summary(self) -> dict[str, Any]:
        """The figures of the run, JSON-ready."""
        points = [e for e in self.events if e.recovery_point]
        recov = [None if e.first_ok is None else round(e.first_ok - e.at, 3) for e in points]
        known = [r for r in recov if r is not None]
        late = sorted(self.lateness)
        return {
            "requests": self.total,
            "ok": self.ok,
            "failed": self.failed,
            "hangs": self.hangs,
            "other": dict(self.other),
            "failed_types": dict(self.failed_types),
            "hang_outcomes": dict(self.hang_finals),
            "error_samples": self.samples,
            "recovery_s": recov,
            "recovery_median_s": round(statistics.median(known), 3) if known else None,
            "recovery_max_s": (round(max(known), 3) if known else None),
            "recovery_never": sum(r is None for r in recov),
            "lateness_p50_s": round(percentile(late, 0.50), 3) if late else None,
            "lateness_max_s": round(late[-1], 3) if late else None,
            "lateness_max_is_lower_bound": bool(late) and self.unfinished_lateness >= late[-1],
            "unfinished": self.unfinished,
            "events": [{"name": e.name, "at_s": round(e.at, 3)} for e in self.events],
            "timeline": {
                "bucket_s": BUCKET,
                "columns": ["ok", "failed", "hang", "other"],
                "rows": [[round(k * BUCKET, 2), *v] for k, v in sorted(self.timeline.items())],
            },
            "truncated": self.total >= self.max_requests,
        }
