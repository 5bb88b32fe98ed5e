"""Role changes and PgBouncer: the scenarios of issue #14, for aiopgpool and its peers.

``failover``
    A primary and one streaming standby (:class:`aiopgpool.testing.ReplicatedCluster`),
    the pool on the multi-host conninfo with ``target_session_attrs=read-write``.
    ``--tasks`` tasks INSERT in a loop (each request: acquire with the pool's
    ``--timeout``, INSERT, release; also bounded from outside at that timeout + 0.5 s).
    The primary is stopped; ``--outage`` seconds later the standby is promoted
    (``pg_promote()``); the load goes on ``--after`` seconds. No ``drain()``.
``read-only``
    The same, but the primary is made read-only in place (``ALTER SYSTEM SET
    default_transaction_read_only = on`` and a reload: it keeps running and accepting
    connections) instead of being stopped.
``pgbouncer``
    PgBouncer (transaction mode, ``server_login_retry = 1``) in front of a throwaway
    server: ``SELECT 1`` throughput of ``--tasks`` tasks for ``--duration`` seconds
    through the bouncer and as long straight to the server (ratio; legs alternate:
    via, direct, via, direct, each on a fresh pool); then a server restart behind the
    bouncer (down ``--down`` s) under the same load, which goes on ``--after`` seconds,
    and the time from the server being back (``start()`` returned) to the first
    successful request. Behind the bouncer, each peer gets what its documentation says
    to set for transaction mode (psycopg_pool: ``prepare_threshold=None``; asyncpg:
    ``statement_cache_size=0``), in both legs; aiopgpool nothing.

Figures (times from the ``pg_promote()`` call):

* **first write**: the first write that succeeded after it;
* **100 % writes**: the first success after the last failure, provided at least
  ``--clean`` seconds of failure-free writes follow it before the run ends; else
  "not within (after - clean) s";
* **failed writes**: every failed write of the run (during the outage, and after the
  promotion).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.reliability.peers import BOUNCER_OPTIONS, INSERT, PEERS, Peer

#: A request unfinished this long after its acquire timeout is abandoned (a failure).
OUTER_MARGIN = 0.5
#: A writer's pause after a successful write (leaves some CPU to the servers).
WRITE_PAUSE = 0.005


@dataclass
class Tally:
    """(seconds since t0, succeeded) of every request, and the failures by type."""

    t0: float = field(default_factory=time.monotonic)
    outcomes: list[tuple[float, bool]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)
    events: dict[str, float] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, name: str) -> float:
        at = self.events[name] = self.now()
        return at

    def add(self, exc: BaseException | None) -> None:
        self.outcomes.append((self.now(), exc is None))
        if exc is not None:
            kind = type(exc).__name__
            self.errors[kind] += 1
            self.samples.setdefault(kind, (str(exc).strip().splitlines() or [""])[0][:160])

    def count(self, since: float = float("-inf"), until: float = float("inf")) -> tuple[int, int]:
        """(successes, failures) that ended in [since, until)."""
        ok = bad = 0
        for at, good in self.outcomes:
            if since <= at < until:
                ok += good
                bad += not good
        return ok, bad

    def first_ok(self, since: float) -> float | None:
        """Seconds from ``since`` to the first success that ended after it."""
        return next((at - since for at, good in self.outcomes if good and at >= since), None)

    def all_ok(self, since: float, end: float, clean: float) -> float | None:
        """Seconds from ``since`` to the first success after the last failure, if at
        least ``clean`` seconds of failure-free requests follow it before ``end``."""
        after = [(at, good) for at, good in self.outcomes if at >= since]
        last_bad = max((at for at, good in after if not good), default=None)
        start = next(
            (at for at, good in after if good and (last_bad is None or at > last_bad)), None
        )
        if start is None or end - start < clean:
            return None
        return start - since


async def _loop(
    peer: Peer, sql: str, tally: Tally, stop: asyncio.Event, timeout: float, pause: float
) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(peer.run(sql), timeout + OUTER_MARGIN)
        except Exception as exc:
            tally.add(exc)
            await asyncio.sleep(pause)
        else:
            tally.add(None)
            if sql.startswith("INSERT"):
                await asyncio.sleep(WRITE_PAUSE)


@contextlib.asynccontextmanager
async def _load(
    peer: Peer, tasks: int, statement: Callable[[int], str], tally: Tally, s: Any
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    workers = [
        asyncio.ensure_future(_loop(peer, statement(n), tally, stop, s.timeout, s.error_pause))
        for n in range(tasks)
    ]
    try:
        yield
    finally:
        stop.set()
        _, pending = await asyncio.wait(workers, timeout=s.timeout + OUTER_MARGIN + 5)
        for w in pending:
            w.cancel()


async def _role_change(pool: str, s: Any, *, read_only: bool) -> dict[str, Any]:
    from aiopgpool.testing import ReplicatedCluster

    rc = await asyncio.to_thread(ReplicatedCluster, 1)
    try:
        old, new = rc.primary, rc.standbys[0]

        def prepare() -> None:
            import psycopg

            with psycopg.connect(old.dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE writes (writer int, at timestamptz DEFAULT now())")
            rc.wait_caught_up()

        await asyncio.to_thread(prepare)
        params = {"target_session_attrs": "read-write"}
        if s.connect_timeout:
            params["connect_timeout"] = str(s.connect_timeout)
        conninfo = rc.conninfo(None, **params)
        peer = PEERS[pool]()
        await peer.open(conninfo, s.pool_size, s.timeout)
        tally = Tally()
        try:
            async with _load(peer, s.tasks, lambda n: INSERT.format(n), tally, s):
                tally.mark("load started")
                await asyncio.sleep(s.warmup)
                tally.mark("fault")
                if read_only:
                    await asyncio.to_thread(rc.make_read_only, old)
                else:
                    await asyncio.to_thread(rc.stop, old)
                tally.mark("fault in effect")
                await asyncio.sleep(s.outage)
                promote = tally.mark("pg_promote")
                await asyncio.to_thread(rc.promote, new)
                tally.mark("out of recovery")
                await asyncio.sleep(max(0.0, promote + s.after - tally.now()))
                end = tally.mark("load stopping")
        finally:
            await peer.close()
        ok_after, failed_after = tally.count(since=promote)
        ok_all, failed_all = tally.count()
        first = tally.first_ok(promote)
        full = tally.all_ok(promote, end, s.clean)
        return {
            "conninfo": conninfo,
            "promoted_after_s": round(tally.events["out of recovery"] - promote, 3),
            "first_write_s": None if first is None else round(first, 3),
            "all_writes_s": None if full is None else round(full, 3),
            "window_s": round(end - promote - s.clean, 1),
            "ok": ok_all,
            "failed": failed_all,
            "ok_after_promotion": ok_after,
            "failed_after_promotion": failed_after,
            "failed_types": dict(tally.errors),
            "error_samples": tally.samples,
            "events": {k: round(v, 3) for k, v in tally.events.items()},
        }
    finally:
        await asyncio.to_thread(rc.close)


async def scenario_failover(pool: str, s: Any) -> dict[str, Any]:
    """Stop the primary, promote the standby ``s.outage`` s later."""
    return await _role_change(pool, s, read_only=False)


async def scenario_read_only(pool: str, s: Any) -> dict[str, Any]:
    """Make the primary read-only in place, promote the standby ``s.outage`` s later."""
    return await _role_change(pool, s, read_only=True)


async def _throughput(
    pool: str, conninfo: str, seconds: float, s: Any, extra: dict[str, Any]
) -> tuple[int, float, Tally]:
    """(successes, measured seconds, tally) of ``SELECT 1`` loops on a fresh pool."""
    peer = PEERS[pool]()
    await peer.open(conninfo, s.pool_size, s.timeout, extra)
    tally = Tally()
    try:
        async with _load(peer, s.tasks, lambda n: "SELECT 1", tally, s):
            await asyncio.sleep(s.warmup)
            start = tally.mark("measure")
            await asyncio.sleep(seconds)
            end = tally.mark("stop")
    finally:
        await peer.close()
    ok, _ = tally.count(start, end)
    return ok, end - start, tally


async def _paired_throughput(
    pool: str, via: str, direct: str, s: Any, extra: dict[str, Any]
) -> dict[str, Any]:
    """Through the bouncer and direct, alternating (via, direct, via, direct), each leg
    ``s.duration / 2`` seconds on a fresh pool, so that a drift of the shared machine
    weighs on both."""
    figures: dict[str, dict[str, Any]] = {}
    for _ in range(2):
        for leg, conninfo in (("via_bouncer", via), ("direct", direct)):
            ok, seconds, tally = await _throughput(pool, conninfo, s.duration / 2, s, extra)
            f = figures.setdefault(
                leg, {"ok": 0, "seconds": 0.0, "failed": 0, "failed_types": Counter()}
            )
            f["ok"] += ok
            f["seconds"] += seconds
            f["failed"] += sum(tally.errors.values())
            f["failed_types"].update(tally.errors)
            f.setdefault("error_samples", {}).update(tally.samples)
    for f in figures.values():
        f["ops_s"] = round(f["ok"] / f["seconds"], 1)
        f["seconds"] = round(f["seconds"], 2)
        f["failed_types"] = dict(f["failed_types"])
    return figures


async def scenario_pgbouncer(pool: str, s: Any) -> dict[str, Any]:
    """Throughput through PgBouncer vs direct, then a server restart behind it."""
    from aiopgpool.testing import PgBouncer
    from benchmarks.environment import local_cluster

    cluster = await asyncio.to_thread(local_cluster)
    bouncer = None
    try:
        settings = {"server_login_retry": 1, "default_pool_size": 20}
        bouncer = await asyncio.to_thread(PgBouncer, cluster, "transaction", settings)
        extra = BOUNCER_OPTIONS[pool]
        legs = await _paired_throughput(pool, bouncer.dsn, cluster.dsn, s, extra)
        via, direct = legs["via_bouncer"], legs["direct"]
        peer = PEERS[pool]()
        await peer.open(bouncer.dsn, s.pool_size, s.timeout, extra)
        tally = Tally()
        try:
            async with _load(peer, s.tasks, lambda n: "SELECT 1", tally, s):
                await asyncio.sleep(s.warmup)
                tally.mark("stop")
                await asyncio.to_thread(cluster.stop)
                await asyncio.sleep(s.down)
                await asyncio.to_thread(cluster.start)
                back = tally.mark("server back")
                await asyncio.sleep(s.after)
                end = tally.mark("load stopping")
        finally:
            await peer.close()
        first = tally.first_ok(back)
        full = tally.all_ok(back, end, s.clean)
        ok, failed = tally.count()
        return {
            "options": extra,
            "via_bouncer": via,
            "direct": direct,
            "ratio": round(via["ops_s"] / direct["ops_s"], 2) if direct["ops_s"] else None,
            "restart": {
                "first_ok_s": None if first is None else round(first, 3),
                "all_ok_s": None if full is None else round(full, 3),
                "window_s": round(end - back - s.clean, 1),
                "ok": ok,
                "failed": failed,
                "failed_types": dict(tally.errors),
                "error_samples": tally.samples,
                "events": {k: round(v, 3) for k, v in tally.events.items()},
            },
        }
    finally:
        if bouncer is not None:
            await asyncio.to_thread(bouncer.close)
        await asyncio.to_thread(cluster.close)


ROLE_SCENARIOS: dict[str, Callable[[str, Any], Awaitable[dict[str, Any]]]] = {
    "failover": scenario_failover,
    "read-only": scenario_read_only,
    "pgbouncer": scenario_pgbouncer,
}


async def run_role(scenario: str, pool: str, s: Any) -> dict[str, Any]:
    """Run one of :data:`ROLE_SCENARIOS` against one pool; never raises."""
    started = time.monotonic()
    result: dict[str, Any] = {"scenario": scenario, "pool": pool}
    try:
        result.update(await ROLE_SCENARIOS[scenario](pool, s))
        result["status"] = "done"
    except Exception as exc:
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result
