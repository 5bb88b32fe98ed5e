"""The examples, served for real on loopback and driven hard: the ASGI app under uvicorn
(on uvloop and on asyncio), the WSGI app under waitress' threads.

Each test starts the app in a subprocess (always stopped afterwards), sends 2,000
requests from 200 concurrent httpx clients to a pool of 10, and checks that no request
failed, that the pool is at rest afterwards and that the scraped metrics agree with the
requests made and with the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 2_000
CLIENTS = 200
POOL_SIZE = 10
START_TIMEOUT = 60.0
LOAD_TIMEOUT = 240.0
REQUEST_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
_seq = itertools.count(1)

logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
pytestmark = pytest.mark.timeout(LOAD_TIMEOUT + START_TIMEOUT + 2 * STOP_TIMEOUT + 60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Served:
    """An example app in a subprocess on a loopback port, its output in a file."""

    def __init__(self, args: list[str], port: int, env: dict[str, str], log: IO[str]) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        """What the app printed so far."""
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self) -> None:
        """Until ``/stats`` answers (the pool is open, the table made), START_TIMEOUT at most."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the app exited ({self.proc.returncode}):\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/stats", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        pytest.fail(f"the app did not answer within {START_TIMEOUT} s:\n{self.output()}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        return self.proc.returncode


@contextlib.contextmanager
def served(args: list[str], dsn: str, table: str) -> Iterator[Served]:
    """The app started with ``args`` (``{port}`` filled in), ready; always stopped."""
    port = _free_port()
    env = {
        "AIOPGPOOL_EXAMPLE_DSN": dsn,
        "AIOPGPOOL_EXAMPLE_MAX_SIZE": str(POOL_SIZE),
        "AIOPGPOOL_EXAMPLE_TABLE": table,
    }
    with tempfile.TemporaryFile(mode="w+") as log:
        app = Served([a.format(port=port) for a in args], port, env, log)
        try:
            app.wait_ready()
            yield app
        finally:
            status = app.stop()
        # uvicorn re-raises the SIGTERM it handled (exit status -15) once shut down.
        output = app.output()
        assert status in (0, -signal.SIGTERM), f"the app exited with {status}:\n{output[-3000:]}"
        assert "Traceback" not in output, output[-3000:]


async def _drive(base: str) -> tuple[Counter[int | str], Counter[str]]:
    """REQUESTS requests from CLIENTS concurrent clients: outcomes and kinds sent.

    An outcome is the status code, or ``"<kind>: <exception>"`` for a request that got
    no response (the pool's timeout is 10 s, so a request lasting REQUEST_TIMEOUT is a
    hang).
    """
    outcomes: Counter[int | str] = Counter()
    kinds: Counter[str] = Counter()
    todo = iter(range(REQUESTS))
    rnd = random.Random(16)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=REQUEST_TIMEOUT) as client:

        async def client_loop() -> None:
            for _ in todo:  # shared: REQUESTS in all, whatever the interleaving
                kind = rnd.choice(["read", "read", "write", "sleep"])
                item = rnd.randint(1, 100)
                kinds[kind] += 1
                try:
                    if kind == "read":
                        response = await client.get(f"/items/{item}")
                    elif kind == "write":
                        response = await client.post(f"/items/{item}/hits")
                    else:
                        response = await client.get("/sleep")
                except httpx.HTTPError as exc:
                    outcomes[f"{kind}: {type(exc).__name__}"] += 1
                else:
                    outcomes[response.status_code] += 1

        await asyncio.wait_for(
            asyncio.gather(*(client_loop() for _ in range(CLIENTS))), LOAD_TIMEOUT
        )
    return outcomes, kinds


def _scrape(base: str) -> dict[tuple[str, str], float]:
    """(sample name, pool_name) -> value, from /metrics (state folded into the name)."""
    text = httpx.get(base + "/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "le" in s.labels:
                continue
            name = s.name + (f":{s.labels['state']}" if "state" in s.labels else "")
            found[(name, s.labels.get("pool_name", ""))] = s.value
    return found


def _check_run(app: Served, dsn: str, table: str, pool: str) -> bool:
    """Drive the load and check the app, the pool, the metrics and the table.

    False when the pool's histograms are empty (the core does not record them yet).
    """
    outcomes, kinds = asyncio.run(_drive(app.base))
    stats = httpx.get(app.base + "/stats", timeout=10).json()
    assert outcomes == Counter({200: REQUESTS}), (outcomes, stats, app.output()[-3000:])
    assert stats["in_use"] == 0
    assert stats["waiting"] == 0
    assert stats["timeouts"] == 0
    assert stats["size"] <= POOL_SIZE
    served_requests = stats["requests"]
    assert served_requests >= REQUESTS + 1  # +1: the table made at startup

    metrics = _scrape(app.base)
    assert metrics[("aiopgpool_pool_requests_total", pool)] == served_requests
    assert metrics[("db_client_connection_count:used", pool)] == 0
    assert metrics[("db_client_connection_pending_requests", pool)] == 0
    assert metrics[("db_client_connection_max", pool)] == POOL_SIZE
    assert metrics[("db_client_connection_timeouts_total", pool)] == 0
    assert metrics[("aiopgpool_pool_connections_failed_total", pool)] == 0
    assert metrics[("db_client_connection_count:idle", pool)] <= POOL_SIZE

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql.SQL("SELECT sum(hits) FROM {}").format(sql.Identifier(table)))
        hits = row.fetchone()
    assert hits is not None and hits[0] == kinds["write"], "every write committed once"

    use_count = metrics[("db_client_connection_use_time_seconds_count", pool)]
    wait_count = metrics[("db_client_connection_wait_time_seconds_count", pool)]
    if use_count == 0 and wait_count == 0:
        return False
    assert use_count == served_requests  # every request returned its connection
    assert wait_count == served_requests
    assert metrics[("db_client_connection_use_time_seconds_sum", pool)] >= kinds["sleep"] * 0.01
    created = metrics[("aiopgpool_pool_connections_created_total", pool)]
    assert metrics[("db_client_connection_create_time_seconds_count", pool)] == created
    return True


def _histograms_checked(checked: bool) -> None:
    assert checked, "the pool's histograms are empty"


@pytest.fixture
def table(dsn: str) -> Iterator[str]:
    """A table name of this test's own, dropped afterwards."""
    name = f"example_items_{os.getpid()}_{next(_seq)}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_asgi_app_under_uvicorn(dsn: str, table: str, loop: str) -> None:
    """The Starlette app on uvicorn: 2,000 requests, 200 clients, a pool of 10."""
    args = [
        sys.executable, "-m", "uvicorn", "examples.asgi_app:app",
        "--host", "127.0.0.1", "--port", "{port}", "--loop", loop,
        "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "10",
        # Keep-alive longer than the run: httpx reuses its first idle connections, so its
        # last ones may idle past uvicorn's 5 s default, and a request sent as uvicorn
        # closes one fails (RemoteProtocolError): a client-server race, not the pool's.
        "--timeout-keep-alive", "120",
    ]  # fmt: skip
    with served(args, dsn, table) as app:
        loop_module = httpx.get(app.base + "/stats", timeout=10).json()["event_loop"]
        assert loop_module.split(".")[0] == loop  # uvloop really, or asyncio's own
        checked = _check_run(app, dsn, table, "asgi-example")
    _histograms_checked(checked)


def test_wsgi_app_under_waitress(dsn: str, table: str) -> None:
    """The plain WSGI app on the sync pool, waitress with 16 threads: the same load."""
    args = [
        sys.executable, "-m", "examples.wsgi_app",
        "--host", "127.0.0.1", "--port", "{port}", "--threads", "16",
        # Accept every client connection: past waitress' default limit of 100, the
        # connections httpx keeps alive would leave the others waiting unaccepted.
        "--connection-limit", str(CLIENTS + 50),
    ]  # fmt: skip
    with served(args, dsn, table) as app:
        checked = _check_run(app, dsn, table, "wsgi-example")
    _histograms_checked(checked)
