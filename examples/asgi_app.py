"""An ASGI app (Starlette) on the async pool, with Prometheus metrics at ``/metrics``.

Run it with uvicorn, on uvloop or on asyncio's own loop::

    AIOPGPOOL_EXAMPLE_DSN="host=127.0.0.1 dbname=app user=app" \\
        uvicorn examples.asgi_app:app --loop uvloop --port 8000

One pool per process, opened and closed in the lifespan (``--workers 4`` makes four
processes, so four pools: size ``max_size`` for that, see the README's "Running in
production"). Endpoints:

* ``GET /items/{id}``: a row of the table the app creates at startup (404 if absent);
* ``POST /items/{id}/hits``: increments its counter (a write, in a transaction);
* ``GET /sleep``: ``SELECT pg_sleep(0.01)``, a slow query holding a connection;
* ``GET /stats``: the pool's counters as JSON (``pool.stats()``, histograms left out)
  and the event loop's module (``uvloop`` or ``asyncio...``);
* ``GET /metrics``: Prometheus text, collected on this event loop's thread.

Settings (environment): ``AIOPGPOOL_EXAMPLE_DSN`` (required), ``AIOPGPOOL_EXAMPLE_MAX_SIZE``
(default 10), ``AIOPGPOOL_EXAMPLE_TABLE`` (default ``asgi_items``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aiopgpool import AsyncConnectionPool, PoolTimeout
from aiopgpool.prometheus import PoolCollector

from .common import env_int, public_stats, queries

QUERIES = queries("asgi_items")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Open the pool (and make the table) before serving; close it gracefully after."""
    pool = AsyncConnectionPool(
        os.environ["AIOPGPOOL_EXAMPLE_DSN"],
        min_size=2,
        max_size=env_int("AIOPGPOOL_EXAMPLE_MAX_SIZE", 10),
        timeout=10.0,  # fail a request after 10 s without a connection: a 503, not a hang
        name="asgi-example",
    )
    await pool.open(wait=True, timeout=30.0)
    try:
        async with pool.connection() as conn:
            for statement in QUERIES.create:
                await conn.execute(statement)
        registry = CollectorRegistry()
        registry.register(PoolCollector(pool))
        app.state.pool = pool
        app.state.registry = registry
        yield
    finally:
        await pool.close(timeout=5.0)


async def _item_query(request: Request, query: sql.Composed) -> tuple[Any, ...] | None:
    """``query`` run on the path's item id in one transaction; its first row."""
    async with request.app.state.pool.connection() as conn:
        cur = await conn.execute(query, (int(request.path_params["item_id"]),))
        row: tuple[Any, ...] | None = await cur.fetchone()
        return row


def _no_such_item() -> Response:
    return JSONResponse({"error": "no such item"}, status_code=404)


async def get_item(request: Request) -> Response:
    """One row, or 404."""
    row = await _item_query(request, QUERIES.select)
    if row is None:
        return _no_such_item()
    return JSONResponse({"id": row[0], "name": row[1], "hits": row[2]})


async def hit_item(request: Request) -> Response:
    """Increment a row's counter; the new value, or 404."""
    row = await _item_query(request, QUERIES.hit)
    if row is None:
        return _no_such_item()
    return JSONResponse({"id": request.path_params["item_id"], "hits": row[0]})


async def sleep(request: Request) -> Response:
    """A slow query: holds a connection for 10 ms on the server."""
    async with request.app.state.pool.connection() as conn:
        await conn.execute("SELECT pg_sleep(0.01)")
    return JSONResponse({"slept": 0.01})


async def stats(request: Request) -> Response:
    """The pool's state and counters, and which event loop serves (uvloop or asyncio)."""
    figures = public_stats(request.app.state.pool.stats())
    figures["event_loop"] = type(asyncio.get_running_loop()).__module__
    return JSONResponse(figures)


async def metrics(request: Request) -> Response:
    """Prometheus exposition of the pool's metrics."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


async def database_busy(request: Request, exc: Exception) -> Response:
    """No connection within the pool's timeout: 503, so that clients back off."""
    return JSONResponse({"error": "database busy"}, status_code=503)


app = Starlette(
    routes=[
        Route("/items/{item_id:int}", get_item),
        Route("/items/{item_id:int}/hits", hit_item, methods=["POST"]),
        Route("/sleep", sleep),
        Route("/stats", stats),
        Route("/metrics", metrics),
    ],
    lifespan=lifespan,
    exception_handlers={PoolTimeout: database_busy},
)
