"""Pool statistics: the public :class:`PoolStats` snapshot and the live counters behind it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Counters", "PoolStats"]


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's state and counters (``pool.stats()``)."""

    name: str
    size: int
    """Connections open now: idle + in use."""
    idle: int
    in_use: int
    waiting: int
    """Requests queued for a connection right now."""
    min_size: int
    max_size: int
    requests: int
    """getconn() calls served or failed since the pool was created."""
    requests_waited: int
    """Requests that found no idle connection and had to wait."""
    wait_time_total: float
    """Seconds spent waiting, summed over all requests that waited."""
    timeouts: int
    """Requests that failed with PoolTimeout (or TooManyRequests)."""
    connections_created: int
    connections_failed: int
    """Connection attempts that failed."""
    connections_lost: int
    """Connections found dead (closed by the server, failed a check) and replaced."""
    returns_bad: int
    """Connections returned in a transaction, in error, mid-query or broken."""
    leaks: int
    """Connections held longer than leak_timeout."""
    connections_closed: int
    """Connections the pool closed (expired, idle, discarded, resized away)."""

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict."""
        return asdict(self)


class Counters:
    """Mutable counters owned by one pool; read into a :class:`PoolStats`."""

    __slots__ = (
        "connections_closed",
        "connections_created",
        "connections_failed",
        "connections_lost",
        "leaks",
        "requests",
        "requests_waited",
        "returns_bad",
        "timeouts",
        "wait_time_total",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.requests_waited = 0
        self.wait_time_total = 0.0
        self.timeouts = 0
        self.connections_created = 0
        self.connections_failed = 0
        self.connections_lost = 0
        self.returns_bad = 0
        self.leaks = 0
        self.connections_closed = 0
