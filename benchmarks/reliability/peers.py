"""The three pools of the role-change and PgBouncer scenarios, behind one small interface.

Unlike the restart and network-cut scenarios (psycopg pools only: their classification
relies on psycopg errors), these count any exception as a failed request, so asyncpg
takes part too. Each pool gets the sizes, its acquire timeout and ``extra`` options;
everything else is the pool's default (psycopg_pool's ``max_lifetime`` of one hour,
asyncpg's ``max_inactive_connection_lifetime`` of 5 minutes and ``max_queries`` of
50,000, ...). psycopg connections are in autocommit, as in the other benchmarks.
"""

from __future__ import annotations

import abc
import asyncio
from typing import Any, ClassVar

from psycopg.conninfo import conninfo_to_dict

from benchmarks.adapters_async import OPEN_TIMEOUT, PSYCOPG_KWARGS, unavailable

INSERT = "INSERT INTO writes (writer) VALUES ({})"


class Peer(abc.ABC):
    """One pool, able to run a statement on a borrowed connection within a timeout."""

    name: ClassVar[str]
    description: ClassVar[str]

    @abc.abstractmethod
    async def open(
        self, conninfo: str, size: int, timeout: float, extra: dict[str, Any] | None = None
    ) -> None:
        """Create the pool (min = max = ``size``, acquire timeout ``timeout``), pre-filled."""

    @abc.abstractmethod
    async def run(self, sql: str) -> None:
        """Acquire (the pool's own timeout), execute ``sql``, release."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the pool."""


class _PsycopgStyle(Peer):
    pool_class: ClassVar[str]

    def __init__(self) -> None:
        self._pool: Any = None

    async def open(
        self, conninfo: str, size: int, timeout: float, extra: dict[str, Any] | None = None
    ) -> None:
        module, _, name = self.pool_class.rpartition(".")
        try:
            cls = getattr(__import__(module, fromlist=[name]), name)
        except Exception as exc:
            raise unavailable(self.pool_class, exc) from exc
        kwargs = {**PSYCOPG_KWARGS, **(extra or {})}
        self._pool = cls(
            conninfo,
            kwargs=kwargs,
            min_size=size,
            max_size=size,
            timeout=timeout,
            name=f"bench-{self.name}",
            open=False,
        )
        await self._pool.open(wait=True, timeout=OPEN_TIMEOUT)

    async def run(self, sql: str) -> None:
        conn = await self._pool.getconn()
        try:
            await conn.execute(sql)
        finally:
            await self._pool.putconn(conn)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close(timeout=2.0)


class AiopgpoolPeer(_PsycopgStyle):
    name = "aiopgpool"
    description = "aiopgpool.AsyncConnectionPool"
    pool_class = "aiopgpool.AsyncConnectionPool"


class PsycopgPoolPeer(_PsycopgStyle):
    name = "psycopg_pool"
    description = "psycopg_pool.AsyncConnectionPool"
    pool_class = "psycopg_pool.AsyncConnectionPool"


def asyncpg_multihost_kwargs(conninfo: str) -> dict[str, Any]:
    """A libpq conninfo (possibly multi-host) as asyncpg.connect() keywords: ``host`` and
    ``port`` as lists when there are several, ``target_session_attrs`` passed on."""
    params = conninfo_to_dict(conninfo)
    hosts = str(params.get("host", "127.0.0.1")).split(",")
    ports = [int(p) for p in str(params.get("port", "5432")).split(",")]
    if len(ports) == 1 and len(hosts) > 1:
        ports *= len(hosts)
    out: dict[str, Any] = {
        "host": hosts if len(hosts) > 1 else hosts[0],
        "port": ports if len(ports) > 1 else ports[0],
    }
    for libpq_key, key in (("user", "user"), ("password", "password"), ("dbname", "database")):
        if params.get(libpq_key) is not None:
            out[key] = params[libpq_key]
    if params.get("target_session_attrs"):
        out["target_session_attrs"] = params["target_session_attrs"]
    if params.get("connect_timeout"):
        out["timeout"] = float(str(params["connect_timeout"]))
    return out


class AsyncpgPeer(Peer):
    name = "asyncpg"
    description = "asyncpg.create_pool() (host/port lists, target_session_attrs)"

    def __init__(self) -> None:
        self._pool: Any = None
        self._timeout = 0.0

    async def open(
        self, conninfo: str, size: int, timeout: float, extra: dict[str, Any] | None = None
    ) -> None:
        try:
            import asyncpg
        except Exception as exc:
            raise unavailable("asyncpg", exc) from exc
        self._timeout = timeout
        self._pool = await asyncio.wait_for(
            asyncpg.create_pool(
                min_size=size,
                max_size=size,
                server_settings={"application_name": f"bench-{self.name}"},
                **asyncpg_multihost_kwargs(conninfo),
                **(extra or {}),
            ),
            OPEN_TIMEOUT,
        )

    async def run(self, sql: str) -> None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.execute(sql)

    async def close(self) -> None:
        if self._pool is None:
            return
        try:
            await asyncio.wait_for(self._pool.close(), 5.0)
        except asyncio.TimeoutError:
            self._pool.terminate()


PEERS: dict[str, type[Peer]] = {p.name: p for p in (AiopgpoolPeer, PsycopgPoolPeer, AsyncpgPeer)}

#: What each peer's documentation says to set behind a transaction-mode PgBouncer
#: (aiopgpool turns psycopg's prepared statements off by itself when it sees a pooler).
BOUNCER_OPTIONS: dict[str, dict[str, Any]] = {
    "aiopgpool": {},
    "psycopg_pool": {"prepare_threshold": None},
    "asyncpg": {"statement_cache_size": 0},
}
