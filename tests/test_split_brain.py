"""A split brain after a failover, on a real cluster: the old primary restarted alone
(a primary of its own, fenced) and a standby that still follows it, on the old timeline.

Positions on two timelines compare with nothing: the standby may replay past the new
primary's position with the old primary's diverged writes. It must get no reads until it
follows the new primary's timeline. The test destroys its cluster's roles, so it builds
a cluster of its own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
import pytest
from helpers import until

from aiopgpool import AsyncReplicatedPool
from aiopgpool.testing import LocalCluster, ReplicatedCluster

FAST = {"probe_interval": 0.2, "max_replica_lag": 0.5}


def role(pool: AsyncReplicatedPool, member: str) -> str:
    return pool.members()[f"{pool.name}.{member}"].role


def ask(node: LocalCluster, sql: str) -> Any:
    """The first column of ``sql``'s first row on ``node`` (None without a row)."""
    with psycopg.connect(node.dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    return None if row is None else row[0]


def position(node: LocalCluster) -> int:
    """The replay position (a standby) or the insert position (a primary), as an integer."""
    return int(
        ask(
            node,
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " ELSE pg_current_wal_insert_lsn() END - '0/0'::pg_lsn)::int8",
        )
    )


def streams_from(standby: LocalCluster, upstream: LocalCluster) -> bool:
    """Whether ``standby``'s WAL receiver streams from ``upstream`` now."""
    return bool(
        ask(
            standby,
            "SELECT status = 'streaming' AND sender_port = "
            f"{upstream.port} FROM pg_stat_wal_receiver",
        )
    )


async def read_many(pool: AsyncReplicatedPool, n: int) -> list[tuple[int, str]]:
    """``n`` reads through the pool: (server port, the value of row 1) each."""
    seen = []
    for _ in range(n):
        async with pool.connection(read_only=True, timeout=10) as conn:
            cur = await conn.execute("SELECT inet_server_port(), v FROM sb WHERE id = 1")
            row = await cur.fetchone()
            assert row is not None
            seen.append((int(row[0]), str(row[1])))
    return seen


async def test_a_standby_following_the_fenced_old_primary_gets_no_reads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with ReplicatedCluster(standbys=2, slots=False) as rc:
        old, new, follower = rc.nodes
        with psycopg.connect(old.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE sb (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO sb VALUES (1, 'before')")
        rc.wait_caught_up()
        pool = AsyncReplicatedPool(
            old.dsn,
            [new.dsn, follower.dsn],
            name="split",
            timeout=5,
            reconnect_timeout=30,
            **FAST,
        )
        caplog.set_level(logging.INFO, "aiopgpool")
        async with pool:
            await pool.open(wait=True)
            assert [m.role for m in pool.members().values()] == ["primary", "replica", "replica"]

            # The failover: the old primary stops, a standby is promoted.
            await asyncio.to_thread(rc.stop, old)
            await asyncio.to_thread(rc.promote, new)
            await until(lambda: pool.primary is pool.pools["split.replica-1"], 10.0, "moved")
            async with pool.connection() as conn:
                await conn.execute("UPDATE sb SET v = 'new' WHERE id = 1")

            # The old primary comes back alone: out of recovery, fenced. The follower's
            # primary_conninfo still names it, and it streams the old timeline from it.
            await asyncio.to_thread(rc.start, old)
            await until(lambda: role(pool, "primary") == "fenced", 15.0, "old fenced")
            await until(lambda: streams_from(follower, old), 30.0, "follower on old")

            # A client still writing to the old primary: its position runs past the new
            # primary's, and the follower replays those diverged writes.
            with psycopg.connect(old.dsn, autocommit=True) as conn:
                conn.execute("UPDATE sb SET v = 'diverged' WHERE id = 1")
                conn.execute("INSERT INTO sb SELECT g, 'x' FROM generate_series(2, 20000) g")
            diverged_at = position(old)
            assert diverged_at > position(new)
            await until(
                lambda: position(follower) >= diverged_at, 30.0, "follower replayed the old"
            )
            assert ask(follower, "SELECT v FROM sb WHERE id = 1") == "diverged"
            assert position(follower) > position(new)

            # From here on, across many probe rounds, the follower never gets reads.
            seen_roles: set[str] = set()
            ports: set[int] = set()
            values: set[str] = set()
            start = pool._topology.rounds
            while pool._topology.rounds < start + 10:
                seen_roles.add(role(pool, "replica-2"))
                for port, value in await read_many(pool, 3):
                    ports.add(port)
                    values.add(value)
                await asyncio.sleep(0.05)
            assert seen_roles == {"diverged"}, seen_roles
            assert follower.port not in ports and ports == {new.port}
            assert values == {"new"}
            assert pool.members()["split.replica-2"].lag is None
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT inet_server_port(), pg_is_in_recovery()")
                assert await cur.fetchone() == (new.port, False)
            warnings = [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.WARNING and "follows timeline" in r.getMessage()
            ]
            assert warnings, caplog.text
            assert (
                "split.replica-2 follows timeline 1 but the primary split.replica-1 is on "
                "timeline 2" in warnings[0]
            ), warnings
            assert not any("port=" in w or "host=" in w for w in warnings), warnings

            # Made a standby of the new primary again: it follows timeline 2 and reads.
            await asyncio.to_thread(rc.rejoin, follower)
            await until(lambda: role(pool, "replica-2") == "replica", 30.0, "back")
            assert "split.replica-2 gets reads again" in caplog.text
            seen = await read_many(pool, 12)
            assert {port for port, _ in seen} == {follower.port}
            assert {value for _, value in seen} == {"new"}
