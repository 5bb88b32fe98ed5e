"""A WSGI app on the sync pool (the legacy-code case), served by waitress' threads.

Run it from the repository's root::

    AIOPGPOOL_EXAMPLE_DSN="host=127.0.0.1 dbname=app user=app" \\
        python -m examples.wsgi_app --port 8000 --threads 16

Plain WSGI, no framework: any WSGI server with threads (waitress, gunicorn
``--threads``, mod_wsgi) serves it the same way. One :class:`aiopgpool.ConnectionPool`
per process, shared by every thread; each request borrows a connection for its query
only. Endpoints as in ``examples/asgi_app.py``: ``GET /items/{id}``,
``POST /items/{id}/hits``, ``GET /sleep``, ``GET /stats`` and ``GET /metrics``.

Settings (environment): ``AIOPGPOOL_EXAMPLE_DSN`` (required), ``AIOPGPOOL_EXAMPLE_MAX_SIZE``
(default 10), ``AIOPGPOOL_EXAMPLE_TABLE`` (default ``wsgi_items``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Iterable
from typing import Any

import waitress  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry, make_wsgi_app

from aiopgpool import ConnectionPool, PoolTimeout
from aiopgpool.prometheus import PoolCollector

from .common import env_int, public_stats, queries

QUERIES = queries("wsgi_items")
StartResponse = Callable[..., Any]
_ITEM = re.compile(r"/items/(\d+)(/hits)?")


def _json(start_response: StartResponse, status: str, body: object) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def make_app(pool: ConnectionPool) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The WSGI callable serving ``pool``'s database."""
    registry = CollectorRegistry()
    registry.register(PoolCollector(pool))
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", "/"), environ["REQUEST_METHOD"]
        try:
            if path == "/metrics":
                result: Iterable[bytes] = metrics_app(environ, start_response)
                return result
            if path == "/stats":
                return _json(start_response, "200 OK", public_stats(pool.stats()))
            if path == "/sleep":
                with pool.connection() as conn:
                    conn.execute("SELECT pg_sleep(0.01)")
                return _json(start_response, "200 OK", {"slept": 0.01})
            match = _ITEM.fullmatch(path)
            if match is not None and (method == "POST") == bool(match[2]):
                with pool.connection() as conn:
                    query = QUERIES.hit if match[2] else QUERIES.select
                    row = conn.execute(query, (int(match[1]),)).fetchone()
                if row is None:
                    return _json(start_response, "404 Not Found", {"error": "no such item"})
                if match[2]:
                    return _json(start_response, "200 OK", {"id": int(match[1]), "hits": row[0]})
                return _json(
                    start_response, "200 OK", {"id": row[0], "name": row[1], "hits": row[2]}
                )
        except PoolTimeout:
            return _json(start_response, "503 Service Unavailable", {"error": "database busy"})
        return _json(start_response, "404 Not Found", {"error": "no such page"})

    return app


def main(argv: list[str] | None = None) -> None:
    """Open the pool, make the table, serve until SIGTERM or SIGINT, close the pool."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument(
        "--connection-limit",
        type=int,
        default=100,
        help="client connections waitress keeps open at once (its own default: 100)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    pool = ConnectionPool(
        os.environ["AIOPGPOOL_EXAMPLE_DSN"],
        min_size=2,
        max_size=env_int("AIOPGPOOL_EXAMPLE_MAX_SIZE", 10),
        timeout=10.0,  # a 503 after 10 s without a connection, not a hung thread
        name="wsgi-example",
    )
    pool.open(wait=True, timeout=30.0)
    try:
        with pool.connection() as conn:
            for statement in QUERIES.create:
                conn.execute(statement)
        server = waitress.create_server(
            make_app(pool),
            host=args.host,
            port=args.port,
            threads=args.threads,
            connection_limit=args.connection_limit,
        )
        # SIGTERM (what process managers send) stops the server as Ctrl-C does: run()
        # returns once waitress has shut its threads down.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        print(f"serving on http://{args.host}:{args.port}", flush=True)
        server.run()
    finally:
        pool.close(timeout=5.0)


if __name__ == "__main__":
    main()
