"""What both example apps share: the table they serve and the stats they show."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from aiopgpool import PoolStats

#: Rows the apps create (ids 1..ITEMS).
ITEMS = 100


@dataclass(frozen=True)
class Queries:
    """The apps' statements on one table (its name quoted as an identifier)."""

    create: tuple[sql.Composed, ...]
    select: sql.Composed
    hit: sql.Composed


def queries(default_table: str) -> Queries:
    """The statements on ``$AIOPGPOOL_EXAMPLE_TABLE`` (default ``default_table``)."""
    table = sql.Identifier(os.environ.get("AIOPGPOOL_EXAMPLE_TABLE", default_table))
    return Queries(
        create=(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id int PRIMARY KEY, name text NOT NULL,"
                " hits bigint NOT NULL DEFAULT 0)"
            ).format(table),
            sql.SQL(
                "INSERT INTO {} (id, name) SELECT i, 'item ' || i FROM generate_series(1, {}) i"
                " ON CONFLICT (id) DO NOTHING"
            ).format(table, sql.Literal(ITEMS)),
        ),
        select=sql.SQL("SELECT id, name, hits FROM {} WHERE id = %s").format(table),
        hit=sql.SQL("UPDATE {} SET hits = hits + 1 WHERE id = %s RETURNING hits").format(table),
    )


def public_stats(stats: PoolStats) -> dict[str, Any]:
    """``stats`` as JSON-ready figures (the histograms are at /metrics)."""
    return {key: value for key, value in stats.as_dict().items() if not key.endswith("_histogram")}


def env_int(name: str, default: int) -> int:
    """An integer setting from the environment."""
    return int(os.environ.get(name, str(default)))
