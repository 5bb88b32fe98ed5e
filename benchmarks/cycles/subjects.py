"""What the cycles command measures: the throughput command's pools, by family."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.adapters_async import ASYNC_ADAPTERS, AsyncAdapter
from benchmarks.adapters_sync import SYNC_ADAPTERS, SyncAdapter


@dataclass(frozen=True)
class Subject:
    """One pool, measured through its adapter's ``raw_calls()`` (the pool's own calls)."""

    family: str
    adapter: type[AsyncAdapter] | type[SyncAdapter]

    @property
    def key(self) -> str:
        """``family/name``, e.g. ``async/psycopg_pool``."""
        return f"{self.family}/{self.adapter.name}"

    @property
    def is_aiopgpool(self) -> bool:
        """True for aiopgpool's pools (whose socket test the child sets)."""
        return self.adapter.name == "aiopgpool"

    @property
    def is_floor(self) -> bool:
        """True for the family's floor."""
        return self.adapter.is_floor


#: psycopg2's pool is left out: it is not in the comparison this command was made for.
SUBJECTS: dict[str, Subject] = {
    s.key: s
    for s in [
        *(Subject("async", a) for a in ASYNC_ADAPTERS),
        *(Subject("sync", a) for a in SYNC_ADAPTERS if a.name != "psycopg2"),
    ]
}
